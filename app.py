"""LoRA Lab: the Gradio app. It only assembles the tabs from components/ and launches.

    python app.py                                   # http://127.0.0.1:7860
    LORA_LAB_SIGN_IN=dev python app.py              # two visitors on one laptop: /dev-sign-in?user=NAME
    LORA_LAB_HOST=0.0.0.0 LORA_LAB_PORT=7860 LORA_LAB_AUTH=user:pass GRADIO_SHARE=1 python app.py
    LORA_LAB_MCP=1 python app.py                    # also an MCP server: http://127.0.0.1:7860/gradio_api/mcp/
"""

from __future__ import annotations

import atexit
import gc
import os
from pathlib import Path

from finetune.core.noise import quiet_known_noise

quiet_known_noise()  # before the libraries load: their known, harmless messages stay out of the app log

from finetune.core.access import JobLimits, can_act, sign_in_mode  # noqa: E402  (no torch, no gradio)


def check_settings() -> str | None:
    """The operator's settings that would stop the app at its first request, as one sentence (None: all fine)."""
    try:
        sign_in_mode()  # the dev sign-in on a Space, an unknown mode
        JobLimits.from_env()
    except ValueError as error:
        return str(error)
    return None


def refuse_broken_settings() -> None:
    if problem := check_settings():
        raise SystemExit(f"LoRA Lab did not start: {problem}")


if __name__ == "__main__":
    refuse_broken_settings()  # at once: the libraries below take ~10 s to load

from finetune.services import deploy  # noqa: E402

# Before gradio/huggingface_hub are imported (they read HF_HOME once): model caches on a Space's /data.
os.environ.update({k: v for k, v in deploy.cache_env().items() if k not in os.environ})

import gradio as gr  # noqa: E402

from components.agent_tools import build_agent_tools, curate_mcp_tools
from components.benchmark_section import build_benchmark_section
from components.chat_tab import adapter_choices, build_chat_tab
from components.compare_tab import build_compare_tab
from components.course_tab import build_course_tab
from components.eval_tab import build_eval_tab, run_choices
from components.export_tab import build_export_tab, export_choices
from components.feedback_tab import build_feedback_tab
from components.inspect_section import build_inspect_section
from components.page_loads import answer_page_loads, on_page_load
from components.quant_tab import build_quant_tab
from components.rlhf_tab import build_rlhf_tab
from components.shared import (bind, calm_queue, check_number_inputs, tick_only_on_the_open_tab, visitor_of,
                               who_markdown)
from components.sign_in import app_kwargs, build_sign_in_row
from components.sweep_section import build_sweep_section
from components.train_tab import build_train_tab
from finetune.core.hardware import HardwareProfile, detect
from finetune.core.run_folder import FEEDBACK_DB, FEEDBACK_EXPORTS_DIR
from finetune.services.benchmarks import BenchmarkService, app_root
from finetune.services.chat import ChatEngine
from finetune.services.compare import CompareQueue
from finetune.services.feedback import FeedbackStore
from finetune.services.langsmith_sync import LangSmithSettings
from finetune.services.runs import RunManager
from finetune.services.scoring import ScorerCache
from finetune.services.sweeps import SweepQueue


def opening_preset(manager: RunManager, profile: HardwareProfile, request: gr.Request = None) -> object:
    """On a page load, the preset for this hardware (t4-qlora on a T4), unless the visitor's own running job fills
    the form (another visitor's run does not)."""
    preset, active = deploy.default_preset(profile), manager.active_run()
    mine = active is not None and can_act(visitor_of(request), manager.owner_of(active))
    return gr.skip() if mine or preset == "cpu-quick" else preset


def build_app(runs_root: str = "runs", profile: HardwareProfile | None = None,
              feedback_db: str | None = None) -> gr.Blocks:
    profile, manager = profile or detect(), RunManager(runs_root)
    # Feedback lives beside the runs unless told otherwise; LangSmith sync only when LANGSMITH_API_KEY is set.
    store = FeedbackStore(feedback_db or Path(runs_root) / FEEDBACK_DB, langsmith=LangSmithSettings.from_env())
    engine = ChatEngine(profile)
    scorers = ScorerCache(profile)  # the reward model in memory, for the RLHF and Evaluate tabs alike
    # Evaluate runs them (in the one device queue, with the runs), the course quotes them
    benchmarks = BenchmarkService(runs_root, app_root(runs_root), manager)
    with gr.Blocks(title="LoRA Lab") as demo:
        gr.Markdown(f"# LoRA Lab\nFine-tune a language model with LoRA / QLoRA and compare it with its base.  \n"
                    f"**Hardware:** {profile.summary()}")
        if sign_in_mode() != "off":  # a shared app: who you are decides which runs and feedback are yours
            on_page_load(who_markdown, None, build_sign_in_row())
        with gr.Tab("Start here", id="course") as course_tab:
            course = build_course_tab(manager, profile, engine, store, benchmarks)
        course_tab.select(course["refresh_forgetting"], None, course["forgetting"], api_visibility="private")
        with gr.Tab("Train", id="train") as train_tab:
            train = build_train_tab(manager, profile)
        with gr.Tab("Chat", id="chat") as chat_tab:
            chat = build_chat_tab(manager, engine, store)
        # Runs finish while the user is on the Train tab: refresh the adapter list on arrival.
        chat_tab.select(bind(adapter_choices, manager), chat["run"], chat["run"],
                        api_visibility="private")
        with gr.Tab("RLHF", id="rlhf") as rlhf_tab:
            build_rlhf_tab(manager, store.path, chat, engine, scorers)
        with gr.Tab("Feedback", id="feedback") as feedback_tab:
            feedback = build_feedback_tab(store, Path(runs_root) / FEEDBACK_EXPORTS_DIR)
        feedback_tab.select(feedback["summary_fn"], None, [feedback["sync"], feedback["counts"], feedback["recent"],
                                                      feedback["wins"]], api_visibility="private")
        with gr.Tab("Export", id="export") as export_tab:
            export = build_export_tab(manager)
        export_tab.select(bind(export_choices, manager), export["run"], export["run"],
                          api_visibility="private")
        with gr.Tab("Evaluate", id="evaluate") as eval_tab:
            evaluation = build_eval_tab(manager, engine, store.path, scorers)
            build_inspect_section(manager)
            build_benchmark_section(manager, benchmarks)
        eval_tab.select(bind(run_choices, manager), evaluation["runs"],
                        [evaluation["runs"], evaluation["ckpt_run"]], api_visibility="private")
        with gr.Tab("Compare", id="compare") as compare_tab:
            build_compare_tab(CompareQueue(manager))
            build_sweep_section(SweepQueue(manager), train)  # "use the best" fills the Train form
        with gr.Tab("Quantization", id="quantization") as quant_tab:
            build_quant_tab(profile)
        tick_only_on_the_open_tab([course_tab, train_tab, chat_tab, rlhf_tab, feedback_tab, export_tab, eval_tab,
                                   compare_tab, quant_tab])
        on_page_load(bind(opening_preset, manager, profile), None, train["preset"])
        build_agent_tools(manager, engine, profile)  # the curated MCP tools (components/agent_tools.py)
        answer_page_loads(demo)  # every tab's page-load handler, as one event
    curate_mcp_tools(demo)
    check_number_inputs(demo)  # NaN, ±inf, text or a list in any number field: refused by its name
    demo.feedback_store = store  # for whoever closes the app: close_app() stops its LangSmith sender too
    return demo


def close_app(demo: gr.Blocks) -> None:
    """Stop serving, then stop the feedback store's sender thread and close its database connections."""
    demo.close()
    store = getattr(demo, "feedback_store", None)
    if store is not None:
        store.close()


def _auth() -> tuple[str, str] | None:
    user, sep, password = os.environ.get("LORA_LAB_AUTH", "").partition(":")
    return (user, password) if sep and user else None


def launch_options() -> dict[str, object]:
    """demo.launch() settings from the environment. Uploads are capped by the server itself (LORA_LAB_MAX_UPLOAD,
    gradio's size syntax such as '200mb'); a bigger upload is refused before it reaches any handler."""
    return {"server_name": deploy.server_host(), "server_port": int(os.environ.get("LORA_LAB_PORT", "7860")),
            "share": os.environ.get("GRADIO_SHARE", "").lower() in ("1", "true", "yes"), "auth": _auth(),
            "max_file_size": os.environ.get("LORA_LAB_MAX_UPLOAD", "200mb"), "app_kwargs": app_kwargs(),
            "mcp_server": mcp_enabled()}


def mcp_enabled() -> bool:
    """LORA_LAB_MCP=1 (or gradio's own GRADIO_MCP_SERVER=true) also serves the curated tools over MCP."""
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes")
               for name in ("LORA_LAB_MCP", "GRADIO_MCP_SERVER"))


def main() -> None:
    refuse_broken_settings()
    # LORA_LAB_RUNS, else /data/runs on a Space with persistent storage, else ./runs (feedback DB goes beside).
    demo = build_app(deploy.runs_root(), feedback_db=os.environ.get("LORA_LAB_FEEDBACK_DB") or None)
    # One training start at a time is enforced per event (concurrency_limit=1); the rest may run side by side.
    calm_queue(demo.queue(default_concurrency_limit=4))
    # What the app imported and built lives as long as it does: out of the cyclic collector's view, a full collection
    # (the quantization comparison asks for one after each format) walks only what requests made, not ~1M objects.
    gc.collect()
    gc.freeze()
    atexit.register(demo.feedback_store.close)  # stop the sender, close connections (the outbox persists)
    demo.launch(**launch_options())


if __name__ == "__main__":
    main()
