"""Getting a trained adapter out of LoRA Lab: a zip, a merged standalone model, a model card, a Hub push.

    zip_path = zip_adapter("runs/demo")                       # runs/demo/export/demo-adapter.zip
    merged = merge_adapter("runs/demo")                       # runs/demo/merged/ (plain transformers model)
    card = write_model_card("runs/demo", "runs/demo/adapter") # README.md + loss.png next to the weights
    url = push_folder("runs/demo/adapter", "me/demo-lora", token)

A 4-bit or 8-bit base cannot absorb the LoRA update (its weights are packed integers), so merging needs a
float copy of the base to add B·A into. Two choices (``MERGE_TARGETS``):

- ``trained`` (default): the base quantized exactly as in training, then dequantized. These are the weights the
  adapter was trained against and the Chat tab answers with, so the merged model answers as the chat did.
- ``original``: the base reloaded at original precision. Slightly different from what was trained and chatted
  with (by the quantization error), which the adapter never saw; ``merge_report`` shows what that costs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from finetune.core.config import BUNDLED_DATASET, EMBEDDED_MODEL, ConfigError, RunConfig, load_config
from finetune.core.data import prepare
from finetune.core.hardware import HardwareProfile, detect, profile_for, resolve_compute_dtype
from finetune.core.models import (HUB_ID, from_hub_or_cache, load_model, load_tokenizer, require_hub_to_push,
                                  save_tokenizer, weight_dtype)
from finetune.core.paths import display_name
from finetune.core.run_folder import (ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS, CONFIG_COPY, EXPORT_DIR, MERGE_INFO,
                                      MERGED_DIR, MODEL_CONFIG, PARTIAL_SUFFIX, RUN_CONFIG, adapter_config, has_adapter)
from finetune.core.run_status import read_metrics, read_status
from finetune.core.storage import disk_full_message, is_disk_full
from finetune.services.evaluate import dataset_loss

# The trainer's pickled arguments: server paths inside, and a pickle is nothing to hand a stranger to load.
NOT_SHARED = ("training_args.bin",)
SOURCE_FIELDS = (("model", "source"), ("data", "source"), ("preference", "start_adapter"),
                 ("preference", "reward_model"))
MERGE_TARGETS = {"trained": "into the base dequantized from the bits it trained at, so it answers as in Chat",
                 "original": "into the original-precision base, not the weights the adapter trained against"}
CARD_FILE, PLOT_FILE = "README.md", "loss.png"  # the model card and its loss plot, in a shared folder
# The embedded model is a GGUF copy of this Hub model; cards name the original so the Hub links it.
EMBEDDED_HUB_ID = {EMBEDDED_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}
Progress = Callable[[float, str], None]


class ExportError(RuntimeError):
    """An export that cannot be done; the message says why and what to do."""


def no_progress(fraction: float, message: str) -> None:
    pass


# --- reading a run ------------------------------------------------------------------------------------------

def run_config(run_dir: str | Path) -> RunConfig:
    """The run's config: the copy saved with the adapter, else the run folder's config.yaml."""
    run_dir = Path(run_dir)
    for path in (run_dir / ADAPTER_DIR / CONFIG_COPY, run_dir / RUN_CONFIG):
        if path.is_file():
            try:
                return load_config(path)
            except ConfigError as error:
                raise ExportError(f"The run's config {path} is invalid: {error}") from None
    raise ExportError(f"{run_dir} has no config.yaml, so it is not a LoRA Lab run folder.")


def adapter_dir(run_dir: str | Path) -> Path:
    folder = Path(run_dir) / ADAPTER_DIR
    if not has_adapter(folder):
        raise ExportError(f"Run '{Path(run_dir).name}' has no saved adapter yet (it saves one when training "
                          "finishes or is stopped).")
    return folder


def adapter_format(folder: str | Path) -> dict[str, Any]:
    """What makes two adapters interchangeable: PEFT's files, its config, and every tensor's name/shape/dtype."""
    from safetensors import safe_open

    folder = Path(folder)
    config = adapter_config(folder)
    with safe_open(str(folder / ADAPTER_WEIGHTS), "pt") as weights:
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
    partial = target.with_suffix(".zip" + PARTIAL_SUFFIX)  # a download never sees half a zip
    try:
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(source.rglob("*")):
                if path.is_file() and path.name not in NOT_SHARED:
                    name = path.relative_to(source).as_posix()
                    shared = shareable_text(run_dir, path)
                    archive.writestr(name, shared) if shared is not None else archive.write(path, name)
        os.replace(partial, target)
    except OSError as error:
        partial.unlink(missing_ok=True)
        if is_disk_full(error):
            raise ExportError(disk_full_message("zipping the adapter (the partial zip was removed)")) from None
        raise
    return target


def shareable_text(run_dir: str | Path, path: Path) -> str | None:
    """The text a download or Hub push carries instead of ``path`` when the file names sources, else None.

    Why: the config copy and peft's adapter_config.json hold the sources as the server saw them (an upload's
    server path with the visitor's file name, the embedded model's cache folder). Anyone may download any run's
    zip on a shared Space, so the copies that leave the server name sources as pages show them."""
    if path.name == CONFIG_COPY:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for section, key in SOURCE_FIELDS:
            if isinstance(raw.get(section), dict) and raw[section].get(key):
                raw[section][key] = display_name(str(raw[section][key]))
        return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
    if path.name == ADAPTER_CONFIG:
        config = json.loads(path.read_text(encoding="utf-8"))
        if config.get("base_model_name_or_path"):
            config["base_model_name_or_path"] = hub_base(run_config(run_dir)) or display_name(
                str(config["base_model_name_or_path"]))
        return json.dumps(config, indent=2)
    return None


def shareable_copy(run_dir: str | Path, folder: str | Path) -> Path:
    """A temporary copy of ``folder`` whose files name no server path (see shareable_text), for a Hub push."""
    folder = Path(folder)
    copy = Path(tempfile.mkdtemp(prefix="lora-lab-share-")) / folder.name
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("*" + PARTIAL_SUFFIX, "__pycache__", *NOT_SHARED))
    for path in copy.rglob("*"):
        shared = shareable_text(run_dir, path) if path.is_file() else None
        if shared is not None:
            path.write_text(shared, encoding="utf-8")
    return copy


# --- merge ----------------------------------------------------------------------------------------------------

def merge_dtype(cfg: RunConfig, profile: HardwareProfile) -> torch.dtype:
    """The dtype the base is reloaded in for merging: a quantized base comes back in its compute dtype."""
    if cfg.model.bits in (4, 8):
        return resolve_compute_dtype(cfg.model.compute_dtype, profile)
    return weight_dtype(cfg.model, profile)


def check_merge_target(into: str) -> str:
    if into not in MERGE_TARGETS:
        raise ExportError(f"Merge into {' or '.join(repr(t) for t in MERGE_TARGETS)}, got {into!r}.")
    return into


def merge_base(cfg: RunConfig, profile: HardwareProfile, into: str = "trained") -> Any:
    """The float base the update is added to, on the CPU (the GPU may be training or chatting, and merging is a
    one-off addition). ``trained``: quantized as in training, then dequantized, before any forward pass (the
    CPU kernel repacks 4-bit weights at the first one)."""
    from transformers import AutoModelForCausalLM

    dtype = merge_dtype(cfg, profile)
    if check_merge_target(into) == "trained" and cfg.model.bits in (4, 8):
        cpu = profile_for("cpu", "CPU", 0.0)
        return load_model(cfg.model, cpu).dequantize(dtype=dtype).to(dtype)
    return from_hub_or_cache(AutoModelForCausalLM.from_pretrained, cfg.model.source, dtype=dtype,
                             trust_remote_code=cfg.model.trust_remote_code)


def merge_adapter(run_dir: str | Path, output_dir: str | Path | None = None,
                  profile: HardwareProfile | None = None, progress: Progress = no_progress,
                  into: str = "trained") -> Path:
    """Fold the adapter into a float copy of the base (see MERGE_TARGETS) and save a standalone model."""
    from peft import PeftModel

    run_dir = Path(run_dir)
    source, cfg, into = adapter_dir(run_dir), run_config(run_dir), check_merge_target(into)
    profile = profile or detect()
    output = Path(output_dir) if output_dir else run_dir / MERGED_DIR
    progress(0.05, f"Loading {display_name(cfg.model.source)} to merge {MERGE_TARGETS[into]}")
    base = merge_base(cfg, profile, into)
    progress(0.5, "Adding the LoRA update B·A into the base weights")
    merged = PeftModel.from_pretrained(base, source).merge_and_unload()
    merged.config.use_cache = True  # load_model turns the cache off for training; generation wants it
    progress(0.75, "Saving the merged model")
    staging = output.with_name(output.name + PARTIAL_SUFFIX)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        merged.save_pretrained(staging)
        save_tokenizer(load_tokenizer(cfg.model), staging)
        (staging / MERGE_INFO).write_text(json.dumps({"into": into, "bits": cfg.model.bits}), encoding="utf-8")
        write_model_card(run_dir, staging, merged=True)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)  # half a model must not pass for a merge
        if is_disk_full(error):
            raise ExportError(disk_full_message("saving the merged model (the partial folder was removed)")) \
                from None
        raise
    shutil.rmtree(output, ignore_errors=True)
    os.replace(staging, output)
    progress(1.0, "Merged")
    return output


def merged_into(folder: str | Path) -> str | None:
    """Which base a merged model folder was made from ('trained' / 'original'); None for older merges."""
    try:
        return json.loads((Path(folder) / MERGE_INFO).read_text(encoding="utf-8")).get("into")
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class MergeReport:
    """Validation loss of the adapter (on the base as trained) and of the merged model, on the same rows."""
    adapter_loss: float
    merged_loss: float
    rows: int
    held_out: bool      # False: the run kept no validation rows, so these are training rows

    @property
    def difference(self) -> float:
        return self.merged_loss - self.adapter_loss

    def summary(self) -> str:
        where = "held-out validation rows" if self.held_out else "training rows (the run kept no validation rows)"
        return (f"Validation loss on the same {self.rows} {where}: adapter on its training base "
                f"{self.adapter_loss:.4f}, merged model {self.merged_loss:.4f} "
                f"(difference {self.difference:+.4f}).")


def comparison_rows(cfg: RunConfig, tokenizer: Any, limit: int) -> tuple[Any, bool]:
    """The run's own held-out rows (same split and seed as in training), else its first training rows."""
    prepared = prepare(cfg.data, tokenizer, seed=cfg.training.seed)
    rows, held_out = (prepared.eval, True) if prepared.eval is not None else (prepared.train, False)
    return rows.select(range(min(limit, len(rows)))), held_out


def merge_report(run_dir: str | Path, merged_dir: str | Path, limit: int = 16) -> MergeReport:
    """How far the merged model is from the adapter as it trained and chatted (its quantized base), on the CPU."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    tokenizer = load_tokenizer(cfg.model)
    rows, held_out = comparison_rows(cfg, tokenizer, limit)
    length = cfg.data.max_seq_length
    adapter = PeftModel.from_pretrained(load_model(cfg.model, profile_for("cpu", "CPU", 0.0)), adapter_dir(run_dir))
    adapter_loss = dataset_loss(adapter.eval(), tokenizer, rows, max_length=length).loss
    del adapter
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype="auto").eval()
    merged_loss = dataset_loss(merged, tokenizer, rows, max_length=length).loss
    return MergeReport(adapter_loss, merged_loss, len(rows), held_out)


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


def hub_base(cfg: RunConfig) -> str | None:
    """The Hub id a model card links as base_model; None for a local folder (no broken link on the Hub)."""
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


def model_card(run_dir: str | Path, merged: bool = False, plot_name: str | None = PLOT_FILE,
               into: str | None = None) -> str:
    """The model card (Hub README.md): metadata header, base model, dataset, hyperparameters, final losses."""
    run_dir = Path(run_dir)
    cfg, curves, status = run_config(run_dir), losses(run_dir), read_status(run_dir)
    base, dataset = hub_base(cfg), _hub_dataset(cfg)
    meta: dict[str, Any] = {"library_name": "transformers" if merged else "peft",
                            "pipeline_tag": "text-generation",
                            "tags": [cfg.lora.method, "qlora" if cfg.model.bits == 4 else "peft", "trl", cfg.stage,
                                     "lora-lab"]}
    if base:
        meta["base_model"] = base
    if dataset:
        meta["datasets"] = [dataset]
    # The card is shown on the page and published: sources by display_name, never a server path or an upload name.
    dataset_text = ("the course Q&A bundled with LoRA Lab" if cfg.data.source == BUNDLED_DATASET
                    else f"`{display_name(cfg.data.source)}`")
    t, lora = cfg.training, cfg.lora
    method = METHOD_NAMES.get(lora.method, lora.method)
    kind = f"Merged model ({method} adapter folded into the base weights)" if merged else f"{method} adapter"
    rows = [("base model", f"`{base or display_name(cfg.model.source)}`"),
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
            ("final training loss", _fmt(curves.final_train)), ("final eval loss", _fmt(curves.final_eval)),
            *([("merge", f"adapter folded {MERGE_TARGETS[into]}")] if merged and into in MERGE_TARGETS else [])]
    usage = ('model = AutoModelForCausalLM.from_pretrained("REPO_ID")' if merged else
             f'base = AutoModelForCausalLM.from_pretrained("{base or display_name(cfg.model.source)}")\n'
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
    card.write_text(model_card(run_dir, merged=merged, plot_name=PLOT_FILE if plot else None,
                               into=merged_into(folder) if merged else None), encoding="utf-8")
    return card


# --- push to the Hub ------------------------------------------------------------------------------------------

def check_repo_id(repo_id: str) -> str:
    repo_id = (repo_id or "").strip()
    if not HUB_ID.match(repo_id):
        raise ExportError(f"Hub repo id must look like 'user/name' (letters, digits, '-', '_', '.'), "
                          f"got {repo_id!r}.")
    return repo_id


def push_folder(folder: str | Path, repo_id: str, token: str | None, private: bool = True,
                api: Any = None, progress: Progress = no_progress, run_dir: str | Path | None = None) -> str:
    """Create (or reuse) the model repo and upload the folder; returns the repo URL. ``api`` is an HfApi.
    With ``run_dir``, what is uploaded is a copy naming no server path (``shareable_copy``)."""
    folder, repo_id = Path(folder), check_repo_id(repo_id)
    if not token or not token.strip():
        raise ExportError("A Hugging Face write token is needed to push (huggingface.co/settings/tokens).")
    if not (folder / MODEL_CONFIG).is_file() and not has_adapter(folder):
        raise ExportError(f"{folder} holds neither an adapter nor a model.")
    if api is None:
        require_hub_to_push(repo_id)
        from huggingface_hub import HfApi

        api = HfApi()
    progress(0.1, f"Creating {repo_id}")
    url = api.create_repo(repo_id, token=token.strip(), private=private, repo_type="model", exist_ok=True)
    progress(0.3, f"Uploading {folder.name}")
    shared = shareable_copy(run_dir, folder) if run_dir is not None else folder
    try:
        api.upload_folder(repo_id=repo_id, folder_path=str(shared), repo_type="model", token=token.strip(),
                          commit_message="Upload from LoRA Lab",
                          ignore_patterns=["*" + PARTIAL_SUFFIX, "__pycache__/*"])
    finally:
        if shared is not folder:
            shutil.rmtree(shared.parent, ignore_errors=True)
    progress(1.0, "Pushed")
    return str(url)
