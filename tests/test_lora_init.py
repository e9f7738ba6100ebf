"""LoRA initialisations: the config value -> peft mapping, where each one does not apply, and LoftQ on the tiny model
quantized to 4 bits by bitsandbytes on the CPU (the step-0 error checked against numpy's SVD of the residual)."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from finetune.core.config import ConfigError, LoraSettings, ModelConfig, from_dict
from finetune.core.lora_init import check_init, init_problems, peft_init_kwargs
from finetune.services.adapter_inspect import InspectError, step0_comparison, step0_quantization_error

RANK = 4
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def run_config(init: str, bits: int = 4, **lora: object):
    return from_dict({"model": {"source": "smollm2-135m-instruct", "bits": bits}, "lora": {"init": init, **lora}})


@pytest.mark.parametrize("init, expected", [("default", True), ("loftq", True), ("pissa", "pissa"),
                                            ("olora", "olora")])
def test_each_init_maps_to_peft(init, expected):
    # LoftQ builds peft's default adapter and then sets A and B itself (apply_loftq): peft's own LoftQ needs CUDA.
    assert peft_init_kwargs(LoraSettings(init=init)) == {"init_lora_weights": expected}


def test_an_unknown_init_is_a_config_error():
    with pytest.raises(ConfigError) as error:
        LoraSettings(init="gaussian")
    assert error.value.problems == {"lora.init": "LoRA initialisation must be one of default, loftq, pissa, olora, "
                                                 "got 'gaussian'"}


@pytest.mark.parametrize("config", [run_config("default"), run_config("loftq"), run_config("olora", bits=16),
                                    run_config("pissa", bits=16), run_config("loftq", method="rslora")])
def test_inits_that_apply_raise_nothing(config):
    assert init_problems(config) == []
    check_init(config)


@pytest.mark.parametrize("config, message", [
    (run_config("loftq", bits=16),
     "LoftQ starts the adapter as a fix for the 4-bit quantization error; a 16-bit run has no quantization error, so "
     "LoftQ would start A and B at zero and nothing would train. Use the default, or pick 4 bits."),
    (run_config("loftq", bits=8),
     "LoftQ is offered for 4-bit bases only (8-bit quantization error is far smaller); pick 4 bits or the default "
     "initialisation."),
    (run_config("pissa", bits=4),
     "PiSSA splits the weight itself into adapter + residual, which peft does only on a 16 or 32-bit base; this run "
     "loads the base at 4 bits. Use LoftQ to start closer to the full-precision weights at 4 bits."),
    (run_config("olora", bits=4),
     "OLoRA takes part of each weight into the adapter and re-quantizes the rest, so its result cannot be turned "
     "back into a LoRA on the unchanged 4-bit base (and on the 4-bit embedded model it starts farther from the "
     "full-precision weights than the default). Use 16 or 32 bits, or LoftQ at 4 bits."),
    (run_config("olora", bits=16, method="dora"),
     "OLoRA initialises LoRA's A and B matrices; the method 'dora' has none to initialise (DoRA's magnitudes start "
     "from the base weights, so it keeps the default start)."),
])
def test_inits_that_do_not_apply_say_why(config, message):
    assert init_problems(config) == [message]
    with pytest.raises(ConfigError) as error:
        check_init(config)
    assert error.value.problems == {"lora.init": message}


def test_loftq_needs_the_full_precision_safetensors(tmp_path):
    assert init_problems(run_config("loftq"), weights_folder=tmp_path) == [
        "LoftQ starts from the base's full-precision weights and reads them from safetensors files; the base "
        "model's folder has none."]


def test_continuing_an_adapter_has_nothing_to_initialise():
    config = from_dict({"stage": "dpo", "lora": {"init": "loftq"}, "preference": {"start_adapter": "sft-run"}})
    assert init_problems(config) == ["This run continues the adapter 'sft-run', so there is no new adapter for LoftQ "
                                     "to initialise; use the default."]


# --- LoftQ on a real 4-bit base ------------------------------------------------------------------------------

def numpy_step0_errors(model_dir, rank: int) -> tuple[float, float]:
    """(default, best rank-r) step-0 errors computed here: each weight quantized by bitsandbytes' NF4 function
    directly (blocksize 64, double quant: what transformers' 4-bit loading does), residual SVD by numpy."""
    import bitsandbytes.functional as bnb_f
    import torch

    weights = load_file(str(model_dir / "model.safetensors"))
    residual_sq = best_sq = total_sq = 0.0
    for name, weight in weights.items():
        if not name.startswith("model.layers.") or weight.ndim != 2:
            continue
        packed, state = bnb_f.quantize_4bit(torch.from_numpy(weight), blocksize=64, compress_statistics=True,
                                            quant_type="nf4")
        residual = weight.astype(np.float64) - bnb_f.dequantize_4bit(packed, state).numpy().astype(np.float64)
        singular = np.linalg.svd(residual, compute_uv=False)
        residual_sq += np.sum(singular ** 2)
        best_sq += np.sum(singular[rank:] ** 2)  # Eckart-Young: what is left after the best rank-r fix
        total_sq += np.sum(weight.astype(np.float64) ** 2)
    return float(np.sqrt(residual_sq / total_sq)), float(np.sqrt(best_sq / total_sq))


@pytest.mark.trajectory
def test_loftq_starts_closer_to_the_full_precision_weights_than_the_default(tiny_model_dir):
    model = ModelConfig(source=str(tiny_model_dir), bits=4, quant_type="nf4", double_quant=True)
    # alpha = 2r, the usual choice: a LoftQ that forgot to divide by alpha/r would start exactly as far as the default.
    default, loftq = step0_comparison(model, LoraSettings(rank=RANK, alpha=2 * RANK, target_modules=TARGETS))
    expected_default, expected_loftq = numpy_step0_errors(tiny_model_dir, RANK)
    assert default.matrices == loftq.matrices == 14
    assert default.relative_error == pytest.approx(expected_default, rel=1e-4)
    assert loftq.relative_error == pytest.approx(expected_loftq, rel=1e-4)
    assert loftq.relative_error < default.relative_error
    assert "closer than the default start" in loftq.caption(default)


def test_step0_error_needs_a_4_bit_base(tiny_model_dir):
    with pytest.raises(InspectError, match="^The step-0 quantization error is measured on a 4-bit base; this config "
                                           "loads the base at 16 bits.$"):
        step0_quantization_error(ModelConfig(source=str(tiny_model_dir), bits=16), LoraSettings(), "loftq")


def test_a_tied_output_head_is_read_from_the_input_embeddings(tiny_model_dir):
    import torch

    from finetune.core.lora_init import full_precision_weights, read_weight

    files = full_precision_weights(tiny_model_dir)
    assert "lm_head.weight" not in files  # the tiny Llama ties its head to the embeddings, as SmolLM2 does
    assert torch.equal(read_weight(files, "lm_head"), read_weight(files, "model.embed_tokens"))
    assert read_weight(files, "model.layers.0.self_attn.nowhere") is None


@pytest.mark.trajectory
def test_loftq_start_brings_the_4_bit_models_outputs_closer_to_full_precision(tiny_model_dir):
    """The weights are closer (above); so is what the model computes: the step-0 logits of the 4-bit model with a
    LoftQ start are nearer the full-precision model's than with the default start (the 4-bit base alone)."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.services.adapter_inspect import step0_model

    tokens = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(tokens).logits
        model = ModelConfig(source=str(tiny_model_dir), bits=4)
        lora = LoraSettings(rank=RANK, alpha=2 * RANK, target_modules=TARGETS)
        distance = {init: float(torch.linalg.norm(step0_model(model, lora, init)[0](input_ids=tokens).logits
                                                  - reference)) for init in ("default", "loftq")}
    assert 0 < distance["loftq"] < distance["default"]


@pytest.mark.trajectory
def test_loftq_on_the_sft_trainers_model_starts_closer_and_trains(tmp_path, tiny_model_dir, qa_file):
    """The wiring the SFT stage needs: LoftQ applied to the model TRL's SFTTrainer has wrapped (4-bit base, peft
    adapter), before the first forward; then real training steps run and the loss is finite."""
    import math

    from helpers import tiny_run_config
    from finetune.core.data import prepare
    from finetune.core.hardware import detect
    from finetune.core.lora_init import apply_loftq, reconstruction_error
    from finetune.core.models import load_model, load_tokenizer
    from finetune.stages.sft import sft_trainer

    cfg = tiny_run_config(tiny_model_dir, qa_file, max_steps=2, eval_steps=0)
    profile, tokenizer = detect(), load_tokenizer(cfg.model)
    data = prepare(cfg.data, tokenizer, seed=cfg.training.seed)
    trainer = sft_trainer(cfg, profile, load_model(cfg.model, profile), tokenizer, data.train, None, tmp_path, [])
    before, matrices = reconstruction_error(trainer.model, tiny_model_dir)
    apply_loftq(trainer.model, tiny_model_dir)
    after, _ = reconstruction_error(trainer.model, tiny_model_dir)
    assert matrices == 14 and after < before
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


# --- through the SFT stage ------------------------------------------------------------------------------------

def with_init(cfg, init: str):
    from finetune.core.config import from_dict, to_dict

    raw = to_dict(cfg)
    raw["lora"]["init"] = init
    return from_dict(raw)


@pytest.mark.trajectory
def test_a_loftq_run_starts_closer_to_the_full_weights_and_records_it(tiny_model_dir, qa_file, tmp_path):
    """The Train tab's choice reaches the stage: a 4-bit LoftQ run's base + adapter starts closer to the
    full-precision weights than the default run's, both measured by the stage and written to run_info."""
    from helpers import tiny_run_config
    from finetune.core.run_folder import ADAPTER_DIR, has_adapter, read_run_info
    from finetune.train import run

    infos = {}
    for init in ("default", "loftq"):
        cfg = with_init(tiny_run_config(tiny_model_dir, qa_file, max_steps=1, eval_steps=0), init)
        assert run(cfg, tmp_path / init) == 0
        assert has_adapter(tmp_path / init / ADAPTER_DIR)
        infos[init] = read_run_info(tmp_path / init)
    assert infos["loftq"]["lora_init"] == "loftq" and infos["loftq"]["init_seconds"] >= 0
    assert 0 < infos["loftq"]["step0_weight_error"] < infos["default"]["step0_weight_error"]
    # The run history tells the two apart.
    from components.train_runs import run_history
    from finetune.core.config import save_config
    from finetune.services.runs import RunManager

    for init in ("default", "loftq"):
        save_config(with_init(tiny_run_config(tiny_model_dir, qa_file), init), tmp_path / init / "config.yaml")
    history, *_ = run_history(RunManager(tmp_path))
    assert dict(zip(history["run id"], history["method"])) == {"default": "lora", "loftq": "lora + loftq"}


def test_a_pissa_run_is_saved_as_a_plain_lora_on_the_unchanged_base(tiny_model_dir, qa_file, tmp_path):
    """PiSSA moves W's top directions into the adapter; the saved result is converted (peft's
    path_initial_model_for_weight_conversion), so the unchanged base + saved adapter computes what the trained
    model computed: PiSSA's changed base + its unconverted last checkpoint."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from helpers import tiny_run_config
    from finetune.core.run_folder import ADAPTER_DIR, CHECKPOINT_DIR, adapter_config
    from finetune.train import run

    cfg = with_init(tiny_run_config(tiny_model_dir, qa_file, max_steps=2, save_steps=2, eval_steps=0, bits=32),
                    "pissa")
    assert run(cfg, tmp_path / "run") == 0
    saved = tmp_path / "run" / ADAPTER_DIR
    assert adapter_config(saved)["r"] == 2 * cfg.lora.rank  # the converted form: rank doubles
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        converted = PeftModel.from_pretrained(base, str(saved)).eval()(ids).logits
        start = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        trained = get_peft_model(start, LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                                                   target_modules=cfg.lora.target_module_list(),
                                                   init_lora_weights="pissa"))
        last = tmp_path / "run" / CHECKPOINT_DIR / "checkpoint-2" / "adapter_model.safetensors"
        set_peft_model_state_dict(trained, load_file(last))
        expected = trained.eval()(ids).logits
    assert torch.allclose(converted, expected, atol=1e-4)
    # Evaluate offers the converted final adapter only, not the unconverted checkpoints.
    from finetune.services.evaluate import run_checkpoints

    assert run_checkpoints(tmp_path / "run") == [("final adapter", saved)]


def test_the_lora_aid_says_how_the_adapter_starts():
    """The Train tab's LoRA aid: "B starting at 0" is the default's start only; LoftQ's B·A is not 0 at step 0."""
    from components.lora_aid import lora_aid_markdown

    form = ("smollm2-135m-instruct", 8, 16, "all-linear", 4, "nf4", True, "paged_adamw_8bit")
    assert "B starting at 0" in lora_aid_markdown(*form)
    loftq = lora_aid_markdown(*form, "loftq")
    assert "LoftQ" in loftq and "B starting at 0" not in loftq
