"""Chat fairness: how long a one-word question waits while another visitor's long answer runs.

    python bench/chat_fairness.py                    # the embedded model, 32-bit, on this machine's CPU

Visitor A sends a prompt at the Space's length cap (8,000 characters) and asks for 128 new tokens, always
written in full (min_new_tokens; the Space allows 512, which on a busy 2-core CPU outlasted the engine's 600 s
wait for a turn in the "before" engine); visitor B sends "hi" (the Chat tab's CPU default of 64 new tokens)
as soon as A's first token streams. Both go through ``ChatEngine.stream_pair`` with a LoRA adapter (r=16 on all
linear layers, random weights), as the Chat tab does. "Before" is the engine with slices that never end (one
answer at a time, as the engine was before issue 32); "after" is the engine as the app runs it (slices of 16
tokens or 1 s while another request waits). Reported: B's wait for its first token and for its whole answer,
A's whole answer, and A's prompt pass (the part no slice can interrupt). Greedy, no time limit. A measurement, not
a test.
"""

from __future__ import annotations

import math
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.services.chat import SLICE_SECONDS, SLICE_TOKENS, ChatEngine, SamplingSettings  # noqa: E402
from finetune.core.config import ModelConfig  # noqa: E402
from finetune.core.models import embedded_model_dir  # noqa: E402

LONG_PROMPT_CHARS = 8000
LONG_TOKENS = 128
SHORT_TOKENS = 64


class FullLength(SamplingSettings):
    """Greedy answers of exactly max_new_tokens tokens: no early end-of-answer shortens the long one."""

    def generation_config(self, tokenizer, eos):  # type: ignore[no-untyped-def]
        config = super().generation_config(tokenizer, eos)
        config.min_new_tokens = self.max_new_tokens
        return config


def random_adapter(cfg: ModelConfig) -> Path:
    from peft import LoraConfig, get_peft_model

    from finetune.core.models import load_model

    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False,
                      task_type="CAUSAL_LM")
    folder = Path(tempfile.mkdtemp(prefix="bench-fairness-"))
    get_peft_model(load_model(cfg), lora).save_pretrained(folder)
    return folder


def long_prompt() -> str:
    sentence = "Summarise the following notes on low-rank adaptation and quantization, point by point. "
    return (sentence * (LONG_PROMPT_CHARS // len(sentence) + 1))[:LONG_PROMPT_CHARS - 1]


def race(engine: ChatEngine, cfg: ModelConfig, adapter: Path) -> dict[str, float]:
    """A's long answer, then B's 'hi' once A's first token streams; seconds measured from B's send."""
    times: dict[str, float] = {}
    first_token = threading.Event()

    def visitor_a() -> None:
        sent = time.monotonic()
        for _ in engine.stream_pair(long_prompt(), [], [], cfg, "bench", adapter, FullLength(LONG_TOKENS, 0.0)):
            if not first_token.is_set():
                times["A prompt pass"] = time.monotonic() - sent
                first_token.set()
        times["A whole answer"] = time.monotonic() - sent

    thread = threading.Thread(target=visitor_a)
    thread.start()
    first_token.wait()
    sent = time.monotonic()
    for _ in engine.stream_pair("hi", [], [], cfg, "bench", adapter, SamplingSettings(SHORT_TOKENS, 0.0)):
        times.setdefault("B first token", time.monotonic() - sent)
    times["B whole answer"] = time.monotonic() - sent
    thread.join()
    return times


def main() -> None:
    cfg = ModelConfig(source=str(embedded_model_dir()), bits=32)
    adapter = random_adapter(cfg)
    rows = {}
    for name, slice_tokens in (("before (one answer at a time)", 10**9),
                               (f"after (slices of {SLICE_TOKENS} tokens or {SLICE_SECONDS:g} s)", SLICE_TOKENS)):
        engine = ChatEngine(max_seconds=0, slice_tokens=slice_tokens,
                            slice_seconds=SLICE_SECONDS if slice_tokens == SLICE_TOKENS else math.inf)
        list(engine.stream_pair("warm up", [], [], cfg, "bench", adapter, SamplingSettings(4, 0.0)))
        rows[name] = race(engine, cfg, adapter)
        print(name, {key: round(value, 1) for key, value in rows[name].items()}, flush=True)
    keys = ["B first token", "B whole answer", "A whole answer", "A prompt pass"]
    print("| engine | " + " | ".join(keys) + " |")
    print("| --- |" + " --- |" * len(keys))
    for name, times in rows.items():
        print(f"| {name} | " + " | ".join(f"{times[k]:.1f} s" for k in keys) + " |")


if __name__ == "__main__":
    main()
