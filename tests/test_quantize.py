"""Quantization side by side on the tiny model: every format really loads through bitsandbytes on the CPU, and the
measured bytes of the quantized layers follow what each format stores per weight."""

from __future__ import annotations

import math

import pytest


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    from helpers import write_jsonl
    from finetune.core.config import DataConfig
    from finetune.services.evaluate import eval_rows

    data = [{"prompt": f"What is rank {i}?", "completion": f"Rank {i} sets the adapter's size."} for i in range(4)]
    return eval_rows(DataConfig(source=str(write_jsonl(tmp_path_factory.mktemp("q") / "v.jsonl", data))))


@pytest.fixture(scope="module")
def results(tiny_model_dir, rows):
    from finetune.services.quantize import FORMATS, compare

    measured = {r.key: r for r in compare(str(tiny_model_dir), list(FORMATS), rows, "What is LoRA?",
                                          max_new_tokens=4)}
    assert list(measured) == list(FORMATS)
    return measured


def test_every_format_is_measured(results):
    for r in results.values():
        assert r.weights > 0 and r.layer_bytes > 0 and r.model_bytes > r.layer_bytes * 0.5
        assert math.isfinite(r.perplexity) and r.perplexity > 1
        assert r.tokens_per_second > 0 and isinstance(r.answer, str)


def test_memory_follows_the_bits_per_weight(results):
    layers = {k: r.layer_bytes for k, r in results.items()}
    assert len({r.weights for r in results.values()}) == 1  # the same layers are measured in every format
    assert layers["16bit"] == layers["fp32"] // 2
    assert 0.5 <= layers["int8"] / layers["16bit"] < 0.56       # 1 byte + an fp32 scale per row
    for key in ("nf4", "fp4"):
        assert 0.25 <= layers[key] / layers["16bit"] < 0.30     # 0.5 byte + an fp32 absmax per 64 weights
    # The measured bytes match each format's per-weight arithmetic within a few percent...
    for key in ("fp32", "16bit", "int8", "nf4", "fp4"):
        assert results[key].layer_bytes == pytest.approx(results[key].theoretical_bytes, rel=0.05), key
    # ...except that double quant also keeps a 256-entry fp32 code table per layer: on the tiny model's 14 small
    # layers that outweighs what it saves (on SmolLM2's large layers it saves ~8%, see the README).
    for key in ("nf4-dq", "fp4-dq"):
        extra = results[key].layer_bytes - results[key].theoretical_bytes
        assert 0 < extra <= 14 * 1100, key  # per layer: 1 KB code table, fp32 offset, blocks rounded up


def test_quantization_costs_little_perplexity_on_16_bit_and_8_bit(results):
    full = results["fp32"].perplexity
    assert results["16bit"].perplexity == pytest.approx(full, rel=0.02)
    assert results["int8"].perplexity == pytest.approx(full, rel=0.05)


def test_linear_layers_are_really_replaced(tiny_model_dir):
    import bitsandbytes as bnb

    from finetune.core.models import load_model
    from finetune.services.quantize import FORMATS, quantizable_linears

    model = load_model(FORMATS["nf4-dq"].model_config(str(tiny_model_dir)))
    layers = quantizable_linears(model)
    assert layers and all(isinstance(m, bnb.nn.Linear4bit) for _, m in layers)
    assert all(m.weight.quant_state.nested for _, m in layers)
    assert not isinstance(model.get_output_embeddings(), bnb.nn.Linear4bit)  # the LM head stays unquantized


def test_quant_tab_streams_rows_and_rejects_bad_input(tiny_model_dir):
    import gradio as gr

    from components.quant_tab import run_comparison
    from finetune.core.hardware import detect

    profile = detect()
    steps = list(run_comparison(profile, str(tiny_model_dir), ["fp32", "nf4"], "bundled:course_qa", "validation",
                                2, "Hi", 4))
    table, points, answers, status = steps[-1]
    assert list(table["format"]) == ["float32", "NF4"] and len(points) == 2 and len(answers) == 2
    assert "Measured 2 format(s)" in status
    assert steps[0][1] is None  # the chart is rebuilt for each new series
    with pytest.raises(gr.Error, match="Pick at least one format"):
        list(run_comparison(profile, str(tiny_model_dir), [], "bundled:course_qa", "validation", 2, "Hi", 4))
    with pytest.raises(gr.Error, match="Validation rows"):
        list(run_comparison(profile, str(tiny_model_dir), ["fp32"], "bundled:course_qa", "validation", 0, "Hi", 4))
    with pytest.raises(gr.Error, match="no split 'nope'"):
        list(run_comparison(profile, str(tiny_model_dir), ["fp32"], "bundled:course_qa", "nope", 2, "Hi", 4))
    with pytest.raises(gr.Error, match="failed: .*neither the embedded model"):
        list(run_comparison(profile, "not a model", ["fp32"], "bundled:course_qa", "validation", 2, "Hi", 4))
