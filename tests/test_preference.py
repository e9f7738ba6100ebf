"""Preference data: the accepted formats, conversions between pairs and thumbs, the bundled set, and the error
messages for malformed pairs. No model needed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import ROOT, write_jsonl
from finetune.core.config import ConfigError, DataConfig, from_dict, load_config
from finetune.core.data import DataError
from finetune.core.preference import (BUNDLED_PREFERENCES, PreferenceError, convert_rows, detect_preference_format,
                                      held_out_prompts, load_preferences, pairs_to_thumbs, preview_preferences,
                                      thumbs_to_pairs)

USER = {"role": "user", "content": "What is LoRA?"}
GOOD = {"role": "assistant", "content": "🧪 Lab note: a low-rank update.\nRule of thumb: start with r=8."}
BAD = {"role": "assistant", "content": "It depends."}


def _data(path, **extra) -> DataConfig:
    return DataConfig(source=str(path), validation_fraction=extra.pop("validation_fraction", 0.0), **extra)


# --- formats ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("columns, expected", [
    (["prompt", "chosen", "rejected"], "paired"),
    (["chosen", "rejected"], "implicit"),
    (["prompt", "completion", "label"], "unpaired"),
    (["prompt", "chosen", "rejected", "score_chosen", "id"], "paired"),
])
def test_detects_the_preference_formats(columns, expected):
    assert detect_preference_format(columns) == expected


def test_sft_columns_are_not_preferences():
    with pytest.raises(PreferenceError, match="Not preference data: found columns completion, prompt"):
        detect_preference_format(["prompt", "completion"])


def test_text_pairs_become_conversations(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is LoRA?", "chosen": GOOD["content"],
                                               "rejected": BAD["content"]}] * 3)
    data = load_preferences(_data(path))
    assert data.source_format == "paired" and len(data.train) == 3
    assert data.train[0] == {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}


def test_feedback_store_exports_are_accepted(tmp_path):
    """The shapes feedback_export.write_pairs / write_thumbs write (message lists on every side)."""
    history = {"role": "assistant", "content": "Earlier answer."}
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": [USER, history, USER], "chosen": [GOOD], "rejected": [BAD]}])
    data = load_preferences(_data(pairs))
    assert data.train[0]["prompt"] == [USER, history, USER] and data.train[0]["chosen"] == [GOOD]
    thumbs = write_jsonl(tmp_path / "thumbs.jsonl", [
        {"prompt": [USER], "completion": [GOOD], "label": True},
        {"prompt": [USER], "completion": [BAD], "label": False}])
    unpaired = load_preferences(_data(thumbs), want="unpaired")
    assert unpaired.source_format == "unpaired" and [r["label"] for r in unpaired.train] == [True, False]


def test_implicit_prompt_conversations_split_at_the_shared_turns(tmp_path):
    system = {"role": "system", "content": "Be brief."}
    path = write_jsonl(tmp_path / "implicit.jsonl", [
        {"chosen": [system, USER, GOOD], "rejected": [system, USER, BAD]}])
    row = load_preferences(_data(path)).train[0]
    assert row == {"prompt": [system, USER], "chosen": [GOOD], "rejected": [BAD]}


def test_implicit_prompt_texts_split_after_the_last_shared_assistant_marker():
    rows, problems = convert_rows([{"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello there, friend.",
                                    "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."}], "implicit")
    assert not problems
    assert rows[0]["prompt"][0]["content"].endswith("Assistant:")
    assert rows[0]["chosen"][0]["content"] == "Hello there, friend."
    assert rows[0]["rejected"][0]["content"] == "Go away."


def test_pairs_repeating_the_prompt_inside_chosen_keep_only_the_answer():
    rows, problems = convert_rows([{"prompt": [USER], "chosen": [USER, GOOD], "rejected": [USER, BAD]}], "paired")
    assert not problems and rows[0]["chosen"] == [GOOD] and rows[0]["rejected"] == [BAD]


@pytest.mark.parametrize("value, expected", [(True, True), (0, False), ("good", True), ("👎", False),
                                             ("FALSE", False), ("up", True)])
def test_thumb_labels_in_common_spellings(value, expected):
    rows, problems = convert_rows([{"prompt": "q", "completion": "a", "label": value}], "unpaired")
    assert not problems and rows[0]["label"] is expected


# --- conversions -----------------------------------------------------------------------------------------------

def test_pairs_become_two_thumbs_each():
    thumbs = pairs_to_thumbs([{"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}])
    assert thumbs == [{"prompt": [USER], "completion": [GOOD], "label": True},
                      {"prompt": [USER], "completion": [BAD], "label": False}]


def test_thumbs_on_the_same_prompt_become_pairs():
    other = [{"role": "user", "content": "Another question"}]
    thumbs = [{"prompt": [USER], "completion": [BAD], "label": False},
              {"prompt": other, "completion": [GOOD], "label": True},  # no bad answer for this prompt: no pair
              {"prompt": [USER], "completion": [GOOD], "label": True}]
    assert thumbs_to_pairs(thumbs) == [{"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}]


def test_thumbs_without_a_good_and_bad_answer_for_one_prompt_suggest_kto(tmp_path):
    path = write_jsonl(tmp_path / "thumbs.jsonl", [{"prompt": f"q{i}", "completion": "a", "label": True}
                                                    for i in range(4)])
    with pytest.raises(PreferenceError, match="KTO"):
        load_preferences(_data(path), want="paired")
    assert len(load_preferences(_data(path), want="unpaired").train) == 4


# --- malformed pairs: clear messages that name the rows --------------------------------------------------------

@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "good answer"}, "row 2: 'rejected' is missing or empty"),
    ({"prompt": "q", "chosen": "", "rejected": "bad"}, "row 2: 'chosen' is missing or empty"),
    ({"prompt": "q", "chosen": "same answer", "rejected": "same answer "}, "row 2: chosen and rejected are identical"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "row 2: 'prompt' is missing or empty"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
     "row 2: 'chosen' must end with an assistant answer"),
    ({"prompt": "q", "chosen": 42, "rejected": "b"}, "'chosen' must be text or a list of chat messages"),
])
def test_malformed_pairs_are_named_by_row(tmp_path, row, message):
    good = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(PreferenceError) as caught:
        load_preferences(_data(path))
    assert message in str(caught.value) and "1 of 3 rows" in str(caught.value)


def test_identical_implicit_conversations_are_rejected():
    _, problems = convert_rows([{"chosen": [USER, GOOD], "rejected": [USER, GOOD]}], "implicit")
    assert problems == ["row 1: chosen and rejected are identical, so the pair prefers nothing"]


def test_bad_thumb_label_is_named():
    _, problems = convert_rows([{"prompt": "q", "completion": "a", "label": "maybe"}], "unpaired")
    assert problems and "'label' must be true/false" in problems[0]


def test_many_problems_are_summarised(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "x", "rejected": "x"}] * 9)
    with pytest.raises(PreferenceError, match=r"9 of 9 rows.*row 5: .*; and 4 more"):
        load_preferences(_data(path))


def test_empty_file_and_wrong_columns(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_preferences(_data(empty))
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(PreferenceError, match="Not preference data"):
        load_preferences(_data(sft))
    with pytest.raises(PreferenceError, match="needs the column"):
        load_preferences(_data(sft), fmt="paired")


# --- the bundled set -----------------------------------------------------------------------------------------

def test_bundled_pairs_are_valid_and_prefer_the_course_style():
    data = load_preferences(DataConfig(source=BUNDLED_PREFERENCES))
    assert len(data.train) == 150 and data.eval is not None and len(data.eval) == 24
    for row in list(data.train) + list(data.eval):
        assert row["chosen"][0]["content"].startswith("🧪 Lab note:")
        assert "Rule of thumb:" not in row["rejected"][0]["content"]
    train_prompts = {r["prompt"][0]["content"] for r in data.train}
    assert not train_prompts & {r["prompt"][0]["content"] for r in data.eval}  # held out means held out


def test_bundled_set_is_reproduced_by_its_script(tmp_path):
    folder = ROOT / "data" / "course_prefs"
    before = {name: (folder / name).read_bytes() for name in ("train.jsonl", "validation.jsonl")}
    subprocess.run([sys.executable, str(folder / "make_pairs.py")], check=True, capture_output=True)
    assert {name: (folder / name).read_bytes() for name in before} == before


def test_preview_and_held_out_prompts():
    fmt, count, rows = preview_preferences(DataConfig(source=BUNDLED_PREFERENCES), rows=3)
    assert fmt == "paired" and count == 150 and len(rows) == 3 and set(rows[0]) == {"prompt", "chosen", "rejected"}
    prompts = held_out_prompts(DataConfig(source=BUNDLED_PREFERENCES), limit=4)
    assert len(prompts) == 4 and all(p.strip() for p in prompts)


# --- config -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, stage", [("reward-cpu", "reward"), ("dpo-cpu", "dpo"), ("kto-cpu", "kto")])
def test_rlhf_presets_load(name, stage):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.stage == stage and cfg.data.source == BUNDLED_PREFERENCES


def test_stage_and_preference_settings_are_validated():
    assert from_dict({}).stage == "sft"  # older configs stay SFT runs
    with pytest.raises(ConfigError) as caught:
        from_dict({"stage": "ppo"})
    assert "stage" in caught.value.problems
    with pytest.raises(ConfigError) as caught:
        from_dict({"preference": {"beta": 0, "loss_type": "nope", "format": "xml"}})
    assert {"preference.beta", "preference.loss_type", "preference.format"} <= set(caught.value.problems)
    with pytest.raises(ConfigError, match="KTO needs a batch size of at least 2"):
        from_dict({"stage": "kto", "training": {"batch_size": 1}})


# --- held out by prompt, and what the amount of data means ----------------------------------------------------

def _votes(count: int, repeats: int = 1) -> list[dict]:
    """Pairs on ``count`` prompts, each prompt voted ``repeats`` times (the second time typed differently)."""
    rows = []
    for i in range(count):
        for r in range(repeats):
            question = f"What does knob {i} do?" if r == 0 else f"  what does KNOB {i} do? "
            rows.append({"prompt": [{"role": "user", "content": question}],
                         "chosen": [{"role": "assistant", "content": f"🧪 Lab note: knob {i}, take {r}."}],
                         "rejected": [{"role": "assistant", "content": "No idea."}]})
    return rows


def test_split_puts_every_prompt_on_one_side_only():
    from finetune.core.preference import prompt_key, split_by_prompt

    rows = _votes(12, repeats=3)
    train, held = split_by_prompt(rows, 0.25, seed=7)
    train_keys, held_keys = {prompt_key(r["prompt"]) for r in train}, {prompt_key(r["prompt"]) for r in held}
    assert train_keys.isdisjoint(held_keys) and len(held_keys) == 3 and len(train_keys) == 9
    assert len(held) == 9 and len(train) + len(held) == len(rows)  # all three votes of a prompt go together
    assert split_by_prompt(rows, 0.25, seed=7) == (train, held)  # deterministic with the seed
    assert any(split_by_prompt(rows, 0.25, seed=s)[1] != held for s in range(8, 12))  # and the seed matters


def test_a_row_split_would_leak_but_load_preferences_does_not(tmp_path):
    """The same question voted twice (once with other capitals) lands on one side, through the real loader."""
    from finetune.core.preference import prompt_key

    path = write_jsonl(tmp_path / "votes.jsonl", _votes(10, repeats=2))
    data = load_preferences(_data(path, validation_fraction=0.2), seed=3)
    train = {prompt_key(r["prompt"]) for r in data.train}
    held = {prompt_key(r["prompt"]) for r in data.eval}
    assert train.isdisjoint(held) and len(held) == 2 and len(data.eval) == 4
    assert set(held_out_prompts(_data(path, validation_fraction=0.2), seed=3)) <= {
        r["prompt"][-1]["content"] for r in data.eval}


def test_too_few_prompts_hold_nothing_out_and_say_no_verdict(tmp_path):
    path = write_jsonl(tmp_path / "votes.jsonl", _votes(3, repeats=2))
    data = load_preferences(_data(path, validation_fraction=0.5))
    assert data.eval is None and len(data.train) == 6
    assert any("no held-out data, so no verdict" in note for note in data.notes)
    # Never the training prompts in place of held-out ones:
    assert held_out_prompts(_data(path, validation_fraction=0.5)) == []


def test_a_validation_split_repeating_training_prompts_loses_those_rows():
    """A source's own validation split is trusted only where its prompts are not also trained on."""
    from finetune.core.preference import _drop_trained_prompts

    notes: list[str] = []
    kept = _drop_trained_prompts(_votes(8)[4:], _votes(6), notes)  # knobs 4 and 5 are also trained on
    assert [r["prompt"][0]["content"] for r in kept] == ["What does knob 6 do?", "What does knob 7 do?"]
    assert "2 validation row(s) dropped" in notes[0]


def test_size_report_warns_of_memorisation_for_a_learner_sized_set(tmp_path):
    from finetune.core.preference import (MAX_EPOCHS_SMALL_DATA, data_size, default_steps, epochs, size_statement,
                                          size_warnings)

    path = write_jsonl(tmp_path / "votes.jsonl", _votes(10))
    size = data_size(load_preferences(_data(path, validation_fraction=0.1)))
    assert (size.rows, size.prompts, size.held_rows, size.held_prompts) == (8, 8, 2, 2)
    steps = default_steps(30, size.rows, 4)
    assert steps == 6 and epochs(size.rows, steps, 4) <= MAX_EPOCHS_SMALL_DATA  # 30 steps would be 15 epochs
    for rows in range(1, 60):  # rounded down: the default never passes over the data more than the cap allows
        assert default_steps(30, rows, 4) == 1 or epochs(rows, default_steps(30, rows, 4), 4) <= MAX_EPOCHS_SMALL_DATA
    assert "**8 pairs** on **8 prompts**" in size_statement(size, steps, 4) and "3.0 epochs" in size_statement(
        size, steps, 4)
    warnings = " ".join(size_warnings(size, 30, 4))
    assert "expect memorisation" in warnings and "15.0 passes" in warnings and "too few for a dependable verdict" in warnings
    assert "15.0 passes" not in " ".join(size_warnings(size, steps, 4))


def test_the_bundled_set_needs_no_warning():
    from finetune.core.preference import data_size, default_steps, size_warnings

    size = data_size(load_preferences(DataConfig(source=BUNDLED_PREFERENCES)))
    assert default_steps(30, size.rows, 4) == 30
    assert size_warnings(size, 30, 4) == []
    assert size_warnings(size, 300, 4) != []  # 8 passes over 150 pairs is too many


def test_pairs_and_thumbs_of_one_file_hold_out_the_same_prompts(tmp_path):
    """The reward model (pairs) and KTO (thumbs) on the same collected thumbs must not split it differently, or
    one trains on what the other holds out."""
    from finetune.core.preference import prompt_key

    thumbs = []
    for i in range(12):
        question = [{"role": "user", "content": f"Question {i}?"}]
        thumbs += [{"prompt": question, "completion": [{"role": "assistant", "content": f"🧪 Lab note: {i}."}],
                    "label": True},
                   {"prompt": question, "completion": [{"role": "assistant", "content": "No idea."}], "label": False}]
    path = write_jsonl(tmp_path / "thumbs.jsonl", thumbs)
    as_pairs = load_preferences(_data(path, validation_fraction=0.25), want="paired", seed=5)
    as_thumbs = load_preferences(_data(path, validation_fraction=0.25), want="unpaired", seed=5)
    held = [{prompt_key(r["prompt"]) for r in data.eval} for data in (as_pairs, as_thumbs)]
    assert held[0] == held[1] and len(held[0]) == 3
    assert not held[1] & {prompt_key(r["prompt"]) for r in as_pairs.train}
