"""Data files as people bring them (issue 18): encodings, CSV dialects, column names, JSON shapes, partly broken
files, Hub-style dataset folders and a preview whose counts are the training run's own.

Every case writes its own file and goes through the entry points the Train tab and the CLI use: ``data.preview``
/ ``data.preview_report`` (the tab), ``paths.check_config`` + ``data.check_file`` (before a run starts) and
``data.prepare`` (the run). Nothing here needs the network: the Hub functions read a local folder laid out as a
Hub dataset repository, which ``datasets`` reads without one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.core.config import DataConfig, RunConfig
from finetune.core.data import (DataError, check_file, hub_configs, hub_first_rows, hub_preview, hub_splits, prepare,
                                preview, preview_report, usable_row_count)
from finetune.core.paths import check_config
from finetune.core.preference import PreferenceError, load_preferences

from helpers import write_jsonl

QA = [("What is LoRA?", "Low-rank adapters."), ("Why quantize?", "To save memory."),
      ("Qu'est-ce qu'un café ?", "Une boisson très chaude.")]


def cfg_for(path: Path, **extra) -> DataConfig:
    return DataConfig(source=str(path), validation_fraction=extra.pop("validation_fraction", 0.0), **extra)


def first_messages(prepared) -> list[dict[str, str]]:
    return prepared.train[0]["prompt"] + prepared.train[0]["completion"]


def user_assistant(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def passes_run_checks(path: Path, skip_bad_rows: bool = False) -> str:
    """What happens before a run starts (CLI and Start): the path gate, then the file checks."""
    check_config(RunConfig(data=cfg_for(path, skip_bad_rows=skip_bad_rows)), operator=True)
    return check_file(path, skip_bad_rows, usable_row_count(cfg_for(path)))  # as admission.check_sources counts


# --- 1. text files as people save them -------------------------------------------------------------------------

def csv_text(delimiter: str = ",") -> str:
    return "\n".join([f"question{delimiter}answer"] + [f"{q}{delimiter}{a}" for q, a in QA]) + "\n"


@pytest.mark.parametrize("name, content", [
    ("bom.jsonl", "".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in QA)),
    ("bom.json", json.dumps([{"prompt": q, "completion": a} for q, a in QA])),
    ("bom.csv", csv_text()),
])
def test_utf8_byte_order_mark_is_tolerated(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + content.encode("utf-8"))
    assert passes_run_checks(path) in ("json", "csv")
    prepared = prepare(cfg_for(path))
    assert len(prepared.train) == len(QA) and first_messages(prepared) == user_assistant(*QA[0])
    assert prepared.encoding == "UTF-8 with byte-order mark"


def test_a_line_separator_inside_a_json_string_does_not_split_the_row(tmp_path):
    path = write_jsonl(tmp_path / "u2028.jsonl", [{"prompt": "one\u2028two", "completion": "a"}] * 3)
    prepared = prepare(cfg_for(path))
    assert len(prepared.train) == 3 and first_messages(prepared) == user_assistant("one\u2028two", "a")


def test_utf8_bom_on_a_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"\xef\xbb\xbfLoRA adds low-rank matrices.\n\nQLoRA quantizes the base.\n")
    prepared = prepare(cfg_for(path))
    assert prepared.train["text"] == ["LoRA adds low-rank matrices.", "QLoRA quantizes the base."]


def test_windows_spreadsheet_csv_in_cp1252_with_semicolons(tmp_path):
    path = tmp_path / "export.csv"
    original = csv_text(";").replace("\n", "\r\n").encode("cp1252")
    path.write_bytes(original)
    report = preview_report(cfg_for(path))
    assert report.encoding == "cp1252 (detected: the file is not UTF-8)"
    assert report.shape == "CSV separated by semicolons" and report.format == "question_answer"
    assert report.rows[2] == user_assistant(*QA[2])  # 'é' and 'è' decoded, not mojibake
    assert "encoding cp1252 (detected: the file is not UTF-8)" in report.markdown()
    assert report.train_rows == len(QA)
    assert path.read_bytes() == original  # the user's file is read, never rewritten


def test_cp1252_with_euro_signs_is_not_read_as_a_cyrillic_code_page(tmp_path):
    """The detector ranks cp1125 first for such a file ('€' -> 'А', 'è' -> 'ш'): Latin words with Cyrillic
    letters inside are a misreading, so cp1252 is taken when it reads the words as one script."""
    rows = [(f"What does setting {i} cost?", f"It costs {i} €, très simplement.") for i in range(25)]
    path = tmp_path / "prices.csv"
    path.write_bytes(("question;answer\r\n" + "".join(f"{q};{a}\r\n" for q, a in rows)).encode("cp1252"))
    report = preview_report(cfg_for(path))
    assert report.encoding == "cp1252 (detected: the file is not UTF-8)"
    assert report.rows[0] == user_assistant(*rows[0])


def test_notepad_utf16_file(tmp_path):
    path = tmp_path / "notepad.csv"
    path.write_bytes(csv_text().encode("utf-16"))  # with its byte-order mark, as Notepad's "Unicode" saves
    assert passes_run_checks(path) == "csv"
    prepared = prepare(cfg_for(path))
    assert prepared.encoding == "UTF-16 (byte-order mark)" and first_messages(prepared) == user_assistant(*QA[0])


def test_bytes_no_encoding_fits_are_refused_with_the_offset(tmp_path):
    path = tmp_path / "noise.csv"
    path.write_bytes(b"prompt,completion\n" + bytes(range(128, 256)) * 4)
    with pytest.raises(DataError) as caught:
        passes_run_checks(path)
    offset = len(b"prompt,completion\n")
    assert str(caught.value) == (f"noise.csv is not UTF-8 text (bad byte at position {offset}) and no other text "
                                 "encoding fits it; re-save it as UTF-8.")


def test_tab_separated_file_and_tabs_in_a_csv(tmp_path):
    for name in ("data.tsv", "tabs.csv"):
        path = tmp_path / name
        path.write_text(csv_text("\t"), encoding="utf-8")
        assert passes_run_checks(path) == "csv"
        report = preview_report(cfg_for(path))
        assert report.shape == "CSV separated by tabs" and report.rows[0] == user_assistant(*QA[0]), name


def test_quoted_newlines_and_a_trailing_empty_column(tmp_path):
    path = tmp_path / "quoted.csv"
    path.write_text('prompt,completion,\n"Two lines:\nfirst, then second","Answer, with a comma",\n'
                    'q2,a2,\n', encoding="utf-8")
    prepared = prepare(cfg_for(path))
    assert prepared.train.column_names == ["prompt", "completion"]
    assert first_messages(prepared) == user_assistant("Two lines:\nfirst, then second", "Answer, with a comma")
    assert len(prepared.train) == 2 and prepared.malformed_rows == 0


# --- 2. columns as people name them ----------------------------------------------------------------------------

@pytest.mark.parametrize("row, fmt, renames", [
    ({"Question": "q", "ANSWER": "a"}, "question_answer", {"Question": "question", "ANSWER": "answer"}),
    ({"Instruction": "q", "output_text": "a"}, "alpaca", {"Instruction": "instruction", "output_text": "output"}),
    ({"query": "q", "response": "a"}, "prompt_completion", {"query": "prompt", "response": "completion"}),
    ({"input": "q", "output": "a"}, "prompt_completion", {"input": "prompt", "output": "completion"}),
    ({"instruction": "q", "response": "a"}, "alpaca", {"response": "output"}),
    ({"human": "q", "assistant": "a"}, "prompt_completion", {"human": "prompt", "assistant": "completion"}),
    ({"User": "q", "Assistant": "a"}, "prompt_completion", {"User": "prompt", "Assistant": "completion"}),
    ({"Prompt Text": "q", "Completion-Text": "a"}, "prompt_completion",
     {"Prompt Text": "prompt", "Completion-Text": "completion"}),
])
def test_column_names_and_synonyms(tmp_path, row, fmt, renames):
    path = write_jsonl(tmp_path / "cols.jsonl", [row] * 3)
    report = preview_report(cfg_for(path))
    assert (report.format, report.column_renames) == (fmt, renames)
    assert report.rows[0] == user_assistant("q", "a")
    assert "**Columns read as:** " + ", ".join(f"`{o}` → `{n}`" for o, n in renames.items()) in report.markdown()


def test_dolly_context_follows_the_instruction(tmp_path):
    row = {"instruction": "Summarise this.", "context": "LoRA trains small adapters.", "response": "Adapters.",
           "category": "summarization"}
    prepared = prepare(cfg_for(write_jsonl(tmp_path / "dolly.jsonl", [row] * 3)))
    assert prepared.format == "alpaca" and prepared.column_renames == {"response": "output", "context": "input"}
    assert first_messages(prepared) == user_assistant("Summarise this.\n\nLoRA trains small adapters.", "Adapters.")


def test_prompt_chosen_trains_on_the_chosen_answer_and_says_so(tmp_path):
    rows = [{"prompt": "q", "chosen": "good", "rejected": "bad"}] * 3
    prepared = prepare(cfg_for(write_jsonl(tmp_path / "prefs.jsonl", rows)))
    assert first_messages(prepared) == user_assistant("q", "good")
    assert any("the chosen answers are trained on, the rejected ones are not used here" in n for n in prepared.notes)


def test_two_readings_pick_one_and_say_which(tmp_path):
    rows = [{"Question": "q", "Answer": "a", "Response": "r", "text": "t"}] * 3
    report = preview_report(cfg_for(write_jsonl(tmp_path / "two.jsonl", rows)))
    assert report.rows[0] == user_assistant("q", "a")
    assert report.format == "question_answer" and report.notes[:2] == [
        "'Answer' read as the answer; 'Response' could also be one (use the column mapping to choose)",
        "the columns also fit the format(s) text; read as question_answer (choose the format to read them otherwise)"]
    synonyms = preview_report(cfg_for(write_jsonl(tmp_path / "syn.jsonl",
                                                  [{"query": "q", "reply": "r", "response": "a", "text": "t"}] * 3)))
    assert synonyms.rows[0] == user_assistant("q", "a") and synonyms.notes[:2] == [
        "'response' read as the answer; 'reply' could also be one (use the column mapping to choose)",
        "'text' is not used (set the format to text to train on it instead)"]
    exact = preview_report(cfg_for(write_jsonl(tmp_path / "exact.jsonl",
                                               [{"prompt": "q", "completion": "a", "text": "t"}] * 3)))
    assert exact.format == "prompt_completion" and exact.notes[0] == (
        "the columns also fit the format(s) text; read as prompt_completion (choose the format to read them "
        "otherwise)")


def test_manual_mapping_and_format_stay_the_override(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"Question": "q", "Answer": "a", "hint": "h"}] * 3)
    mapped = prepare(cfg_for(path, column_mapping={"hint": "completion", "Question": "prompt"}))
    assert first_messages(mapped) == user_assistant("q", "h")
    chosen_format = prepare(cfg_for(path, format="question_answer"))
    assert chosen_format.format == "question_answer" and first_messages(chosen_format) == user_assistant("q", "a")


def test_preference_columns_as_people_name_them(tmp_path):
    rows = [{"Question": f"q{i}", "preferred": "good", "Dispreferred": "bad"} for i in range(4)]
    data = load_preferences(cfg_for(write_jsonl(tmp_path / "prefs.jsonl", rows)))
    assert data.source_format == "paired" and len(data.train) == 4
    assert data.train[0]["chosen"][0]["content"] == "good" and data.train[0]["rejected"][0]["content"] == "bad"
    assert "columns read as: Question → prompt, preferred → chosen, Dispreferred → rejected" in data.notes


# --- 3. shapes as people write them -----------------------------------------------------------------------------

def test_pandas_json_orients(tmp_path):
    import pandas as pd

    frame = pd.DataFrame([{"question": q, "answer": a} for q, a in QA])
    written = {"default.json": frame.to_json(), "split.json": frame.to_json(orient="split"),
               "index.json": frame.to_json(orient="index"), "lists.json": json.dumps(frame.to_dict(orient="list")),
               "records.json": frame.to_json(orient="records"),
               "lines.jsonl": frame.to_json(orient="records", lines=True)}
    for name, text in written.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        prepared = prepare(cfg_for(tmp_path / name))
        assert len(prepared.train) == len(QA) and first_messages(prepared) == user_assistant(*QA[0]), name


@pytest.mark.parametrize("key", ["data", "rows", "examples"])
def test_rows_under_a_top_level_key(tmp_path, key):
    path = tmp_path / "nested.json"
    path.write_text(json.dumps({"version": 2, key: [{"prompt": q, "completion": a} for q, a in QA]}))
    report = preview_report(cfg_for(path))
    assert report.shape == f"a JSON list of objects under the top-level key '{key}'"
    assert report.train_rows == len(QA) and report.rows[0] == user_assistant(*QA[0])


def test_one_object_is_one_row_even_a_conversation(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]}))
    prepared = prepare(cfg_for(path))
    assert len(prepared.train) == 1 and first_messages(prepared) == user_assistant("Hi", "Hey")


def test_sharegpt_system_turn_reaches_the_chat_template(tmp_path, embedded_dir):
    from transformers import AutoTokenizer

    turns = [{"from": "system", "value": "Answer like a pirate."}, {"from": "human", "value": "Hi"},
             {"from": "gpt", "value": "Ahoy"}, {"from": "human", "value": "What is LoRA?"},
             {"from": "gpt", "value": "Small adapters, matey."}]
    as_column = {"system": "Answer like a pirate.", "conversations": turns[1:]}  # LLaMA-Factory's layout
    for name, row in (("turn.jsonl", {"conversations": turns}), ("column.jsonl", as_column)):
        prepared = prepare(cfg_for(write_jsonl(tmp_path / name, [row] * 3)))
        prompt = prepared.train[0]["prompt"]
        assert prompt[0] == {"role": "system", "content": "Answer like a pirate."}, name
        assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user"]
        assert prepared.train[0]["completion"] == [{"role": "assistant", "content": "Small adapters, matey."}]
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    rendered = tokenizer.apply_chat_template(prompt + prepared.train[0]["completion"], tokenize=False)
    assert "Answer like a pirate." in rendered


def test_a_number_among_texts_is_read_as_text(tmp_path):
    rows = [{"question": "How many bits?", "answer": 4}] + [{"question": q, "answer": a} for q, a in QA]
    prepared = prepare(cfg_for(write_jsonl(tmp_path / "mixed.jsonl", rows)))
    assert len(prepared.train) == 4 and first_messages(prepared) == user_assistant("How many bits?", "4")


def test_deeply_nested_json_is_refused_not_a_traceback(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError) as caught:
        passes_run_checks(path)
    assert str(caught.value) == "Could not read deep.json as JSON: it is nested too deeply to be rows of data."


def test_big_files_go_to_datasets_loaders_bom_and_tabs_included(tmp_path, monkeypatch):
    """Over IN_MEMORY_LIMIT a file is read by datasets (flat memory), which needs UTF-8; a BOM still works."""
    import finetune.core.data_sources

    monkeypatch.setattr(finetune.core.data_sources, "IN_MEMORY_LIMIT", 10)
    for name, text in (("big.jsonl", "".join(json.dumps({"Prompt": q, "Completion": a}) + "\n" for q, a in QA)),
                       ("big.tsv", csv_text("\t"))):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
        assert passes_run_checks(path) in ("json", "csv")
        prepared = prepare(cfg_for(path))
        assert prepared.encoding is None and first_messages(prepared) == user_assistant(*QA[0]), name
    latin = tmp_path / "big.csv"
    latin.write_bytes(csv_text().encode("cp1252"))
    with pytest.raises(DataError) as caught:
        passes_run_checks(latin)
    offset = csv_text().encode("cp1252").index("é".encode("cp1252"))  # the first byte UTF-8 cannot read
    assert str(caught.value) == (f"big.csv is not UTF-8 text (bad byte at position {offset}); files over 0 MB must "
                                 "be UTF-8: re-save it as UTF-8.")


@pytest.mark.parametrize("name, message", [
    ("book.xlsx", "Unsupported file type '.xlsx' for book.xlsx: spreadsheet files are not read. Save the sheet as "
                  "CSV UTF-8 (File > Save as, or Download > CSV) and use that file."),
    ("sheet.ods", "Unsupported file type '.ods' for sheet.ods: spreadsheet files are not read. Save the sheet as "
                  "CSV UTF-8 (File > Save as, or Download > CSV) and use that file."),
])
def test_spreadsheets_are_refused_with_what_to_do(tmp_path, name, message):
    path = tmp_path / name
    path.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(DataError) as caught:
        passes_run_checks(path)
    assert str(caught.value) == message


# --- 4. partly broken files -----------------------------------------------------------------------------------

def broken_jsonl(tmp_path: Path, bad: dict[int, str], total: int = 10) -> Path:
    lines = [json.dumps({"prompt": f"question {i}", "completion": f"answer {i}"}) for i in range(1, total + 1)]
    for number, text in bad.items():
        lines[number - 1] = text
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


BROKEN = {2: '{"prompt": "q", "completion": }', 5: "[1, 2]", 9: '{"prompt": "q"'}
BROKEN_MESSAGE = (
    "Could not read broken.jsonl as JSON Lines: 3 of 10 rows are malformed: line 2 is not valid JSON (Expecting "
    "value at column 31); line 5 holds a list, not an object (JSON Lines need one JSON object per line); line 9 is "
    "not valid JSON (Expecting ',' delimiter at column 15). Fix them, or turn on skip malformed rows "
    "(data.skip_bad_rows) to train on the 7 usable rows.")


def test_every_bad_line_is_listed_and_the_file_refused_by_default(tmp_path):
    path = broken_jsonl(tmp_path, BROKEN)
    for attempt in (lambda: passes_run_checks(path), lambda: prepare(cfg_for(path))):
        with pytest.raises(DataError) as caught:
            attempt()
        assert str(caught.value) == BROKEN_MESSAGE


def test_skip_bad_rows_trains_on_the_good_rows_and_counts_the_rest(tmp_path):
    path = broken_jsonl(tmp_path, BROKEN)
    assert passes_run_checks(path, skip_bad_rows=True) == "json"
    prepared = prepare(cfg_for(path, skip_bad_rows=True))
    assert len(prepared.train) == 7 and prepared.malformed_rows == 3
    assert [line.split(" is ")[0].split(" holds ")[0] for line in prepared.bad_lines] == ["line 2", "line 5", "line 9"]
    assert "3 malformed line(s) skipped: lines 2, 5, 9" in prepared.notes  # notes go to run_info.json
    assert first_messages(prepared) == user_assistant("question 1", "answer 1")


def test_preview_lists_the_bad_lines_and_the_refusal_to_come(tmp_path):
    report = preview_report(cfg_for(broken_jsonl(tmp_path, BROKEN)))
    assert report.refusal == BROKEN_MESSAGE and len(report.bad_lines) == 3
    assert (report.source_rows, report.train_rows, report.skipped_malformed) == (10, 7, 3)
    assert "**Start will refuse this file:** " + BROKEN_MESSAGE in report.markdown()
    assert preview_report(cfg_for(broken_jsonl(tmp_path, BROKEN), skip_bad_rows=True)).refusal is None


def test_mostly_broken_file_is_refused_even_when_skipping(tmp_path):
    path = broken_jsonl(tmp_path, {n: "not json" for n in range(1, 7)})
    with pytest.raises(DataError) as caught:
        prepare(cfg_for(path, skip_bad_rows=True))
    not_json = "; ".join(f"line {n} is not valid JSON (Expecting value at column 1)" for n in range(1, 7))
    assert str(caught.value) == (
        f"Could not read broken.jsonl as JSON Lines: 6 of 10 rows are malformed: {not_json}. More than half the file "
        "is unreadable, so it is refused even with skip malformed rows: fix it.")


def test_many_bad_lines_all_numbered(tmp_path):
    path = broken_jsonl(tmp_path, {n: "oops" for n in range(1, 31)}, total=70)
    with pytest.raises(DataError) as caught:
        check_file(path)
    message = str(caught.value)
    assert message.startswith("Could not read broken.jsonl as JSON Lines: 30 of 70 rows are malformed: line 1 ")
    assert "; also lines 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30. " in message


def test_preview_explains_the_first_bad_lines_and_numbers_all_the_others(tmp_path):
    path = broken_jsonl(tmp_path, {n: "oops" for n in range(1, 31)}, total=70)
    report = preview_report(cfg_for(path, skip_bad_rows=True))
    assert len(report.bad_lines) == 30 and report.refusal is None
    explained = "; ".join(f"line {n} is not valid JSON (Expecting value at column 1)" for n in range(1, 21))
    assert f"**Malformed (30):** {explained}; and 10 more: lines 21, 22, 23, 24, 25, 26, 27, 28, 29, 30" in \
        report.markdown()


def test_csv_rows_with_the_wrong_number_of_fields(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text('prompt,completion\nq1,a1\nq2,a2,extra\nq3\n"q4\nstill q4",a4\nq5,a5\n', encoding="utf-8")
    with pytest.raises(DataError) as caught:
        prepare(cfg_for(path))
    assert str(caught.value) == (
        "Could not read ragged.csv as CSV separated by commas: 2 of 5 rows are malformed: line 3 has 3 field(s); the "
        "header has 2 (a missing or extra separator, or an unclosed quote); line 4 has 1 field(s); the header has 2 "
        "(a missing or extra separator, or an unclosed quote). Fix them, or turn on skip malformed rows "
        "(data.skip_bad_rows) to train on the 3 usable rows.")
    prepared = prepare(cfg_for(path, skip_bad_rows=True))
    assert [m[0]["content"] for m in prepared.train["prompt"]] == ["q1", "q4\nstill q4", "q5"]


def test_unusable_preference_pairs_skipped_on_request(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(6)]
    rows[2] = {"prompt": "q2", "chosen": "same", "rejected": "same"}
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(PreferenceError) as caught:
        load_preferences(cfg_for(path))
    assert str(caught.value) == (
        f"1 of 6 rows in '{path}' are not usable preferences: row 3: chosen and rejected are identical, so the pair "
        "prefers nothing. Fix or remove them, or turn on skip malformed rows (data.skip_bad_rows) to train on the 5 "
        "usable rows.")
    data = load_preferences(cfg_for(path, skip_bad_rows=True))
    assert len(data.train) == 5 and data.skipped_rows == 1
    assert "1 unusable row(s) skipped: row 3: chosen and rejected are identical, so the pair prefers nothing" \
        in data.notes


def test_unusable_pairs_in_a_csv_are_named_by_their_line_too(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\n" + "".join(f"q{i},good,bad\n" for i in range(4)) + "q4,same,same\n",
                    encoding="utf-8")
    with pytest.raises(PreferenceError, match=r"^1 of 5 rows in .* are not usable preferences: row 5 \(line 6\): "
                                              "chosen and rejected are identical"):
        load_preferences(cfg_for(path))


# --- 5. Hub datasets: configs, splits, a first look -------------------------------------------------------------

HUB_README = """---
configs:
- config_name: chat
  data_files:
  - split: train
    path: chat/train.jsonl
- config_name: qa
  data_files:
  - split: train
    path: qa/train.jsonl
  - split: validation
    path: qa/validation.jsonl
---
# A dataset laid out as on the Hub
"""


@pytest.fixture
def hub_folder(tmp_path) -> Path:
    folder = tmp_path / "someone--qa-set"
    (folder / "qa").mkdir(parents=True)
    (folder / "chat").mkdir()
    (folder / "README.md").write_text(HUB_README)
    write_jsonl(folder / "qa" / "train.jsonl", [{"Question": q, "Answer": a} for q, a in QA])
    write_jsonl(folder / "qa" / "validation.jsonl", [{"Question": "Held?", "Answer": "Out."}])
    write_jsonl(folder / "chat" / "train.jsonl", [{"messages": user_assistant(q, a)} for q, a in QA])
    return folder


def test_hub_configs_splits_and_preview(hub_folder):
    assert sorted(hub_configs(str(hub_folder))) == ["chat", "qa"]
    assert hub_splits(str(hub_folder), "qa") == ["train", "validation"]
    assert hub_splits(str(hub_folder), "chat") == ["train"]
    report = hub_preview(str(hub_folder), "qa", "train", rows=2)
    assert report.format == "question_answer" and report.column_renames == {"Question": "question",
                                                                             "Answer": "answer"}
    assert report.rows == [user_assistant(*QA[0]), user_assistant(*QA[1])]
    assert report.train_rows is None  # streamed: the counts are unknown until the split is loaded
    assert hub_preview(str(hub_folder), "chat", "train", rows=1).rows == [user_assistant(*QA[0])]
    assert hub_first_rows(str(hub_folder), "qa", "validation") == [{"Question": "Held?", "Answer": "Out."}]


def test_hub_preview_of_a_missing_split_is_explained(hub_folder):
    with pytest.raises(DataError, match=f"Could not preview '{hub_folder}' \\(chat\\), split 'test': "):
        hub_preview(str(hub_folder), "chat", "test")


def test_hub_listing_offline_is_unchanged(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = ("Cannot reach the Hugging Face Hub to download the dataset 'tatsu-lab/alpaca' (this machine is "
               "offline); use the bundled dataset or upload a file.")
    for call in (lambda: hub_configs("tatsu-lab/alpaca"), lambda: hub_splits("tatsu-lab/alpaca"),
                 lambda: hub_preview("tatsu-lab/alpaca")):
        with pytest.raises(DataError) as caught:
            call()
        assert str(caught.value) == message


# --- 6. the preview tells the truth about training ---------------------------------------------------------------

def test_preview_counts_are_the_runs_own(tmp_path, embedded_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    rows = [{"prompt": f"Question number {i}?", "completion": f"Answer {i}."} for i in range(30)]
    rows += [{"prompt": "word " * 200, "completion": "long"}] * 2 + [{"prompt": "no answer", "completion": ""}] * 3
    path = broken_jsonl(tmp_path, {})
    lines = [json.dumps(r) for r in rows]
    lines.insert(4, "{broken")
    path.write_text("\n".join(lines) + "\n")
    cfg = cfg_for(path, validation_fraction=0.2, max_seq_length=64, skip_bad_rows=True)
    report = preview_report(cfg, tokenizer, seed=7)
    prepared = prepare(cfg, tokenizer, seed=7)
    too_long = prepared.dropped_too_long + prepared.eval_dropped_too_long
    assert too_long == 2  # both long rows, wherever the split put them
    assert report.train_rows == len(prepared.train) and report.held_out_rows == len(prepared.eval)
    assert (report.source_rows, report.skipped_malformed, report.skipped_missing, report.skipped_too_long) == \
        (36, 1, 3, 2)
    assert report.train_rows + report.held_out_rows + 1 + 3 + 2 == 36  # every row of the file accounted for
    assert (f"**Rows:** 36 in the source → **{report.train_rows} will train**, {report.held_out_rows} held out for "
            "validation (20% of the rows), 6 skipped: 1 malformed, 3 with missing or empty fields, 2 longer than 64 "
            "tokens.") in report.markdown()


def test_preview_without_a_tokenizer_says_what_it_did_not_count(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": q, "completion": a} for q, a in QA * 4])
    report = preview_report(cfg_for(path, validation_fraction=0.1))
    assert report.skipped_too_long is None
    assert report.markdown().splitlines()[-1] == (
        "**Rows:** 12 in the source → **10 will train**, 2 held out for validation (10% of the rows), 0 skipped "
        "(rows longer than 512 tokens are not counted here).")


def test_old_preview_tuple_is_unchanged(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"Question": q, "Answer": a} for q, a in QA])
    fmt, rows, columns = preview(cfg_for(path), rows=2)
    assert (fmt, columns) == ("question_answer", ["Question", "Answer"])
    assert rows == [user_assistant(*QA[0]), user_assistant(*QA[1])]


# --- the CLI, end to end: what was skipped reaches the run's own record ---------------------------------------------

def test_cli_trains_on_the_good_rows_of_a_spreadsheet_export(tmp_path, tiny_model_dir, capsys):
    """A Windows spreadsheet export (cp1252, semicolons, other capitals) with one broken line: refused with the
    line named, then trained with skip_bad_rows, the skip and the encoding recorded in run_info.json."""
    import yaml

    from finetune.core.config import to_dict
    from finetune.train import cli
    from helpers import tiny_run_config

    rows = [f"What does setting {i} do?;It sets {i}, très simplement." for i in range(12)]
    rows.insert(3, "a line without its separator")
    path = tmp_path / "export.csv"
    path.write_bytes(("Question;Answer\r\n" + "\r\n".join(rows) + "\r\n").encode("cp1252"))
    raw = to_dict(tiny_run_config(tiny_model_dir, path, bits=32, max_steps=1))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert cli([str(config), "--output-dir", str(tmp_path / "refused")]) == 1
    err = capsys.readouterr().err
    assert ("error: Could not read export.csv as CSV separated by semicolons: 1 of 13 rows are malformed: line 5 has 1 "
            "field(s); the header has 2") in err and "Traceback" not in err
    raw["data"]["skip_bad_rows"] = True
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert cli([str(config), "--output-dir", str(tmp_path / "run")]) == 0
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["train_rows"] + info["eval_rows"] == 12
    assert "1 malformed line(s) skipped: line 5" in info["data_notes"]
    assert "read as CSV separated by semicolons, encoding cp1252 (detected: the file is not UTF-8)" in \
        info["data_notes"]
    assert path.read_bytes().startswith("Question;Answer\r\n".encode("cp1252"))  # the file as it was
