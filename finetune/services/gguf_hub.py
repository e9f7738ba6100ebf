"""A built GGUF to the Hugging Face Hub: the file, its Ollama Modelfile and a model card, in one commit with the
visitor's own token. A push sends what was built and never builds (gguf_export.py builds).

    HF_TOKEN=... python -m finetune.services.gguf_export runs/demo --push me/demo-gguf   # the CLI's way
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from finetune.core.config import BUNDLED_DATASET
from finetune.core.models import require_hub_to_push
from finetune.core.paths import display_name
from finetune.core.run_status import read_status
from finetune.services.export import (CARD_FILE, MERGE_TARGETS, METHOD_NAMES, STAGE_TRAINERS, ExportError, Progress,
                                      check_repo_id, hub_base, losses, no_progress, run_config)
from finetune.services.gguf_convert import GGUF_TYPES, GgufExport, check_type, ollama_name
from finetune.services.gguf_plan import cached_export, gguf_path, info_path, size_text


def built_gguf(run_dir: str | Path, out_type: str) -> tuple[GgufExport, str]:
    """The run's finished GGUF of ``out_type`` and the merge target it was built with; refuses one never built,
    left unfinished, or built from an earlier adapter of the run."""
    run_dir, out_type = Path(run_dir), check_type(out_type)
    path = gguf_path(run_dir, out_type)
    if not path.is_file():
        raise ExportError(f"Run '{run_dir.name}' has no {out_type} GGUF yet: build it first ('Build GGUF + "
                          "Modelfile'), then push. A push sends the built file and never builds one.")
    try:
        into = json.loads(info_path(path).read_text(encoding="utf-8")).get("into", "trained")
    except (OSError, ValueError):
        into = "trained"
    result = cached_export(run_dir, out_type, into)
    if result is None:
        raise ExportError(f"The {out_type} GGUF of run '{run_dir.name}' was not built from the run's current "
                          "adapter (or its build did not finish): build it again, then push.")
    return result, into


def _kept_text(result: GgufExport) -> str:
    reasons = sorted(set(result.kept.values()))
    if not reasons:
        return "none"
    return "; ".join(f"{sum(1 for why in result.kept.values() if why == reason)} at "
                     f"{next(result.tensor_types[n] for n, w in result.kept.items() if w == reason)}: {reason}"
                     for reason in reasons)


def _dataset_text(cfg: Any) -> str:
    return ("the course Q&A bundled with LoRA Lab" if cfg.data.source == BUNDLED_DATASET
            else f"`{display_name(cfg.data.source)}`")


def gguf_model_card(run_dir: str | Path, result: GgufExport, into: str, repo_id: str) -> str:
    """README.md for a Hub repo holding the GGUF: the file's type, size and bits per weight, the base model, how
    the adapter was merged and trained, and how to run it with llama.cpp and Ollama. Sources are named as pages
    show them (``display_name``), never by a server path."""
    run_dir = Path(run_dir)
    cfg, curves, status = run_config(run_dir), losses(run_dir), read_status(run_dir)
    base = hub_base(cfg)
    method = METHOD_NAMES.get(cfg.lora.method, cfg.lora.method)
    meta: dict[str, Any] = {"pipeline_tag": "text-generation",
                            "tags": ["gguf", "llama.cpp", "ollama", result.out_type, cfg.lora.method, cfg.stage,
                                     "lora-lab"]}
    if base:
        meta["base_model"] = base
    final = " / ".join(f"{v:.4f}" if v is not None else "n/a" for v in (curves.final_train, curves.final_eval))
    rows = [("file", f"`{result.path.name}`"), ("type", f"`{result.out_type}`: {GGUF_TYPES[result.out_type]}"),
            ("file size", f"{size_text(result.size_bytes)} ({result.size_bytes:,} bytes)"),
            ("bits per weight", f"{result.bits_per_weight:.2f} (file bytes x 8 / {result.weights:,} weights)"),
            ("tensors kept at other types", _kept_text(result)),
            ("base model", f"`{base or display_name(cfg.model.source)}`"),
            ("merge", f"adapter folded {MERGE_TARGETS[into]}"),
            ("training", f"{method} adapter, TRL `{STAGE_TRAINERS.get(cfg.stage, cfg.stage)}`, "
                         f"{status.get('step', curves.steps[-1] if curves.steps else 0)} steps on "
                         f"{_dataset_text(cfg)}"),
            ("final training / eval loss", final)]
    name, modelfile = result.path.name, result.modelfile.name
    ollama = ollama_name(name)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {run_dir.name} ({result.out_type} GGUF)", "",
             f"A {method} fine-tune of `{base or display_name(cfg.model.source)}` made with LoRA Lab, merged into "
             "its base and written as one GGUF file for llama.cpp, Ollama and LM Studio. The file carries the "
             "tokenizer and the chat template.", "",
             "| | |", "| --- | --- |", *[f"| {key} | {value} |" for key, value in rows], "",
             "## Run it", "", "llama.cpp (for a private repo, set `HF_TOKEN` first):", "", "```",
             f"llama-cli --hf-repo {repo_id} --hf-file {name} -cnv", "```", "",
             "Ollama, with the Modelfile beside the file (the chat format, stop tokens and the sampling of LoRA "
             "Lab's Chat tab):", "", "```",
             f"hf download {repo_id} {name} {modelfile} --local-dir {ollama}",
             f"cd {ollama} && ollama create {ollama} -f {modelfile}", f"ollama run {ollama}", "```", ""]
    return "\n".join(lines)


def push_gguf(run_dir: str | Path, out_type: str, repo_id: str, token: str | None, private: bool = True,
              api: Any = None, progress: Progress = no_progress) -> str:
    """Push the run's built GGUF, its Modelfile and a model card (README.md) to a Hub model repo in one commit,
    with the visitor's own token (used for this call only, as ``push_folder`` does); returns the repo URL.
    ``api`` is an HfApi. A type that was not built is refused rather than built here: building merges the model
    (minutes, a float model in memory) and the visitor should see the file's size before sending it."""
    run_dir, out_type, repo_id = Path(run_dir), check_type(out_type), check_repo_id(repo_id)
    if not token or not token.strip():
        raise ExportError("A Hugging Face write token is needed to push (huggingface.co/settings/tokens).")
    result, into = built_gguf(run_dir, out_type)
    if api is None:
        require_hub_to_push(repo_id)
        from huggingface_hub import HfApi

        api = HfApi()
    from huggingface_hub import CommitOperationAdd

    card = gguf_model_card(run_dir, result, into, repo_id)
    progress(0.05, f"Creating {repo_id}")
    url = api.create_repo(repo_id, token=token.strip(), private=private, repo_type="model", exist_ok=True)
    progress(0.1, f"Uploading {result.path.name} ({size_text(result.size_bytes)})")
    operations = [CommitOperationAdd(path_in_repo=result.path.name, path_or_fileobj=str(result.path)),
                  CommitOperationAdd(path_in_repo=result.modelfile.name, path_or_fileobj=str(result.modelfile)),
                  CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card.encode("utf-8"))]
    api.create_commit(repo_id, operations=operations, commit_message=f"Upload {result.path.name} from LoRA Lab",
                      token=token.strip(), repo_type="model")
    progress(1.0, "Pushed")
    return str(url)
