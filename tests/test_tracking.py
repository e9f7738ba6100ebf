"""Experiment tracking through transformers' report_to: a run with Trackio writes a local project that Trackio's own
reader gives back with the metrics of metrics.jsonl; W&B and MLflow are refused with a clear message where their
packages are missing (this machine has neither); no secret reaches the run folder, the tracker's store or the
exported code. The run is the app's child process (``python -m finetune.train``), so Trackio's store is placed
the way it is for every run: beside the runs, in ``<runs>/trackio``."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.core.config import TRACKIO_PROJECT, ConfigError, TrainingConfig, save_config
from finetune.core.run_folder import TRACKER_DIRS
from finetune.core.run_status import read_metrics

from helpers import tiny_run_config, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
SECRETS = {"WANDB_API_KEY": "wandb-secret-1d2e3f", "HF_TOKEN": "hf_secret4a5b6c"}


@pytest.fixture(scope="module")
def trackio_run(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("tracking")
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(20)]
    cfg = tiny_run_config(tiny_model_dir, write_jsonl(folder / "qa.jsonl", rows), max_steps=4, eval_steps=2)
    cfg.training.report_to = "trackio"
    run_dir = folder / "runs" / "tracked"
    save_config(cfg, run_dir / "config.yaml")
    env = {k: v for k, v in os.environ.items() if k != "TRACKIO_DIR"}
    done = subprocess.run([sys.executable, "-m", "finetune.train", str(run_dir / "config.yaml"), "--output-dir",
                           str(run_dir)], cwd=ROOT, capture_output=True, text=True, env={**env, **SECRETS})
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def trackio_logs(store: Path, run_name: str) -> list[dict]:
    """The run's logs as Trackio's own reader gives them back (a fresh process: Trackio fixes its folder on import)."""
    code = ("import json, sys\nfrom trackio.sqlite_storage import SQLiteStorage\n"
            "print(json.dumps(SQLiteStorage.get_logs(sys.argv[1], sys.argv[2]), default=str))")
    done = subprocess.run([sys.executable, "-c", code, TRACKIO_PROJECT, run_name], capture_output=True, text=True,
                          env={**os.environ, "TRACKIO_DIR": str(store)})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_trackio_run_writes_a_project_with_the_metrics_of_metrics_jsonl(trackio_run):
    store = trackio_run.parent / TRACKER_DIRS["trackio"]
    logs = trackio_logs(store, trackio_run.name)
    metrics = read_metrics(trackio_run)
    ours = {(m["step"], "loss"): m["loss"] for m in metrics if "loss" in m}
    ours.update({(m["step"], "eval_loss"): m["eval_loss"] for m in metrics if "eval_loss" in m})
    # Trackio numbers its own log calls; transformers passes the trainer's step as train/global_step.
    theirs = {(log["train/global_step"], "loss"): log["train/loss"] for log in logs if "train/loss" in log}
    theirs.update({(log["train/global_step"], "eval_loss"): log["eval/loss"] for log in logs if "eval/loss" in log})
    assert sorted(ours) == sorted(theirs) and len([k for k in ours if k[1] == "loss"]) == 4
    assert len([k for k in ours if k[1] == "eval_loss"]) >= 2
    for key, value in ours.items():
        assert theirs[key] == pytest.approx(value, rel=1e-6), key  # the same float, through JSON and SQLite


def test_no_secret_reaches_the_run_folder_the_tracker_or_the_exported_code(trackio_run, tmp_path):
    from finetune.services.take_home import write_take_home

    exported = write_take_home(trackio_run, tmp_path / "code")
    script = exported.script.read_text(encoding="utf-8")
    assert "report_to='trackio'" in script and f"trackio=={importlib.metadata.version('trackio')}" in script
    places = [*trackio_run.rglob("*"), *(trackio_run.parent / TRACKER_DIRS["trackio"]).rglob("*"),
              *(tmp_path / "code").rglob("*")]
    files = [p for p in places if p.is_file()]
    assert any(p.suffix == ".db" for p in files), "the Trackio store is among the files searched"
    for path in files:
        content = path.read_bytes()
        for secret in SECRETS.values():
            assert secret.encode() not in content, f"{secret} leaked into {path}"


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_wandb_and_mlflow_are_refused_clearly_without_their_package(tracker, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    if importlib.util.find_spec(tracker) is not None:
        assert TrainingConfig(report_to=tracker).report_to == tracker  # installed: offline mode is accepted
        return
    with pytest.raises(ConfigError) as refused:
        TrainingConfig(report_to=tracker)
    message = refused.value.problems["training.report_to"]
    assert f"needs the {tracker} package" in message and "pick 'tensorboard' or 'trackio'" in message


def test_the_train_and_rlhf_forms_carry_the_choice_and_refuse_an_unknown_one():
    """The forms' configs go through the same checks: the tabs show a refusal as the field's warning."""
    from components.rlhf_form import stage_config_from_form
    from components.train_form import config_from_form

    assert config_from_form({"training_report_to": "trackio"}).training.report_to == "trackio"
    for stage in ("reward", "dpo", "kto"):
        assert stage_config_from_form(stage, "bundled:course_prefs", {"report_to": "trackio"}).training.report_to \
            == "trackio"
        assert stage_config_from_form(stage, "bundled:course_prefs", {}).training.report_to == "tensorboard"
    with pytest.raises(ConfigError) as refused:
        config_from_form({"training_report_to": "nowhere"})
    assert "Report to must be one of tensorboard, trackio, wandb, mlflow, none" in refused.value.problems[
        "training.report_to"]
