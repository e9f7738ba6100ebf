"""The adapter inspector on hand-built adapters of known rank, checked against numpy computed here, independently.

Each adapter is made by real peft on the tiny Llama and saved with ``save_pretrained``, so the inspector reads the
same files (key names, adapter_config.json) a training run writes; only B and A are set by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from helpers import app_client
import torch
from safetensors.numpy import load_file

from finetune.core.config import from_dict, save_config
from finetune.services.adapter_inspect import (ENERGY, InspectError, compare_updates, effective_rank, inspect_run,
                                               principal_angles)

RANK, ALPHA = 4, 8.0
TARGETS = ["q_proj", "v_proj", "down_proj"]
KNOWN_SINGULAR = [4.0, 2.0, 1.0, 0.5]  # energies 16, 4, 1, 0.25: 90% of 21.25 needs the first two directions
Factors = Callable[[int, int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def orthonormal(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, columns, generator=generator))[0]


def known_factors(out: int, inp: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """B = U·diag(KNOWN_SINGULAR), A = Vᵀ: B·A has exactly these singular values."""
    u, v = orthonormal(out, RANK, generator), orthonormal(inp, RANK, generator)
    return u * torch.tensor(KNOWN_SINGULAR), v.T


def make_run(folder: Path, model_dir: Path, factors: Factors, seed: int = 0, **lora: object) -> Path:
    """A run folder as the trainer leaves it: adapter/ (peft's files) with lora_lab_config.yaml beside them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, **lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in peft_model.modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                b, a = factors(module.out_features, module.in_features, generator)
                module.lora_B["default"].weight.copy_(b)
                module.lora_A["default"].weight.copy_(a)
    peft_model.save_pretrained(folder / "adapter")
    method = "dora" if lora.get("use_dora") else "rslora" if lora.get("use_rslora") else "lora"
    cfg = from_dict({"model": {"source": str(model_dir), "bits": 32},
                     "lora": {"rank": RANK, "alpha": ALPHA, "method": method}})
    save_config(cfg, folder / "adapter" / "lora_lab_config.yaml")
    return folder


def saved_updates(run: Path, scale: float) -> dict[str, np.ndarray]:
    """{module path: scale·B·A} straight from the saved safetensors, with numpy."""
    tensors = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    updates = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = tensors[key.replace("lora_A", "lora_B")]
            updates[name] = scale * b.astype(np.float64) @ a.astype(np.float64)
    return updates


def numpy_effective_rank(singular: np.ndarray) -> int:
    energy = np.cumsum(singular ** 2) / np.sum(singular ** 2)
    return int(np.argmax(energy >= ENERGY - 1e-9)) + 1


@pytest.fixture(scope="module")
def known_run(tmp_path_factory, tiny_model_dir) -> Path:
    return make_run(tmp_path_factory.mktemp("known"), tiny_model_dir, known_factors)


def test_singular_values_effective_rank_and_norms_match_numpy(known_run, tiny_model_dir):
    report = inspect_run(known_run)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    updates = saved_updates(known_run, ALPHA / RANK)
    assert len(report.modules) == 2 * len(TARGETS) == len(updates)  # 2 layers of the tiny Llama
    for module in report.modules:
        expected = np.linalg.svd(updates[module.name], compute_uv=False)[:RANK]
        np.testing.assert_allclose(module.singular_values, expected, rtol=1e-5)
        assert module.effective_rank == numpy_effective_rank(expected) == 2
        weight = base[f"{module.name}.weight"].astype(np.float64)
        assert module.relative_norm == pytest.approx(np.linalg.norm(updates[module.name]) / np.linalg.norm(weight),
                                                     rel=1e-5)
    # The hand-set spectrum times the scale alpha/r = 2 is what the inspector sees.
    np.testing.assert_allclose(report.modules[0].singular_values, np.array(KNOWN_SINGULAR) * 2, rtol=1e-5)
    assert "rank 4 was set" in report.summary() and "median of 2 directions" in report.summary()
    assert "90% of the update's energy is in 2 directions" in report.modules[0].caption()


def test_largest_changes_are_ranked_by_relative_norm(known_run):
    report = inspect_run(known_run)
    relative = [m.relative_norm for m in report.top_changed(len(report.modules))]
    assert relative == sorted(relative, reverse=True)
    by_type = report.by_module_type()
    assert set(by_type) == set(TARGETS) and list(by_type.values()) == sorted(by_type.values(), reverse=True)
    assert sorted(report.by_layer()) == [0, 1]


def test_effective_rank_counts_energy_not_nonzero_values():
    assert effective_rank(torch.tensor([1.0, 1.0, 1.0, 1.0])) == 4  # 3 of 4 equal directions hold only 75%
    assert effective_rank(torch.tensor([10.0, 1.0, 0.0])) == 1      # 100 / 101 > 90%
    assert effective_rank(torch.zeros(3)) == 0


def test_rslora_scale_is_alpha_over_sqrt_r(tmp_path, tiny_model_dir):
    run = make_run(tmp_path, tiny_model_dir, known_factors, use_rslora=True)
    report = inspect_run(run)
    assert report.scaling == pytest.approx(ALPHA / RANK ** 0.5)
    np.testing.assert_allclose(report.modules[0].singular_values, np.array(KNOWN_SINGULAR) * ALPHA / RANK ** 0.5,
                               rtol=1e-5)


def test_dora_update_includes_the_magnitude_rescaling(tmp_path, tiny_model_dir):
    run = make_run(tmp_path, tiny_model_dir, known_factors, use_dora=True)
    tensors = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    report = inspect_run(run)
    module = report.modules[0]
    prefix = f"base_model.model.{module.name}"
    magnitude = next(v for k, v in tensors.items() if k.startswith(f"{prefix}.lora_magnitude_vector"))
    weight = base[f"{module.name}.weight"].astype(np.float64)
    combined = weight + ALPHA / RANK * tensors[f"{prefix}.lora_B.weight"] @ tensors[f"{prefix}.lora_A.weight"]
    change = magnitude.reshape(-1, 1) * combined / np.linalg.norm(combined, axis=1, keepdims=True) - weight
    np.testing.assert_allclose(module.update_norm, np.linalg.norm(change), rtol=1e-5)
    assert report.method == "dora" and "DoRA" in report.summary()


# --- two runs ------------------------------------------------------------------------------------------------

def test_identical_adapters_share_their_subspaces(known_run):
    comparison = compare_updates(known_run, known_run, top_k=2)
    assert comparison.matches and not comparison.skipped
    for match in comparison.matches:
        np.testing.assert_allclose(match.output_angles, 0.0, atol=1e-3)
        np.testing.assert_allclose(match.input_angles, 0.0, atol=1e-3)
        assert match.output_similarity == pytest.approx(1.0)


def test_orthogonal_adapters_are_at_ninety_degrees(tmp_path, tiny_model_dir):
    def halves(second: bool) -> Factors:
        # The same seed gives both runs the same orthonormal bases; each run uses its own half of the columns.
        def factors(out: int, inp: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            u, v = orthonormal(out, 2 * RANK, generator), orthonormal(inp, 2 * RANK, generator)
            part = slice(RANK, 2 * RANK) if second else slice(0, RANK)
            return u[:, part] * torch.tensor(KNOWN_SINGULAR), v[:, part].T
        return factors

    first = make_run(tmp_path / "a", tiny_model_dir, halves(False), seed=1)
    second = make_run(tmp_path / "b", tiny_model_dir, halves(True), seed=1)
    comparison = compare_updates(first, second, top_k=RANK)
    for match in comparison.matches:
        np.testing.assert_allclose(match.output_angles, 90.0, atol=1e-3)
        np.testing.assert_allclose(match.input_angles, 90.0, atol=1e-3)
        assert match.output_similarity == pytest.approx(0.0, abs=1e-9)
    assert "overlap 0.00" in comparison.summary()


def test_principal_angles_of_a_rotated_plane():
    basis = torch.eye(3)[:, :2]
    tilted = torch.tensor([[1.0, 0.0], [0.0, 0.5 ** 0.5], [0.0, 0.5 ** 0.5]])  # the y axis turned 45° toward z
    np.testing.assert_allclose(sorted(principal_angles(basis, tilted).tolist()), [0.0, 45.0], atol=1e-6)


# --- refusals ------------------------------------------------------------------------------------------------

def write_adapter_config(folder: Path, **config: object) -> Path:
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.mark.parametrize("config, message", [
    ({"peft_type": "IA3"}, "IA3 learns one scaling vector per layer, not a low-rank matrix: there are no singular "
                           "values or subspaces to inspect. The inspector reads LoRA, rsLoRA and DoRA adapters."),
    ({"peft_type": "PROMPT_TUNING"}, "Prompt tuning trains virtual input tokens and leaves every weight untouched: "
                                     "there is no weight update to inspect. The inspector reads LoRA, rsLoRA and DoRA "
                                     "adapters."),
    ({"peft_type": "LORA", "r": 4, "init_lora_weights": "pissa"},
     "This adapter started from a pissa initialisation, which moved part of each base weight into the adapter and "
     "saved it without converting back, so B·A is not the change to the original base. Save such runs with peft's "
     "path_initial_model_for_weight_conversion to inspect them."),
])
def test_non_lora_adapters_are_refused_with_the_reason(tmp_path, config, message):
    with pytest.raises(InspectError) as error:
        inspect_run(write_adapter_config(tmp_path / "run", **config))
    assert str(error.value) == message


def test_a_full_fine_tune_is_refused(tmp_path):
    (tmp_path / "full-run" / "model").mkdir(parents=True)
    (tmp_path / "full-run" / "model" / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(InspectError) as error:
        inspect_run(tmp_path / "full-run")
    assert str(error.value) == ("full-run is a full fine-tune: every weight changed and there is no low-rank update "
                                "to inspect. The inspector reads LoRA, rsLoRA and DoRA adapters.")


def test_an_unfinished_run_is_refused(tmp_path):
    (tmp_path / "running").mkdir()
    with pytest.raises(InspectError, match=r"^running has no finished adapter \(adapter/adapter_config.json is "
                                           r"missing\): wait until the run has finished, or pick another run.$"):
        inspect_run(tmp_path / "running")


def test_runs_on_different_bases_are_not_compared(tmp_path, known_run, tiny_model_dir):
    import shutil

    other_base = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other_base)
    other = make_run(tmp_path / "other", other_base, known_factors)
    with pytest.raises(InspectError) as error:
        compare_updates(known_run, other)
    assert str(error.value).endswith("updates of different base models live in different weight spaces and cannot "
                                     "be compared.")


# --- the Evaluate tab's section, through its API -------------------------------------------------------------

@pytest.fixture(scope="module")
def section_client(tmp_path_factory, known_run, tiny_model_dir):
    """A page holding only the inspector section, served on a free port, over a runs folder with three runs: the
    known adapter, an orthogonal copy's twin (the same adapter again) and an IA3 run."""
    import shutil
    from helpers import serving

    import gradio as gr

    from components.inspect_section import build_inspect_section
    from components.page_loads import answer_page_loads
    from finetune.services.runs import RunManager

    root = tmp_path_factory.mktemp("runs")
    for run_id in ("known", "twin"):
        shutil.copytree(known_run, root / run_id)
    write_adapter_config(root / "ia3-run", peft_type="IA3")
    for run_id in ("known", "twin", "ia3-run"):
        (root / run_id / "status.json").write_text('{"state": "completed"}', encoding="utf-8")
    with gr.Blocks() as page:
        build_inspect_section(RunManager(root))
        answer_page_loads(page)  # as the app does
    with serving(page) as url:
        yield app_client(url)
    page.close()


def test_section_inspects_a_run_through_the_api(section_client):
    from components.inspect_section import TOP_MATRICES as TOP_SHOWN

    first, second = section_client.predict(None, None, api_name="/inspect_runs")
    assert {c[0] for c in first["choices"]} == {"known", "twin", "ia3-run"}
    summary, heat, by_type, by_layer, energy, table = section_client.predict("known", api_name="/inspect_adapter")
    assert "rank 4 was set" in summary and "median of 2 directions" in summary
    assert len(heat["data"]) == 2 * len(TARGETS)       # one point per layer x module
    assert len(by_type["data"]) == len(TARGETS) and len(by_layer["data"]) == 2 * len(TARGETS)
    assert len(table["data"]) == 2 * len(TARGETS)
    series = {row[2] for row in energy["data"]}
    assert any(name.startswith("random B·A (") for name in series) and len(series) == 1 + TOP_SHOWN


def test_section_compares_two_runs_and_refuses_ia3(section_client):
    from gradio_client.exceptions import AppError

    summary, matches = section_client.predict("known", "twin", 2, api_name="/inspect_compare")
    assert "overlap 1.00 on average" in summary and len(matches["data"]) == 2 * len(TARGETS)
    with pytest.raises(AppError, match="IA3 learns one scaling vector per layer"):
        section_client.predict("ia3-run", api_name="/inspect_adapter")


def test_command_line_prints_the_summary_or_a_clear_error(known_run, tmp_path, capsys):
    from finetune.services.adapter_inspect import main

    assert main([str(known_run), "--compare", str(known_run), "--top-k", "2", "--show", "1"]) == 0
    printed = capsys.readouterr().out
    assert "rank 4 was set" in printed and "overlap 1.00 on average" in printed
    assert main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().out == ("error: missing has no finished adapter (adapter/adapter_config.json is "
                                       "missing): wait until the run has finished, or pick another run.\n")


def test_a_checkpoint_is_read_with_its_runs_config(tmp_path, known_run):
    import shutil

    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    shutil.copytree(known_run / "adapter", checkpoint)
    (checkpoint / "lora_lab_config.yaml").rename(tmp_path / "run" / "config.yaml")  # as the trainer leaves them
    report = inspect_run(checkpoint)
    assert report.run == "checkpoint-2" and len(report.modules) == 2 * len(TARGETS)
    (tmp_path / "run" / "config.yaml").unlink()
    with pytest.raises(InspectError, match="^checkpoint-2 has no lora_lab_config.yaml beside its adapter, so its base "
                                           "model is unknown.$"):
        inspect_run(checkpoint)
