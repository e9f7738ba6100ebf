"""Hyperparameter sweeps: real trials (the tiny Llama, 32-bit, 2 steps each) in child processes through the
RunManager and the comparison's queue; refusals before anything starts; the section's handlers on a real sweep.

One 2x2 sweep (learning rate x rank) is trained once for the module and serves the ranking, the restart and the
UI-handler tests: its first queue "dies" after starting trial 1, and a new queue on the same runs folder (the
restarted app's) finishes it.
"""

from __future__ import annotations

import json

import pytest

from helpers import app_client

from finetune.core.config import ConfigError, from_dict
from finetune.core.run_status import read_metrics
from finetune.services.runs import RunManager
from finetune.services.sweeps import (SweepQueue, SweepRequest, best_config, eval_losses, prune_reason, results,
                                      validate_sweep, validation_loss)


def _base(model_dir, data_file, **training):
    from helpers import tiny_run_config

    return tiny_run_config(model_dir, data_file, bits=32, max_steps=2, eval_steps=2, **training)


@pytest.fixture(scope="module")
def sweep_data(tmp_path_factory):
    from helpers import write_jsonl

    rows = [{"prompt": f"What does setting {i} control in LoRA?", "completion": f"Lab note: setting {i}."}
            for i in range(30)]
    return write_jsonl(tmp_path_factory.mktemp("sweep-data") / "qa.jsonl", rows)


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, tiny_model_dir, sweep_data):
    """(queue, sweep id, id of the run the 'dead' app had started) of a finished 2x2 sweep."""
    from helpers import wait_until

    root = tmp_path_factory.mktemp("sweep") / "runs"
    manager = RunManager(root)
    first = SweepQueue(manager, poll_seconds=0.2)
    first._spawn_worker = lambda sweep_id: None  # the app "dies" before its worker does anything
    sweep_id = first.start_sweep(_base(tiny_model_dir, sweep_data),
                                 SweepRequest(learning_rates="1e-3, 0.05", ranks="2, 4", alphas="2r", dropouts="0",
                                              bits="32", max_steps=2, prune_margin=0))
    state = first.load(sweep_id)
    run_id = manager.start(from_dict(state["items"][0]["config"]))  # the trial it had started before dying
    first._update_item(sweep_id, 0, run_id=run_id, state="running")

    restarted = SweepQueue(RunManager(root), poll_seconds=0.2)
    restarted.ensure_worker(sweep_id)
    wait_until(lambda: restarted.load(sweep_id)["state"] != "running", "the sweep finished", timeout=600)
    return restarted, sweep_id, run_id


@pytest.mark.trajectory
def test_a_2x2_grid_gives_four_runs_and_picks_the_lowest_validation_loss(finished_sweep):
    queue, sweep_id, _ = finished_sweep
    state = queue.load(sweep_id)
    assert state["state"] == "completed", json.dumps(state["items"], indent=1)[:2000]
    assert [i["state"] for i in state["items"]] == ["completed"] * 4
    run_ids = [i["run_id"] for i in state["items"]]
    assert len(set(run_ids)) == 4 and set(run_ids) <= set(queue.manager.list_ids())  # normal runs in the history
    grid = {(i["params"]["learning_rates"], i["params"]["ranks"]) for i in state["items"]}
    assert grid == {(1e-3, 2), (1e-3, 4), (0.05, 2), (0.05, 4)}
    for item in state["items"]:  # each run trained the trial's own hyperparameters, alpha = 2 x rank
        cfg = from_dict(json.loads(json.dumps(item["config"])))
        saved = (queue.manager.run_dir(item["run_id"]) / "config.yaml").read_text()
        assert f"rank: {item['params']['ranks']}" in saved and cfg.lora.alpha == 2 * cfg.lora.rank

    # The held-out loss of each run, read from its own metrics: the table is sorted by it, the best is its minimum.
    own = {i["run_id"]: eval_losses(read_metrics(queue.manager.run_dir(i["run_id"]))) for i in state["items"]}
    final = {run_id: losses[max(losses)] for run_id, losses in own.items()}
    assert all(max(losses) == 2 for losses in own.values())  # evaluated at the last step
    rows = results(queue.manager, state)
    assert [r["run id"] for r in rows] == sorted(final, key=final.get)
    assert [r["rank in sweep"] for r in rows] == [1, 2, 3, 4]
    winner = min(final, key=final.get)
    best = best_config(queue.manager, state)
    winner_item = next(i for i in state["items"] if i["run_id"] == winner)
    assert (best.training.learning_rate, best.lora.rank) == (winner_item["params"]["learning_rates"],
                                                             winner_item["params"]["ranks"])


def test_a_restarted_app_continues_the_sweep(finished_sweep):
    """The trial the dead app had started is waited for and kept, not started twice; the rest were started by the
    new queue."""
    queue, sweep_id, run_id = finished_sweep
    state = queue.load(sweep_id)
    assert state["items"][0]["run_id"] == run_id
    trial_runs = [r for r in queue.manager.list_ids() if r.startswith("sweep-t") or r == run_id]
    assert len(trial_runs) == 4


def test_the_section_shows_the_ranking_charts_and_fills_the_train_form(finished_sweep):
    from components.sweep_section import chart_frames, poll_sweep, trials_frame, use_best

    queue, sweep_id, _ = finished_sweep
    state = queue.load(sweep_id)
    table = trials_frame(queue, state)
    losses = list(table["val loss"])
    assert losses == sorted(losses) and len(losses) == 4
    charts = dict(zip(["learning rate", "rank", "alpha", "dropout", "bits"], chart_frames(queue, state)))
    assert charts["dropout"] is None and charts["bits"] is None  # not varied: no chart
    assert sorted(set(charts["rank"]["value"])) == [2.0, 4.0] and len(charts["learning rate"]) == 4
    polled = poll_sweep(queue, "")
    assert polled[0] == sweep_id and "completed" in polled[1] and "4/4" in polled[1]

    best = best_config(queue.manager, state)
    keys = ["lora_rank", "training_learning_rate", "lora_alpha", "model_bits", "training_max_steps"]
    assert use_best(queue, keys, sweep_id) == [best.lora.rank, best.training.learning_rate, best.lora.alpha, 32, 2]


def test_validation_loss_of_a_run_that_kept_its_best_checkpoint_is_its_best_metric(tmp_path):
    from finetune.core.run_status import write_status
    from finetune.core.run_folder import METRICS_FILE

    manager = RunManager(tmp_path / "runs")
    folder = manager.run_dir("kept-best")
    folder.mkdir(parents=True)
    (folder / METRICS_FILE).write_text('{"step": 2, "eval_loss": 1.5}\n{"step": 4, "eval_loss": 1.9}\n')
    write_status(folder, state="completed")
    assert validation_loss(manager, "kept-best") == 1.9  # keep=last: the last evaluation
    write_status(folder, kept="best", best_metric=1.5, best_metric_name="eval_loss")
    assert validation_loss(manager, "kept-best") == 1.5


def test_a_clearly_bad_trial_is_stopped_against_the_best_at_the_same_step(tmp_path):
    from finetune.core.run_folder import METRICS_FILE

    manager = RunManager(tmp_path / "runs")
    for run_id, rows in {"good": [(2, 3.0), (4, 2.0)], "bad": [(2, 3.8)], "close": [(2, 3.4)]}.items():
        folder = manager.run_dir(run_id)
        folder.mkdir(parents=True)
        (folder / METRICS_FILE).write_text("".join(json.dumps({"step": s, "eval_loss": v}) + "\n" for s, v in rows))
    state = {"request": {"prune_margin": 0.5},
             "items": [{"run_id": "good", "state": "completed"}, {"run_id": "bad", "state": "running"},
                       {"run_id": "close", "state": "running"}]}
    reason = prune_reason(manager, state, 1, "bad")
    assert reason and "step 2" in reason and "0.80 nats" in reason  # 3.8 vs 3.0 at step 2, not vs the final 2.0
    assert prune_reason(manager, state, 2, "close") is None  # within the margin
    state["request"]["prune_margin"] = 0
    assert prune_reason(manager, state, 1, "bad") is None  # 0 = never


# --- refusals before anything starts ---------------------------------------------------------------------------

def _problems(base, **request) -> dict[str, str]:
    with pytest.raises(ConfigError) as error:
        validate_sweep(base, SweepRequest(**request))
    return error.value.problems


def test_refusals_name_every_problem_at_once(tiny_model_dir, qa_file, monkeypatch):
    base = _base(tiny_model_dir, qa_file)
    problems = _problems(base, learning_rates=" , ", ranks="4, 0, x", alphas="2r", dropouts="0.1, 1.5", bits="4")
    assert problems == {
        "learning_rates": "give at least one learning rate to try",
        "ranks": "not a number: 'x'; LoRA rank must be between 1 and 4096, got 0",
        "dropouts": "LoRA dropout must be >= 0 and < 1, got 1.5",
    }
    problems = _problems(base, learning_rates="2, 1e-3, -1", ranks="0", bits="3", max_steps=0)
    assert problems == {
        "learning_rates": "Learning rate must be > 0 and < 1, got 2; Learning rate must be > 0 and < 1, got -1",
        "ranks": "LoRA rank must be between 1 and 4096, got 0",
        "bits": "Bit width must be 4, 8, 16 or 32, got 3",
        "max_steps": "steps per trial must be a whole number above 0, got 0",
    }
    monkeypatch.setenv("LORA_LAB_MAX_TRIALS", "3")
    assert _problems(base, learning_rates="1e-4, 1e-3", ranks="4, 8") == {
        "trials": "the grid has 4 trials; this server allows at most 3 per sweep (LORA_LAB_MAX_TRIALS): shorten a "
                  "list or use random search"}
    assert _problems(base, learning_rates="1e-4, 1e-3", ranks="4, 8", search="random", trials=5) == {
        "trials": "5 trials asked for; this server allows at most 3 per sweep (LORA_LAB_MAX_TRIALS)"}


def test_a_sweep_without_held_out_data_is_refused(tmp_path, tiny_model_dir, qa_file):
    from helpers import write_jsonl

    no_eval = _base(tiny_model_dir, qa_file)
    no_eval.data.validation_fraction = 0
    assert _problems(no_eval) == {"data.validation_fraction": "a sweep ranks its trials by validation loss: set the "
                                                              "validation fraction above 0 (for example 0.1)"}
    few = write_jsonl(tmp_path / "few.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(6)])
    queue = SweepQueue(RunManager(tmp_path / "runs"))
    with pytest.raises(ConfigError) as error:
        queue.start_sweep(_base(tiny_model_dir, few), SweepRequest(bits="32", max_steps=2))
    assert error.value.problems == {"data.validation_fraction": "this dataset holds no rows out for validation (too "
                                    "few rows, under 10), and a sweep ranks its trials by validation loss"}
    assert queue.list_ids() == [] and queue.manager.list_ids() == []


def test_an_initialisation_that_does_not_fit_a_swept_bit_width_is_refused(tmp_path, tiny_model_dir, qa_file):
    base = _base(tiny_model_dir, qa_file)
    base.lora.init = "pissa"  # 16/32-bit only
    queue = SweepQueue(RunManager(tmp_path / "runs"))
    with pytest.raises(ConfigError) as error:
        queue.start_sweep(base, SweepRequest(bits="32, 4", max_steps=2))
    assert list(error.value.problems) == ["bits"]
    assert error.value.problems["bits"].startswith("At 4 bits: PiSSA splits the weight itself into adapter + residual")
    assert queue.list_ids() == [] and queue.manager.list_ids() == []


def test_random_search_with_a_seed_is_reproducible(tiny_model_dir, qa_file):
    base = _base(tiny_model_dir, qa_file)
    request = dict(learning_rates="1e-4, 3e-4, 1e-3", ranks="2, 4, 8", alphas="8, 2r", dropouts="0",
                   bits="32", search="random", trials=5)
    picked = [params for params, _ in validate_sweep(base, SweepRequest(**request, seed=7))]
    assert picked == [params for params, _ in validate_sweep(base, SweepRequest(**request, seed=7))]
    assert len(picked) == 5 and len({json.dumps(p, sort_keys=True) for p in picked}) == 5  # distinct trials
    others = [[params for params, _ in validate_sweep(base, SweepRequest(**request, seed=s))] for s in range(8, 12)]
    assert any(other != picked for other in others)  # the seed decides which trials
    grid = [params for params, _ in validate_sweep(base, SweepRequest(**{**request, "search": "grid"}))]
    assert len(grid) == 18 and all(p in grid for p in picked)  # a sample of the grid


# --- the section on a page, through its API (the Train tab's form beside it, as the lead wires it) -------------

@pytest.fixture(scope="module")
def section_client(finished_sweep):
    from helpers import serving

    import gradio as gr

    from components.page_loads import answer_page_loads
    from components.sweep_section import build_sweep_section
    from components.train_tab import build_train_tab
    from finetune.core.hardware import detect

    queue, _, _ = finished_sweep
    with gr.Blocks() as page:
        train = build_train_tab(queue.manager, detect())
        build_sweep_section(SweepQueue(queue.manager, poll_seconds=0.2), train)
        answer_page_loads(page)  # as the app does
    with serving(page) as url:
        yield app_client(url)
    page.close()


def test_the_section_through_its_api(section_client, finished_sweep):
    queue, sweep_id, _ = finished_sweep
    polled = section_client.predict("", "", api_name="/sweep_poll")
    assert polled[0] == sweep_id and "4/4 trials done" in polled[1]
    best = best_config(queue.manager, queue.load(sweep_id))
    values = section_client.predict(sweep_id, api_name="/sweep_use_best")
    info = section_client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/sweep_use_best"]
    by_label = dict(zip([r["label"] for r in info["returns"]], values))
    assert (by_label["LoRA rank (r)"], by_label["Learning rate"], by_label["LoRA alpha"]) == (
        best.lora.rank, best.training.learning_rate, best.lora.alpha)
    refused = section_client.predict(sweep_learning_rates=" ", data_file=None, api_name="/sweep_start")
    assert "give at least one learning rate to try" in refused[1]
    assert not [i for i in queue.list_ids() if queue.load(i)["state"] == "running"]  # nothing started


@pytest.mark.trajectory
def test_a_real_trial_far_behind_the_best_is_stopped_early(tmp_path, tmp_path_factory, embedded_dir, sweep_data):
    """Two trials of 30 steps, evaluated every 2: the second (a learning rate 5000x smaller, on a tiny Llama whose
    spread logits learn fast) is compared with the first at its first evaluation and stopped there."""
    from helpers import save_tiny_llama, wait_until

    model = save_tiny_llama(tmp_path_factory.mktemp("learner"), embedded_dir, initializer_range=0.3)
    queue = SweepQueue(RunManager(tmp_path / "runs"), poll_seconds=0.1)
    sweep_id = queue.start_sweep(_base(model, sweep_data), SweepRequest(
        learning_rates="0.05, 1e-5", ranks="4", alphas="2r", dropouts="0", bits="32", max_steps=30, prune_margin=0.5))
    wait_until(lambda: queue.load(sweep_id)["state"] != "running", "the sweep finished", timeout=600)
    state = queue.load(sweep_id)
    good, slow = state["items"]
    good_losses = eval_losses(read_metrics(queue.manager.run_dir(good["run_id"])))
    slow_losses = eval_losses(read_metrics(queue.manager.run_dir(slow["run_id"])))
    assert good["state"] == "completed" and max(good_losses) == 30
    first = min(slow_losses)
    assert slow_losses[first] > good_losses[first] + 0.5, (good_losses, slow_losses)  # the premise of the test
    step = int(slow["pruned"].removeprefix("stopped at step ").split(":")[0])  # the evaluation it was judged at
    assert slow_losses[step] > good_losses[step] + 0.5 and slow["state"] == "stopped"
    assert queue.manager.status(slow["run_id"])["step"] < 30
    ranked = results(queue.manager, state)
    assert ranked[0]["run id"] == good["run_id"] and ranked[1]["state"] == "pruned"
    assert best_config(queue.manager, state).training.learning_rate == 0.05
