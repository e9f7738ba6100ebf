"""Security: upload limits, optional login, path traversal, remote code off by default, tokens never written
anywhere, and generation limits enforced by the server itself.

All real: the app is launched with ``app.launch_options()`` (the settings `python app.py` uses) on loopback,
a short tiny-model run trains in its child with secret HF/LangSmith tokens in the environment, and every file
it and the app write, the page, the API config and the captured logs are searched for the secrets. LangSmith
points at a closed loopback port, so its client really fails (and its errors are logged) while nothing leaves
the machine.
"""

from __future__ import annotations

import socket
import time
import urllib.request
import zipfile
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file

from conftest import served_app, write_jsonl

HF_SECRET = "hf_SECRETsecretSECRET0123456789"
LS_SECRET = "lsv2_pt_SECRETsecret0123456789abcdef"
PUSH_SECRET = "hf_PUSHsecretPUSH9876543210"
SECRETS = (HF_SECRET, LS_SECRET, PUSH_SECRET)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_login_and_upload_limits(tmp_path, monkeypatch):
    import app

    monkeypatch.setenv("LORA_LAB_AUTH", "teacher:s3cret-pass")
    monkeypatch.setenv("LORA_LAB_MAX_UPLOAD", "1mb")
    monkeypatch.setenv("LORA_LAB_HOST", "127.0.0.1")
    demo = app.build_app(str(tmp_path / "runs"))
    demo.queue()
    port = _free_port()
    demo.launch(**{**app.launch_options(), "server_port": port, "server_name": "127.0.0.1"},
                prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        with pytest.raises(Exception, match="(?i)login|auth|401|credentials"):
            Client(url, verbose=False)
        with pytest.raises(Exception):
            Client(url, verbose=False, auth=("teacher", "wrong"))
        client = Client(url, verbose=False, auth=("teacher", "s3cret-pass"))
        assert client.predict(None, api_name="/list_adapters")["__type__"] == "update"

        big = tmp_path / "big.jsonl"
        line = '{"prompt": "p", "completion": "' + "x" * 1000 + '"}\n'
        big.write_text(line * 1500)  # about 1.5 MB
        with pytest.raises(Exception, match="exceeds the maximum file size of 1048576 bytes"):  # client's check
            client.predict(data_kind="Uploaded file", data_file=handle_file(str(big)), api_name="/preview_data")
        # The server's own check, for a caller that skips the client's: a raw multipart upload.
        answer = httpx.post(client.upload_url, files={"files": ("big.jsonl", big.read_bytes())},
                            cookies=client.cookies, timeout=60)
        assert answer.status_code >= 400 and "File size exceeded maximum allowed size" in answer.text
        small = write_jsonl(tmp_path / "small.jsonl", [{"prompt": "p", "completion": "c"}] * 3)
        info, _ = client.predict(data_kind="Uploaded file", data_file=handle_file(str(small)),
                                 api_name="/preview_data")
        assert "prompt_completion" in info  # a file under the limit still works
        script = tmp_path / "run.sh"
        script.write_text("rm -rf /\n")
        with pytest.raises(Exception, match="Invalid file type"):
            client.predict(data_kind="Uploaded file", data_file=handle_file(str(script)), api_name="/preview_data")
    finally:
        app.close_app(demo)


def test_login_is_optional_and_upload_cap_has_a_default(monkeypatch):
    import app

    monkeypatch.delenv("LORA_LAB_AUTH", raising=False)
    monkeypatch.delenv("LORA_LAB_MAX_UPLOAD", raising=False)
    assert app.launch_options()["auth"] is None and app.launch_options()["max_file_size"] == "200mb"
    for value in ("no-colon", ":no-user"):
        monkeypatch.setenv("LORA_LAB_AUTH", value)
        assert app.launch_options()["auth"] is None
    monkeypatch.setenv("LORA_LAB_AUTH", "ann:pw:with:colons")
    assert app.launch_options()["auth"] == ("ann", "pw:with:colons")


@pytest.mark.parametrize("run_id", ["..", ".", "../x", "a/../../b", "/etc", "x/y", "a\\..\\b", "a\0b", "~root",
                                    "-rf", "%2e%2e", " ", ""])
def test_run_ids_cannot_escape_the_runs_folder(tmp_path, run_id):
    from finetune.runs import RunError, RunManager

    manager = RunManager(tmp_path / "runs")
    with pytest.raises(RunError, match="Invalid run id"):
        manager.run_dir(run_id)


def test_run_names_are_sanitised_into_the_runs_folder(tmp_path):
    from finetune.config import RunConfig
    from finetune.runs import RunManager

    manager = RunManager(tmp_path / "runs")
    for name in ("../../etc/passwd", "/abs/path", "..", "a\0b", "名前 with spaces"):
        run_id = manager.new_run_id(RunConfig(run_name=name))
        assert manager.run_dir(run_id).parent == manager.root


def test_remote_code_is_off_unless_the_operator_enables_it(monkeypatch, tmp_path):
    from finetune.config import ConfigError, ModelConfig
    from finetune.hardware import detect
    from finetune.models import model_load_kwargs

    monkeypatch.delenv("LORA_LAB_ALLOW_REMOTE_CODE", raising=False)
    with pytest.raises(ConfigError, match="Remote code is disabled on this server"):
        ModelConfig(source="someone/model", trust_remote_code=True)
    monkeypatch.setenv("LORA_LAB_ALLOW_REMOTE_CODE", "1")
    cfg = ModelConfig(source="someone/model", bits=32, trust_remote_code=True)
    assert model_load_kwargs(cfg, detect())["trust_remote_code"] is True
    # A config written while it was allowed does not carry the permission to a server where it is not.
    monkeypatch.delenv("LORA_LAB_ALLOW_REMOTE_CODE")
    assert model_load_kwargs(cfg, detect())["trust_remote_code"] is False


def test_generation_limits_are_enforced_by_the_handler_itself(tmp_path):
    """Calling the chat handler directly (no gradio slider in between) still refuses oversized requests."""
    import gradio as gr

    from components.chat_tab import chat
    from finetune.runs import RunManager

    manager = RunManager(tmp_path / "runs")
    for prompt, tokens, message in (("x" * 1_000_000, 8, "keep it under 20,000"),
                                    ("hello", 100_000, "max new tokens must be a whole number from 1 to 1024"),
                                    ("hello", -1, "max new tokens")):
        with pytest.raises(gr.Error, match=message):
            next(chat(manager, None, None, prompt, "any-run", [], [], tokens, 0.7, 0.9, 0))


def _all_bytes(root: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in root.rglob("*") if p.is_file()]


def test_tokens_never_reach_logs_run_folders_exports_or_the_page(tmp_path, monkeypatch, capfd, tiny_model_dir,
                                                                 qa_file):
    monkeypatch.setenv("HF_TOKEN", HF_SECRET)
    monkeypatch.setenv("LANGSMITH_API_KEY", LS_SECRET)
    monkeypatch.setenv("LANGSMITH_ENDPOINT", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    root = tmp_path / "runs"
    form = {"data_kind": "Uploaded file", "data_file": handle_file(str(qa_file)), "run_name": "secret",
            "model_source": str(tiny_model_dir), "model_bits": 32, "training_max_steps": 2,
            "training_save_steps": 1, "training_batch_size": 2, "data_max_seq_length": 128,
            "training_eval_steps": 1, "lora_rank": 4, "lora_alpha": 8}
    with served_app(root) as url:
        client = Client(url, verbose=False)
        run_id, message = client.predict(**form, api_name="/start_run")
        assert "Started" in message, message
        deadline = time.time() + 240
        while "completed" not in (poll := client.predict(run_id, api_name="/poll_run"))[1]:
            assert "failed" not in poll[1] and time.time() < deadline, poll[1] + poll[5]
            time.sleep(0.5)
        client.predict("What is LoRA?", run_id, [], [], 4, 0.8, 0.9, 0, api_name="/chat")
        client.predict("left", "a comment", "", "both", api_name="/submit_feedback")
        zip_path, _ = client.predict(run_id, api_name="/export_zip")
        with pytest.raises(Exception) as refused:  # offline: refused, and the token is not in the message
            client.predict(run_id, "Adapter", "someone/lora", PUSH_SECRET, True, api_name="/push_to_hub")
        sync = client.predict(api_name="/feedback_summary")
        page = urllib.request.urlopen(url).read() + urllib.request.urlopen(url + "config").read()
        time.sleep(1.0)  # let the LangSmith sender fail at least once against the closed port

    import sqlite3

    with sqlite3.connect(root / "feedback.db") as db:  # the LangSmith client really ran and failed
        errors = [row[0] for row in db.execute("SELECT last_error FROM outbox WHERE last_error IS NOT NULL")]
    assert errors and "waiting" in repr(sync)
    texts = {"push refusal": str(refused.value).encode(), "page and /config": page,
             "feedback summary": repr(sync).encode(), "app logs": "".join(capfd.readouterr()).encode()}
    with zipfile.ZipFile(zip_path) as archive:
        texts.update({f"zip:{name}": archive.read(name) for name in archive.namelist()})
    texts.update({str(path.relative_to(root)): data for path, data in _all_bytes(root)})
    assert any(name.endswith("train.log") for name in texts) and any("tensorboard" in n for n in texts)
    leaks = [(name, secret) for name, data in texts.items() for secret in SECRETS if secret.encode() in data]
    assert not leaks, leaks
