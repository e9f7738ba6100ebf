"""Show the code: a run's notebook and script in plain transformers + peft + trl + bitsandbytes.

The proof: real runs of a tiny model trained by LoRA Lab's own entry point (the cpu-quick config as it is, 4-bit
QLoRA on the bundled data; a 4-step run with LoRA dropout on; a DPO run), then each one's exported code run in a
fresh Python process (the notebook: its cells in order under nbclient) on the CPU against the same model and data. Their trainable-parameter counts, train/held-out split (the held-out rows themselves) and
every logged training loss must match, within 2e-5 relative. Why that much and no more: the two runs share the
seed, the library versions, the rows and the CPU, but not every kernel. LoRA Lab scores answer tokens on the CPU with
one log-softmax (TRL's tiled function in the script) and attends packed rows one by one (a block-diagonal mask in
the script), so float32 sums may run in another order (about 1e-7 relative each). Measured here: identical to the
last bit for SFT; the DPO run (its only such kernel: the CPU LM head) by at most 4.4e-6 relative over its four
steps (2.9e-6 under ATEN_CPU_CAPABILITY=default; the three trajectory tests pass under =avx2 and =default too). A real difference is far larger: leaving out the script's one LoRA Lab fix that moves numbers (keeping
the adapter in float32 where TRL casts it to bfloat16) moved step 2 by 6e-5 and step 4 by 2e-4 relative; a wrong
split, data order, warmup or seed moves them by percents (this model's larger initializer range makes LoRA learn
within a few steps).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.core.config import save_config
from finetune.core.run_folder import read_run_info
from finetune.core.run_status import read_metrics

from helpers import save_tiny_llama, tiny_run_config, write_jsonl

TOLERANCE = 2e-5
ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = ("transformers", "peft", "trl", "bitsandbytes", "torch", "datasets")


@pytest.fixture(scope="module")
def learning_model(tmp_path_factory, embedded_dir) -> Path:
    """The tiny Llama with a larger initializer range, so a few LoRA steps move its loss."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-learning"), embedded_dir, initializer_range=0.3)


def _train(cfg, run_dir: Path) -> Path:
    """LoRA Lab's run of ``cfg`` (finetune.train.run: what the app's child process runs)."""
    from finetune.train import run

    save_config(cfg, run_dir / "config.yaml")
    assert run(cfg, run_dir) == 0, (run_dir / "status.json").read_text()
    return run_dir


@pytest.fixture(scope="module")
def cpu_quick_run(learning_model, tmp_path_factory) -> Path:
    """configs/cpu-quick.yaml (4-bit QLoRA on the bundled course Q&A and its validation file) with the tiny model for
    the embedded one and 6 of its 30 steps: the app's run and the script's each train in 4-bit on the CPU, the
    slowest path there, and 6 steps already cross two held-out evaluations and two checkpoints."""
    from finetune.core.config import load_config

    cfg = load_config(ROOT / "configs" / "cpu-quick.yaml")
    cfg.model.source = str(learning_model)
    cfg.training.max_steps, cfg.training.eval_steps, cfg.training.save_steps = 6, 3, 3
    return _train(cfg, tmp_path_factory.mktemp("cpu-quick") / "runs" / "cpu-quick")


@pytest.fixture(scope="module")
def small_run(learning_model, tmp_path_factory) -> Path:
    """A 4-step run on 30 rows of a local file: small enough for the rows to be embedded in the notebook."""
    folder = tmp_path_factory.mktemp("small-run")
    rows = [{"prompt": f"What does setting {i} control in LoRA?",
             "completion": f"🧪 Lab note: setting {i} controls the adapter.\nRule of thumb: keep it small."}
            for i in range(30)]
    cfg = tiny_run_config(learning_model, write_jsonl(folder / "qa.jsonl", rows), max_steps=4, eval_steps=2,
                          learning_rate=0.01)
    cfg.lora.dropout = 0.05  # the dropout masks follow the seed too
    return _train(cfg, folder / "runs" / "tiny")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune.services.take_home", *args], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _fresh_python(script: Path) -> subprocess.CompletedProcess:
    """The script in a new interpreter whose path holds no LoRA Lab (run from its own folder)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, script.name], cwd=script.parent, capture_output=True, text=True, env=env)


def _export(run_dir: Path, out: Path, as_a_command: bool = False) -> Path:
    """The CLI's export: as the operator's command (a new Python, ~5 s of imports), or its entry point in this one."""
    if as_a_command:
        done = _cli(str(run_dir), "--out", str(out), cwd=ROOT)
        assert done.returncode == 0, done.stderr
    else:
        from finetune.services.take_home import cli

        assert cli([str(run_dir), "--out", str(out)]) == 0
    return out


def _assert_matches(app_run: Path, out: Path, name: str, learns: bool = False) -> None:
    """The exported code's summary against LoRA Lab's run: parameters, split (the held-out rows) and losses."""
    from transformers import AutoTokenizer

    from finetune.core.config import load_config
    from finetune.core.data import prepare
    from finetune.core.preference import load_preferences

    summary = json.loads((out / f"{name}-take-home" / "summary.json").read_text())
    info = read_run_info(app_run)
    assert summary["trainable_parameters"] == info["trainable_parameters"] > 0
    assert (summary["train_rows"], summary["held_out_rows"]) == (info["train_rows"], info["eval_rows"])
    cfg = load_config(app_run / "config.yaml")
    if cfg.stage == "sft":
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.source)
        app_held_out = prepare(cfg.data, tokenizer, seed=cfg.training.seed).eval.to_list()
    else:
        want = "unpaired" if cfg.stage == "kto" else "paired"
        app_held_out = load_preferences(cfg.data, want=want, seed=cfg.training.seed).eval.to_list()
    script_held_out = [json.loads(line) for line in
                       (out / f"{name}-take-home" / "held_out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert script_held_out == app_held_out and len(app_held_out) == info["eval_rows"] > 0

    app_losses = [(m["step"], m["loss"]) for m in read_metrics(app_run) if "loss" in m]
    script_losses = [tuple(pair) for pair in summary["losses"]]
    assert [s for s, _ in script_losses] == [s for s, _ in app_losses] == list(range(1, cfg.training.max_steps + 1))
    if learns:  # the match must mean something: the adapter's start and updates decide these losses
        assert app_losses[0][1] - app_losses[-1][1] > 0.05, f"the loss must fall: {app_losses}"
    for (step, app_loss), (_, script_loss) in zip(app_losses, script_losses):
        assert script_loss == pytest.approx(app_loss, rel=TOLERANCE), f"step {step}: {app_losses} vs {script_losses}"


@pytest.mark.trajectory  # the losses (and that they fall) follow the training trajectory
def test_exported_script_of_cpu_quick_matches_the_app_run(cpu_quick_run, tmp_path):
    out = _export(cpu_quick_run, tmp_path, as_a_command=True)
    script = (out / "cpu-quick.py").read_text(encoding="utf-8")
    assert "import finetune" not in script and "from finetune" not in script
    for name in ("transformers", "peft", "trl", "bitsandbytes"):
        assert f"{name}=={importlib.metadata.version(name)}" in script
    # The bundled training rows are too many to embed: they travel in a file beside the script (its 24
    # validation rows are embedded).
    assert [p.name for p in out.glob("*.jsonl")] == ["cpu-quick-rows.jsonl"]
    done = _fresh_python(out / "cpu-quick.py")
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_matches(cpu_quick_run, out, "cpu-quick")


@pytest.mark.trajectory  # the losses (and that they fall) follow the training trajectory
def test_notebook_validates_and_its_cells_run_in_order(small_run, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    out = _export(small_run, tmp_path)
    assert not list(out.glob("*.jsonl")), "30 short rows are embedded in the notebook"
    notebook = nbformat.read(str(out / "tiny.ipynb"), as_version=4)
    nbformat.validate(notebook)
    kinds = [cell.cell_type for cell in notebook.cells]
    assert kinds[0] == "markdown" and all(a != b for a, b in zip(kinds, kinds[1:]) if b == "code"), \
        "every code cell follows a markdown cell"
    NotebookClient(notebook, kernel_name="python3", resources={"metadata": {"path": str(out)}}).execute()
    _assert_matches(small_run, out, "tiny", learns=True)


@pytest.fixture(scope="module")
def dpo_run(learning_model, pairs_file, tmp_path_factory) -> Path:
    """A 4-step DPO run on a fresh LoRA over the 4-bit tiny model: 16 training pairs, 4 held out by prompt."""
    cfg = tiny_run_config(learning_model, pairs_file, max_steps=4, eval_steps=2, learning_rate=0.01, batch_size=2)
    cfg.stage, cfg.data.validation_fraction = "dpo", 0.25
    return _train(cfg, tmp_path_factory.mktemp("dpo-run") / "runs" / "dpo")


@pytest.mark.trajectory  # the losses (and that they fall) follow the training trajectory
def test_exported_script_of_a_dpo_run_matches_the_app_run(dpo_run, tmp_path):
    out = _export(dpo_run, tmp_path)
    script = (out / "tiny.py").read_text(encoding="utf-8")
    assert "DPOTrainer(" in script and "beta=0.1" in script and "import finetune" not in script
    done = _fresh_python(out / "tiny.py")
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_matches(dpo_run, out, "tiny", learns=True)


def test_a_reward_run_and_a_folder_without_a_run_are_refused_clearly(small_run, tmp_path):
    from finetune.core.config import load_config

    cfg = load_config(small_run / "config.yaml")
    cfg.stage = "reward"
    save_config(cfg, tmp_path / "reward-run" / "config.yaml")
    refused = _cli(str(tmp_path / "reward-run"), cwd=ROOT)
    assert refused.returncode == 2 and "covers SFT, DPO and KTO runs for now; this is a reward run" in refused.stderr
    assert "Traceback" not in refused.stderr
    missing = _cli(str(tmp_path / "nothing-here"), cwd=ROOT)
    assert missing.returncode == 2 and "has no config.yaml" in missing.stderr


def test_the_export_tab_zips_the_notebook_and_the_script(small_run):
    """The Export tab's 'Show the code' handler (sign-in off: the local user may export every run)."""
    import zipfile

    from components.export_tab import export_code
    from finetune.core.config import load_config
    from finetune.services.runs import RunManager

    path, message = export_code(RunManager(small_run.parent), "tiny")
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == ["tiny.ipynb", "tiny.py"]
        script, notebook = (archive.read(name).decode("utf-8") for name in ("tiny.py", "tiny.ipynb"))
    assert "trainer = SFTTrainer(" in script
    # The server's folders stay its own: the model and the data by their last part only, as the pages name them.
    model_dir = load_config(small_run / "config.yaml").model.source
    assert f"MODEL_ID = {Path(model_dir).name!r}" in script
    assert str(Path(model_dir).parent) not in script + notebook and str(small_run.parent) not in script + notebook
    assert "tiny.ipynb" in message and "Colab" in message


HUB_ROWS = [  # (LoRA Lab's format name, a row as a Hub dataset might hold it)
    ("messages", {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                               {"role": "assistant", "content": "Hello."}]}),
    ("messages", {"messages": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "B."},
                               {"role": "user", "content": "C?"}]}),  # ends with a question: the last answer is B
    ("messages", {"messages": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": " "}]}),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}),
    ("alpaca", {"instruction": "Sum.", "input": "2 and 3", "output": "5"}),
    ("alpaca", {"instruction": "Greet.", "input": "", "output": "Hi."}),
    ("alpaca", {"instruction": "Greet.", "input": "", "output": None}),
    ("prompt_completion", {"prompt": "P?", "completion": "C.", "system": "Sys."}),
    ("prompt_response", {"prompt": "P?", "response": 42}),
    ("question_answer", {"question": "Q?", "answer": "A."}),
    ("question_answer", {"question": "", "answer": "A."}),
]


@pytest.mark.parametrize("fmt,row", HUB_ROWS, ids=[f"{fmt}-{i}" for i, (fmt, _) in enumerate(HUB_ROWS)])
def test_the_notebooks_hub_converter_converts_as_lora_lab_does(fmt, row):
    """A Hub dataset is converted in the notebook by a plain function; it must give LoRA Lab's rows (or drop the
    same unusable ones)."""
    from finetune.core.data_format import row_to_messages, split_prompt_completion
    from finetune.services.take_home_data import HUB_CONVERTER

    namespace: dict = {}
    exec(HUB_CONVERTER, namespace)  # the cell's code as the notebook runs it
    messages = row_to_messages(row, fmt)
    ours = (split_prompt_completion(messages) if messages else None) or {"prompt": None, "completion": None}
    assert namespace["to_prompt_completion"](row) == ours


@pytest.mark.parametrize("changes,expected", [
    ({"data": {"source": "tatsu-lab/alpaca", "hub_config": "default", "column_mapping": {"q": "prompt"}}},
     "load_dataset('tatsu-lab/alpaca', 'default', split='train')"),
    ({"lora": {"init": "loftq"}, "training": {"early_stopping_patience": 2, "keep": "best", "report_to": "trackio"}},
     "torch.linalg.svd"),
    ({"lora": {"method": "dora"}, "model": {"bits": 16}, "data": {"max_samples": 5, "max_eval_samples": 3}},
     "use_dora=True"),
    ({"lora": {"method": "ia3"}, "model": {"bits": 8, "compute_dtype": "float16"}}, "IA3Config"),
    ({"lora": {"method": "prompt_tuning", "prompt_init_text": "Answer:"}, "training": {"max_steps": -1}},
     "PromptTuningConfig"),
    ({"lora": {"method": "full"}, "model": {"bits": 32}, "data": {"validation_fraction": 0.0}}, "peft_config = None"),
    ({"stage": "kto", "preference": {"loss_type": "apo_zero_unpaired", "start_adapter": "sft-run"}},
     "KTOTrainer(model=model"),
], ids=["hub", "loftq-best-trackio", "dora-16bit-caps", "ia3-8bit", "prompt-tuning-epochs", "full-no-eval",
        "kto-from-an-adapter"])
def test_every_branch_of_the_generated_code_is_valid_python(changes, expected):
    """The notebook's cells for the methods, bit widths and data sources the proof run does not cover: each code
    cell compiles, and the settings that differ reach the code."""
    from finetune.core.config import from_dict, load_config, to_dict
    from finetune.services.take_home_cells import RunData, take_home_cells

    raw = to_dict(load_config(ROOT / "configs" / "cpu-quick.yaml"))
    for section, values in changes.items():
        raw[section] = {**raw[section], **values} if isinstance(values, dict) else values
    cfg = from_dict(raw)
    rows = [{"prompt": [{"role": "user", "content": "Q?"}], "completion": [{"role": "assistant", "content": "A."}]}]
    data = RunData(None, None, "auto") if "data" in changes and "source" in changes["data"] else \
        RunData(rows * 12, None, "prompt_completion")
    if cfg.stage == "kto":
        thumbs = [{"prompt": "Q?", "completion": "A.", "label": True}] * 6
        data = RunData(thumbs, thumbs[:2], "unpaired", presplit=True)
    cells = take_home_cells(cfg, "branch", data, {}, {}, "/somewhere/sft-run/adapter" if cfg.stage == "kto" else None)
    code = "\n\n".join(cell.text for cell in cells if cell.kind == "code")
    for cell in cells:
        if cell.kind == "code":
            compile(cell.text, "<cell>", "exec")
    assert expected in code
