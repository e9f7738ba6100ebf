"""The GGUF converter: a saved Llama-family transformers model as one GGUF file for llama.cpp, Ollama and LM
Studio, and the Ollama Modelfile that goes beside it. It knows the format, not runs: gguf_export.py builds a run's
file with it, gguf_measure.py measures a base model's files with it.

Every tensor is renamed to llama.cpp's names, Llama's q/k projections are permuted into llama.cpp's RoPE layout,
and the weights are written at the chosen type with the ``gguf`` package's NumPy quantizers. Metadata carries what
llama.cpp needs to run the file alone: architecture, sizes, context length, RoPE settings, the tokenizer
(vocabulary, merges, token types, special ids, whether BOS/EOS are added) and the chat template.
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

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from finetune.core.config import EMBEDDED_MODEL
from finetune.core.data import first_line
from finetune.core.models import ModelSourceError, embedded_model_dir, from_hub_or_cache
from finetune.core.paths import local_paths_mode
from finetune.core.run_folder import PARTIAL_SUFFIX
from finetune.core.storage import disk_full_message, free_bytes, is_disk_full
from finetune.services.export import ExportError, Progress, no_progress

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


# --- checks before any work ---------------------------------------------------------------------------------------

def check_type(out_type: str) -> str:
    out_type = (out_type or "").strip().lower()
    if out_type not in GGUF_TYPES:
        raise ExportError(f"GGUF type must be one of {', '.join(GGUF_TYPES)}, got {out_type!r}.")
    return out_type


def _supported() -> str:
    return "; ".join(f"{kind} ({text})" for kind, text in SUPPORTED_MODEL_TYPES.items())


def base_model_config(source: str) -> Any:
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


# --- tensors ------------------------------------------------------------------------------------------------------

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


# --- metadata -----------------------------------------------------------------------------------------------------

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
             f"#   ollama create {ollama_name(gguf_name)} -f {modelfile_name(gguf_name)}", "", f"FROM ./{gguf_name}", ""]
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


def ollama_name(gguf_name: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", Path(gguf_name).stem.lower()).strip("-") or "lora-lab"


def modelfile_name(gguf_name: str) -> str:
    return Path(gguf_name).stem + MODELFILE_SUFFIX


def ollama_command(result: "GgufExport", in_folder: bool | None = None) -> str:
    """The command that creates the Ollama model. ``in_folder`` (default: where pages may show server paths, see
    ``paths.local_paths_mode``) starts it with a cd into the file's folder; on a Space a visitor runs it where
    their two downloads landed, and the server's folder is neither theirs nor something to show them."""
    create = f"ollama create {ollama_name(result.path.name)} -f {result.modelfile.name}"
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


def convert_folder(model_dir: Path, target: Path, out_type: str, tokenizer: Any, name: str,
                   progress: Progress = no_progress) -> GgufExport:
    """Write ``model_dir`` (a saved Llama-family transformers model) as one GGUF at ``target``. Written to a
    ``.partial`` file that is renamed at the end, and removed on any failure."""
    from gguf import GGUFWriter
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    check_architecture(config)
    plans = plan_tensors(model_dir, config, out_type)
    needed = sum(tensor_nbytes(p.shape, p.qtype) for p in plans)
    target.parent.mkdir(parents=True, exist_ok=True)
    free = free_bytes(target.parent)
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
