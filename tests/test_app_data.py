"""Issue 18 through the app's API (gradio_client against the real app): a user's own data file as the Train tab
reads it (the preview's encoding, column reading and counts; Start refusing a partly broken file unless
"Skip malformed rows" is ticked, and the skip recorded beside the run), and Hub datasets listed and previewed in
the Train and RLHF tabs (offline: one clear message; a local folder laid out as a Hub repository where the
operator allows local paths, since this machine has no Hub).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gradio_client import handle_file

from helpers import app_client, served_app, spreadsheet_export, wait_until, write_jsonl


HUB_README = """---
configs:
- config_name: pairs
  data_files:
  - split: train
    path: pairs/train.jsonl
- config_name: qa
  data_files:
  - split: train
    path: qa/train.jsonl
  - split: validation
    path: qa/validation.jsonl
---
# A dataset laid out as on the Hub
"""


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def client(runs_root):

    with served_app(runs_root) as url:
        yield app_client(url)


@pytest.fixture
def export_csv(tmp_path) -> Path:
    return spreadsheet_export(tmp_path / "export.csv")


def _form(model_dir: Path, data: Path, **extra) -> dict:
    return {"data_kind": "Uploaded file", "data_file": handle_file(str(data)), "model_kind": "Local folder",
            "model_source": str(model_dir), "run_name": "skip", "training_max_steps": 2, "training_batch_size": 4,
            "training_eval_steps": 0, "training_save_steps": 100, "data_max_seq_length": 128, **extra}


def test_preview_names_the_encoding_the_reading_and_the_skipped_line(client, tiny_model_dir, export_csv):
    text, table = client.predict(**_form(tiny_model_dir, export_csv), api_name="/preview_data")
    assert "encoding cp1252" in text and "CSV separated by semicolons" in text
    assert "`Question` → `question`, `Answer` → `answer`" in text
    # 25 data lines, one malformed: 24 rows, of which 10% are held out; none longer than 128 tokens.
    # Not "will train" while Start would refuse: the count is what ticking the box would train.
    assert ("**Rows:** 25 in the source → **21 would train with Skip malformed rows ticked**, 3 held out for "
            "validation") in text
    assert "1 skipped: 1 malformed." in text
    assert "line 5 has 1 field(s); the header has 2" in text
    assert "Start will refuse this file" in text  # the box is not ticked yet
    first = [row for row in table["data"] if row[0] == 1]
    assert [row[1:] for row in first] == [["user", "What does setting 0 do?"],
                                          ["assistant", "It sets 0, très simplement."]]

    ticked, _ = client.predict(**_form(tiny_model_dir, export_csv, data_skip_bad_rows=True),
                               api_name="/preview_data")
    assert "1 skipped: 1 malformed." in ticked and "Start will refuse" not in ticked
    assert "**21 will train**" in ticked


def test_preview_without_a_tokenizer_still_counts_the_rest(client, export_csv):
    """A Hub model offline: the rows are previewed, only the too-long count is left out (and said so)."""
    text, _ = client.predict(data_kind="Uploaded file", data_file=handle_file(str(export_csv)),
                             model_kind="Hub id", model_source="nobody/no-such-model", api_name="/preview_data")
    assert "**21 would train with Skip malformed rows ticked**" in text
    assert "too-long rows not counted: the tokenizer is not available" in text


def test_start_refuses_a_broken_line_then_trains_on_the_good_rows(client, runs_root, tiny_model_dir, export_csv):
    from finetune.core.run_folder import read_run_info

    _, refused = client.predict(**_form(tiny_model_dir, export_csv), api_name="/start_run")
    assert "line 5 has 1 field(s)" in refused and "skip malformed rows" in refused, refused
    assert client.predict([], api_name="/run_history")[0]["data"] == []  # nothing started

    run_id, message = client.predict(**_form(tiny_model_dir, export_csv, data_skip_bad_rows=True),
                                     api_name="/start_run")
    assert "Started" in message, message
    def ended() -> str | None:
        status = client.predict(run_id, api_name="/poll_run")[1]
        return status if "completed" in status or "failed" in status else None

    status = wait_until(ended, "the run ends", timeout=600)
    assert "completed" in status, status
    history, *_ = client.predict([], api_name="/run_history")
    row = dict(zip(history["headers"], history["data"][0]))
    assert row["run id"] == run_id and row["rows skipped"] == 1
    info = read_run_info(runs_root / run_id)
    assert (info["malformed_rows"], info["skipped_rows"], info["dropped_too_long"]) == (1, 0, 0)
    assert info["train_rows"] + info["eval_rows"] == 24  # the 24 good rows, the broken one left out


def test_hub_listing_offline_says_so_and_keeps_the_form(client):
    config, split, message = client.predict("nobody/no-such-data", "", api_name="/hub_listing")
    assert message.startswith("**Cannot list:** Cannot reach the Hugging Face Hub")
    assert config == split == {"__type__": "update"}  # gr.skip(): the pickers keep what they hold
    text, _ = client.predict(data_kind="Hub dataset", data_file=None, data_hub_name="nobody/no-such-data",
                             api_name="/preview_data")
    assert "Cannot reach the Hugging Face Hub" in text


@pytest.fixture
def hub_folder(tmp_path, monkeypatch) -> Path:
    """A dataset repository laid out as on the Hub, under a root the operator allows."""
    from finetune.core import paths

    folder = tmp_path / "someone--prefs"
    for sub in ("pairs", "qa"):
        (folder / sub).mkdir(parents=True)
    (folder / "README.md").write_text(HUB_README)
    write_jsonl(folder / "qa" / "train.jsonl", [{"Question": f"Q{i}?", "Answer": f"A{i}."} for i in range(6)])
    write_jsonl(folder / "qa" / "validation.jsonl", [{"Question": "Held?", "Answer": "Out."}])
    write_jsonl(folder / "pairs" / "train.jsonl",
                [{"Prompt": "Hi?", "Preferred": "Hello!", "Dispreferred": "Hello!"}] +
                [{"Prompt": f"P{i}?", "Preferred": f"Good {i}.", "Dispreferred": f"Bad {i}."} for i in range(4)])
    monkeypatch.setenv(paths.LOCAL_ROOTS_ENV, str(tmp_path))
    return folder


def test_train_tab_lists_and_previews_a_hub_style_folder(client, hub_folder):
    config, split, message = client.predict(str(hub_folder), "qa", api_name="/hub_listing")
    assert config["value"] == "qa" and sorted(c[0] for c in config["choices"]) == ["pairs", "qa"]
    assert split["value"] == "train" and [c[0] for c in split["choices"]] == ["train", "validation"]
    assert "splits of `qa`: train, validation" in message
    text, table = client.predict(data_kind="Hub dataset", data_file=None, data_hub_name=str(hub_folder),
                                 data_hub_config="qa", data_split="validation", api_name="/preview_data")
    assert "`question_answer`" in text and "`Question` → `question`" in text
    assert "row counts (train, held out, skipped) are known once a run loads the whole split" in text
    assert [row[1:] for row in table["data"]] == [["user", "Held?"], ["assistant", "Out."]]


def test_rlhf_tab_previews_a_hub_style_folders_pairs(client, hub_folder):
    config, split, _ = client.predict(str(hub_folder), "", api_name="/rlhf_hub_listing")
    assert config["value"] == "pairs"  # the first config when none was chosen
    text, table = client.predict(data_kind="Hub dataset", data_file=None, reward_run=None,
                                 data_hub_name=str(hub_folder), data_hub_config="pairs", data_split="train",
                                 api_name="/rlhf_preview_data")
    assert "**format:** `paired`" in text and "the first 5 rows, streamed" in text
    assert "`Preferred` → `chosen`" in text and "`Dispreferred` → `rejected`" in text
    assert "**Unusable (1 of 5):** row 1:" in text  # chosen and rejected are the same answer
    assert [row[0] for row in table["data"]] == [f"P{i}?" for i in range(4)]
    assert table["headers"] == ["prompt", "chosen", "rejected"]


def test_rlhf_form_carries_skip_and_hub_config():
    from components.rlhf_form import stage_config_from_form

    cfg = stage_config_from_form("dpo", "someone/prefs", {"data_skip_bad_rows": True, "data_hub_config": "pairs"})
    assert cfg.data.skip_bad_rows is True and cfg.data.hub_config == "pairs"
    assert stage_config_from_form("dpo", "someone/prefs", {}).data.skip_bad_rows is False


def test_preference_runs_record_their_skipped_rows():
    from datasets import Dataset

    from finetune.core.preference import PreferenceData
    from finetune.stages.common import preference_data_fields

    data = PreferenceData(Dataset.from_list([{"prompt": "p"}]), None, "paired", "paired", skipped_rows=2,
                          malformed_rows=3)
    fields = preference_data_fields(data)
    assert (fields["skipped_rows"], fields["malformed_rows"]) == (2, 3)


def test_history_sums_the_skipped_rows(tmp_path):
    """What the history's "rows skipped" column reads (the SFT stage writes it: the Start test above)."""
    from components.train_runs import rows_skipped
    from finetune.core.run_folder import RUN_INFO_FILE

    assert rows_skipped(tmp_path) is None  # a run that recorded nothing shows no number, not 0
    (tmp_path / RUN_INFO_FILE).write_text(json.dumps({"malformed_rows": 2, "skipped_rows": 1,
                                                      "dropped_too_long": 3}))
    assert rows_skipped(tmp_path) == 6
