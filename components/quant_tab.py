"""The Quantization tab: one model at 32/16-bit, LLM.int8 and 4-bit NF4/FP4 (± double quant), side by side.

For each format: measured memory of the quantized layers, the theoretical size, the whole model's footprint,
perplexity on a validation set, greedy tokens/s and the answer to one prompt; and a chart of memory vs perplexity.
Formats load one at a time and each row appears as soon as it is measured.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import gradio as gr
import pandas as pd

from components.shared import bind, refusal, visitor_of
from finetune.core import paths
from finetune.core.access import AccessDenied, require_signed_in
from finetune.core.config import BUNDLED_DATASET, EMBEDDED_MODEL
from finetune.core.data import first_line
from finetune.core.hardware import HardwareProfile
from finetune.core.models import ModelSourceError
from finetune.services.chat import MAX_PROMPT_CHARS
from finetune.services.evaluate import load_eval_rows
from finetune.services.export import ExportError
from finetune.services.gguf_measure import GgufMeasurement, measure_gguf
from finetune.services.quantize import FORMATS, MB, QuantResult, measure

COLUMNS = ["format", "quantized layers (MB, measured)", "theoretical (MB)", "bits / weight", "vs 16-bit",
           "whole model (MB)", "perplexity", "vs fp32", "tokens/s"]
ANSWER_COLUMNS = ["format", "answer"]
# llama.cpp's block formats beside bitsandbytes' (finetune/services/gguf_convert.py writes them): blocks of 32
# weights with one fp16 scale (and a minimum in the _1 types), against NF4's 64-weight blocks of normal-distributed
# levels.
GGUF_FORMATS = {"gguf-q8_0": ("q8_0", "GGUF Q8_0: 8-bit integers in blocks of 32, one fp16 scale each (8.5 bits "
                                      "per weight). llama.cpp's near-lossless type."),
                "gguf-q5_1": ("q5_1", "GGUF Q5_1: 5-bit integers in blocks of 32 with an fp16 scale and minimum "
                                      "(6 bits per weight)."),
                "gguf-q4_0": ("q4_0", "GGUF Q4_0: 4-bit integers in blocks of 32 with one fp16 scale (4.5 bits "
                                      "per weight): evenly spaced levels, where NF4 spaces them like a normal "
                                      "distribution.")}
GGUF_BITS = {"q8_0": 8.5, "q5_1": 6.0, "q4_0": 4.5}

LEARN_QUANT = """**What quantization stores per weight.** A 32-bit float takes 4 bytes and a 16-bit float 2. LLM.int8
keeps one signed byte per weight plus one fp32 scale per row. 4-bit formats (NF4, FP4) keep a 4-bit index into a
16-level table per weight (two per byte) plus one scale (*absmax*) per block of 64 weights; *double quantization*
stores those scales in 8 bits too. At compute time each block is dequantized to the compute dtype (fp32 on the CPU,
fp16/bf16 on a GPU) just before its matrix multiply, so memory shrinks ~4-8x while the arithmetic stays 16/32-bit.
Only the Linear layers are quantized; embeddings, norms and the LM head stay in 16/32-bit.

**QLoRA** = this 4-bit NF4 base (frozen, double-quantized) + LoRA adapters trained in 16/32-bit on top, with a
*paged* optimizer whose states move to CPU RAM when GPU memory runs short. The adapters train against the rounded
weights, so they can make up part of the rounding error. How much 4-bit costs depends on the model: the QLoRA paper
measured 7-65B models; a small model loses more. The comparison below measures it on yours (memory, perplexity
against fp32), and the Evaluate tab measures what an adapter trained on the 4-bit base recovers."""


def format_choices(profile: HardwareProfile) -> list[tuple[str, str]]:
    return [(f.label(profile), f.key) for f in FORMATS.values()] + [
        (f"GGUF {out_type.upper()}", key) for key, (out_type, _) in GGUF_FORMATS.items()]


def gguf_result(key: str, measured: GgufMeasurement) -> QuantResult:
    """A GGUF measurement as a row of the table; 'whole model' is the file's size, tokens/s is not measured (the
    file is loaded back dequantized to fp32, so its speed would say nothing about llama.cpp's)."""
    return QuantResult(key, f"GGUF {measured.out_type.upper()}", measured.layer_bytes, measured.file_bytes,
                       measured.weights * GGUF_BITS[measured.out_type] / 8, measured.weights, measured.loss,
                       measured.perplexity, math.nan, measured.answer, 0.0)


def _row(result: QuantResult, reference: dict[str, QuantResult]) -> list[Any]:
    half = reference.get("16bit")
    full = reference.get("fp32")
    return [result.label, round(result.layer_bytes / MB, 2), round(result.theoretical_bytes / MB, 2),
            round(result.bits_per_weight, 3),
            f"{result.layer_bytes / half.layer_bytes:.3f}x" if half else "–",
            round(result.model_bytes / MB, 1), round(result.perplexity, 3),
            f"{100 * (result.perplexity / full.perplexity - 1):+.1f}%" if full else "–",
            "–" if math.isnan(result.tokens_per_second) else round(result.tokens_per_second, 2)]


def _check(source: str, keys: list[str] | None, limit: float | None, max_new_tokens: float, prompt: str) -> None:
    if not (source or "").strip():
        raise refusal("Enter a model: the embedded name, a Hub id or a local folder.")
    if not keys:
        raise refusal("Pick at least one format.")
    if not limit or limit < 1 or not float(limit).is_integer():
        raise refusal(f"Validation rows must be a whole number of at least 1, got {limit!r}.")
    if not max_new_tokens or not 1 <= max_new_tokens <= 512:
        raise refusal(f"Max new tokens must be from 1 to 512, got {max_new_tokens!r}.")
    if not isinstance(prompt, str) or not prompt.strip():
        raise refusal("Type a prompt for the answers.")
    if len(prompt) > MAX_PROMPT_CHARS:  # a 1 MB prompt would tie up the CPU for every format in turn
        raise refusal(f"The prompt is {len(prompt):,} characters long; keep it under {MAX_PROMPT_CHARS:,}.")


def run_comparison(profile: HardwareProfile, source: str, keys: list[str] | None, data_source: str, split: str,
                   limit: float, prompt: str, max_new_tokens: float, request: gr.Request = None
                   ) -> Iterator[tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame, str]]:
    """Measure each chosen format in turn; yields (table, memory-vs-perplexity points, answers, status). On a
    shared app only a signed-in visitor loads models onto the shared device."""
    try:
        require_signed_in(visitor_of(request), "run a quantization comparison")
    except AccessDenied as error:
        raise refusal(str(error)) from None
    _check(source, keys, limit, max_new_tokens, prompt)
    try:
        source = paths.model_source(source)  # the gated (in listed roots: resolved) path is the one read
    except paths.PathRefused as error:
        raise refusal(str(error)) from None
    ordered = [k for k in (*FORMATS, *GGUF_FORMATS) if k in keys]
    unknown = sorted(set(keys) - set(FORMATS) - set(GGUF_FORMATS))
    if unknown:
        raise refusal(f"Unknown format(s) {', '.join(unknown)}; choose from {', '.join((*FORMATS, *GGUF_FORMATS))}.")
    try:
        rows = load_eval_rows(data_source or BUNDLED_DATASET, split or "validation", int(limit))
    except ValueError as error:
        raise refusal(str(error)) from None
    results: dict[str, QuantResult] = {}
    for index, key in enumerate(ordered):
        # None first: gradio's plot fixes its colour domain on first data, so a new series needs a rebuilt chart.
        label = FORMATS[key].label(profile) if key in FORMATS else f"GGUF {GGUF_FORMATS[key][0].upper()}"
        yield (_table(results), None, _answers(results),
               f"Loading and measuring **{label}** ({index + 1}/{len(ordered)})…")
        try:
            results[key] = _measure(profile, key, source.strip(), rows, prompt.strip(), int(max_new_tokens))
        except (ModelSourceError, ExportError, ValueError, RuntimeError, OSError, ImportError) as error:
            raise gr.Error(f"{label} failed: {first_line(error)}") from None
        yield (_table(results), _points(results), _answers(results),
               _summary(results) if index == len(ordered) - 1 else gr.skip())


def _measure(profile: HardwareProfile, key: str, source: str, rows: Any, prompt: str, max_new_tokens: int
             ) -> QuantResult:
    if key in GGUF_FORMATS:
        return gguf_result(key, measure_gguf(source, GGUF_FORMATS[key][0], rows, prompt, max_new_tokens))
    return measure(FORMATS[key], source, rows, prompt, max_new_tokens, profile=profile)


def _table(results: dict[str, QuantResult]) -> pd.DataFrame:
    return pd.DataFrame([_row(r, results) for r in results.values()], columns=COLUMNS)


def _answers(results: dict[str, QuantResult]) -> pd.DataFrame:
    return pd.DataFrame([(r.label, r.answer) for r in results.values()], columns=ANSWER_COLUMNS)


def _points(results: dict[str, QuantResult]) -> pd.DataFrame | None:
    if not results:
        return None
    return pd.DataFrame([(r.label, round(r.layer_bytes / MB, 2), round(r.perplexity, 3)) for r in results.values()],
                        columns=["format", "memory (MB)", "perplexity"])


NEAR_LOSSLESS_PERCENT = 1.0  # a perplexity change below this is within what re-running the rows would move


def _summary(results: dict[str, QuantResult]) -> str:
    """What the learner's own numbers show about 4-bit: its memory and its perplexity against fp32, in words
    that follow the numbers (not a claim that 4-bit matches 16-bit)."""
    done = f"Measured {len(results)} format(s)."
    nf4, full, half = results.get("nf4-dq"), results.get("fp32"), results.get("16bit")
    if nf4 is None or full is None:
        return done + " Measure fp32 and NF4 + double quant together to see what 4-bit costs on this model."
    change = 100 * (nf4.perplexity / full.perplexity - 1)
    memory = (f"{nf4.layer_bytes / half.layer_bytes:.2f}x the 16-bit memory" if half else
              f"{nf4.layer_bytes / full.layer_bytes:.2f}x the fp32 memory")
    verdict = ("about the same perplexity as fp32" if abs(change) < NEAR_LOSSLESS_PERCENT else
               f"perplexity {change:+.1f}% vs fp32: on this model 4-bit rounding {'costs' if change > 0 else 'changes'}"
               " quality before any training")
    return (f"{done} NF4 + double quant holds the quantized layers in {memory}, with {verdict}. Whether an adapter "
            "trained on this 4-bit base makes that up is for the Evaluate tab to measure.")


def explanations_markdown(profile: HardwareProfile) -> str:
    return "\n".join([f"- **{f.label(profile)}**: {f.explanation}" for f in FORMATS.values()]
                     + [f"- **{text.split(':')[0]}**:{text.split(':', 1)[1]}" for _, text in GGUF_FORMATS.values()])


def build_quant_tab(profile: HardwareProfile) -> dict[str, Any]:
    gr.Markdown(LEARN_QUANT)
    with gr.Accordion("The formats", open=False):
        gr.Markdown(explanations_markdown(profile))
    ui: dict[str, Any] = {}
    with gr.Row():
        ui["source"] = gr.Textbox(value=EMBEDDED_MODEL, label="Model", elem_id="quant-source", scale=2,
                                  info="The embedded model, a Hub id or a local folder.")
        ui["formats"] = gr.CheckboxGroup(format_choices(profile), value=list(FORMATS), label="Formats",
                                         elem_id="quant-formats", scale=3)
    with gr.Row():
        ui["data_source"] = gr.Textbox(value=BUNDLED_DATASET, label="Validation data")
        ui["split"] = gr.Textbox(value="validation", label="Split")
        ui["limit"] = gr.Number(value=12, precision=0, minimum=1, label="Validation rows", elem_id="quant-limit")
    with gr.Row():
        ui["prompt"] = gr.Textbox(value="What does QLoRA freeze and what does it train?", label="Prompt", scale=3)
        ui["max_new_tokens"] = gr.Slider(4, 256, value=24, step=4, label="Max new tokens", elem_id="quant-tokens")
    ui["run"] = gr.Button("Load and compare", variant="primary", elem_id="quant-run")
    ui["status"] = gr.Markdown(elem_id="quant-status")
    ui["table"] = gr.Dataframe(pd.DataFrame(columns=COLUMNS), interactive=False, wrap=True, elem_id="quant-table")
    ui["plot"] = gr.ScatterPlot(None, x="memory (MB)", y="perplexity", color="format",
                                title="Memory of the quantized layers vs perplexity", elem_id="quant-plot",
                                height=320)
    ui["answers"] = gr.Dataframe(pd.DataFrame(columns=ANSWER_COLUMNS), interactive=False, wrap=True,
                                 label="The same prompt, greedy, in each format", elem_id="quant-answers")
    ui["run"].click(bind(run_comparison, profile),
                    [ui[k] for k in ("source", "formats", "data_source", "split", "limit", "prompt",
                                     "max_new_tokens")],
                    [ui["table"], ui["plot"], ui["answers"], ui["status"]], api_name="quantize_compare",
                    concurrency_limit=1, concurrency_id="quantize")
    return ui
