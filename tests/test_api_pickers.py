"""Every endpoint that takes a run accepts any run the caller may see, even from a client that never loaded the
page (issue 29 item 2). A run picker starts empty (its choices are the visitor's own runs, filled on page load),
and gradio refuses a value that is not among a dropdown's choices unless it allows custom values: an API client
naming a run it may see was refused with "Value: known is not in the list of choices: []". The handlers check the
visitor's right to the run themselves."""

from __future__ import annotations

from pathlib import Path


def public_dropdown_inputs(config: dict) -> list[tuple[str, dict]]:
    components = {c["id"]: c for c in config["components"]}
    return [(dep["api_name"], components[i]) for dep in config["dependencies"]
            if dep.get("api_name") and dep.get("api_visibility") != "private" for i in dep["inputs"]
            if components[i]["type"] == "dropdown"]


def test_every_picker_filled_per_visitor_accepts_a_named_value(tmp_path: Path):
    from app import build_app, close_app

    demo = build_app(str(tmp_path / "runs"))
    try:
        pickers = [(api, c["props"]) for api, c in public_dropdown_inputs(demo.config)
                   if not c["props"].get("choices")]
    finally:
        close_app(demo)
    assert pickers, "the app has run pickers that start empty"  # the check below has something to check
    refused = sorted({f"/{api}: {props.get('label')}" for api, props in pickers
                      if not props.get("allow_custom_value")})
    assert refused == []
