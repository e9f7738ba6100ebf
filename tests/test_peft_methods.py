"""PEFT methods beyond LoRA, all through peft: config, peft objects, parameter estimates, training, chat."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import tiny_run_config
from finetune.core.config import PEFT_METHODS, ConfigError, LoraSettings, ModelConfig, RunConfig, from_dict, load_config
from finetune.stages.sft import to_peft_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_method_defaults_to_lora_and_every_preset_stays_valid():
    assert LoraSettings().method == "lora"
    for path in CONFIGS.glob("*.yaml"):
        load_config(path)  # raises on any unknown or invalid field


@pytest.mark.parametrize("lora, field", [
    ({"method": "adapterx"}, "lora.method"),
    ({"method": "prompt_tuning", "num_virtual_tokens": 0}, "lora.num_virtual_tokens"),
    ({"method": "ia3", "ia3_feedforward_modules": " "}, "lora.ia3_feedforward_modules"),
])
def test_bad_method_settings_name_their_field(lora, field):
    with pytest.raises(ConfigError) as error:
        from_dict({"lora": lora})
    assert field in error.value.problems


@pytest.mark.parametrize("bits", [4, 8])
def test_full_fine_tuning_refuses_a_quantized_base(bits):
    with pytest.raises(ConfigError) as error:
        from_dict({"model": {"bits": bits}, "lora": {"method": "full"}})
    assert "16 or 32" in error.value.problems["model.bits"]


def test_bits_stay_independent_of_the_method():
    for bits in (4, 8, 16, 32):
        assert from_dict({"model": {"bits": bits}, "lora": {"method": "ia3"}}).model.bits == bits


def test_peft_config_per_method(tiny_model_dir):
    from peft import IA3Config, LoraConfig, PromptTuningConfig

    def peft_for(**lora):
        return to_peft_config(RunConfig(model=ModelConfig(source=str(tiny_model_dir), bits=32),
                                        lora=LoraSettings(**lora)))

    plain, dora, rslora = peft_for(), peft_for(method="dora"), peft_for(method="rslora")
    assert isinstance(plain, LoraConfig) and not plain.use_dora and not plain.use_rslora
    assert dora.use_dora and not dora.use_rslora and rslora.use_rslora and not rslora.use_dora
    ia3 = peft_for(method="ia3", target_modules="q_proj,down_proj", ia3_feedforward_modules="down_proj")
    assert isinstance(ia3, IA3Config) and set(ia3.feedforward_modules) == {"down_proj"}
    prompt = peft_for(method="prompt_tuning", num_virtual_tokens=5, prompt_init_text="Answer as a lab note:")
    assert isinstance(prompt, PromptTuningConfig) and prompt.num_virtual_tokens == 5
    assert prompt.prompt_tuning_init == "TEXT" and prompt.tokenizer_name_or_path == str(tiny_model_dir)
    assert peft_for(method="full") is None


@pytest.mark.parametrize("lora", [
    {"method": "lora"}, {"method": "dora"}, {"method": "rslora", "bias": "all"}, {"method": "ia3"},
    {"method": "ia3", "target_modules": "q_proj,up_proj,down_proj", "ia3_feedforward_modules": "up_proj,down_proj"},
    {"method": "prompt_tuning", "num_virtual_tokens": 7}, {"method": "full"},
])
def test_estimated_trainable_parameters_match_peft(tiny_model_dir, lora):
    """The Train tab's estimate (from the config only) equals what peft counts on the loaded model."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.core.estimate import model_shape, peft_parameter_count

    cfg = RunConfig(model=ModelConfig(source=str(tiny_model_dir), bits=32), lora=LoraSettings(rank=4, **lora))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_config = to_peft_config(cfg)
    if peft_config is None:
        counted = (sum(p.numel() for p in model.parameters()),) * 2
    else:
        counted = get_peft_model(model, peft_config).get_nb_trainable_parameters()
    assert peft_parameter_count(model_shape(cfg.model), cfg.lora) == tuple(counted)


def test_every_method_has_help_text():
    from finetune.core.config import field_help

    text = field_help("lora", "method")
    assert all(f"'{method}'" in text for method in PEFT_METHODS)
    for name in ("ia3_feedforward_modules", "num_virtual_tokens", "prompt_init_text"):
        assert field_help("lora", name)


@pytest.mark.parametrize("method", ["prompt_tuning", "dora"])
def test_methods_train_and_save_their_adapter(tmp_path, tiny_model_dir, qa_file, method):
    """Methods the comparison test does not run (it runs full, IA3 and LoRA at 4/8/16 bits) train here."""
    from finetune.core.run_status import read_metrics
    from finetune.train import run

    cfg = tiny_run_config(tiny_model_dir, qa_file, bits=4 if method == "dora" else 32, max_steps=3,
                          learning_rate=0.05)
    cfg.lora.method = method
    assert run(cfg, tmp_path) == 0, (tmp_path / "status.json").read_text()
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == {"prompt_tuning": "PROMPT_TUNING", "dora": "LORA"}[method]
    assert saved.get("use_dora", False) == (method == "dora")
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert len(losses) == 3
    if method == "prompt_tuning":
        assert losses[-1] < losses[0]  # a large step on 20 free embeddings shows within 3 steps
    else:  # LoRA's B starts at zero: any trained step leaves it non-zero (on a 4-bit base: QDoRA)
        from safetensors.torch import load_file

        weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
        assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())
        assert any("magnitude" in k for k in weights)
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["peft_method"] == method and info["peak_memory_mb"] > 0 and info["saved_weights_mb"] > 0
    if method == "prompt_tuning":
        assert info["recipe"]["padding_free"] is False  # peft ignores position ids under prompt tuning
        assert info["trainable_parameters"] == cfg.lora.num_virtual_tokens * 64


def test_chat_streams_an_ia3_adapter_after_the_base(tmp_path, tiny_model_dir):
    """peft's mixed-adapter batches only take LoRA-type adapters: an IA3 one answers after the base instead."""
    import torch
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.services.chat import ChatEngine, SamplingSettings

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), IA3Config(task_type="CAUSAL_LM"))
    with torch.no_grad():  # IA3 starts as the identity; scale it so the adapted model really differs
        for name, parameter in model.named_parameters():
            if "ia3_l" in name:
                parameter.mul_(torch.linspace(0.0, 3.0, parameter.numel()).reshape(parameter.shape))
    model.save_pretrained(tmp_path / "ia3")
    engine = ChatEngine()
    cfg = ModelConfig(source=str(tiny_model_dir), bits=32)
    settings = SamplingSettings(max_new_tokens=6, temperature=0.0)
    frames = list(engine.stream_pair("Hello there", [], [], cfg, "ia3run", tmp_path / "ia3", settings))
    base, tuned = frames[-1]
    assert base and tuned and base != tuned
    assert frames[0][1] == ""  # the base side streamed first, the adapted side after it
    assert engine.base_loads == 1


def test_train_tab_form_carries_the_method_and_shows_its_fields():
    from components.train_form import config_from_form, form_from_config
    from components.train_form import METHOD_FIELDS, show_method_fields

    cfg = config_from_form({"lora_method": "prompt_tuning", "lora_num_virtual_tokens": 12.0,
                            "lora_prompt_init_text": "Lab note:", "model_bits": 16})
    assert (cfg.lora.method, cfg.lora.num_virtual_tokens, cfg.lora.prompt_init_text) == ("prompt_tuning", 12,
                                                                                          "Lab note:")
    assert form_from_config(cfg)["lora_method"] == "prompt_tuning"
    with pytest.raises(ConfigError) as error:
        config_from_form({"lora_method": "full", "model_bits": 4})
    assert "model.bits" in error.value.problems
    visible = {method: dict(zip(METHOD_FIELDS, (u["visible"] for u in show_method_fields(method))))
               for method in PEFT_METHODS}
    assert visible["lora"]["lora_rank"] and not visible["lora"]["lora_num_virtual_tokens"]
    assert visible["ia3"]["lora_ia3_feedforward_modules"] and not visible["ia3"]["lora_rank"]
    assert visible["prompt_tuning"]["lora_prompt_init_text"] and not visible["prompt_tuning"]["lora_target_modules"]
    assert not any(visible["full"].values())


def test_a_finished_full_fine_tune_is_not_sent_to_the_chat_tab():
    from components.train_runs import run_status_text

    done = {"state": "completed", "duration": 12}
    assert "Chat tab" in run_status_text("lora-run", done, adapter_saved=True)
    assert "not offered in Chat" in run_status_text("full-run", done, adapter_saved=False)
