"""A finished run as one GGUF file for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile beside it.

    python -m finetune.services.gguf_export runs/demo --type q8_0   # runs/demo/export/gguf/demo-q8_0.gguf + .Modelfile
    python -m finetune.services.gguf_export runs/demo --plan        # sizes, folders and free disk, before building
    HF_TOKEN=... python -m finetune.services.gguf_export runs/demo --push me/demo-gguf   # the file + model card
    result = write_gguf("runs/demo", "q4_0")                        # the same from Python; result.summary() says what

The adapter is first merged (``finetune.services.export.merge_adapter``; by default into the weights it trained
against, so the file answers like the Chat tab), then every tensor of the merged model is renamed to llama.cpp's names,
Llama's q/k projections are permuted into llama.cpp's RoPE layout, and the weights are written at the chosen
type with the ``gguf`` package's NumPy quantizers. Metadata carries what llama.cpp needs to run the file alone:
architecture, sizes, context length, RoPE settings, the tokenizer (vocabulary, merges, token types, special ids,
whether BOS/EOS are added) and the chat template.

Which tensors keep more bits than the chosen type, and why (``tensor_type``):
- 1-D tensors (the RMSNorm weights) stay F32: they are a per-channel scale, tiny, and llama.cpp keeps them F32 too.
- In the 4/5-bit types the token embedding (and the output head when untied) is Q8_0: with tied embeddings it is
  also the output head, where every logit comes from, and llama.cpp's own quantizer also gives the output head
  more bits than the rest.
- A matrix whose rows are not a multiple of 32 values cannot be cut into the 32-value blocks of the Q types; it
  stays F16.

Only Llama-family models (``model_type`` llama) with a byte-level BPE tokenizer are supported (SmolLM2 of every
size, Llama 3); Llama 2's SentencePiece tokenizer and anything else is refused before any work starts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import yaml

from finetune.core.config import BUNDLED_DATASET, EMBEDDED_MODEL
from finetune.core.data import first_line
from finetune.core.hardware import detect
from finetune.core.metrics import read_status
from finetune.core.models import (ModelSourceError, embedded_model_dir, from_hub_or_cache, load_tokenizer,
                                  require_hub_to_push)
from finetune.core.paths import display_name, for_visitors, local_paths_mode
from finetune.core.run_folder import (ADAPTER_WEIGHTS, BUILDING_MARKER, EXPORT_DIR, GGUF_DIR, MERGED_DIR, MODEL_CONFIG,
                                      PARTIAL_SUFFIX)
from finetune.core.storage import disk_full_message, is_disk_full
from finetune.services.export import (CARD_FILE, MERGE_TARGETS, METHOD_NAMES, STAGE_TRAINERS, ExportError, Progress,
                                      adapter_dir, check_merge_target, check_repo_id, hub_base, losses, merge_adapter,
                                      merge_dtype, merged_into, run_config)

MODELFILE_SUFFIX = ".Modelfile"  # one per type: run-q8_0.gguf + run-q8_0.Modelfile
# Output types: what a learner picks, the gguf package's type for the big matrices, and llama.cpp's file type.
GGUF_TYPES = {
    "f16": "16-bit float: no rounding a learner would notice; half the size of fp32",
    "bf16": "bfloat16: fp32's range with 8 bits of mantissa",
    "q8_0": "8-bit blocks of 32 with one scale each (~8.5 bits/weight): near-lossless",
    "q5_1": "5-bit blocks with a scale and a minimum (~6 bits/weight)",
    "q5_0": "5-bit blocks with a scale (~5.5 bits/weight)",
    "q4_1": "4-bit blocks with a scale and a minimum (~5 bits/weight)",
    "q4_0": "4-bit blocks with a scale (~4.5 bits/weight): smallest, most rounding",
}
SUPPORTED_MODEL_TYPES = {"llama": "Llama family with a byte-level BPE tokenizer: SmolLM2, Llama 3"}
# What llama.cpp calls the pre-tokenizer (the regex that splits text before BPE), told apart by the HF
# tokenizer's own pre-tokenizer description.
PRE_TOKENIZERS = {"gpt-2": "GPT-2's split (ByteLevel with its regex)",
                  "smollm": "single digits, then GPT-2's split",
                  "llama-bpe": "Llama 3's split"}
_LLAMA3_SPLIT_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
BLOCK = 32  # values per block of every Q type written here
# The Chat tab's sampling defaults (finetune.services.chat.SamplingSettings; a test keeps the two equal).
CHAT_TEMPERATURE, CHAT_TOP_P = 0.7, 0.9


def _no_progress(fraction: float, message: str) -> None:
    pass


# --- checks before any work -----------------------------------------------------------------------------------

def check_type(out_type: str) -> str:
    out_type = (out_type or "").strip().lower()
    if out_type not in GGUF_TYPES:
        raise ExportError(f"GGUF type must be one of {', '.join(GGUF_TYPES)}, got {out_type!r}.")
    return out_type


def _supported() -> str:
    return "; ".join(f"{kind} ({text})" for kind, text in SUPPORTED_MODEL_TYPES.items())


def base_config(source: str) -> Any:
    """The base model's transformers config, read without loading weights."""
    from transformers import AutoConfig

    if source == EMBEDDED_MODEL:
        return AutoConfig.from_pretrained(embedded_model_dir())
    try:
        return from_hub_or_cache(AutoConfig.from_pretrained, source)
    except (ModelSourceError, OSError, ValueError) as error:
        raise ExportError(f"Cannot read the base model's config: {first_line(error)}") from None


def check_architecture(config: Any) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ExportError(f"GGUF export supports {_supported()}; this run's base is a {model_type!r} model "
                          f"({', '.join(getattr(config, 'architectures', None) or ['unknown class'])}).")
    rope = rope_settings(config)
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise ExportError(f"GGUF export supports RoPE types 'default' and 'linear'; this model uses "
                          f"{rope.get('rope_type')!r} (e.g. Llama 3.1's 'llama3' scaling), not written yet.")


def rope_settings(config: Any) -> dict[str, Any]:
    """transformers 5 keeps RoPE in ``rope_parameters``; older configs in rope_theta/rope_scaling."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope["type"]
    return rope


def pre_tokenizer_name(tokenizer: Any) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE; refuses tokenizers it cannot name."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or not _byte_level(pre):
        raise ExportError("GGUF export supports byte-level BPE tokenizers (GPT-2 style, as SmolLM2 and Llama 3 "
                          f"use); this tokenizer is {model.get('type')!r} with pre-tokenizer {pre.get('type')!r}.")
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp's spelling (llama.cpp itself refused "gpt2": checked with llama-cpp-python)
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and str((steps[0].get("pattern") or {}).get("Regex", "")).startswith(
            _LLAMA3_SPLIT_START):
        return "llama-bpe"
    raise ExportError(f"GGUF export knows the pre-tokenizers {', '.join(PRE_TOKENIZERS)}; this tokenizer "
                      f"splits text with {kinds}, which llama.cpp may not reproduce.")


def _byte_level(pre: dict[str, Any]) -> bool:
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    return any(step.get("type") == "ByteLevel" for step in steps or [])


# --- one export per run at a time -------------------------------------------------------------------------------

_building: set[str] = set()
_building_lock = threading.Lock()


class BuildLock:
    """Refuses a second GGUF export of the same run while one builds: in this process (a set) and across
    processes (a lock file holding host and pid; one left by a dead process is taken over)."""

    def __init__(self, run_dir: Path, out_type: str) -> None:
        self.key = str(run_dir.resolve())
        self.path = run_dir / EXPORT_DIR / GGUF_DIR / BUILDING_MARKER
        self.out_type = out_type

    def __enter__(self) -> "BuildLock":
        with _building_lock:
            if self.key in _building:
                raise ExportError(self._busy(self._holder()))
            _building.add(self.key)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._take_file()
        except BaseException:
            with _building_lock:
                _building.discard(self.key)
            raise
        return self

    def _take_file(self) -> None:
        for _ in range(2):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._alive(self._holder()):
                    raise ExportError(self._busy(self._holder())) from None
                self.path.unlink(missing_ok=True)  # left by a process that died mid-build
                continue
            with os.fdopen(handle, "w") as out:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "type": self.out_type}, out)
            return
        raise ExportError(self._busy(self._holder()))

    def _holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _alive(holder: dict[str, Any]) -> bool:
        if holder.get("host") not in (None, socket.gethostname()):
            return True  # another machine's build: cannot check, so respect it
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except (OSError, ValueError):
            return False
        return True

    def _busy(self, holder: dict[str, Any]) -> str:
        what = f" ({holder['type']})" if holder.get("type") else ""
        return (f"A GGUF export of run '{Path(self.key).name}'{what} is already being built; wait for it to "
                "finish, then export again (finished files are reused).")

    def __exit__(self, *exc: Any) -> None:
        self.path.unlink(missing_ok=True)
        with _building_lock:
            _building.discard(self.key)


# --- tensors ----------------------------------------------------------------------------------------------------

def llama_rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF Llama rotates the two halves of each head's dimensions; llama.cpp rotates adjacent pairs. Reorder the
    rows of q_proj/k_proj so that each head's (i, i + d/2) pair becomes (2i, 2i + 1). transformers' GGUF loader
    applies the inverse (the round-trip test checks both directions meet)."""
    rows = weight.shape[0]
    halves = weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)


def tensor_type(name: str, shape: tuple[int, ...], out_type: str) -> tuple[Any, str]:
    """The ggml type of one tensor and, when it differs from the chosen type, why."""
    from gguf import GGMLQuantizationType as Q

    chosen = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1,
              "q5_0": Q.Q5_0, "q5_1": Q.Q5_1}[out_type]
    if len(shape) == 1:
        return Q.F32, "1-D (norm weights): tiny, and kept F32 as llama.cpp does"
    if chosen in (Q.F16, Q.BF16):
        return chosen, ""
    if shape[-1] % BLOCK:
        return Q.F16, f"rows of {shape[-1]} values are not a multiple of the {BLOCK}-value block"
    if out_type != "q8_0" and name in ("token_embd.weight", "output.weight"):
        return Q.Q8_0, "embedding / output head: every logit passes through it, so it keeps 8 bits"
    return chosen, ""


def encode_tensor(data: np.ndarray, qtype: Any) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if qtype == Q.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


def tensor_nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


@dataclass(frozen=True)
class TensorPlan:
    hf_name: str
    name: str
    shape: tuple[int, ...]
    qtype: Any
    why: str
    permute_heads: int | None  # q/k projections: the head count to permute rows by


def plan_tensors(model_dir: Path, config: Any, out_type: str) -> list[TensorPlan]:
    """Every tensor of the saved merged model, with its llama.cpp name and type."""
    from safetensors import safe_open

    shapes = []
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), "np") as weights:
            shapes += [(name, tuple(weights.get_slice(name).get_shape())) for name in weights.keys()]
    return plan_shapes(shapes, config, out_type)


def plan_shapes(shapes: list[tuple[str, tuple[int, ...]]], config: Any, out_type: str) -> list[TensorPlan]:
    """The GGUF plan of tensors given by HF name and shape; refuses a tensor llama.cpp has no name for."""
    from gguf import MODEL_ARCH, get_tensor_name_map

    names = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    plans = []
    for hf_name, shape in shapes:
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope.freq_base
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"The merged model has a tensor llama.cpp has no name for: {hf_name}.")
        qtype, why = tensor_type(name, shape, out_type)
        heads = (config.num_attention_heads if ".attn_q." in name
                 else config.num_key_value_heads if ".attn_k." in name else None)
        plans.append(TensorPlan(hf_name, name, shape, qtype, why, heads))
    return plans


def _tensors(model_dir: Path, plans: list[TensorPlan]) -> Iterator[tuple[TensorPlan, np.ndarray]]:
    """One tensor at a time, so a large model never sits in memory twice."""
    from safetensors import safe_open

    files = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), "np") as weights:
            files.update({name: file for name in weights.keys()})
    for plan in plans:
        with safe_open(str(files[plan.hf_name]), "pt") as weights:  # "pt": numpy has no bfloat16
            data = weights.get_tensor(plan.hf_name).float().numpy()
        if plan.permute_heads:
            data = llama_rope_permute(data, plan.permute_heads)
        yield plan, encode_tensor(data, plan.qtype)


# --- metadata ---------------------------------------------------------------------------------------------------

def add_model_metadata(writer: Any, config: Any, out_type: str, name: str) -> None:
    from gguf import GGML_QUANT_VERSION, LlamaFileType, RopeScalingType

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = rope_settings(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    file_types = {"f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
                  "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0,
                  "q4_1": LlamaFileType.MOSTLY_Q4_1, "q5_0": LlamaFileType.MOSTLY_Q5_0,
                  "q5_1": LlamaFileType.MOSTLY_Q5_1}
    writer.add_file_type(file_types[out_type])
    writer.add_quantization_version(GGML_QUANT_VERSION)


def vocabulary(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their llama.cpp types: special added tokens are CONTROL (matched whole, never split),
    other added tokens USER_DEFINED, ids the model has but the tokenizer lacks UNUSED placeholders."""
    from gguf import TokenType

    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    if max(by_id) >= vocab_size:
        raise ExportError(f"The tokenizer has ids up to {max(by_id)} but the model only {vocab_size} embeddings.")
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def bpe_merges(tokenizer: Any) -> list[str]:
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"].get("merges") or []
    # tokenizers writes merges as ["a", "b"] pairs (newer) or "a b" strings (older); GGUF wants "a b".
    return [" ".join(m) if isinstance(m, list) else m for m in merges]


def adds_special(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding text adds BOS / EOS, observed rather than read from a flag that may be absent."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    starts = bos is not None and len(full) > len(plain) and full[0] == bos
    ends = eos is not None and len(full) > len(plain) and full[-1] == eos
    return starts, ends


def add_tokenizer_metadata(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    tokens, types = vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(bpe_merges(tokenizer))
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
               "pad": tokenizer.pad_token_id}
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for kind, token_id in special.items():
        if token_id is not None:
            adders[kind](int(token_id))
    add_bos, add_eos = adds_special(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


# --- Ollama -------------------------------------------------------------------------------------------------------

CHATML_TEMPLATE = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}{{ end }}<|im_start|>assistant
"""


def _chatml_turn(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def chatml_default_system(tokenizer: Any) -> str | None:
    """The system prompt a ChatML chat template inserts when the chat has none ('' if it inserts none); None
    when the template is not ChatML, checked by rendering it (not by reading its source)."""
    def render(messages: list[dict[str, str]]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    user, reply, system = "Question one?", "Answer one.", "Be brief."
    try:
        single = render([{"role": "user", "content": user}])
        with_system = render([{"role": "system", "content": system}, {"role": "user", "content": user}])
        turns = render([{"role": "user", "content": user}, {"role": "assistant", "content": reply},
                        {"role": "user", "content": user}])
    except Exception:  # a template that cannot render these is not one we can translate
        return None
    prompt = _chatml_turn("user", user) + "<|im_start|>assistant\n"
    if not single.endswith(prompt) or with_system != _chatml_turn("system", system) + prompt:
        return None
    prefix = single[: -len(prompt)]
    match = re.fullmatch(r"<\|im_start\|>system\n(.*)<\|im_end\|>\n", prefix, flags=re.S)
    default = match.group(1) if match else ("" if not prefix else None)
    if default is None or turns != prefix + _chatml_turn("user", user) + _chatml_turn("assistant", reply) + prompt:
        return None
    return default


def modelfile_text(gguf_name: str, tokenizer: Any) -> str:
    """An Ollama Modelfile: FROM the file beside it, the chat format, stop tokens and the Chat tab's sampling."""
    system = chatml_default_system(tokenizer)
    stops = sorted({t for t in ("<|im_end|>", tokenizer.eos_token) if t and (system is not None or
                                                                              t == tokenizer.eos_token)})
    lines = ["# Ollama Modelfile written by LoRA Lab. Create the model with:",
             f"#   ollama create {_ollama_name(gguf_name)} -f {modelfile_name(gguf_name)}", "", f"FROM ./{gguf_name}", ""]
    if system is not None:
        lines += ['TEMPLATE """' + CHATML_TEMPLATE + '"""']
        if system:
            lines += ['SYSTEM """' + system + '"""']
    else:
        lines += ["# The chat template is not ChatML, so no TEMPLATE is written here: Ollama reads the chat",
                  "# template stored in the GGUF file (tokenizer.chat_template) for the formats it knows."]
    lines += [""] + [f'PARAMETER stop "{stop}"' for stop in stops]
    lines += [f"PARAMETER temperature {CHAT_TEMPERATURE}", f"PARAMETER top_p {CHAT_TOP_P}", ""]
    return "\n".join(lines)


def _ollama_name(gguf_name: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", Path(gguf_name).stem.lower()).strip("-") or "lora-lab"


def modelfile_name(gguf_name: str) -> str:
    return Path(gguf_name).stem + MODELFILE_SUFFIX


def ollama_command(result: "GgufExport", in_folder: bool | None = None) -> str:
    """The command that creates the Ollama model. ``in_folder`` (default: where pages may show server paths, see
    ``paths.local_paths_mode``) starts it with a cd into the file's folder; on a Space a visitor runs it where
    their two downloads landed, and the server's folder is neither theirs nor something to show them."""
    create = f"ollama create {_ollama_name(result.path.name)} -f {result.modelfile.name}"
    if in_folder is None:
        in_folder = local_paths_mode() == "anywhere"
    return f"cd {result.path.parent} && {create}" if in_folder else create


# --- writing ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GgufExport:
    """What was written: the file, its Modelfile, its size, bits per weight and the tensors kept at other types."""
    path: Path
    modelfile: Path
    out_type: str
    size_bytes: int
    weights: int
    tensor_types: dict[str, str]
    kept: dict[str, str] = field(default_factory=dict)  # tensor name -> why it is not at the chosen type
    cached: bool = False

    @property
    def bits_per_weight(self) -> float:
        return self.size_bytes * 8 / self.weights

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for qtype in self.tensor_types.values():
            counts[qtype] = counts.get(qtype, 0) + 1
        reasons = sorted(set(self.kept.values()))
        kept = "" if not reasons else " Kept at other types: " + "; ".join(
            f"{sum(1 for w in self.kept.values() if w == r)} tensor(s), {r}" for r in reasons) + "."
        return (f"{self.path.name}: {self.size_bytes / 2**20:.1f} MB, {self.bits_per_weight:.2f} bits per weight "
                f"over {self.weights:,} weights; tensors {', '.join(f'{n} {t}' for t, n in sorted(counts.items()))}."
                f"{kept}{' (reused: this run and type were exported before)' if self.cached else ''}")


def gguf_path(run_dir: str | Path, out_type: str) -> Path:
    run_dir = Path(run_dir)
    return run_dir / EXPORT_DIR / GGUF_DIR / f"{run_dir.name}-{check_type(out_type)}.gguf"


def _fingerprint(run_dir: Path, into: str) -> str:
    digest = hashlib.sha256(into.encode())
    with open(adapter_dir(run_dir) / ADAPTER_WEIGHTS, "rb") as weights:
        for chunk in iter(lambda: weights.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _info_path(path: Path) -> Path:
    return path.with_suffix(".json")


def cached_export(run_dir: Path, out_type: str, into: str) -> GgufExport | None:
    path = gguf_path(run_dir, out_type)
    try:
        info = json.loads(_info_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not path.is_file() or info.get("fingerprint") != _fingerprint(run_dir, into):
        return None
    return GgufExport(path, path.parent / modelfile_name(path.name), out_type, path.stat().st_size, info["weights"],
                      info["tensor_types"], info.get("kept", {}), cached=True)


def _merged_reusable(run_dir: Path, into: str) -> bool:
    """run/merged was merged into the same target after the adapter was last saved."""
    folder = run_dir / MERGED_DIR
    try:
        adapter_time = (adapter_dir(run_dir) / ADAPTER_WEIGHTS).stat().st_mtime
        return merged_into(folder) == into and (folder / MODEL_CONFIG).stat().st_mtime >= adapter_time
    except OSError:
        return False


def merged_for(run_dir: Path, into: str, progress: Progress) -> Path:
    """The run's merged model, reusing run/merged when it is current (``_merged_reusable``)."""
    if _merged_reusable(run_dir, into):
        progress(0.3, "Reusing the merged model in merged/")
        return run_dir / MERGED_DIR
    return merge_adapter(run_dir, progress=lambda f, m: progress(0.3 * f, m), into=into)


def _free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def convert_folder(model_dir: Path, target: Path, out_type: str, tokenizer: Any, name: str,
                   progress: Progress = _no_progress) -> GgufExport:
    """Write ``model_dir`` (a saved Llama-family transformers model) as one GGUF at ``target``. Written to a
    ``.partial`` file that is renamed at the end, and removed on any failure."""
    from gguf import GGUFWriter
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    check_architecture(config)
    plans = plan_tensors(model_dir, config, out_type)
    needed = sum(tensor_nbytes(p.shape, p.qtype) for p in plans)
    target.parent.mkdir(parents=True, exist_ok=True)
    free = _free_bytes(target.parent)
    if free < needed + (16 << 20):
        raise ExportError(f"Not enough disk space for the {out_type} GGUF: it needs about {needed / 2**20:.0f} MB "
                          f"and {free / 2**20:.0f} MB are free where it is written ({target.parent}).")
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    writer = GGUFWriter(partial, "llama")
    try:
        add_model_metadata(writer, config, out_type, name)
        add_tokenizer_metadata(writer, tokenizer, config.vocab_size)
        for plan in plans:
            writer.add_tensor_info(plan.name, plan.shape, np.dtype(np.float32), tensor_nbytes(plan.shape, plan.qtype),
                                   raw_dtype=plan.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for done, (plan, data) in enumerate(_tensors(model_dir, plans), start=1):
            writer.write_tensor_data(data)
            progress(done / len(plans), f"Writing {plan.name} as {plan.qtype.name} ({done}/{len(plans)})")
        writer.close()
        os.replace(partial, target)
    except OSError as error:
        raise ExportError(_disk_message(error, needed)) from None
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    weights = sum(int(np.prod(p.shape)) for p in plans)
    return GgufExport(target, target.parent / modelfile_name(target.name), out_type, target.stat().st_size, weights,
                      {p.name: p.qtype.name for p in plans}, {p.name: p.why for p in plans if p.why})


def _disk_message(error: OSError, needed: int) -> str:
    if is_disk_full(error):
        return disk_full_message(f"writing the GGUF (about {needed / 2**20:.0f} MB; the partial file was removed)",
                                 "build it again")
    return f"Writing the GGUF failed ({first_line(error)}); the partial file was removed."


# --- sizes and disk space, before building ----------------------------------------------------------------------

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
    return Landing(what, folder, size, _free_bytes(existing), existing.stat().st_dev, not_written)


def _mb(size: float) -> str:
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
                parts = " and ".join(f"the {x.what} (about {_mb(x.size_bytes)}, into {for_visitors(str(x.folder))})"
                                     for x in new)
                lines.append(f"{parts} need about {_mb(needed + DISK_MARGIN)} with room to spare, and that disk "
                             f"has {_mb(free)} free")
        return lines

    def summary(self) -> str:
        lines = [f"Building the {self.out_type} GGUF of run '{self.run}' writes:"]
        for x in self.landings:
            state = x.not_written or f"disk has {_mb(x.free_bytes)} free"
            lines.append(f"- {x.what}: about {_mb(x.size_bytes)} into `{for_visitors(str(x.folder))}` ({state})")
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
    return _disk_plan(Path(run_dir), checked_run(run_dir, out_type, into), downloads, downloaded)


def _disk_plan(run_dir: Path, run: "RunToExport", downloads: tuple[str | Path, ...] = (),
               downloaded: bool = False) -> DiskPlan:
    shapes = parameter_shapes(run.config)
    built = cached_export(run_dir, run.out_type, run.into)
    gguf_bytes = built.size_bytes if built else gguf_file_bytes(
        run.config, run.tokenizer, run.out_type, metadata_name(run_dir, run.out_type),
        plan_shapes(shapes, run.config, run.out_type))
    merged_there = _merged_reusable(run_dir, run.into)
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
    config = base_config(cfg.model.source)
    check_architecture(config)
    tokenizer = load_tokenizer(cfg.model)
    pre_tokenizer_name(tokenizer)
    return RunToExport(cfg, config, tokenizer, out_type, into)


def metadata_name(run_dir: Path, out_type: str) -> str:
    """The name written into the file's metadata."""
    return f"{run_dir.name} ({out_type})"


def write_gguf(run_dir: str | Path, out_type: str = "q8_0", into: str = "trained",
               progress: Progress = _no_progress, downloads: tuple[str | Path, ...] = ()) -> GgufExport:
    """Merge the run's adapter and write it as a GGUF of ``out_type`` plus an Ollama Modelfile, into
    ``run/export/gguf/``. Reuses a file of the same run, type and adapter written before; refuses before merging
    when the disk lacks room for the merged model, the file and a copy in each of ``downloads`` (``disk_plan``)."""
    run_dir = Path(run_dir)
    run = checked_run(run_dir, out_type, into)
    out_type, into = run.out_type, run.into
    with BuildLock(run_dir, out_type):
        cached = cached_export(run_dir, out_type, into)
        if cached is not None:
            progress(1.0, "Reusing the file exported before")
            return cached
        _disk_plan(run_dir, run, downloads).check()
        fingerprint = _fingerprint(run_dir, into)
        merged = merged_for(run_dir, into, progress)
        target = gguf_path(run_dir, out_type)
        result = convert_folder(merged, target, out_type, run.tokenizer, metadata_name(run_dir, out_type),
                                progress=lambda f, m: progress(0.3 + 0.68 * f, m))
        _finish(result, target, {"fingerprint": fingerprint, "into": into, "weights": result.weights,
                                 "tensor_types": result.tensor_types, "kept": result.kept}, run.tokenizer)
        progress(1.0, "GGUF written")
        return result


def _finish(result: GgufExport, target: Path, info: dict[str, Any], tokenizer: Any) -> None:
    """The Modelfile and the build record beside the GGUF. If either cannot be written (a full disk), the GGUF goes
    too: a file without its record would be built again anyway, and its space is what the visitor needs back."""
    try:
        result.modelfile.write_text(modelfile_text(target.name, tokenizer), encoding="utf-8")
        _info_path(target).write_text(json.dumps(info), encoding="utf-8")
    except OSError as error:
        for path in (target, result.modelfile, _info_path(target)):
            path.unlink(missing_ok=True)
        if is_disk_full(error):
            raise ExportError(disk_full_message("writing the GGUF's Modelfile (the GGUF was removed)",
                                                "build it again")) from None
        raise ExportError(f"Writing the GGUF's Modelfile failed ({first_line(error)}); the GGUF was removed.") \
            from None


def zip_merged(run_dir: str | Path, into: str = "trained", progress: Progress = _no_progress) -> Path:
    """run/export/<run>-merged.zip: the merged model (safetensors, config, tokenizer, model card) for download,
    merging first when run/merged is missing, older than the adapter, or merged into another target."""
    run_dir = Path(run_dir)
    merged = merged_for(run_dir, check_merge_target(into), lambda f, m: progress(0.7 * f / 0.3, m))
    target = run_dir / EXPORT_DIR / f"{run_dir.name}-merged.zip"
    partial = target.with_name(target.name + PARTIAL_SUFFIX)  # a download never sees half a zip
    progress(0.75, "Zipping the merged model")
    try:
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as archive:  # weights do not compress
            for path in sorted(merged.rglob("*")):
                if path.is_file():
                    archive.write(path, f"{run_dir.name}-merged/{path.relative_to(merged).as_posix()}")
        os.replace(partial, target)
    except OSError as error:
        if is_disk_full(error):
            raise ExportError(disk_full_message("zipping the merged model (the partial zip was removed)")) from None
        raise ExportError(f"Zipping the merged model failed ({first_line(error)}); nothing was left behind.") \
            from None
    finally:
        partial.unlink(missing_ok=True)
    progress(1.0, "Zipped")
    return target


# --- the Hub: the built file, its Modelfile and a model card, with the visitor's token ------------------------------

def built_gguf(run_dir: str | Path, out_type: str) -> tuple[GgufExport, str]:
    """The run's finished GGUF of ``out_type`` and the merge target it was built with; refuses one never built,
    left unfinished, or built from an earlier adapter of the run."""
    run_dir, out_type = Path(run_dir), check_type(out_type)
    path = gguf_path(run_dir, out_type)
    if not path.is_file():
        raise ExportError(f"Run '{run_dir.name}' has no {out_type} GGUF yet: build it first ('Build GGUF + "
                          "Modelfile'), then push. A push sends the built file and never builds one.")
    try:
        into = json.loads(_info_path(path).read_text(encoding="utf-8")).get("into", "trained")
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
            ("file size", f"{_mb(result.size_bytes)} ({result.size_bytes:,} bytes)"),
            ("bits per weight", f"{result.bits_per_weight:.2f} (file bytes x 8 / {result.weights:,} weights)"),
            ("tensors kept at other types", _kept_text(result)),
            ("base model", f"`{base or display_name(cfg.model.source)}`"),
            ("merge", f"adapter folded {MERGE_TARGETS[into]}"),
            ("training", f"{method} adapter, TRL `{STAGE_TRAINERS.get(cfg.stage, cfg.stage)}`, "
                         f"{status.get('step', curves.steps[-1] if curves.steps else 0)} steps on "
                         f"{_dataset_text(cfg)}"),
            ("final training / eval loss", final)]
    name, modelfile = result.path.name, result.modelfile.name
    ollama = _ollama_name(name)
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
              api: Any = None, progress: Progress = _no_progress) -> str:
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
    progress(0.1, f"Uploading {result.path.name} ({_mb(result.size_bytes)})")
    operations = [CommitOperationAdd(path_in_repo=result.path.name, path_or_fileobj=str(result.path)),
                  CommitOperationAdd(path_in_repo=result.modelfile.name, path_or_fileobj=str(result.modelfile)),
                  CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card.encode("utf-8"))]
    api.create_commit(repo_id, operations=operations, commit_message=f"Upload {result.path.name} from LoRA Lab",
                      token=token.strip(), repo_type="model")
    progress(1.0, "Pushed")
    return str(url)


# --- the Quantization tab's GGUF rows -------------------------------------------------------------------------------

# The matrices bitsandbytes quantizes (every Linear but the LM head), by their llama.cpp names: the GGUF rows of the
# Quantization tab count the same layers as its bitsandbytes rows.
LINEAR_TENSORS = re.compile(r"blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight$")


@dataclass(frozen=True)
class GgufMeasurement:
    out_type: str
    file_bytes: int
    layer_bytes: int      # the quantized layers' bytes in the file (blocks with their scales)
    weights: int          # weights in those layers
    loss: float
    perplexity: float
    answer: str           # greedy answer of the file's weights, dequantized to fp32 by transformers


def saved_model_dir(source: str, scratch: Path) -> Path:
    """A folder holding ``source`` as safetensors: the embedded model's cache, a local folder that has them, or
    a copy saved into ``scratch``."""
    from transformers import AutoModelForCausalLM

    from finetune.core.models import resolve_source

    folder = Path(resolve_source(source))
    if folder.is_dir() and any(folder.glob("*.safetensors")):
        return folder
    model = from_hub_or_cache(AutoModelForCausalLM.from_pretrained, source, dtype="float32")
    model.save_pretrained(scratch / "model")
    return scratch / "model"


def measure_gguf(source: str, out_type: str, rows: Any, prompt: str, max_new_tokens: int = 32,
                 batch_size: int = 4) -> GgufMeasurement:
    """Write ``source`` as a GGUF of ``out_type`` into a temp folder, load it back with transformers' GGUF loader,
    and measure its size, perplexity on ``rows`` and a greedy answer (speed is llama.cpp's business, not
    measured: the loaded copy is dequantized fp32)."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from finetune.core.config import ModelConfig
    from finetune.services.evaluate import dataset_loss

    out_type = check_type(out_type)
    tokenizer = load_tokenizer(ModelConfig(source=source))
    with tempfile.TemporaryDirectory(prefix="lora-lab-gguf-") as scratch:
        model_dir = saved_model_dir(source, Path(scratch))
        result = convert_folder(model_dir, Path(scratch) / f"model-{out_type}.gguf", out_type, tokenizer, out_type)
        layers = {name: qtype for name, qtype in result.tensor_types.items() if LINEAR_TENSORS.match(name)}
        layer_bytes, weights = _layer_bytes(result.path, set(layers))
        model = AutoModelForCausalLM.from_pretrained(scratch, gguf_file=result.path.name, dtype=torch.float32)
        model.eval()
        loss = dataset_loss(model, tokenizer, rows, batch_size=batch_size)
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        batch = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        return GgufMeasurement(out_type, result.size_bytes, layer_bytes, weights, loss.loss, loss.perplexity,
                               answer)


def _layer_bytes(path: Path, names: set[str]) -> tuple[int, int]:
    """(bytes, weights) of the named tensors as stored in the file, read back with GGUFReader."""
    from gguf import GGUFReader

    tensors = [t for t in GGUFReader(path).tensors if t.name in names]
    return sum(int(t.n_bytes) for t in tensors), sum(int(t.n_elements) for t in tensors)


# --- how far a built file drifts from the adapter the Chat tab answers with -----------------------------------------
# The merged model (merged into the weights the adapter trained against) is the artefact that answers as the Chat
# tab does: its loss differs from the adapter's by float rounding only (the merge's own report). A GGUF rounds those
# merged weights again to its block type; this measures by how much, on the run's held-out rows and prompts.

DRIFT_PROMPTS = 3        # held-out prompts whose greedy answers are compared token by token
DRIFT_TOKENS = 24        # tokens generated per prompt


@dataclass(frozen=True)
class GgufDrift:
    out_type: str
    adapter_loss: float
    gguf_loss: float
    rows: int
    held_out: bool
    agreement: tuple[int, ...]  # per prompt: how many leading greedy tokens the file and the adapter share
    tokens: int

    def summary(self) -> str:
        where = "held-out rows" if self.held_out else "training rows (the run kept no validation rows)"
        agree = ", ".join(str(n) for n in self.agreement)
        same = sum(n == self.tokens for n in self.agreement)
        return (f"How far the {self.out_type} file drifts from the adapter as the Chat tab runs it: loss on the same "
                f"{self.rows} {where} {self.adapter_loss:.4f} (adapter) vs {self.gguf_loss:.4f} (GGUF), difference "
                f"{self.gguf_loss - self.adapter_loss:+.4f}; greedy answers to {len(self.agreement)} held-out prompts "
                f"agree for the first {agree} of {self.tokens} tokens ({same} of {len(self.agreement)} identical). "
                "The merged model is the one that answers exactly as the Chat tab; a GGUF rounds it again.")


def _greedy_tokens(model: Any, tokenizer: Any, prompt: list[dict[str, str]], tokens: int) -> list[int]:
    import torch

    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    batch = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, batch["input_ids"].shape[1]:].tolist()


def _leading_agreement(first: list[int], second: list[int]) -> int:
    count = 0
    for a, b in zip(first, second):
        if a != b:
            break
        count += 1
    return count


def gguf_drift(run_dir: str | Path, gguf_file: str | Path, out_type: str, limit: int = 8) -> GgufDrift:
    """The built file against the adapter on its trained (quantized) base, as merge_report does for the merge:
    loss on the same rows and the greedy answers' agreement on the first held-out prompts (CPU, fp32)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.services.evaluate import dataset_loss
    from finetune.services.export import comparison_rows
    from finetune.core.hardware import profile_for
    from finetune.core.models import load_model

    run_dir, gguf_file = Path(run_dir), Path(gguf_file)
    cfg = run_config(run_dir)
    tokenizer = load_tokenizer(cfg.model)
    rows, held_out = comparison_rows(cfg, tokenizer, limit)
    prompts = [row["prompt"] for row in rows.select(range(min(DRIFT_PROMPTS, len(rows))))]
    length = cfg.data.max_seq_length
    adapter = PeftModel.from_pretrained(load_model(cfg.model, profile_for("cpu", "CPU", 0.0)), adapter_dir(run_dir))
    adapter.eval()
    adapter_loss = dataset_loss(adapter, tokenizer, rows, max_length=length).loss
    adapter_answers = [_greedy_tokens(adapter, tokenizer, p, DRIFT_TOKENS) for p in prompts]
    del adapter
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    model.eval()
    gguf_loss = dataset_loss(model, tokenizer, rows, max_length=length).loss
    agreement = tuple(_leading_agreement(_greedy_tokens(model, tokenizer, p, DRIFT_TOKENS), answer)
                      for p, answer in zip(prompts, adapter_answers))
    return GgufDrift(out_type, adapter_loss, gguf_loss, len(rows), held_out, agreement, DRIFT_TOKENS)


def drift_text(run_dir: str | Path, result: GgufExport) -> str:
    """The drift of a built file, measured once per build and kept beside it (a reused file reuses its text)."""
    kept = result.path.with_name(result.path.name + ".drift.txt")
    if kept.is_file() and kept.stat().st_mtime >= result.path.stat().st_mtime:
        return kept.read_text(encoding="utf-8")
    text = gguf_drift(run_dir, result.path, result.out_type).summary()
    kept.write_text(text, encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.services.gguf_export",
                                     description="Write a finished run as a GGUF file for llama.cpp / Ollama.")
    parser.add_argument("run_dir", help="the run folder (runs/<id>)")
    parser.add_argument("--type", default="q8_0", help=f"one of {', '.join(GGUF_TYPES)} (default q8_0)")
    parser.add_argument("--into", default="trained", help="merge target: trained (default) or original")
    parser.add_argument("--plan", action="store_true",
                        help="only say what building would write, how big, where, and the free disk there")
    parser.add_argument("--push", metavar="REPO_ID",
                        help="push the built file, its Modelfile and a model card to this Hub repo (token: HF_TOKEN)")
    parser.add_argument("--public", action="store_true", help="with --push: make a new repo public")
    args = parser.parse_args(argv)
    try:
        if args.plan:
            print(disk_plan(args.run_dir, args.type, args.into).summary())
            return 0
        if args.push:
            url = push_gguf(args.run_dir, args.type, args.push, os.environ.get("HF_TOKEN"), private=not args.public)
            print(f"Pushed to {url}")
            return 0
        result = write_gguf(args.run_dir, args.type, args.into,
                            progress=lambda f, m: print(f"[{f:4.0%}] {m}", file=sys.stderr))
    except (ExportError, ModelSourceError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # the Hub's own refusals (bad token, no write access), one line, never the token
        if not args.push:
            raise
        print(f"error: the Hub refused the push: {type(error).__name__}: {first_line(error)}", file=sys.stderr)
        return 2
    print(result.summary())
    print(f"Ollama: {ollama_command(result, in_folder=True)}")  # the CLI runs on the machine that has the file
    return 0


if __name__ == "__main__":
    sys.exit(main())
