"""Hosting: spaces_config.yaml <-> README front matter, the deploy plan, hosting defaults, multi-GPU configs,
and runs synced back from another machine.

The Hub cannot be reached here: the real create/update path is driven with a recording stand-in for
huggingface_hub's HfApi, and the tests assert the calls it receives.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import time

import torch

from finetune.core.config import load_config
from finetune.core.hardware import profile_for
from finetune.core.run_status import HOSTNAME, read_status, write_status
from finetune.services import deploy
from finetune.services.runs import RunManager

from helpers import ROOT

T4 = profile_for("cuda", "Tesla T4", 15.6, (7, 5))
CPU = profile_for("cpu", "CPU (2 cores)", 8.0)


class RecordingHfApi:
    """Stands in for huggingface_hub.HfApi (no Hub here); records every call with its arguments."""

    def __init__(self, storage_api: bool = True):
        self.calls: list[tuple[str, dict]] = []
        self.storage_api = storage_api

    def __getattr__(self, name):
        if name == "request_space_storage" and not self.storage_api:
            raise AttributeError(name)
        return lambda *args, **kwargs: self.calls.append((name, kwargs))


def test_readme_front_matter_agrees_with_spaces_config():
    settings = deploy.load_settings()
    assert deploy.readme_problems(ROOT / "README.md", settings) == []
    header, body = deploy.split_front_matter((ROOT / "README.md").read_text(encoding="utf-8"))
    assert header["sdk"] == "gradio" and header["app_file"] == "app.py"
    # The Space must install the gradio this app is written for.
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().split("\n") if "==" in line)
    assert header["sdk_version"] == pins["gradio"] == importlib.metadata.version("gradio")
    assert header["suggested_hardware"] == "t4-small" and body.lstrip().startswith("# LoRA Lab")
    assert {"HF_TOKEN", "LANGSMITH_API_KEY"} <= set(settings.secrets)


def test_t4_default_preset_is_a_small_instruct_model_in_4_bit():
    settings = deploy.load_settings()
    cfg = load_config(ROOT / settings.default_preset)
    assert cfg.model.bits == 4 and "1.7B-Instruct" in cfg.model.source
    assert deploy.default_preset(T4) == "t4-qlora" == (ROOT / settings.default_preset).stem
    assert deploy.default_preset(CPU) == "cpu-quick"
    assert deploy.default_preset(profile_for("cuda", "small GPU", 6.0, (7, 5))) == "cpu-quick"


def test_write_readme_header_regenerates_and_check_catches_drift(tmp_path):
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    settings = deploy.load_settings()
    body = deploy.split_front_matter(readme.read_text(encoding="utf-8"))[1]
    settings.hardware = "a10g-small"
    assert any("suggested_hardware" in p for p in deploy.readme_problems(readme, settings))
    deploy.write_readme_header(readme, settings)
    assert deploy.readme_problems(readme, settings) == []
    assert deploy.split_front_matter(readme.read_text(encoding="utf-8")) == (deploy.front_matter(settings), body)
    readme.write_text("# no header\n")
    assert deploy.readme_problems(readme, settings) == ["README.md has no YAML front matter"]


def test_dry_run_prints_the_plan_and_never_a_secret(monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_do_not_print_me")
    monkeypatch.delenv("LANGSMITH_API_KEY", raising=False)
    assert deploy.cli(["--space", "me/lora-lab", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "hf_do_not_print_me" not in out
    lines = out.splitlines()
    assert lines[0] == "Plan for Space me/lora-lab (dry run: nothing is sent):"
    assert "sdk gradio 6.31.0" in lines[1] and "request hardware t4-small" in lines[2]
    assert "persistent storage 'small'" in lines[3]
    assert "set secret HF_TOKEN" in out and "(value hidden)" in out
    assert "skip secret LANGSMITH_API_KEY" in out
    upload = lines[-1]
    assert "app.py" in upload and "finetune/" in upload and "tests" not in upload and ".venv" not in upload


def test_deploy_calls_the_hub_api_with_space_hardware_secrets_and_files(monkeypatch):
    settings = deploy.load_settings()
    api = RecordingHfApi()
    env = {"HF_TOKEN": "hf_secret", "LANGSMITH_API_KEY": "ls_secret"}
    logged: list[str] = []
    deploy.apply(deploy.plan("me/lora-lab", settings, env=env), api, log=logged.append)
    names = [name for name, _ in api.calls]
    assert names[:3] == ["create_repo", "request_space_hardware", "request_space_storage"]
    create = api.calls[0][1]
    assert create["repo_type"] == "space" and create["space_sdk"] == "gradio" and create["exist_ok"] is True
    assert api.calls[1][1] == {"repo_id": "me/lora-lab", "hardware": "t4-small"}
    secrets = {kw["key"]: kw["value"] for name, kw in api.calls if name == "add_space_secret"}
    assert secrets == env  # sent as secrets (not variables), with their values...
    assert not any("secret" in line and ("hf_secret" in line or "ls_secret" in line) for line in logged)  # ...unlogged
    variables = {kw["key"] for name, kw in api.calls if name == "add_space_variable"}
    assert not variables & set(env)
    upload = api.calls[-1][1]
    assert api.calls[-1][0] == "upload_folder" and upload["repo_type"] == "space"
    uploaded = deploy.upload_files(ROOT)
    assert {"app.py", "requirements.txt", "README.md", "finetune/services/deploy.py", "components/export_tab.py",
            "configs/t4-qlora.yaml"} <= set(uploaded)
    assert not [f for f in uploaded if f.startswith(("tests/", "runs/", ".venv/")) or "__pycache__" in f]


def test_deploy_without_a_storage_api_says_what_to_do():
    from huggingface_hub import HfApi

    api, logged = RecordingHfApi(storage_api=False), []
    steps = deploy.plan("me/x", deploy.load_settings(), env={})
    deploy.apply(steps, api, log=logged.append)
    assert "request_space_storage" not in [name for name, _ in api.calls]
    assert any("enable persistent storage" in line for line in logged)
    # The dry run says it up front when the installed client has no storage-tier call (the pinned one has none).
    storage = next(step.text for step in steps if step.action == "request_space_storage")
    assert ("cannot request a tier" in storage) == (not hasattr(HfApi, "request_space_storage"))


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert deploy.cli(["--space", "not a space", "--dry-run"]) == 2
    assert "error: --space must look like USER/NAME" in capsys.readouterr().err
    assert deploy.cli(["--space", "me/x"]) == 2  # HF_HUB_OFFLINE=1 in the tests: the real path refuses early
    assert "error: cannot reach the Hugging Face Hub" in capsys.readouterr().err
    bad = tmp_path / "spaces.yaml"
    bad.write_text("title: x\nsdk_version: '6.31.0'\nhardware: a-toaster\ncolour: red\n")
    assert deploy.cli(["--settings", str(bad), "--check-readme"]) == 2
    assert "unknown setting(s) colour" in capsys.readouterr().err
    bad.write_text("title: x\nsdk_version: '6.31.0'\nhardware: a-toaster\n")
    assert deploy.cli(["--settings", str(bad), "--check-readme"]) == 2
    err = capsys.readouterr().err
    assert "hardware must be one of" in err and "Traceback" not in err


def test_storage_root_prefers_persistent_storage(tmp_path, monkeypatch):
    monkeypatch.delenv("LORA_LAB_RUNS", raising=False)
    assert deploy.runs_root("runs", candidate=tmp_path) == str(tmp_path / "runs")
    assert deploy.cache_env(candidate=tmp_path)["HF_HOME"] == str(tmp_path / "huggingface")
    assert deploy.runs_root("runs", candidate=tmp_path / "absent") == "runs"
    assert deploy.cache_env(candidate=tmp_path / "absent") == {}
    monkeypatch.setenv("LORA_LAB_RUNS", str(tmp_path / "mine"))
    assert deploy.runs_root("runs", candidate=tmp_path) == str(tmp_path / "mine")


def test_host_is_public_only_on_a_space(monkeypatch):
    monkeypatch.delenv("LORA_LAB_HOST", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert deploy.server_host() == "127.0.0.1"
    monkeypatch.setenv("SPACE_ID", "me/lora-lab")
    assert deploy.server_host() == "0.0.0.0"
    monkeypatch.setenv("LORA_LAB_HOST", "10.0.0.5")
    assert deploy.server_host() == "10.0.0.5"


def test_opening_preset_follows_the_hardware(tmp_path):
    import gradio as gr

    from app import opening_preset

    manager = RunManager(tmp_path)
    assert opening_preset(manager, T4) == "t4-qlora"
    assert isinstance(opening_preset(manager, CPU), type(gr.skip()))  # the form already shows cpu-quick
    folder = manager.run_dir("busy")
    folder.mkdir()
    write_status(folder, state="running", pid=os.getpid(), hostname=HOSTNAME)
    assert isinstance(opening_preset(manager, T4), type(gr.skip()))  # the running job's settings win


# --- past one GPU ---------------------------------------------------------------------------------------------

def test_accelerate_configs_load_for_1_2_8_gpus_and_fsdp():
    from accelerate.commands.config.config_args import load_config_from_file

    folder = ROOT / "configs" / "accelerate"
    loaded = {p.stem: load_config_from_file(str(p)) for p in folder.glob("*.yaml")}
    assert {name: c.num_processes for name, c in loaded.items()} == {
        "1gpu": 1, "2gpu-ddp": 2, "8gpu-ddp": 8, "fsdp-qlora-2gpu": 2}
    assert loaded["2gpu-ddp"].distributed_type == "MULTI_GPU"
    fsdp = loaded["fsdp-qlora-2gpu"]
    assert fsdp.distributed_type == "FSDP" and fsdp.fsdp_config["fsdp_use_orig_params"] is False
    assert fsdp.fsdp_config["fsdp_cpu_ram_efficient_loading"] and fsdp.fsdp_config["fsdp_sync_module_states"]


def test_fsdp_qlora_needs_quant_storage_in_the_compute_dtype_and_one_gpu_per_rank(monkeypatch):
    from finetune.core.config import ModelConfig
    from finetune.core.models import model_load_kwargs, to_bnb_config

    for profile, dtype in ((T4, torch.float16), (profile_for("cuda", "A100", 80.0, (8, 0)), torch.bfloat16)):
        bnb = to_bnb_config(ModelConfig(bits=4), profile)
        assert bnb.bnb_4bit_quant_storage == bnb.bnb_4bit_compute_dtype == dtype
    monkeypatch.setenv("LOCAL_RANK", "3")  # what accelerate launch sets for the 4th process on a machine
    assert model_load_kwargs(ModelConfig(bits=4), T4)["device_map"] == {"": 3}
    assert model_load_kwargs(ModelConfig(bits=4), CPU)["device_map"] == {"": "cpu"}


def _synced_run(manager: RunManager, run_id: str, **status) -> None:
    folder = manager.run_dir(run_id)
    folder.mkdir()
    write_status(folder, **status)


def test_a_run_synced_from_another_machine_shows_as_it_was_there(tmp_path):
    manager = RunManager(tmp_path)
    dead_pid = 2**22 + 12345  # above Linux's pid_max default: no such process here
    _synced_run(manager, "remote-running", state="running", pid=dead_pid, hostname="gpu-box-7", step=40,
                max_steps=100, started_at=time.time() - 60)
    _synced_run(manager, "local-dead", state="running", pid=dead_pid, hostname=HOSTNAME)
    assert manager.status("remote-running")["state"] == "running"  # not "interrupted": its pid is not ours
    assert read_status(manager.run_dir("remote-running"))["state"] == "running"  # and the folder is untouched
    assert manager.status("local-dead")["state"] == "interrupted"
    assert manager.active_run() is None  # the remote run does not hold this machine's device
    summary = manager.summary("remote-running")
    assert (summary.state, summary.step, summary.max_steps) == ("running", 40, 100)


def test_cli_runs_record_their_host(tiny_model_dir, qa_file, tmp_path):
    from helpers import tiny_run_config
    from finetune.train import run

    assert run(tiny_run_config(tiny_model_dir, qa_file, max_steps=1, eval_steps=0), tmp_path / "r") == 0
    status = read_status(tmp_path / "r")
    assert status["hostname"] == HOSTNAME and status["state"] == "completed"
    status_file = tmp_path / "r" / "status.json"
    status_file.write_text(json.dumps({**status, "hostname": "gpu-box-7"}))  # as if rsynced from there
    manager = RunManager(tmp_path)
    assert manager.finished_adapters() == {"r": tmp_path / "r" / "adapter"}
    assert manager.summary("r").state == "completed"
