"""Library messages that say nothing a user of LoRA Lab can act on, kept out of the app log and the training log.
Each is named with why; call ``quiet_known_noise()`` first thing in an entry point (app.py, finetune.train)."""

from __future__ import annotations

import logging
import os
import warnings

KNOWN_WARNINGS = (
    # bitsandbytes 0.49 warns whenever peft reads a deprecated attribute of an int8 layer, i.e. on every forward
    # pass; other libraries reset Python's "once per place" registry, so one Quantization comparison wrote ~5,700
    # copies (700 KB) into the app log.
    (FutureWarning, r"MatmulLtState\.\w+ is deprecated"),
    # transformers 5 renamed it; peft 0.21 still reads the old name at every model wrap. Nothing to change here.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # transformers 5 renamed the training argument; TRL 1.16's configs still pass the old name, and the warning
    # reached the Train tab's log view on every run.
    (FutureWarning, r"`gradient_checkpointing` is deprecated"),
)
# At import, bitsandbytes tries to fetch an optional CPU kernel from the Hub through the `kernels` package and
# warns when it cannot; without it bitsandbytes uses its own CPU code, which is what this app measures and uses.
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops",)
# Worth reading once, not per layer and batch: "MatMul8bitLt: inputs will be cast from torch.float32 to float16"
# came 4,200 times from one int8 measurement of the embedded model (every Linear, every forward pass).
ONCE_LOGGERS = ("bitsandbytes.autograd._functions",)


class OncePerMessage(logging.Filter):
    """Lets each distinct message template of a logger through once per process."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def quiet_known_noise() -> None:
    # Terminal progress bars (transformers' "Loading weights", datasets' maps, Hub downloads) redraw with carriage
    # returns: in a log file each becomes one line of many kilobytes. The app and the Train tab show their own
    # progress. Read by huggingface_hub when the libraries load; an operator's own setting wins.
    for setting in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(setting, "1")
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in ONCE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OncePerMessage) for f in logger.filters):  # a second call adds no second filter
            logger.addFilter(OncePerMessage())
