"""What building a run's GGUF will take, before anything is built: the checks a run must pass
(``checked_run``), where its files go and whether an earlier build can be reused (``gguf_path``,
``cached_export``), the sizes of the merged model and of the GGUF (counted from the config and the tokenizer,
without loading weights), and whether the disks they land on have room (``disk_plan``).

    print(disk_plan("runs/demo", "q4_0").summary())    # sizes, folders and free disk; writes nothing
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finetune.core.hardware import detect
from finetune.core.models import load_tokenizer
from finetune.core.paths import for_visitors
from finetune.core.run_folder import ADAPTER_WEIGHTS, EXPORT_DIR, GGUF_DIR, MERGED_DIR, MODEL_CONFIG
from finetune.core.storage import free_bytes
from finetune.services.export import ExportError, adapter_dir, check_merge_target, merge_dtype, merged_into, run_config
from finetune.services.gguf_convert import (GgufExport, TensorPlan, add_model_metadata, add_tokenizer_metadata,
                                            base_model_config, check_architecture, check_type, modelfile_name,
                                            plan_shapes, pre_tokenizer_name, tensor_nbytes)


# --- the run and its files ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunToExport:
    """A run that passed every check a GGUF export can make before heavy work."""
    cfg: Any            # the run's RunConfig
    config: Any         # the base model's transformers config
    tokenizer: Any
    out_type: str
    into: str


def checked_run(run_dir: str | Path, out_type: str, into: str = "trained") -> RunToExport:
    """Refuses, before any merge or download of weights, what cannot become a GGUF: an unknown type or merge
    target, a run without an adapter, a prompt-tuning or reward run, another architecture, an unknown tokenizer."""
    run_dir = Path(run_dir)
    out_type, into = check_type(out_type), check_merge_target(into)
    cfg = run_config(run_dir)
    adapter_dir(run_dir)
    if cfg.lora.method == "prompt_tuning":
        raise ExportError("A prompt-tuning run trains virtual prompt tokens, not weights, so there is nothing to "
                          "merge into a GGUF; export a LoRA, DoRA, rsLoRA or IA3 run.")
    if cfg.stage == "reward":
        raise ExportError("This run trained a reward model (it scores answers, it does not write them); export "
                          "an SFT, DPO, KTO or GRPO run as GGUF instead.")
    config = base_model_config(cfg.model.source)
    check_architecture(config)
    tokenizer = load_tokenizer(cfg.model)
    pre_tokenizer_name(tokenizer)
    return RunToExport(cfg, config, tokenizer, out_type, into)


def metadata_name(run_dir: Path, out_type: str) -> str:
    """The name written into the file's metadata."""
    return f"{run_dir.name} ({out_type})"


def gguf_path(run_dir: str | Path, out_type: str) -> Path:
    run_dir = Path(run_dir)
    return run_dir / EXPORT_DIR / GGUF_DIR / f"{run_dir.name}-{check_type(out_type)}.gguf"


def adapter_fingerprint(run_dir: Path, into: str) -> str:
    digest = hashlib.sha256(into.encode())
    with open(adapter_dir(run_dir) / ADAPTER_WEIGHTS, "rb") as weights:
        for chunk in iter(lambda: weights.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def info_path(path: Path) -> Path:
    return path.with_suffix(".json")


def cached_export(run_dir: Path, out_type: str, into: str) -> GgufExport | None:
    path = gguf_path(run_dir, out_type)
    try:
        info = json.loads(info_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not path.is_file() or info.get("fingerprint") != adapter_fingerprint(run_dir, into):
        return None
    return GgufExport(path, path.parent / modelfile_name(path.name), out_type, path.stat().st_size, info["weights"],
                      info["tensor_types"], info.get("kept", {}), cached=True)


def merged_reusable(run_dir: Path, into: str) -> bool:
    """run/merged was merged into the same target after the adapter was last saved."""
    folder = run_dir / MERGED_DIR
    try:
        adapter_time = (adapter_dir(run_dir) / ADAPTER_WEIGHTS).stat().st_mtime
        return merged_into(folder) == into and (folder / MODEL_CONFIG).stat().st_mtime >= adapter_time
    except OSError:
        return False


# --- sizes and disk space, before building ------------------------------------------------------------------------

DISK_MARGIN = 16 << 20  # beside the big files: the Modelfile, the info file, filesystem overhead
_SCALAR_BYTES = {"UINT8": 1, "INT8": 1, "BOOL": 1, "UINT16": 2, "INT16": 2, "UINT32": 4, "INT32": 4, "FLOAT32": 4,
                 "UINT64": 8, "INT64": 8, "FLOAT64": 8}
_GGUF_HEADER_BYTES = 24  # magic, version, tensor count, key-value count


def parameter_shapes(config: Any) -> list[tuple[str, tuple[int, ...]]]:
    """Every weight the merged model saves, by name and shape, from its config alone: the model is built on
    PyTorch's meta device, which holds no memory. Tied weights are listed once, as safetensors saves them."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [(name, tuple(weight.shape)) for name, weight in model.named_parameters()]


def _value_bytes(value: Any, vtype: Any, sub_type: Any = None) -> int:
    """Bytes of one metadata value as GGUF stores it (the layout of the GGUF specification)."""
    from gguf import GGUFValueType

    if vtype == GGUFValueType.STRING:
        return 8 + len(value.encode("utf-8") if isinstance(value, str) else value)
    if vtype == GGUFValueType.ARRAY:
        item = sub_type or (GGUFValueType.UINT8 if isinstance(value, bytes) else GGUFValueType.get_type(value[0]))
        return 4 + 8 + sum(_value_bytes(v, item) for v in value)
    return _SCALAR_BYTES[GGUFValueType(vtype).name]


def _padded(size: int) -> int:
    from gguf import GGUF_DEFAULT_ALIGNMENT

    return -(-size // GGUF_DEFAULT_ALIGNMENT) * GGUF_DEFAULT_ALIGNMENT


def gguf_file_bytes(config: Any, tokenizer: Any, out_type: str, name: str, plans: list[TensorPlan]) -> int:
    """The size of the GGUF ``convert_folder`` writes, counted before writing: the metadata that
    ``add_model_metadata`` and ``add_tokenizer_metadata`` put in (measured on a writer that never opens a file),
    each tensor's description, and each tensor's blocks padded to the file's alignment."""
    from gguf import GGUFWriter

    writer = GGUFWriter(None, "llama")
    add_model_metadata(writer, config, out_type, name)
    add_tokenizer_metadata(writer, tokenizer, config.vocab_size)
    metadata = sum(8 + len(key.encode("utf-8")) + 4 + _value_bytes(value.value, value.type, value.sub_type)
                   for key, value in writer.kv_data[0].items())
    descriptions = sum(8 + len(p.name.encode("utf-8")) + 4 + 8 * len(p.shape) + 4 + 8 for p in plans)
    return (_padded(_GGUF_HEADER_BYTES + metadata + descriptions)
            + sum(_padded(tensor_nbytes(p.shape, p.qtype)) for p in plans))


def merged_model_bytes(shapes: list[tuple[str, tuple[int, ...]]], dtype: Any, tokenizer: Any) -> int:
    """About the size of the merged model folder: the weights at the merge dtype, safetensors' header, the
    tokenizer file (the tokenizer's own JSON, as saved) and the small files (config, card, loss plot)."""
    import torch

    weights = sum(int(np.prod(shape)) for _, shape in shapes) * torch.empty((), dtype=dtype).element_size()
    header = 8 + sum(64 + len(name) + 12 * len(shape) for name, shape in shapes)
    return weights + header + len(tokenizer.backend_tokenizer.to_str(pretty=True).encode("utf-8")) + (64 << 10)


@dataclass(frozen=True)
class Landing:
    """One large file (or folder) a build writes, where it lands and the free space on that disk."""
    what: str
    folder: Path
    size_bytes: int
    free_bytes: int
    disk: int               # the folder's device id: landings on one disk share its free space
    not_written: str = ""   # why nothing new is written here ("" when it is)


def _existing(folder: Path) -> Path:
    """The folder, or its nearest parent that exists (what disk_usage and stat can look at before building)."""
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _landing(what: str, folder: Path, size: int, not_written: str = "") -> Landing:
    existing = _existing(folder)
    return Landing(what, folder, size, free_bytes(existing), existing.stat().st_dev, not_written)


def size_text(size: float) -> str:
    return f"{size / 2**30:.1f} GB" if size >= 2**30 else f"{size / 2**20:.1f} MB"


@dataclass(frozen=True)
class DiskPlan:
    """What building a run's GGUF writes, how big, where, and whether the disks there have room."""
    run: str
    out_type: str
    landings: tuple[Landing, ...]

    def shortages(self) -> list[str]:
        """One line per disk that lacks room for the new files landing on it (reused ones need none)."""
        lines = []
        for disk in dict.fromkeys(landing.disk for landing in self.landings):
            new = [x for x in self.landings if x.disk == disk and not x.not_written]
            needed = sum(x.size_bytes for x in new)
            free = next(x.free_bytes for x in self.landings if x.disk == disk)
            if new and free < needed + DISK_MARGIN:
                parts = " and ".join(f"the {x.what} (about {size_text(x.size_bytes)}, into "
                                     f"{for_visitors(str(x.folder))})" for x in new)
                lines.append(f"{parts} need about {size_text(needed + DISK_MARGIN)} with room to spare, and that disk "
                             f"has {size_text(free)} free")
        return lines

    def summary(self) -> str:
        lines = [f"Building the {self.out_type} GGUF of run '{self.run}' writes:"]
        for x in self.landings:
            state = x.not_written or f"disk has {size_text(x.free_bytes)} free"
            lines.append(f"- {x.what}: about {size_text(x.size_bytes)} into `{for_visitors(str(x.folder))}` ({state})")
        short = self.shortages()
        lines.append("")  # the verdict on a line of its own, not joined to the last item by Markdown
        if short:
            lines.append("Not enough disk space: " + "; ".join(short) + ".")
        elif all(x.not_written for x in self.landings):
            lines.append("Nothing new is written: every file is already there.")
        else:
            lines.append("There is room for it.")
        return "\n".join(lines)

    def check(self) -> None:
        short = self.shortages()
        if short:
            raise ExportError(f"Not enough disk space to build the {self.out_type} GGUF of run '{self.run}': "
                              + "; ".join(short) + ". Free some space (old runs' merged/ and export/ folders "
                              "are the largest) and build again.")


def disk_plan(run_dir: str | Path, out_type: str = "q8_0", into: str = "trained",
              downloads: tuple[str | Path, ...] = (), downloaded: bool = False) -> DiskPlan:
    """Before building: the merged model's and the GGUF's sizes (estimated from the config and tokenizer, or
    measured where an earlier build left them), the folders they land in, and the free space there.
    ``downloads`` names folders where a copy of the GGUF and its Modelfile lands for download (the Export tab
    copies them once, into gradio's cache); ``downloaded``: copies of the built file are already there."""
    return plan_checked_run(Path(run_dir), checked_run(run_dir, out_type, into), downloads, downloaded)


def plan_checked_run(run_dir: Path, run: "RunToExport", downloads: tuple[str | Path, ...] = (),
               downloaded: bool = False) -> DiskPlan:
    shapes = parameter_shapes(run.config)
    built = cached_export(run_dir, run.out_type, run.into)
    gguf_bytes = built.size_bytes if built else gguf_file_bytes(
        run.config, run.tokenizer, run.out_type, metadata_name(run_dir, run.out_type),
        plan_shapes(shapes, run.config, run.out_type))
    merged_there = merged_reusable(run_dir, run.into)
    merged_bytes = (_folder_bytes(run_dir / MERGED_DIR) if merged_there
                    else merged_model_bytes(shapes, merge_dtype(run.cfg, detect()), run.tokenizer))
    merged_note = ("not needed: the GGUF was built before" if built else
                   "already there, reused" if merged_there else "")
    landings = [_landing("merged model", run_dir / MERGED_DIR, merged_bytes, merged_note),
                _landing(f"{run.out_type} GGUF", gguf_path(run_dir, run.out_type).parent, gguf_bytes,
                         "already built, reused" if built else "")]
    copied = "already there, reused" if built and downloaded else ""
    landings += [_landing("download copy", Path(folder), gguf_bytes + (4 << 10), copied) for folder in downloads]
    return DiskPlan(run_dir.name, run.out_type, tuple(landings))


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
