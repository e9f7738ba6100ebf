"""Security: upload limits, optional login, path traversal, remote code off by default, tokens never written
anywhere, and generation limits enforced by the server itself.

All real: the app is launched with ``app.launch_options()`` (the settings `python app.py` uses) on loopback,
a short tiny-model run trains in its child with secret HF/LangSmith tokens in the environment, and every file
it and the app write, the page, the API config and the captured logs are searched for the secrets. LangSmith
points at a closed loopback port, so its client really fails (and its errors are logged) while nothing leaves
the machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import urllib.request
import zipfile
from pathlib import Path

import httpx
import pytest
import yaml
from gradio_client import Client, handle_file

from helpers import app_client, loopback_tls, served_app, wait_for_completion, wait_until, write_jsonl

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
            app_client(url)
        with pytest.raises(Exception):
            app_client(url, auth=("teacher", "wrong"))
        client = app_client(url, auth=("teacher", "s3cret-pass"))
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
    from finetune.services.runs import RunManager
    from finetune.services.admission import RunError

    manager = RunManager(tmp_path / "runs")
    with pytest.raises(RunError, match="Invalid run id"):
        manager.run_dir(run_id)


def test_run_names_are_sanitised_into_the_runs_folder(tmp_path):
    from finetune.core.config import RunConfig
    from finetune.services.runs import RunManager

    manager = RunManager(tmp_path / "runs")
    for name in ("../../etc/passwd", "/abs/path", "..", "a\0b", "名前 with spaces"):
        run_id = manager.new_run_id(RunConfig(run_name=name))
        assert manager.run_dir(run_id).parent == manager.root


def test_remote_code_is_off_unless_the_operator_enables_it(monkeypatch, tmp_path):
    from finetune.core.config import ConfigError, ModelConfig
    from finetune.core.hardware import detect
    from finetune.core.models import model_load_kwargs

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
    from finetune.services.runs import RunManager

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
        client = app_client(url)
        run_id, message = client.predict(**form, api_name="/start_run")
        assert "Started" in message, message
        wait_for_completion(client, run_id)
        client.predict("What is LoRA?", run_id, [], [], 4, 0.8, 0.9, 0, api_name="/chat")
        client.predict("left", "a comment", "", "both", api_name="/submit_feedback")
        zip_path, _ = client.predict(run_id, api_name="/export_zip")
        with pytest.raises(Exception) as refused:  # offline: refused, and the token is not in the message
            client.predict(run_id, "Adapter", "someone/lora", PUSH_SECRET, True, api_name="/push_to_hub")
        sync = client.predict(api_name="/feedback_summary")
        page = urllib.request.urlopen(url).read() + urllib.request.urlopen(url + "config").read()
        # the LangSmith sender fails at least once against the closed port
        wait_until(lambda: _outbox_errors(root), "the LangSmith sender trying")

    errors = _outbox_errors(root)  # the LangSmith client really ran and failed
    assert errors and "waiting" in repr(sync)
    texts = {"push refusal": str(refused.value).encode(), "page and /config": page,
             "feedback summary": repr(sync).encode(), "app logs": "".join(capfd.readouterr()).encode()}
    with zipfile.ZipFile(zip_path) as archive:
        texts.update({f"zip:{name}": archive.read(name) for name in archive.namelist()})
    texts.update({str(path.relative_to(root)): data for path, data in _all_bytes(root)})
    assert any(name.endswith("train.log") for name in texts) and any("tensorboard" in n for n in texts)
    leaks = [(name, secret) for name, data in texts.items() for secret in SECRETS if secret.encode() in data]
    assert not leaks, leaks


def _outbox_errors(root) -> list[str]:
    import sqlite3

    with sqlite3.connect(root / "feedback.db") as db:
        return [row[0] for row in db.execute("SELECT last_error FROM outbox WHERE last_error IS NOT NULL")]


# --- the path gate (finetune/core/paths.py): what a request can reach ---------------------------------------------
# A secret folder outside every allowed root holds a marker in each file an endpoint could read (data rows, a model's
# config.json, an adapter's adapter_config.json); the app runs with LORA_LAB_LOCAL_ROOTS set to another folder that
# holds a symlink back to the secret. Every endpoint parameter that names a source is found from the app's own API
# (gradio_client's view_api), so a new endpoint is swept without editing this list.

MARKER = "MARKER-7f3a9c-not-for-visitors"
# Parameters that name a source or a path (name or label); run pickers (a label with 'run'/'runs', unless it also
# accepts a folder) only take run ids, which RunManager.run_dir checks: test_run_ids_cannot_escape_the_runs_folder.
SOURCE_WORDS = re.compile(r"(?i)source|dataset|model|file|folder|path|preset|bundled|adapter|start|reward")
SOURCE_NAMES = re.compile(r"source|file|folder|path|adapter")  # parameter names (model_compute_dtype is no source)
RUN_PICKER = re.compile(r"(?i)\bruns?\b|comparison")
FOLDER_TOO = re.compile(r"(?i)model|from")
# Endpoints that only compare a value with the list of runs to pre-select it, and never open anything.
ONLY_LIST_LOOKUPS = {"/rlhf_lists", "/inspect_runs"}
CHOICE_REFUSAL = "not in the list of choices"  # gradio's own check of a fixed-choice dropdown
# A File value naming a server path never reaches a handler: gradio accepts only its upload folder there (its error
# reaches the client without details). The handlers' own check of the same is test_uploads_only_from_gradio_folder.
NOT_UPLOADED = re.compile(r"was not uploaded by a user|embedded null byte")
GENERIC_WORDS = {"data", "dataset", "model", "source", "the", "from"}


def _secret_folder(root: Path) -> Path:
    secret = root / "secret"
    rows = [{"prompt": f"{MARKER} question {i}", "completion": f"{MARKER} answer {i}",
             "chosen": f"{MARKER} yes", "rejected": f"{MARKER} no"} for i in range(12)]
    for name in ("train.jsonl", "secret.jsonl", "validation.jsonl"):
        write_jsonl(secret / name, rows) if secret.is_dir() else (secret.mkdir(), write_jsonl(secret / name, rows))
    for sub in ("", "adapter", "reward_model"):
        (secret / sub).mkdir(exist_ok=True)
        (secret / sub / "adapter_config.json").write_text(json.dumps({"marker": MARKER}))
        (secret / sub / "config.json").write_text(json.dumps({"marker": MARKER, "model_type": "llama"}))
    (secret / "preset.yaml").write_text(f"run_name: {MARKER}\n")
    return secret


def _vectors(secret: Path, allowed: Path) -> dict[str, str]:
    """Each way a request tried (issue 16) to name the secret file; all must meet the same refusal."""
    relative = str(secret / "secret.jsonl").lstrip("/")
    up = "../" * 20
    home_relative = os.path.relpath(secret / "secret.jsonl", Path.home())
    return {"absolute": str(secret / "secret.jsonl"), "absolute folder": str(secret),
            "dot-dot": up + relative, "tilde": "~/" + home_relative,
            "bundled dot-dot": "bundled:" + up + str(secret).lstrip("/"),
            "symlink out of an allowed root": str(allowed / "escape" / "secret.jsonl"),
            "symlinked folder": str(allowed / "escape"),
            "NUL byte": str(secret / "secret.jsonl") + "\0.jsonl",
            "url-encoded dots": "%2e%2e/" * 20 + relative,
            "windows separators": "..\\" * 20 + relative.replace("/", "\\")}


def _source_parameters(client: Client) -> list[tuple[str, dict, list[dict]]]:
    """(endpoint, parameter, all parameters) for every parameter that names a source, from the live API."""
    found = []
    for endpoint, info in client.view_api(return_format="dict", print_info=False)["named_endpoints"].items():
        for parameter in info["parameters"]:
            words = f"{parameter['parameter_name']} {parameter['label']}"
            named = SOURCE_WORDS.search(parameter["label"] or "") or SOURCE_NAMES.search(parameter["parameter_name"])
            if parameter["component"] == "File" or (
                    parameter["component"] in ("Textbox", "Dropdown") and named
                    and not (RUN_PICKER.search(parameter["label"] or "") and not FOLDER_TOO.search(words))):
                found.append((endpoint, parameter, info["parameters"]))
    return found


def _kind_choices(parameter: dict, parameters: list[dict]) -> list[dict[str, str]]:
    """The settings of the '<prefix>_kind' radio under which this parameter is read: the choices that share a
    word with it (Uploaded file <-> data_file), else every choice but the default (Embedded ignores the Model box)."""
    prefix = parameter["parameter_name"].split("_")[0]
    radio = next((p for p in parameters if p["parameter_name"] == f"{prefix}_kind"), None)
    if radio is None:
        return [{}]
    choices = list(radio["python_type"]["type"].removeprefix("Literal[").removesuffix("]").replace("'", "")
                   .split(", "))
    words = set(re.findall(r"[a-z]{3,}", f"{parameter['parameter_name']} {parameter['label']}".lower()))
    words -= GENERIC_WORDS
    matching = [c for c in choices if words & set(re.findall(r"[a-z]{3,}", c.lower()))]
    chosen = matching or [c for c in choices if c != radio["parameter_default"]]
    return [{radio["parameter_name"]: choice} for choice in chosen]


def _answer(client: Client, endpoint: str, fields: dict) -> str:
    try:
        return repr(client.predict(**fields, api_name=endpoint))
    except Exception as error:  # gr.Error reaches the client as AppError: its message is the response
        return f"{type(error).__name__}: {error}"


def _masked(answer: str, vector: str) -> str:
    """The answer with the vector itself taken out (gradio's choice check repeats the value it was sent)."""
    for form in sorted({vector, repr(vector)[1:-1], json.dumps(vector)[1:-1], repr(repr(vector)[1:-1])[1:-1]},
                       key=len, reverse=True):
        answer = answer.replace(form, "<value>")
    return re.sub(r"event_id\W+\w+|\b[0-9a-f]{32}\b", "", answer)


def _raw_answer(client: Client, endpoint: str, parameters: list[dict], fields: dict) -> str:
    """The call as an outsider makes it with plain HTTP: gradio_client would upload a FileData it is given,
    while a raw request can name any server path in one."""
    data = [fields.get(p["parameter_name"], p["parameter_default"]) for p in parameters]
    event = httpx.post(f"{client.src}gradio_api/call{endpoint}", json={"data": data}, timeout=60,
                       verify=loopback_tls()).json()
    return httpx.get(f"{client.src}gradio_api/call{endpoint}/{event['event_id']}", timeout=120,
                     verify=loopback_tls()).text


@pytest.fixture
def gated_app(tmp_path_factory, style_run):
    """The app with local paths confined to one root, a finished run to evaluate, and the secret beside. Per test:
    the confinement is an environment setting, and a module-wide one reached whichever tests of this file a
    shuffled order ran while it was up (a local model folder elsewhere was refused)."""
    from finetune.core import paths

    base = tmp_path_factory.mktemp("gate")
    secret, allowed, runs = _secret_folder(base), base / "allowed", base / "runs"
    allowed.mkdir()
    (allowed / "escape").symlink_to(secret, target_is_directory=True)
    shutil.copytree(style_run[0], runs / "finished")
    with pytest.MonkeyPatch.context() as env:
        env.setenv(paths.LOCAL_ROOTS_ENV, str(allowed))
        env.delenv("SPACE_ID", raising=False)
        with served_app(runs) as url:
            yield app_client(url), secret, allowed, runs


def test_every_source_parameter_refuses_every_vector_with_one_message(gated_app, capfd):
    from finetune.core.paths import REFUSED

    client, secret, allowed, runs = gated_app
    vectors = _vectors(secret, allowed)
    swept, failures, file_calls = set(), [], 0
    answers: dict[tuple, set[str]] = {}  # (endpoint, parameter, kind) -> its answers, the vector masked
    for endpoint, parameter, parameters in _source_parameters(client):
        if endpoint in ONLY_LIST_LOOKUPS:
            continue
        # Run pickers get the finished run, so that an endpoint reaches its source instead of stopping at "pick".
        # The other fields as a careful visitor fills them, so a handler's checks of them never hide the source's.
        required = {p["parameter_name"]: "x" if p["component"] == "Textbox" else None
                    for p in parameters if not p["parameter_has_default"]}
        pickers = {p["parameter_name"]: (["finished"] if "list" in str(p["python_type"]["type"]) else "finished")
                   for p in parameters if RUN_PICKER.search(p["label"] or "") and p is not parameter
                   and not FOLDER_TOO.search(f"{p['parameter_name']} {p['label']}")}
        for kind in _kind_choices(parameter, parameters):
            for vector_name, vector in vectors.items():
                is_file = parameter["component"] == "File"
                fields = {**required, **pickers, **kind, parameter["parameter_name"]: vector}
                if is_file:
                    fields[parameter["parameter_name"]] = {"path": vector, "orig_name": "data.jsonl",
                                                           "meta": {"_type": "gradio.FileData"}}
                    answer = _raw_answer(client, endpoint, parameters, fields)
                else:
                    answer = _answer(client, endpoint, fields)
                answers.setdefault((endpoint, parameter["parameter_name"], str(kind)), set()).add(
                    _masked(answer, vector))
                swept.add(endpoint)
                file_calls += is_file
                refused = REFUSED in answer or (parameter["component"] == "Dropdown" and CHOICE_REFUSAL in answer) \
                    or (is_file and answer.startswith("event: error"))
                if not refused or MARKER in answer:
                    failures.append((endpoint, parameter["parameter_name"], kind, vector_name, answer[:300]))
    assert not failures, "\n".join(map(str, failures))
    assert len(NOT_UPLOADED.findall(capfd.readouterr().err)) >= file_calls > 0  # gradio refused each File value
    # The sweep found the endpoints issue 16 probed, through the API itself (not a hand-kept list).
    assert {"/preview_data", "/start_run", "/estimate", "/rlhf_preview_data", "/rlhf_start_reward", "/eval_loss",
            "/eval_generations", "/compare_start", "/quantize_compare", "/lora_aid", "/load_preset",
            "/hub_listing", "/rlhf_hub_listing"} <= swept
    leaked = [str(p) for p in runs.rglob("*") if p.is_file() and MARKER.encode() in p.read_bytes()]
    assert not leaked, leaked  # nothing of the secret was copied in (kept uploads, exports)
    # One message per field: no vector is told apart from another (what exists, what is a folder).
    differing = {key: texts for key, texts in answers.items() if len(texts) > 1}
    assert not differing, differing


def test_real_uploads_bundled_data_and_allowed_roots_still_work(gated_app, tmp_path, tiny_model_dir):
    client, secret, allowed, _ = gated_app
    upload = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(12)])
    info, table = client.predict(data_kind="Uploaded file", data_file=handle_file(str(upload)),
                                 api_name="/preview_data")
    assert "prompt_completion" in info and "a0" in repr(table)
    info, table = client.predict(data_kind="Bundled", data_bundled="bundled:course_qa", data_file=None,
                                 api_name="/preview_data")
    assert "Detected format" in info and len(table["data"]) > 0
    inside = write_jsonl(allowed / "inside.jsonl", [{"prompt": "q", "completion": "inside-answer"}] * 12)
    rows = client.predict(["finished"], str(inside), "train", 2, 16, api_name="/eval_generations")
    assert "inside-answer" in repr(rows)
    shutil.copytree(tiny_model_dir, allowed / "tiny")
    aid = client.predict(model_source=str(allowed / "tiny"), api_name="/lora_aid")
    assert "Example" in aid, aid


def test_gradios_file_route_serves_no_server_file(gated_app):
    """The other way a request names a path: gradio's own file route (/gradio_api/file=...), which serves only
    what the app made or the visitor uploaded."""
    client, secret, allowed, runs = gated_app
    for path in (secret / "secret.jsonl", allowed / "escape" / "secret.jsonl", runs / "finished" / "config.yaml"):
        answer = httpx.get(f"{client.src}gradio_api/file={path}", timeout=30)
        assert answer.status_code == 403 and MARKER not in answer.text


def test_upload_folder_is_gradios_own():
    import gradio.utils

    from finetune.core.paths import upload_folder

    assert upload_folder() == Path(gradio.utils.get_upload_folder()).resolve()


def test_run_history_and_messages_show_no_server_paths(tmp_path, monkeypatch):
    from finetune.core.paths import UPLOADED, display_name, upload_folder

    assert display_name(str(tmp_path / "runs" / "uploads" / "20260101-visitor-notes.jsonl")) == UPLOADED
    assert display_name(str(upload_folder() / "abc123" / "their-data.jsonl")) == UPLOADED
    assert display_name(str(tmp_path / "models" / "mine")) == "mine"
    for name in ("bundled:course_qa", "owner/name", "smollm2-135m-instruct"):
        assert display_name(name) == name


@pytest.mark.parametrize("space, roots, expected", [
    (None, None, "anywhere"), ("me/lab", None, "off"), ("me/lab", "ROOT", "roots"), (None, "ROOT", "roots")])
def test_local_paths_are_an_operator_setting(tmp_path, monkeypatch, space, roots, expected):
    from finetune.core import paths

    for name, value in (("SPACE_ID", space), (paths.LOCAL_ROOTS_ENV, roots and str(tmp_path))):
        monkeypatch.setenv(name, value) if value else monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(paths.LOCAL_PATHS_ENV, raising=False)
    assert paths.local_paths_mode() == expected
    inside, outside = write_jsonl(tmp_path / "in.jsonl", [{"a": 1}]), Path("/etc/hostname")
    if expected == "anywhere":
        assert paths.data_source(str(outside)) == str(outside)
    else:
        with pytest.raises(paths.PathRefused, match=re.escape(paths.REFUSED)):
            paths.data_source(str(outside))
    if expected == "roots":
        assert paths.data_source(str(inside)) == str(inside.resolve())
    elif expected == "off":
        with pytest.raises(paths.PathRefused):
            paths.model_source(str(tmp_path))
    # Whatever the mode: the CLI is the operator, and names stay names.
    assert paths.data_source(str(outside), operator=True) == str(outside)
    assert paths.hub_id("owner/name") == "owner/name" and paths.bundled_name("bundled:course_qa")
    monkeypatch.setenv(paths.LOCAL_PATHS_ENV, "0")
    assert paths.local_paths_mode() == "off"


def test_space_mode_refuses_local_folders_through_the_app(tmp_path, monkeypatch, tiny_model_dir):
    """SPACE_ID set and no roots listed: a model folder on the server's disk is refused, the same words as the
    sweep's; listing its parent as a root lets it through."""
    from finetune.core import paths

    monkeypatch.setenv("SPACE_ID", "someone/lora-lab")
    monkeypatch.delenv(paths.LOCAL_ROOTS_ENV, raising=False)
    with served_app(tmp_path / "runs") as url:
        client = app_client(url)
        aid = client.predict(model_source=str(tiny_model_dir), api_name="/lora_aid")
        assert paths.REFUSED in aid, aid
        _, message = client.predict(model_kind="Local folder", model_source=str(tiny_model_dir), data_file=None,
                                    api_name="/start_run")
        assert paths.REFUSED in message and str(tiny_model_dir) not in message
        monkeypatch.setenv(paths.LOCAL_ROOTS_ENV, str(tiny_model_dir.parent))
        assert "Example" in client.predict(model_source=str(tiny_model_dir), api_name="/lora_aid")


def test_cli_config_goes_through_the_gate(tmp_path, capsys):
    from finetune.train import cli

    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"data": {"source": "bundled:../../etc"}}))
    assert cli([str(config), "--output-dir", str(tmp_path / "out")]) == 2
    assert "data.source: Source refused" in capsys.readouterr().err


def test_uploads_only_from_gradio_folder(tmp_path, monkeypatch, qa_file):
    """The handlers' own check of an upload, for a caller that skips gradio's (a direct call, another frontend):
    only a file inside gradio's upload folder, after symlinks are resolved, counts as uploaded."""
    from components.rlhf_form import form_data_source
    from components.train_form import config_from_form
    from finetune.core import paths
    from finetune.core.config import ConfigError
    from finetune.services.runs import RunManager

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    upload = tmp_path / "gradio" / "abc123" / "qa.jsonl"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(qa_file.read_bytes())
    (tmp_path / "gradio" / "link.jsonl").symlink_to(qa_file)  # inside the folder, leading out of it
    form = {"data_kind": "Uploaded file", "data_file": str(upload)}
    assert config_from_form(form).data.source == str(upload.resolve())
    manager = RunManager(tmp_path / "runs")
    for outside in (str(qa_file), str(tmp_path / "gradio" / "link.jsonl"),
                    str(upload.parent / ".." / ".." / "qa.jsonl"), str(upload.parent), str(upload) + "\0",
                    {"path": str(qa_file)}, 42):
        with pytest.raises(ConfigError) as refused:
            config_from_form({**form, "data_file": outside})
        assert refused.value.problems == {"data.source": paths.REFUSED}
        with pytest.raises(paths.PathRefused):
            form_data_source(manager, None, "dpo", {"data_kind": "Uploaded file", "data_file": outside})
    assert not (manager.root / "uploads").exists()  # nothing refused was copied in


def test_a_run_id_is_looked_up_among_the_runs_only(tmp_path, monkeypatch):
    """A start adapter or reward model named like a run id never reaches a folder of the app's working directory;
    a folder must be written as a path, which the tab's path gate then judges (the CLI's operator may use any)."""
    from finetune.core.models import ModelSourceError, resolve_run_folder

    (tmp_path / "elsewhere" / "adapter").mkdir(parents=True)
    (tmp_path / "elsewhere" / "adapter" / "adapter_config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceError, match="No adapter found for 'elsewhere'"):
        resolve_run_folder("elsewhere", tmp_path / "runs", "adapter")
    assert resolve_run_folder("./elsewhere", tmp_path / "runs", "adapter") == Path("elsewhere") / "adapter"


def test_logs_and_errors_shown_to_visitors_name_no_server_folder(monkeypatch):
    from finetune.core.paths import for_visitors

    log = ("Loading /srv/app/runs/uploads/20260101-ann-notes.jsonl\n"
           "FileNotFoundError: [Errno 2] No such file: '/home/ann/models/mine/config.json' (see ~/.cache/hf/x)")
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("LORA_LAB_LOCAL_ROOTS", raising=False)
    monkeypatch.delenv("LORA_LAB_LOCAL_PATHS", raising=False)
    assert for_visitors(log) == log  # the operator's own app: the log as written
    monkeypatch.setenv("SPACE_ID", "me/lab")
    shown = for_visitors(log)
    assert "/srv" not in shown and "/home" not in shown and ".cache" not in shown and "ann/" not in shown
    assert "'…/config.json'" in shown and "…/x)" in shown
    assert shown.startswith("Loading uploaded file\n") and "FileNotFoundError: [Errno 2]" in shown
