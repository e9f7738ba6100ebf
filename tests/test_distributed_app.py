"""Past one device from the app: a run asking 2 processes is started, watched, stopped, resumed and failed through
the run manager like any other, as 2 CPU processes over gloo (real DDP, real accelerate launch)."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest
import torch

from helpers import tiny_run_config, wait_until, write_jsonl
from finetune.core.config import ConfigError, from_dict
from finetune.core.distributed import (LAUNCH_NOTE, accelerate_config, effective_batch, first_rank_failure,
                                       launch_problems, read_ranks, write_accelerate_config)
from finetune.core.run_folder import ACCELERATE_CONFIG
from finetune.core.run_status import read_metrics, read_status
from finetune.services.runs import RunManager

ROWS = [{"prompt": f"What does setting {i} control in LoRA?", "completion": f"Lab note: setting {i}."}
        for i in range(20)]


def ddp_config(model_dir: Path, data: Path, max_steps: int, save_steps: int = 1000):
    """The tiny model at 32 bits (no 4-bit repacking per process), short rows, 2 processes of batch 2."""
    cfg = tiny_run_config(model_dir, data, max_steps=max_steps, batch_size=2, bits=32, eval_steps=0,
                          save_steps=save_steps, processes=2, strategy="ddp")
    cfg.data.max_seq_length, cfg.data.max_samples = 64, 16
    return cfg


def group_members(pgid: int) -> list[int]:
    """Every live process in the process group ``pgid`` (zombies count as gone)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def rendezvous_port(folder: Path) -> int:
    lines = [line for line in (folder / "train.log").read_text().splitlines() if line.startswith(LAUNCH_NOTE)]
    return int(lines[-1].split()[-1])


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are not a listener
        try:
            sock.bind(("0.0.0.0", port))
            sock.listen()
        except OSError:
            return False
    return True


def live_ranks(folder: Path) -> list[int]:
    """The ranks of the run (from their records) still running: torch elastic starts each in a session of its
    own, so the launcher's process group does not hold them."""
    from finetune.core.distributed import same_process

    return [r["pid"] for r in read_ranks(folder) if same_process(r["pid"], r.get("pid_start"))]


def ended(manager: RunManager, run_id: str) -> int:
    """Wait for the run's launcher (status.json's pid, the leader of every rank's process group) to be gone;
    returns its pid."""
    pid = read_status(manager.run_dir(run_id))["pid"]
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), "the launcher exits and is reaped", timeout=120)
    return pid


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_model_dir):
    """(manager, run id, launcher pid) of one finished 2-process run started from the app's API."""
    root = tmp_path_factory.mktemp("ddp")
    data = write_jsonl(root / "qa.jsonl", ROWS)
    manager = RunManager(root / "runs")
    run_id = manager.start(ddp_config(tiny_model_dir, data, max_steps=3))
    status = manager.wait(run_id, timeout=400)
    assert status["state"] == "completed", manager.log_tail(run_id, 60)
    return manager, run_id, ended(manager, run_id)


def test_a_two_process_run_completes_with_one_curve_and_its_launch_recorded(ddp_run):
    from accelerate.commands.config.config_args import load_config_from_file

    manager, run_id, launcher = ddp_run
    folder = manager.run_dir(run_id)
    assert [r["step"] for r in read_metrics(folder) if "loss" in r] == [1, 2, 3]  # rank 0 alone writes
    assert json.loads((folder / "run_info.json").read_text())["world_size"] == 2
    recorded = load_config_from_file(str(folder / ACCELERATE_CONFIG))
    assert (recorded.num_processes, recorded.distributed_type) == (2, "MULTI_GPU")
    ranks = read_ranks(folder)
    assert launcher not in [r["pid"] for r in ranks]  # status.json names the launcher the manager watches
    assert [r["rank"] for r in ranks] == [0, 1] and all("finished_at" in r for r in ranks)
    assert not group_members(launcher) and port_is_free(rendezvous_port(folder))


def test_the_history_shows_processes_and_effective_batch(ddp_run):
    from components.train_runs import run_history

    manager, run_id, _ = ddp_run
    table = run_history(manager)[0]
    row = table[table["run id"] == run_id].iloc[0]
    assert (row["processes"], row["effective batch"]) == ("2 · ddp", 4)  # batch 2 x accumulation 1 x 2


def test_the_adapter_has_the_format_of_a_one_process_run(ddp_run, tiny_model_dir, tmp_path):
    from finetune.services.export import adapter_format
    from finetune.train import run

    manager, run_id, _ = ddp_run
    single = ddp_config(tiny_model_dir, write_jsonl(tmp_path / "qa.jsonl", ROWS), max_steps=1)
    single.training.processes, single.training.strategy = 1, "single"
    assert run(single, tmp_path / "single") == 0
    assert adapter_format(manager.run_dir(run_id) / "adapter") == adapter_format(tmp_path / "single" / "adapter")


def test_stop_ends_every_rank_resume_continues_and_a_killed_rank_fails_the_run(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", ROWS)
    manager = RunManager(tmp_path / "runs", stop_grace=60, term_grace=10)
    run_id = manager.start(ddp_config(tiny_model_dir, data, max_steps=5000, save_steps=5000))
    folder = manager.run_dir(run_id)
    wait_until(lambda: (read_status(folder).get("step") or 0) >= 2, "the ranks train", timeout=300)
    # An app restarted now finds the run alive: status.json carries the launcher's pid, which leads the group.
    assert RunManager(tmp_path / "runs").status(run_id)["state"] == "running"
    # ... and its stall detection reads rank 0's progress (here with a threshold any run exceeds).
    assert "stalled_seconds" in RunManager(tmp_path / "runs", stall_after=1e-6).status(run_id)
    manager.request_stop(run_id)  # what the Stop button does
    status = manager.wait(run_id, timeout=120)
    launcher = ended(manager, run_id)
    assert status["state"] == "stopped", manager.log_tail(run_id, 60)
    stopped_at = status["step"]
    assert (folder / "checkpoints" / f"checkpoint-{stopped_at}").is_dir()  # both ranks stopped at that step
    assert not group_members(launcher) and not live_ranks(folder), "a rank survived Stop"
    assert port_is_free(rendezvous_port(folder))

    manager.resume(run_id)  # the same launcher, with --resume
    wait_until(lambda: (read_status(folder).get("step") or 0) > stopped_at + 1, "the resumed ranks train", 300)
    rank_one = next(r for r in read_ranks(folder) if r["rank"] == 1)
    os.kill(rank_one["pid"], signal.SIGKILL)
    status = manager.wait(run_id, timeout=120)
    launcher = ended(manager, run_id)
    assert status["state"] == "failed"
    assert status["error"].startswith("[rank 1]") and "SIGKILL" in status["error"], status["error"]
    assert not group_members(launcher) and not live_ranks(folder), "a rank survived its peer's death"
    assert port_is_free(rendezvous_port(folder))


# --- refusals, before any child starts ----------------------------------------------------------------------------

@pytest.mark.parametrize("fields, field, fix", [
    ({"training": {"processes": 2}}, "training.strategy", "set processes to 1, or pick 'ddp'"),
    ({"training": {"strategy": "ddp"}}, "training.processes", "needs 2 or more processes"),
    ({"model": {"bits": 8}, "training": {"processes": 2, "strategy": "fsdp"}}, "model.bits", "use 4 bits"),
    ({"lora": {"method": "ia3"}, "training": {"processes": 2, "strategy": "fsdp"}}, "lora.method", "strategy 'ddp'"),
    ({"stage": "reward", "training": {"processes": 2, "strategy": "fsdp"}}, "training.strategy", "'ddp'"),
    ({"data": {"max_samples": 6}, "training": {"processes": 2, "strategy": "ddp", "batch_size": 4}},
     "data.max_samples", "raise max samples to 8"),
])
def test_the_config_refuses_what_several_processes_cannot_do(fields, field, fix):
    with pytest.raises(ConfigError) as refused:
        from_dict({"model": {"source": "org/unused", **fields.get("model", {})}, "stage": fields.get("stage", "sft"),
                   **{k: v for k, v in fields.items() if k not in ("model", "stage")}})
    assert fix in refused.value.problems[field]


def test_the_machine_refuses_more_processes_than_devices():
    def cfg(processes: int, strategy: str = "ddp"):
        return from_dict({"model": {"source": "org/unused"},
                          "training": {"processes": processes, "strategy": strategy}})

    assert "set processes to 2 or fewer" in launch_problems(cfg(4), gpus=2, cores=64)["training.processes"]
    assert "processes to 1 and strategy to 'single'" in launch_problems(cfg(2), gpus=1, cores=64)["training.processes"]
    assert launch_problems(cfg(8, "fsdp"), gpus=8, cores=2) == {}
    assert "use 'ddp'" in launch_problems(cfg(2, "fsdp"), gpus=0, cores=8)["training.strategy"]
    assert "set processes to 2 or fewer" in launch_problems(cfg(3), gpus=0, cores=2)["training.processes"]
    assert launch_problems(cfg(2), gpus=0, cores=2) == {}


def test_the_manager_and_the_train_tab_refuse_it_before_a_child_starts(tiny_model_dir, tmp_path):
    from components.train_runs import start_run

    too_many = (torch.cuda.device_count() if torch.cuda.is_available() else os.cpu_count() or 1) + 1
    cfg = tiny_run_config(tiny_model_dir, write_jsonl(tmp_path / "qa.jsonl", ROWS), processes=too_many,
                          strategy="ddp", batch_size=1)
    manager = RunManager(tmp_path / "runs")
    with pytest.raises(ConfigError) as refused:
        manager.start(cfg)
    assert f"set processes to {too_many - 1}" in refused.value.problems["training.processes"] or \
        "set processes to 1" in refused.value.problems["training.processes"]
    assert manager.list_ids() == []  # nothing queued, no child
    form = {"data_kind": "Bundled", "model_kind": "Embedded", "training_processes": too_many,
            "training_strategy": "ddp", "training_batch_size": 1, "run_name": "many"}
    _, message = start_run(manager, **form)  # what the Start button does with the form
    assert "`training.processes`" in message and "set processes to" in message, message
    assert manager.list_ids() == []


def test_the_rlhf_stages_take_the_processes_choice_as_data_parallel(tmp_path):
    """The RLHF tab's processes number makes a stage's run data parallel (a 2-process DPO run on this CPU
    completed through the same launcher; the stage runner is the one every stage shares). FSDP is SFT-only,
    so the form never asks for it; too many processes are refused before anything starts."""
    from components.rlhf_form import stage_config_from_form
    from components.rlhf_runs import start_stage

    for stage in ("reward", "dpo", "kto"):
        cfg = stage_config_from_form(stage, "bundled:course_prefs", {"processes": 2, "batch_size": 2})
        assert (cfg.training.processes, cfg.training.strategy, effective_batch(cfg)) == (2, "ddp", 4)
    assert stage_config_from_form("dpo", "bundled:course_prefs", {}).training.strategy == "single"
    too_many = (torch.cuda.device_count() if torch.cuda.is_available() else os.cpu_count() or 1) + 1
    manager = RunManager(tmp_path / "runs")
    _, message = start_stage(manager, None, "dpo", data_kind="Bundled", processes=too_many, batch_size=1)
    assert "training.processes" in message and "set processes to" in message, message
    assert manager.list_ids() == []

# --- FSDP-QLoRA: what the CPU can check, and a GPU test for the rest --------------------------------------------------

def test_the_fsdp_launch_config_is_generated_valid_and_recorded(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = from_dict({"model": {"source": "org/unused", "bits": 4},
                     "training": {"processes": 4, "strategy": "fsdp", "batch_size": 2, "gradient_accumulation": 8}})
    assert effective_batch(cfg) == 64
    assert accelerate_config(cfg)["fsdp_config"]["fsdp_use_orig_params"] is False
    loaded = load_config_from_file(str(write_accelerate_config(cfg, tmp_path)))
    assert (loaded.distributed_type, loaded.num_processes) == ("FSDP", 4)
    assert loaded.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"


def test_the_estimate_shards_the_base_with_fsdp_and_says_which_strategy_fits():
    from transformers import LlamaConfig

    from finetune.core.estimate import estimate_memory, shape_from_config, strategy_note
    from finetune.core.hardware import profile_for

    shape = shape_from_config(LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                                          num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8))
    a100 = profile_for("cuda", "A100", 40.0, (8, 0))

    def cfg(strategy: str):
        return from_dict({"model": {"source": "org/unused", "bits": 4}, "data": {"max_seq_length": 512},
                          "training": {"processes": 4, "strategy": strategy, "batch_size": 1}})

    ddp, fsdp = estimate_memory(shape, cfg("ddp"), a100), estimate_memory(shape, cfg("fsdp"), a100)
    assert fsdp.weights_gb < ddp.weights_gb / 3 and not ddp.fits and fsdp.fits  # a 70B in 4-bit on 4 x 40 GB
    note = strategy_note(shape, cfg("ddp"), a100)
    assert "per device" in note and "only FSDP fits" in note and "= 4 rows a step" in note
    cpu = profile_for("cpu", "CPU (2 cores)", 16.0, None)
    on_cpu = strategy_note(shape, cfg("ddp"), cpu)  # no "both fit" where FSDP cannot run at all
    assert "only DDP runs (FSDP needs GPUs)" in on_cpu and "share this machine's 16.0 GB" in on_cpu


def test_the_estimate_gives_starts_refusal_for_processes_this_machine_cannot_run():
    from components.train_preview import update_estimate
    from finetune.core.hardware import detect

    too_many = (torch.cuda.device_count() if torch.cuda.is_available() else os.cpu_count() or 1) + 1
    form = {"data_kind": "Bundled", "model_kind": "Embedded", "training_processes": too_many,
            "training_strategy": "ddp", "training_batch_size": 1}
    text = update_estimate(detect(), **form)
    assert text.startswith("Estimate unavailable until the form is valid") and "set processes to" in text, text


def test_a_rank_error_is_told_before_the_broken_collectives_it_caused():
    records = [{"rank": 0, "pid": 10, "error": "RuntimeError: Connection closed by peer", "failed_at": 5.0},
               {"rank": 1, "pid": 11, "error": "DataError: bad row 7", "failed_at": 4.0}]
    assert first_rank_failure(records, "") == "[rank 1] DataError: bad row 7"
    killed = [{"rank": 0, "pid": 10, "error": "RuntimeError: Connection closed by peer", "failed_at": 5.0},
              {"rank": 1, "pid": 11}]
    summary = "exitcode  : -9 (pid: 11)\n  exitcode  : 1 (pid: 10)"
    assert first_rank_failure(killed, summary).startswith("[rank 1] the process ended by SIGKILL")
    terminated = [{"rank": 0, "pid": 10}, {"rank": 1, "pid": 11, "error": "ValueError: x", "failed_at": 1.0}]
    assert first_rank_failure(terminated, "exitcode  : -15 (pid: 10)") == "[rank 1] ValueError: x"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="FSDP-QLoRA needs 2 CUDA GPUs")
def test_fsdp_qlora_trains_on_two_gpus_from_the_app(tiny_model_dir, tmp_path):
    from finetune.services.export import adapter_format

    data = write_jsonl(tmp_path / "qa.jsonl", ROWS)
    cfg = tiny_run_config(tiny_model_dir, data, max_steps=3, batch_size=2, bits=4, eval_steps=0,
                          processes=2, strategy="fsdp")
    manager = RunManager(tmp_path / "runs")
    run_id = manager.start(cfg)
    status = manager.wait(run_id, timeout=600)
    assert status["state"] == "completed", manager.log_tail(run_id, 80)
    folder = manager.run_dir(run_id)
    assert [r["step"] for r in read_metrics(folder) if "loss" in r] == [1, 2, 3]
    assert adapter_format(folder / "adapter")["config"]["peft_type"] == "LORA"
    assert not group_members(ended(manager, run_id))


def test_a_run_that_needs_more_devices_than_this_machine_has_is_not_resumed(tmp_path):
    from finetune.core.config import save_config
    from finetune.core.run_status import write_status
    from finetune.services.admission import RunError

    manager = RunManager(tmp_path / "runs")
    folder = manager.run_dir("from-a-bigger-box")
    (folder / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    too_many = (torch.cuda.device_count() if torch.cuda.is_available() else os.cpu_count() or 1) + 1
    save_config(from_dict({"model": {"source": "org/unused"}, "data": {"max_samples": None},
                           "training": {"processes": too_many, "strategy": "ddp"}}), folder / "config.yaml")
    write_status(folder, state="stopped", step=2)
    with pytest.raises(RunError, match="cannot resume on this machine: training.processes"):
        manager.resume("from-a-bigger-box")
    assert read_status(folder)["state"] == "stopped"  # nothing queued, no child
