"""Generated input for the parsers and validators a visitor reaches (issue 29): the data-file reader, the full
data preview, the preference rows, a RunConfig from YAML and from the Train form, the path gate and the chat's
request limits. The property is the same everywhere: every input gives a result or one of the app's own clear
errors (DataError, ConfigError, PathRefused, the chat's ValueError) -- never another exception. A hang is caught by
the suite's per-test timeout.

Seeded and bounded in CI (the "ci" profile: derandomized, a fixed number of examples per test); `make fuzz` runs
the "fuzz" profile, many more examples from a random seed (hypothesis prints the seed and the falsifying example to
replay a failure).
"""

from __future__ import annotations

import json
import math
import os
import string
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from finetune.core import paths
from finetune.core.config import ConfigError, DataConfig, from_dict, load_config, to_dict
from finetune.core.data import preview_report
from finetune.core.data_files import DataError, check_bad_lines, read_text_file
from finetune.core.preference import ROW_CONVERTERS, PreferenceError, convert_rows
from finetune.services.chat import SamplingSettings, check_prompt

settings.register_profile("ci", max_examples=60, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("fuzz", max_examples=2000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TEXT_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".txt")
ENCODINGS = ("utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252")

# --- values a visitor can send ----------------------------------------------------------------------------------

odd_numbers = st.sampled_from([math.nan, math.inf, -math.inf, -1, 0, 1e308, -1e-9, 2**63, 0.5])
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), odd_numbers, st.text(max_size=20))
json_values = st.recursive(scalars.filter(lambda v: not (isinstance(v, float) and not math.isfinite(v))),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=4),
                           max_leaves=12)
any_value = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=5), scalars,
                                                                               max_size=3))
column_names = st.sampled_from(["prompt", "completion", "chosen", "rejected", "label", "messages", "text",
                                "instruction", "output", "question", "answer", "conversations", "input", ""])


def write(tmp_path: Path, suffix: str, data: bytes) -> Path:
    path = tmp_path / f"upload{suffix}"
    path.write_bytes(data)
    return path


def encoded(text: str, encoding: str) -> bytes:
    return text.encode(encoding, errors="replace")


# --- the data-file reader -----------------------------------------------------------------------------------------

@given(data=st.binary(max_size=2000), suffix=st.sampled_from(TEXT_SUFFIXES))
@example(data=b"\xff\xfe\x00", suffix=".csv").via("a truncated UTF-16 mark")
@example(data=b"[" * 5000, suffix=".json").via("nesting deeper than the parser's recursion")
@example(data=b'a,b\n"1,2\n', suffix=".csv").via("an unterminated quote")
def test_any_bytes_are_read_or_refused_clearly(tmp_path_factory, data, suffix):
    path = write(tmp_path_factory.mktemp("bytes"), suffix, data)
    try:
        read = read_text_file(path)
        check_bad_lines(read, path.name, skip_bad_rows=False)
    except DataError as error:
        assert str(error).strip()


row_dicts = st.dictionaries(column_names, json_values, max_size=5)


@given(rows=st.lists(row_dicts, max_size=8), encoding=st.sampled_from(ENCODINGS),
       layout=st.sampled_from(["jsonl", "array", "object of rows", "one object"]))
def test_json_shapes_are_read_or_refused_clearly(tmp_path_factory, rows, encoding, layout):
    if layout == "jsonl":
        text, suffix = "\n".join(json.dumps(row, ensure_ascii=False) for row in rows), ".jsonl"
    else:
        value = {"array": rows, "object of rows": {"train": rows}, "one object": rows[0] if rows else {}}[layout]
        text, suffix = json.dumps(value, ensure_ascii=False), ".json"
    path = write(tmp_path_factory.mktemp("json"), suffix, encoded(text, encoding))
    try:
        read_text_file(path)
    except DataError as error:
        assert str(error).strip()


cells = st.text(alphabet=string.printable + "éü中😀\u2028", max_size=30)


@given(header=st.lists(cells, min_size=1, max_size=4), body=st.lists(st.lists(cells, max_size=5), max_size=8),
       delimiter=st.sampled_from([",", ";", "\t", "|"]), quoting=st.sampled_from([0, 1, 2, 3]),
       encoding=st.sampled_from(ENCODINGS), suffix=st.sampled_from([".csv", ".tsv"]))
def test_csv_dialects_are_read_or_refused_clearly(tmp_path_factory, header, body, delimiter, quoting, encoding,
                                                  suffix):
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, quoting=quoting, escapechar="\\")
    try:
        writer.writerows([header, *body])
    except csv.Error:  # the dialect cannot write these cells (quoting none without an escape); nothing to read
        return
    path = write(tmp_path_factory.mktemp("csv"), suffix, encoded(buffer.getvalue(), encoding))
    try:
        read = read_text_file(path)
        check_bad_lines(read, path.name, skip_bad_rows=True)
    except DataError as error:
        assert str(error).strip()


@settings(max_examples=15)  # each example loads the file through `datasets`, the Train tab's real preview
@given(rows=st.lists(st.dictionaries(st.sampled_from(["prompt", "completion", "messages", "text"]), json_values,
                                     min_size=1, max_size=3), min_size=1, max_size=6),
       fmt=st.sampled_from(["auto", "prompt_completion", "messages", "text"]))
@example(rows=[{"prompt": "a", "completion": 1}, {"prompt": "b", "completion": "x"}], fmt="auto")
@example(rows=[{"prompt": {"a": 1}}, {"prompt": [1, 2]}], fmt="auto").via("a column of mixed nested types")
def test_the_data_preview_gives_a_report_or_a_clear_error(tmp_path_factory, rows, fmt):
    path = write(tmp_path_factory.mktemp("preview"), ".jsonl",
                 "\n".join(json.dumps(row) for row in rows).encode())
    try:
        report = preview_report(DataConfig(source=str(path), format=fmt, skip_bad_rows=True))
    except DataError as error:
        assert str(error).strip()
    else:
        assert report.train_rows + report.held_out_rows <= report.source_rows


# --- preference rows ----------------------------------------------------------------------------------------------

preference_rows = st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "completion", "label"]),
                                  json_values | st.lists(st.fixed_dictionaries(
                                      {"role": st.sampled_from(["user", "assistant", "system", "x"]),
                                       "content": json_values}), max_size=3), max_size=5)


@given(rows=st.lists(preference_rows, max_size=6), fmt=st.sampled_from(sorted(ROW_CONVERTERS)))
def test_preference_rows_convert_or_name_the_row(rows, fmt):
    try:
        converted, problems = convert_rows(rows, fmt)
    except PreferenceError as error:
        assert str(error).strip()
        return
    assert len(converted) + len(problems) == len(rows)
    assert all(problem.startswith("row ") for problem in problems)


# --- a RunConfig from YAML and from the Train form ----------------------------------------------------------------

def mutated_config(changes: list[tuple[str, str, Any]]) -> dict[str, Any]:
    raw = to_dict(from_dict({}))
    for section, name, value in changes:
        if isinstance(raw.get(section), dict):
            raw[section][name if name in raw[section] else name + "_unknown"] = value
    return raw


config_fields = st.sampled_from([(s, f) for s, fields in to_dict(from_dict({})).items() if isinstance(fields, dict)
                                 for f in fields])
config_changes = st.lists(st.tuples(config_fields, any_value).map(lambda p: (*p[0], p[1])), min_size=1, max_size=4)


@given(changes=config_changes)
@example(changes=[("model", "double_quant", 2)]).via("issue 32: a yes/no field given a number")
@example(changes=[("training", "max_steps", math.nan)])
def test_a_config_from_yaml_is_built_or_every_bad_field_named(tmp_path_factory, changes):
    path = tmp_path_factory.mktemp("yaml") / "config.yaml"
    path.write_text(yaml.safe_dump(mutated_config(changes), allow_unicode=True), encoding="utf-8")
    try:
        cfg = load_config(path)
    except ConfigError as error:
        assert error.problems and all(isinstance(m, str) and m for m in error.problems.values())
    else:  # a config that was accepted also builds the library objects the trainer makes from it
        assert_builds_library_objects(cfg)


def assert_builds_library_objects(cfg: Any) -> None:
    from finetune.core.hardware import detect
    from finetune.core.models import to_bnb_config

    to_bnb_config(cfg.model, detect())


@given(text=st.text(max_size=300))
def test_any_yaml_text_is_read_or_refused_clearly(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("yaml-text") / "config.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as error:
        assert error.problems


@pytest.fixture(scope="module")
def default_form() -> dict[str, Any]:
    from components.train_form import form_from_config

    return form_from_config(from_dict({}))


@given(changes=st.lists(st.tuples(st.sampled_from(sorted(from_dict({}).__dict__["training"].__dict__)), any_value),
                        min_size=1, max_size=4),
       model=st.lists(st.tuples(st.sampled_from(["bits", "double_quant", "quant_type", "source"]), any_value),
                      max_size=2))
def test_the_train_form_gives_a_config_or_names_the_bad_fields(default_form, changes, model):
    from components.train_form import config_from_form

    form = dict(default_form)
    form.update({f"training_{name}": value for name, value in changes})
    form.update({f"model_{name}": value for name, value in model})
    try:
        cfg = config_from_form(form)
    except ConfigError as error:
        assert error.problems and all(isinstance(m, str) and m for m in error.problems.values())
    else:
        assert_builds_library_objects(cfg)


# --- the path gate and the chat's request limits ------------------------------------------------------------------

path_like = st.one_of(any_value, st.sampled_from(["../../etc/passwd", "/etc/passwd", "~/.ssh/id_rsa", "bundled:../x",
                                                  "bundled:", "owner/name", "a" * 5000, "\x00", "C:\\x", "./",
                                                  "file:///etc/passwd", "owner/../name"]),
                      st.text(alphabet="./~:\\ab_-\x00", max_size=40))


@given(value=path_like, gate=st.sampled_from(["data_source", "model_source", "run_id_or_folder", "uploaded_file",
                                              "bundled_name", "hub_id", "hub_dataset", "local_path"]))
def test_the_path_gate_returns_a_name_or_refuses(value, gate):
    try:
        result = getattr(paths, gate)(value)
    except paths.PathRefused as error:
        assert str(error) == paths.REFUSED
    else:
        assert isinstance(result, str)


@given(prompt=any_value | st.text(min_size=0, max_size=50))
def test_a_chat_prompt_is_taken_or_refused_with_a_reason(prompt):
    try:
        assert isinstance(check_prompt(prompt), str)
    except ValueError as error:
        assert str(error).strip()


@given(max_new_tokens=any_value, temperature=any_value, top_p=any_value, seed=any_value)
def test_sampling_settings_are_taken_or_every_problem_named(max_new_tokens, temperature, top_p, seed):
    try:
        settings_ = SamplingSettings(max_new_tokens, temperature, top_p, seed)
    except ValueError as error:
        assert str(error).startswith("Invalid sampling settings: ")
    else:
        assert isinstance(settings_.max_new_tokens, int) and isinstance(settings_.seed, int)
