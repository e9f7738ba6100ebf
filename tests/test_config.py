from pathlib import Path

import pytest

from finetune.core.config import (ConfigError, DataConfig, LoraSettings, ModelConfig, RunConfig, TrainingConfig,
                                  field_help, from_dict, load_config, save_config)

ROOT = Path(__file__).resolve().parent.parent


def problems_of(kind, **values) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        kind(**values)
    return caught.value.problems


@pytest.mark.parametrize("value, fragment", [(0, "between 1 and 4096"), (-3, "between 1 and 4096"), (100000, "between 1 and 4096"),
                                             (2.5, "whole number"), ("eight", "whole number"),
                                             (float("nan"), "whole number")])
def test_rank_must_be_a_positive_integer(value, fragment):
    problems = problems_of(LoraSettings, rank=value)
    assert fragment in problems["lora.rank"]
    assert "LoRA rank" in problems["lora.rank"]


def test_rank_accepts_integral_float_from_a_number_box():
    assert LoraSettings(rank=8.0).rank == 8
    assert isinstance(LoraSettings(rank=8.0).rank, int)


@pytest.mark.parametrize("alpha", [0, -1, float("inf")])
def test_alpha_must_be_positive(alpha):
    assert "LoRA alpha" in problems_of(LoraSettings, alpha=alpha)["lora.alpha"]


@pytest.mark.parametrize("dropout", [1.0, -0.1, 1.5])
def test_dropout_range(dropout):
    assert "< 1" in problems_of(LoraSettings, dropout=dropout)["lora.dropout"]


@pytest.mark.parametrize("rate", [0, -1e-4, 1.0, float("nan")])
def test_learning_rate_in_open_unit_interval(rate):
    assert "Learning rate" in problems_of(TrainingConfig, learning_rate=rate)["training.learning_rate"]


def test_bits_must_be_a_supported_width():
    assert "4, 8, 16 or 32" in problems_of(ModelConfig, bits=3)["model.bits"]


def test_quantized_bits_need_bitsandbytes(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    assert "bitsandbytes" in problems_of(ModelConfig, bits=4)["model.bits"]
    assert ModelConfig(bits=16).bits == 16  # 16-bit does not need it


def test_every_problem_is_reported_at_once():
    problems = problems_of(TrainingConfig, learning_rate=-1, batch_size=0, max_steps=0, optimizer="sgdx")
    assert set(problems) == {"training.learning_rate", "training.batch_size", "training.max_steps",
                             "training.optimizer"}


def test_sequence_length_zero_rejected():
    assert "Max sequence length" in problems_of(DataConfig, max_seq_length=0)["data.max_seq_length"]


def test_unknown_keys_are_rejected_with_their_names():
    with pytest.raises(ConfigError) as caught:
        from_dict({"lora": {"rank": 8, "rnak": 4}, "trainng": {}})
    assert "lora.rnak" in caught.value.problems
    assert "trainng" in caught.value.problems


def test_yaml_round_trip(tmp_path):
    cfg = RunConfig(lora=LoraSettings(rank=32, alpha=64), run_name="round")
    path = save_config(cfg, tmp_path / "c.yaml")
    assert load_config(path) == cfg


def test_bad_yaml_file_gives_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_load(preset):
    cfg = load_config(preset)
    assert cfg.run_name


def test_colab_preset_reproduces_the_classic_recipe():
    cfg = load_config(ROOT / "configs" / "llama2-7b-colab.yaml")
    assert (cfg.model.bits, cfg.model.quant_type, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == \
        (4, "nf4", 64, 16, 0.1)
    assert (cfg.training.learning_rate, cfg.training.batch_size, cfg.training.optimizer,
            cfg.training.lr_scheduler, cfg.training.warmup_ratio) == (2e-4, 4, "paged_adamw_32bit", "cosine", 0.03)


def test_every_field_has_help_text():
    import dataclasses

    for section, kind in [("model", ModelConfig), ("lora", LoraSettings), ("data", DataConfig),
                          ("training", TrainingConfig)]:
        for f in dataclasses.fields(kind):
            assert len(field_help(section, f.name)) > 15, f"{section}.{f.name} lacks help"
