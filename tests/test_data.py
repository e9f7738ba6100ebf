import json
from pathlib import Path

import pytest

from finetune.core.config import DataConfig
from finetune.core.data import DataError, bundled_names, detect_format, prepare, preview, validation_prompts

from helpers import write_jsonl

QA = [("What is LoRA?", "Low-rank adapters."), ("Why quantize?", "To save memory.")] * 6


def cfg_for(path: Path, **extra) -> DataConfig:
    return DataConfig(source=str(path), validation_fraction=extra.pop("validation_fraction", 0.0), **extra)


def first_pair(prepared):
    row = prepared.train[0]
    return row["prompt"][-1]["content"], row["completion"][0]["content"]


FORMATS = {
    "messages": lambda q, a: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
    "sharegpt": lambda q, a: {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},
    "alpaca": lambda q, a: {"instruction": q, "input": "", "output": a},
    "prompt_completion": lambda q, a: {"prompt": q, "completion": a},
    "prompt_response": lambda q, a: {"prompt": q, "response": a},
    "question_answer": lambda q, a: {"question": q, "answer": a},
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_chat_format_is_detected_and_converted(tmp_path, fmt):
    path = write_jsonl(tmp_path / "d.jsonl", [FORMATS[fmt](q, a) for q, a in QA])
    prepared = prepare(cfg_for(path))
    assert prepared.format == fmt
    assert first_pair(prepared) in QA
    assert prepared.train[0]["completion"][0]["role"] == "assistant"


def test_alpaca_input_is_appended_to_the_instruction(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Translate", "input": "hola", "output": "hello"}] * 3)
    assert first_pair(prepare(cfg_for(path))) == ("Translate\n\nhola", "hello")


def test_multi_turn_keeps_history_in_the_prompt(tmp_path):
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "What is r?"},
             {"role": "assistant", "content": "The rank."}]
    prepared = prepare(cfg_for(write_jsonl(tmp_path / "m.jsonl", [{"messages": turns}] * 3)))
    assert [m["role"] for m in prepared.train[0]["prompt"]] == ["system", "user", "assistant", "user"]
    assert prepared.train[0]["completion"][0]["content"] == "The rank."


def test_plain_text_format(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("LoRA adds low-rank matrices.\nQLoRA quantizes the base.\n")
    prepared = prepare(cfg_for(path))
    assert prepared.format == "text" and prepared.train[0]["text"] == "LoRA adds low-rank matrices."


def test_csv_json_and_parquet_files(tmp_path):
    import pandas as pd

    frame = pd.DataFrame([{"question": q, "answer": a} for q, a in QA])
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(frame.to_dict(orient="records")))
    for name in ("d.csv", "d.parquet", "d.json"):
        prepared = prepare(cfg_for(tmp_path / name))
        assert prepared.format == "question_answer" and len(prepared.train) == len(QA), name


def test_column_mapping_overrides_detection(tmp_path):
    """'reply' is a synonym of an answer, but the user's mapping says the answer is in 'notes'."""
    path = write_jsonl(tmp_path / "c.jsonl", [{"query": q, "reply": "wrong", "notes": a} for q, a in QA])
    assert prepare(cfg_for(path)).train[0]["completion"][0]["content"] == "wrong"
    prepared = prepare(cfg_for(path, column_mapping={"query": "prompt", "notes": "completion"}))
    assert first_pair(prepared) in QA


def test_mapping_names_missing_columns(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"query": q, "reply": a} for q, a in QA])
    with pytest.raises(DataError, match="do not exist: nope"):
        prepare(cfg_for(path, column_mapping={"nope": "prompt"}))


def test_no_usable_columns_lists_columns_and_formats(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("title\nfoo\nbar\n")
    with pytest.raises(DataError) as caught:
        prepare(cfg_for(path))
    message = str(caught.value)
    assert "Found: title" in message and "instruction + output" in message and "prompt + completion" in message


@pytest.mark.parametrize("name, content, fragment", [
    ("empty.jsonl", b"", "is empty"),
    ("binary.jsonl", b"\x00\x01\x02PK\x03\x04" * 50, "binary"),
    ("undecodable.csv", b"prompt,completion\n" + bytes(range(128, 256)) * 4, "not UTF-8"),
    ("truncated.json", b'[{"prompt": "a", "completion": "b"}, {"prompt": "c", "compl', "Could not read"),
    ("scalars.json", b"[1, 2, 3]", "list of objects"),
    ("scalars.jsonl", b"1\n2\n", "one JSON object per line"),
    ("data.xlsx", b"whatever", "Unsupported file type '.xlsx' for data.xlsx: spreadsheet files are not read"),
    ("notes.docx", b"whatever", "Unsupported file type"),
])
def test_bad_files_get_specific_messages(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=fragment):
        prepare(cfg_for(path))


def test_missing_file():
    with pytest.raises(DataError, match="not found"):
        prepare(cfg_for(Path("/nonexistent/data.jsonl")))


def test_rows_with_missing_fields_are_skipped_and_counted(tmp_path):
    rows = [{"prompt": q, "completion": a} for q, a in QA] + [{"prompt": "x", "completion": ""}, {"prompt": None}]
    prepared = prepare(cfg_for(write_jsonl(tmp_path / "p.jsonl", rows)))
    assert prepared.skipped_rows == 2 and len(prepared.train) == len(QA)
    assert "2 row(s) skipped: missing or empty fields" in prepared.notes


def test_all_rows_empty(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "", "completion": ""}] * 3)
    with pytest.raises(DataError, match="None of the 3 rows"):
        prepare(cfg_for(path))


def test_one_row_dataset_trains_without_eval(tmp_path):
    prepared = prepare(cfg_for(write_jsonl(tmp_path / "1.jsonl", [{"prompt": "q", "completion": "a"}]),
                               validation_fraction=0.1))
    assert len(prepared.train) == 1 and prepared.eval is None


def test_all_rows_too_long(tmp_path, embedded_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "word " * 100, "completion": "ok"}] * 3)
    with pytest.raises(DataError, match="All 3 rows are longer than the max sequence length of 32"):
        prepare(cfg_for(path, max_seq_length=32), tokenizer)


def test_too_long_rows_are_dropped_not_cut(tmp_path, embedded_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    rows = [{"prompt": "word " * 100, "completion": "ok"}] + [{"prompt": "short", "completion": "ok"}] * 3
    prepared = prepare(cfg_for(write_jsonl(tmp_path / "mix.jsonl", rows), max_seq_length=64), tokenizer)
    assert prepared.dropped_too_long == 1 and len(prepared.train) == 3


def test_hub_dataset_offline_fails_fast(monkeypatch):
    from helpers import connection_attempts

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts = connection_attempts(monkeypatch)
    with pytest.raises(DataError, match="Cannot reach the Hugging Face Hub"):
        prepare(DataConfig(source="tatsu-lab/alpaca"))
    assert attempts == []  # fast because it knew without trying the network: no timeout, no retry


def test_bundled_dataset_has_its_own_validation_split():
    # The preference pairs are bundled too, but only offered where preferences are trained (the RLHF tab).
    assert "bundled:course_qa" in bundled_names() and "bundled:course_prefs" not in bundled_names()
    assert bundled_names(preference=True) == ["bundled:course_prefs"]
    prepared = prepare(DataConfig())
    assert len(prepared.train) >= 200 and prepared.eval is not None and len(prepared.eval) >= 20
    train_prompts = {r["prompt"][-1]["content"] for r in prepared.train}
    assert not train_prompts & {r["prompt"][-1]["content"] for r in prepared.eval}


def test_bundled_answers_share_one_distinctive_style():
    prepared = prepare(DataConfig())
    answers = [r["completion"][0]["content"] for r in prepared.train]
    assert all(a.startswith("🧪 Lab note:") and "\nRule of thumb:" in a for a in answers)


def test_preview_and_example_prompts():
    fmt, rows, columns = preview(DataConfig(), rows=3)
    assert fmt == "prompt_completion" and len(rows) == 3 and columns == ["prompt", "completion"]
    assert rows[0][-1]["role"] == "assistant"
    prompts = validation_prompts(DataConfig(), limit=4)
    assert len(prompts) == 4 and all(prompts)


def test_unknown_bundled_name():
    with pytest.raises(DataError, match="No bundled dataset"):
        prepare(DataConfig(source="bundled:nope"))


def test_detect_format_prefers_specific_columns():
    assert detect_format(["instruction", "input", "output", "text"]) == "alpaca"


def test_max_eval_samples_caps_the_held_out_rows_with_a_fixed_sample():
    """The bundled course Q&A has its own validation split; the cap keeps a seeded sample of it and says so."""
    full = prepare(DataConfig(source="bundled:course_qa"))
    capped = prepare(DataConfig(source="bundled:course_qa", max_eval_samples=5))
    assert len(full.eval) > 5 and len(capped.eval) == 5 and len(capped.train) == len(full.train)
    assert {json.dumps(r, sort_keys=True) for r in capped.eval} <= {json.dumps(r, sort_keys=True) for r in full.eval}
    assert capped.eval[:] == prepare(DataConfig(source="bundled:course_qa", max_eval_samples=5)).eval[:]  # fixed
    assert f"max held-out rows: 5 of the {len(full.eval)} evaluated" in capped.notes


def test_max_eval_samples_caps_the_held_out_pairs():
    from finetune.core.preference import BUNDLED_PREFERENCES, load_preferences

    full = load_preferences(DataConfig(source=BUNDLED_PREFERENCES))
    capped = load_preferences(DataConfig(source=BUNDLED_PREFERENCES, max_eval_samples=4))
    assert len(full.eval) > 4 and len(capped.eval) == 4 and len(capped.train) == len(full.train)
    assert all(row in list(full.eval) for row in capped.eval)
    assert f"max held-out pairs: 4 of the {len(full.eval)} evaluated" in capped.notes


def test_max_eval_samples_refuses_zero_by_name():
    from finetune.core.config import ConfigError

    with pytest.raises(ConfigError, match="data.max_eval_samples"):
        DataConfig(max_eval_samples=0)
