"""Getting a trained adapter out of LoRA Lab: a zip, a merged standalone model, a model card, a Hub push.

    zip_path = zip_adapter("runs/demo")                       # runs/demo/export/demo-adapter.zip
    merged = merge_adapter("runs/demo")                       # runs/demo/merged/ (plain transformers model)
    card = write_model_card("runs/demo", "runs/demo/adapter") # README.md + loss.png next to the weights
    url = push_folder("runs/demo/adapter", "me/demo-lora", token)

A 4-bit or 8-bit base cannot absorb the LoRA update (its weights are packed integers), so merging loads the
base again unquantized in the compute dtype and adds B·A into those weights. The merged model therefore equals
"adapter on the full-precision base", which differs from "adapter on the 4-bit base" by the quantization error.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from finetune.config import BUNDLED_DATASET, EMBEDDED_MODEL, ConfigError, RunConfig, load_config
from finetune.hardware import HardwareProfile, detect, resolve_compute_dtype
from finetune.metrics import read_metrics, read_status
from finetune.models import HUB_ID, from_hub_or_cache, load_tokenizer, require_hub, weight_dtype
from finetune.train import ADAPTER_DIR, CONFIG_COPY

MERGED_DIR, EXPORT_DIR = "merged", "export"
CARD_FILE, PLOT_FILE = "README.md", "loss.png"
# The embedded model is a GGUF copy of this Hub model; cards name the original so the Hub links it.
EMBEDDED_HUB_ID = {EMBEDDED_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}
Progress = Callable[[float, str], None]


class ExportError(RuntimeError):
    """An export that cannot be done; the message says why and what to do."""


def _no_progress(fraction: float, message: str) -> None:
    pass


# --- reading a run ------------------------------------------------------------------------------------------

def run_config(run_dir: str | Path) -> RunConfig:
    """The run's config: the copy saved with the adapter, else the run folder's config.yaml."""
    run_dir = Path(run_dir)
    for path in (run_dir / ADAPTER_DIR / CONFIG_COPY, run_dir / "config.yaml"):
        if path.is_file():
            try:
                return load_config(path)
            except ConfigError as error:
                raise ExportError(f"The run's config {path} is invalid: {error}") from None
    raise ExportError(f"{run_dir} has no config.yaml, so it is not a LoRA Lab run folder.")


def adapter_dir(run_dir: str | Path) -> Path:
    folder = Path(run_dir) / ADAPTER_DIR
    if not (folder / "adapter_config.json").is_file():
        raise ExportError(f"Run '{Path(run_dir).name}' has no saved adapter yet (it saves one when training "
                          "finishes or is stopped).")
    return folder


def adapter_format(folder: str | Path) -> dict[str, Any]:
    """What makes two adapters interchangeable: PEFT's files, its config, and every tensor's name/shape/dtype."""
    from safetensors import safe_open

    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as weights:
        tensors = {name: (tuple(weights.get_slice(name).get_shape()), weights.get_slice(name).get_dtype())
                   for name in weights.keys()}
    keys = ("peft_type", "task_type", "r", "lora_alpha", "target_modules", "bias", "base_model_name_or_path")
    summary = {k: config.get(k) for k in keys}
    if isinstance(summary["target_modules"], list):  # peft saves a set: its order changes between processes
        summary["target_modules"] = sorted(summary["target_modules"])
    return {"files": sorted(p.name for p in folder.iterdir() if p.is_file()), "config": summary,
            "tensors": tensors}


# --- zip ------------------------------------------------------------------------------------------------------

def zip_adapter(run_dir: str | Path) -> Path:
    """runs/<id>/export/<id>-adapter.zip: the adapter folder (with its model card) at the zip's top level, so
    unzipping into a folder gives something ``PeftModel.from_pretrained`` loads."""
    run_dir = Path(run_dir)
    source = adapter_dir(run_dir)
    write_model_card(run_dir, source)
    target = run_dir / EXPORT_DIR / f"{run_dir.name}-adapter.zip"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".zip.partial")  # a download never sees half a zip
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(source.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(source).as_posix())
    os.replace(partial, target)
    return target


# --- merge ----------------------------------------------------------------------------------------------------

def merge_dtype(cfg: RunConfig, profile: HardwareProfile) -> torch.dtype:
    """The dtype the base is reloaded in for merging: a quantized base comes back in its compute dtype."""
    if cfg.model.bits in (4, 8):
        return resolve_compute_dtype(cfg.model.compute_dtype, profile)
    return weight_dtype(cfg.model, profile)


def merge_adapter(run_dir: str | Path, output_dir: str | Path | None = None,
                  profile: HardwareProfile | None = None, progress: Progress = _no_progress) -> Path:
    """Fold the adapter into an unquantized copy of the base and save a standalone model (safetensors)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = Path(run_dir)
    source, cfg = adapter_dir(run_dir), run_config(run_dir)
    profile = profile or detect()
    output = Path(output_dir) if output_dir else run_dir / MERGED_DIR
    progress(0.05, f"Loading the base model {cfg.model.source} unquantized")
    # On the CPU on purpose: the GPU may be training or chatting, and merging is a one-off addition.
    base = from_hub_or_cache(AutoModelForCausalLM.from_pretrained, cfg.model.source,
                             dtype=merge_dtype(cfg, profile), trust_remote_code=cfg.model.trust_remote_code)
    progress(0.5, "Adding the LoRA update B·A into the base weights")
    merged = PeftModel.from_pretrained(base, source).merge_and_unload()
    progress(0.75, f"Saving the merged model to {output}")
    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    load_tokenizer(cfg.model).save_pretrained(staging)
    write_model_card(run_dir, staging, merged=True)
    shutil.rmtree(output, ignore_errors=True)
    os.replace(staging, output)
    progress(1.0, "Merged")
    return output


# --- model card -----------------------------------------------------------------------------------------------

@dataclass
class Losses:
    steps: list[int]
    train: list[float]
    eval_steps: list[int]
    eval: list[float]

    @property
    def final_train(self) -> float | None:
        return self.train[-1] if self.train else None

    @property
    def final_eval(self) -> float | None:
        return self.eval[-1] if self.eval else None


def losses(run_dir: str | Path) -> Losses:
    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]
    evals = [(r["step"], r["eval_loss"]) for r in rows if isinstance(r.get("eval_loss"), (int, float))]
    return Losses([s for s, _ in train], [v for _, v in train], [s for s, _ in evals], [v for _, v in evals])


def draw_loss_plot(curves: Losses, path: str | Path, size: tuple[int, int] = (640, 360)) -> Path | None:
    """A PNG of training and eval loss drawn with Pillow (matplotlib is not a dependency); None without data."""
    from PIL import Image, ImageDraw

    series = [(curves.steps, curves.train, (37, 99, 235)), (curves.eval_steps, curves.eval, (234, 88, 12))]
    points = [(s, v) for steps, values, _ in series for s, v in zip(steps, values)]
    if not points:
        return None
    width, height = size
    left, right, top, bottom = 60, 20, 30, 40
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    x_hi, y_hi = (x_hi if x_hi > x_lo else x_lo + 1), (y_hi if y_hi > y_lo else y_lo + 1e-3)

    def at(step: float, value: float) -> tuple[float, float]:
        return (left + (step - x_lo) / (x_hi - x_lo) * (width - left - right),
                height - bottom - (value - y_lo) / (y_hi - y_lo) * (height - top - bottom))

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, width - right, height - bottom], outline=(160, 160, 160))
    for value in (y_lo, (y_lo + y_hi) / 2, y_hi):
        _, y = at(x_lo, value)
        draw.text((4, y - 6), f"{value:.3g}", fill="black")
    draw.text((left, height - bottom + 6), f"step {x_lo}", fill="black")
    draw.text((width - right - 70, height - bottom + 6), f"step {x_hi}", fill="black")
    draw.text((left, 8), "train loss", fill=series[0][2])
    draw.text((left + 100, 8), "eval loss", fill=series[1][2])
    for steps, values, colour in series:
        line = [at(s, v) for s, v in zip(steps, values)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, y in line:
            draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=colour)
    path = Path(path)
    image.save(path, format="PNG")
    return path


def _hub_base(cfg: RunConfig) -> str | None:
    source = cfg.model.source
    if source in EMBEDDED_HUB_ID:
        return EMBEDDED_HUB_ID[source]
    return source if HUB_ID.match(source) and not Path(source).exists() else None


def _hub_dataset(cfg: RunConfig) -> str | None:
    source = cfg.data.source
    return source if HUB_ID.match(source) and not Path(source).exists() else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# What trained the adapter, by run stage and PEFT method (a DPO or IA3 run is not "SFT, LoRA").
STAGE_TRAINERS = {"sft": "SFTTrainer", "reward": "RewardTrainer", "dpo": "DPOTrainer", "kto": "KTOTrainer",
                  "grpo": "GRPOTrainer"}
METHOD_NAMES = {"lora": "LoRA", "dora": "DoRA", "rslora": "rsLoRA", "ia3": "IA3", "prompt_tuning": "prompt tuning",
                "full": "full fine-tuning"}


def model_card(run_dir: str | Path, merged: bool = False, plot_name: str | None = PLOT_FILE) -> str:
    """The model card (Hub README.md): metadata header, base model, dataset, hyperparameters, final losses."""
    run_dir = Path(run_dir)
    cfg, curves, status = run_config(run_dir), losses(run_dir), read_status(run_dir)
    base, dataset = _hub_base(cfg), _hub_dataset(cfg)
    meta: dict[str, Any] = {"library_name": "transformers" if merged else "peft",
                            "pipeline_tag": "text-generation",
                            "tags": [cfg.lora.method, "qlora" if cfg.model.bits == 4 else "peft", "trl", cfg.stage,
                                     "lora-lab"]}
    if base:
        meta["base_model"] = base
    if dataset:
        meta["datasets"] = [dataset]
    dataset_text = ("the course Q&A bundled with LoRA Lab" if cfg.data.source == BUNDLED_DATASET
                    else f"`{cfg.data.source}`")
    t, lora = cfg.training, cfg.lora
    method = METHOD_NAMES.get(lora.method, lora.method)
    kind = f"Merged model ({method} adapter folded into the base weights)" if merged else f"{method} adapter"
    rows = [("base model", f"`{base or cfg.model.source}`"),
            ("base precision during training", f"{cfg.model.bits}-bit"
             + (f" {cfg.model.quant_type}, double quant {cfg.model.double_quant}" if cfg.model.bits == 4 else "")),
            ("dataset", f"{dataset_text} (split `{cfg.data.split}`, format `{cfg.data.format}`)"),
            *([("LoRA rank / alpha / dropout", f"{lora.rank} / {lora.alpha:g} / {lora.dropout:g}")]
              if lora.method in ("lora", "dora", "rslora") else []),
            ("target modules", f"`{lora.target_modules}`"),
            ("learning rate / scheduler / warmup", f"{t.learning_rate:g} / {t.lr_scheduler} / {t.warmup_ratio:g}"),
            ("batch size x accumulation", f"{t.batch_size} x {t.gradient_accumulation}"),
            ("steps", f"{status.get('step', curves.steps[-1] if curves.steps else 0)}"
             + (f" (max_steps {t.max_steps})" if t.max_steps > 0 else f" ({t.num_epochs:g} epochs)")),
            ("optimizer", t.optimizer), ("max sequence length", str(cfg.data.max_seq_length)),
            ("seed", str(t.seed)),
            ("final training loss", _fmt(curves.final_train)), ("final eval loss", _fmt(curves.final_eval))]
    usage = ('model = AutoModelForCausalLM.from_pretrained("REPO_ID")' if merged else
             f'base = AutoModelForCausalLM.from_pretrained("{base or cfg.model.source}")\n'
             f'model = PeftModel.from_pretrained(base, "REPO_ID")')
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {run_dir.name}", "", f"{kind} trained with LoRA Lab "
             f"(TRL `{STAGE_TRAINERS.get(cfg.stage, cfg.stage)}`, PEFT {method}"
             f"{', 4-bit base' if cfg.model.bits == 4 else ''}).", "",
             "## Training", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    if plot_name and curves.steps:
        lines += ["", "## Loss", "", f"![training and eval loss]({plot_name})"]
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM"
              + ("" if merged else "\nfrom peft import PeftModel"), usage, "```", ""]
    return "\n".join(lines)


def write_model_card(run_dir: str | Path, folder: str | Path, merged: bool = False) -> Path:
    """README.md (and loss.png when there are losses) into ``folder``; returns the card's path."""
    folder = Path(folder)
    plot = draw_loss_plot(losses(run_dir), folder / PLOT_FILE)
    card = folder / CARD_FILE
    card.write_text(model_card(run_dir, merged=merged, plot_name=PLOT_FILE if plot else None), encoding="utf-8")
    return card


# --- push to the Hub ------------------------------------------------------------------------------------------

def check_repo_id(repo_id: str) -> str:
    repo_id = (repo_id or "").strip()
    if not HUB_ID.match(repo_id):
        raise ExportError(f"Hub repo id must look like 'user/name' (letters, digits, '-', '_', '.'), "
                          f"got {repo_id!r}.")
    return repo_id


def push_folder(folder: str | Path, repo_id: str, token: str | None, private: bool = True,
                api: Any = None, progress: Progress = _no_progress) -> str:
    """Create (or reuse) the model repo and upload the folder; returns the repo URL. ``api`` is an HfApi."""
    folder, repo_id = Path(folder), check_repo_id(repo_id)
    if not token or not token.strip():
        raise ExportError("A Hugging Face write token is needed to push (huggingface.co/settings/tokens).")
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        raise ExportError(f"{folder} holds neither an adapter nor a model.")
    if api is None:
        require_hub(repo_id, "model repo")
        from huggingface_hub import HfApi

        api = HfApi()
    progress(0.1, f"Creating {repo_id}")
    url = api.create_repo(repo_id, token=token.strip(), private=private, repo_type="model", exist_ok=True)
    progress(0.3, f"Uploading {folder.name}")
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", token=token.strip(),
                      commit_message="Upload from LoRA Lab", ignore_patterns=["*.partial", "__pycache__/*"])
    progress(1.0, "Pushed")
    return str(url)
