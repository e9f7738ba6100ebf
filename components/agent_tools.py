"""The lab as MCP tools: a curated set of the app's API for an agent (list runs, estimate, start, status, stop, chat
pair, evaluate), served by gradio's MCP server when the app runs with ``LORA_LAB_MCP=1`` (streamable HTTP at
``/gradio_api/mcp/``). Not a tab: app.py registers these functions with ``gr.api`` and hides every other endpoint
from the tool list (``curate_mcp_tools``; they stay in the HTTP API the page uses).

Each tool's docstring is its MCP description (gradio reads the summary, and one line per argument under
``Args:``, which is why those lines run long). Each tool applies the same sign-in and ownership rules as the tabs,
through the same checks: a tool call cannot do what its visitor cannot (a signed-out call on a shared Space cannot
start a run; only a run's owner stops it). The MCP server calls a queued tool through the app's own HTTP API with
the MCP request's headers, so an agent signs in by sending the session cookie it got from the sign-in page.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import gradio as gr
import yaml

from components.eval_tab import evaluate_loss
from components.shared import bind, require_visible, stop_run, visitor_of
from finetune.core import paths
from finetune.core.access import AccessDenied
from finetune.core.config import ConfigError, from_dict, load_config, to_dict
from finetune.core.estimate import estimate_run
from finetune.core.hardware import HardwareProfile
from finetune.core.models import ModelSourceError
from finetune.core.run_folder import RUN_CONFIG
from finetune.core.run_status import read_metrics
from finetune.services.admission import RunError, check_sources
from finetune.services.chat import ChatEngine, SamplingSettings, check_prompt
from finetune.services.runs import RunManager

BASE_PRESET = "cpu-quick"  # what a start or an estimate without settings runs, and what given settings override
TOOLS = ("lab_list_runs", "lab_estimate", "lab_start_run", "lab_run_status", "lab_stop_run", "lab_chat_pair",
         "lab_evaluate")


def _json(value: Any) -> str:
    return json.dumps(value, indent=1, ensure_ascii=False, default=str)


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    return {key: _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
            for key, value in {**base, **override}.items()}


def config_from_yaml(config_yaml: str) -> Any:
    """cpu-quick with the YAML's settings on top, through the path gate (a visitor's request names no server path
    the tabs would refuse); ConfigError names every bad field."""
    try:
        override = yaml.safe_load(config_yaml or "") or {}
    except yaml.YAMLError as error:
        raise ConfigError({"config_yaml": f"not valid YAML: {error}"}) from None
    if not isinstance(override, dict):
        raise ConfigError({"config_yaml": "give a mapping of sections, e.g. 'training: {max_steps: 5}'"})
    base = to_dict(load_config(paths.CONFIGS_DIR / f"{BASE_PRESET}.yaml"))
    cfg = from_dict(_merged(base, override))
    paths.check_config(cfg)
    return cfg


def _refused(error: Exception) -> str:
    if isinstance(error, ConfigError):
        return "Refused: " + "; ".join(f"{name}: {message}" for name, message in error.problems.items())
    return f"Refused: {error}"


def _last(rows: list[dict[str, Any]], key: str) -> float | None:
    return next((row[key] for row in reversed(rows) if key in row), None)


def _status(manager: RunManager, run_id: str) -> dict[str, Any]:
    status, rows = manager.status(run_id), read_metrics(manager.run_dir(run_id))
    return {"run_id": run_id, "stage": status.get("stage"), "state": status.get("state"),
            "step": status.get("step"), "max_steps": status.get("max_steps"), "eta_seconds": status.get("eta_seconds"),
            "last_train_loss": _last(rows, "loss"), "last_eval_loss": _last(rows, "eval_loss"),
            "error": status.get("error"), "has_adapter": run_id in manager.finished_adapters()}


def lab_list_runs(manager: RunManager, request: gr.Request = None) -> str:
    """List the fine-tuning runs you may see, newest first, as JSON: run id, stage, state (waiting, queued, running,
    completed, failed, stopped), step and max steps, the last training and held-out loss, and whether it saved an
    adapter (only those can be chatted with or evaluated)."""
    visible = manager.visible_ids(visitor_of(request))
    return _json([_status(manager, run_id) for run_id in reversed(visible)])


def lab_estimate(profile: HardwareProfile, config_yaml: str = "") -> str:
    """Estimate a run before starting it: trainable parameters and memory on this server's hardware, and whether it
    fits. Starts nothing.

    Args:
        config_yaml: the run's settings in YAML with the field names of the app's configs (sections model, lora, data, training), e.g. "training: {max_steps: 5}"; what is left out keeps the cpu-quick preset's value (the embedded SmolLM2-135M in 4 bits, LoRA rank 16, the bundled course Q&A, 30 steps). Empty: cpu-quick as it is.
    """
    try:
        cfg = config_from_yaml(config_yaml)
        parameters, memory = estimate_run(cfg, profile)
    except (ConfigError, ModelSourceError, OSError, ValueError) as error:
        return _refused(error)
    return _json({"trainable_parameters": parameters, "memory_gb": round(memory.total_gb, 2),
                  "device_memory_gb": round(memory.device_gb, 1), "fits": memory.fits, "verdict": memory.verdict})


def lab_start_run(manager: RunManager, config_yaml: str = "", request: gr.Request = None) -> str:
    """Start a fine-tuning run (it waits in the queue while another job trains) and return its run id as JSON; poll
    lab_run_status with it. On a shared app you must be signed in, and your limits apply.

    Args:
        config_yaml: the run's settings in YAML with the field names of the app's configs (sections model, lora, data, training, and stage), e.g. "training: {max_steps: 5}"; what is left out keeps the cpu-quick preset's value (the embedded SmolLM2-135M in 4 bits, LoRA rank 16, the bundled course Q&A, 30 steps). Data: 'bundled:course_qa', a Hub dataset id, or a file the server allows.
    """
    try:
        cfg = config_from_yaml(config_yaml)
        check_sources(cfg)  # an offline Hub name or a bad file is reported now, not by a failed run
        run_id = manager.start(cfg, visitor=visitor_of(request))
    except (ConfigError, RunError, AccessDenied, ModelSourceError) as error:
        return _refused(error)
    return _json({"run_id": run_id, "state": manager.status(run_id).get("state")})


def lab_run_status(manager: RunManager, run_id: str, request: gr.Request = None) -> str:
    """One run's progress as JSON: state (waiting, queued, running, completed, failed, stopped), step of max steps,
    seconds left, the last training and held-out loss, the error of a failed run, and whether it saved an adapter.

    Args:
        run_id: the run's id, as lab_start_run or lab_list_runs gave it.
    """
    try:
        if not run_id:
            raise RunError("Name a run: lab_start_run and lab_list_runs give run ids.")
        require_visible(manager, run_id, visitor_of(request), "look at this run")
        return _json(_status(manager, run_id))
    except (RunError, AccessDenied) as error:  # another visitor's run, or none of that name: the same answer
        return _refused(error)


def lab_stop_run(manager: RunManager, run_id: str, request: gr.Request = None) -> str:
    """Stop a run: it saves a checkpoint at its next step and ends (a waiting one leaves the queue). Only the run's
    owner may stop it.

    Args:
        run_id: the run's id.
    """
    return stop_run(manager, run_id, request).replace("**Error:** ", "Refused: ", 1)


def lab_chat_pair(manager: RunManager, engine: ChatEngine, run_id: str, prompt: str, max_new_tokens: int = 64,
                  request: gr.Request = None) -> str:
    """Ask a finished run's base model and its fine-tuned adapter the same question, greedily (temperature 0), and
    return both answers as JSON: the adapter's whole effect is the difference.

    Args:
        run_id: a finished run that saved an adapter (see lab_list_runs).
        prompt: the user's message.
        max_new_tokens: the longest answer, in tokens (1 to the app's limit).
    """
    try:
        prompt = check_prompt(prompt)
        settings = SamplingSettings(max_new_tokens, 0.0, 1.0, 0)
        require_visible(manager, run_id, visitor_of(request), "chat with this run")
        adapters = manager.finished_adapters()
        if run_id not in adapters:
            raise ValueError(f"Run '{run_id}' has no saved adapter (yet): wait until lab_run_status says completed.")
        cfg = load_config(manager.run_dir(run_id) / RUN_CONFIG)
        base, tuned = engine.answer_pair(prompt, [], [], cfg.model, run_id, adapters[run_id], settings)
    except gr.Error as error:
        return f"Refused: {error.message}"
    except (ValueError, RuntimeError, RunError, AccessDenied) as error:
        return _refused(error)
    return _json({"run_id": run_id, "prompt": prompt, "base": base, "tuned": tuned})


def lab_evaluate(manager: RunManager, engine: ChatEngine, run_id: str, dataset: str = "", split: str = "validation",
                 max_rows: int = 50, request: gr.Request = None) -> str:
    """Validation loss and perplexity of a finished run's base model and of its adapter on held-out rows, with the
    difference and its uncertainty as the Evaluate tab reports them: did fine-tuning help on data it never trained on?

    Args:
        run_id: a finished run that saved an adapter.
        dataset: the rows to evaluate on: 'bundled:course_qa' (the default: its validation split, which no run trains on), a Hub dataset id, or a file the server allows.
        split: the dataset's split to evaluate on.
        max_rows: evaluate on at most this many rows (more rows: a narrower interval, a longer wait).
    """
    try:
        if not run_id:
            raise RunError("Name a finished run: lab_list_runs gives run ids.")
        table, _, summary = evaluate_loss(manager, engine, [run_id], dataset, split, max_rows, 4, request,
                                          progress=lambda *args, **kwargs: None)
    except gr.Error as error:
        return f"Refused: {error.message}"
    except (RunError, AccessDenied) as error:
        return _refused(error)
    return _json({"run_id": run_id, "results": table.to_dict(orient="records"), "summary": summary})


def build_agent_tools(manager: RunManager, engine: ChatEngine, profile: HardwareProfile) -> None:
    """Register the tools (inside the app's Blocks); each keeps its function's name as its api_name."""
    for tool in (bind(lab_list_runs, manager), bind(lab_estimate, profile), bind(lab_start_run, manager),
                 bind(lab_run_status, manager), bind(lab_stop_run, manager),
                 bind(lab_chat_pair, manager, engine), bind(lab_evaluate, manager, engine)):
        # gr.api reads the output's type from the return annotation, which bind's signature leaves out: every tool
        # answers one text (JSON, or a sentence that starts with "Refused:").
        tool.__signature__ = inspect.signature(tool).replace(return_annotation=str)  # type: ignore[attr-defined]
        gr.api(tool, api_name=tool.__name__, concurrency_limit=2, concurrency_id="agent-tools")


def curate_mcp_tools(demo: gr.Blocks) -> None:
    """List only TOOLS as MCP tools: gradio's MCP server skips a function marked as another MCP kind. The page's
    other endpoints stay callable over HTTP as before, with their own checks."""
    for block_fn in demo.fns.values():
        fn = getattr(block_fn, "fn", None)
        if fn is None or block_fn.api_name in TOOLS:
            continue
        target = getattr(fn, "__func__", fn)  # a bound method: its function
        try:
            target._mcp_type = "not-a-tool"
        except (AttributeError, TypeError):
            pass
