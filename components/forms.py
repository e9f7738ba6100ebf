"""What the forms that start a job share: the kinds of model source and of data source they offer, one list each,
so every tab names and orders them alike, and the one way from a form to a RunConfig. Not a tab: train_form.py and
rlhf_form.py (what is each form's own: its sources, its preset) and the tabs import these."""

from __future__ import annotations

from typing import Any, Iterable

from finetune.core.config import ConfigError, RunConfig, from_dict, to_dict

MODEL_KINDS = ("Embedded", "Hub id", "Local folder")
SFT_DATA_KINDS = ("Bundled", "Hub dataset", "Uploaded file")
PREFERENCE_DATA_KINDS = ("Bundled pairs", "Collected feedback", "Uploaded file", "Hub dataset")
SECTIONS = ("model", "lora", "data", "training", "preference")


def form_sections(form: dict[str, Any], fields: dict[str, str] | None = None,
                  skip: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """The form's values as config sections. A key "<section>_<field>" (``lora_rank``) is that field; ``fields``
    names the field of a key spelled otherwise (``"beta": "preference.beta"``); keys in ``skip`` (what the form
    assembles itself: sources, the column mapping) and keys of no section are left out."""
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in form.items():
        target = (fields or {}).get(key)
        section, _, name = target.partition(".") if target else key.partition("_")
        if key not in skip and section in sections and name:
            sections[section][name] = value
    return sections


def run_config_from_form(sections: dict[str, dict[str, Any]], base: RunConfig | None = None,
                         problems: dict[str, str] | None = None, **top: Any) -> RunConfig:
    """The RunConfig a form describes, for every tab that starts a job: its sections over ``base`` (a stage's preset;
    the config's defaults when None) with ``top`` (run_name, stage). ConfigError lists every bad field at once:
    ``problems`` the form found itself (a source the path gate refused) with those the config refuses."""
    raw: dict[str, Any] = to_dict(base) if base is not None else {}
    for name, values in sections.items():
        if values:
            raw[name] = {**raw.get(name, {}), **values}
    try:
        cfg = from_dict({**raw, **top})
    except ConfigError as error:
        raise ConfigError({**(problems or {}), **error.problems}) from None
    if problems:
        raise ConfigError(problems)
    return cfg
