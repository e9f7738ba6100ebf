"""LoRA Lab: the Gradio app. It only assembles the tabs from components/ and launches.

    python app.py                                   # http://127.0.0.1:7860
    LORA_LAB_HOST=0.0.0.0 LORA_LAB_PORT=7860 LORA_LAB_AUTH=user:pass GRADIO_SHARE=1 python app.py
"""

from __future__ import annotations

import functools
import os

import gradio as gr

from components.chat_tab import adapter_choices, build_chat_tab
from components.train_tab import build_train_tab
from finetune.chat import ChatEngine
from finetune.hardware import detect
from finetune.runs import RunManager


def build_app(runs_root: str = "runs") -> gr.Blocks:
    profile, manager = detect(), RunManager(runs_root)
    engine = ChatEngine(profile)
    with gr.Blocks(title="LoRA Lab") as demo:
        gr.Markdown(f"# LoRA Lab\nFine-tune a language model with LoRA / QLoRA and compare it with its base.  \n"
                    f"**Hardware:** {profile.summary()}")
        with gr.Tab("Train", id="train"):
            build_train_tab(manager, profile)
        with gr.Tab("Chat", id="chat") as chat_tab:
            chat = build_chat_tab(manager, engine)
        # Runs finish while the user is on the Train tab: refresh the adapter list on arrival.
        chat_tab.select(functools.partial(adapter_choices, manager), chat["run"], chat["run"],
                        api_visibility="private")
    return demo


def _auth() -> tuple[str, str] | None:
    user, sep, password = os.environ.get("LORA_LAB_AUTH", "").partition(":")
    return (user, password) if sep and user else None


def main() -> None:
    demo = build_app(os.environ.get("LORA_LAB_RUNS", "runs"))
    # One training start at a time is enforced per event (concurrency_limit=1); the rest may run side by side.
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=os.environ.get("LORA_LAB_HOST", "127.0.0.1"),
                server_port=int(os.environ.get("LORA_LAB_PORT", "7860")),
                share=os.environ.get("GRADIO_SHARE", "").lower() in ("1", "true", "yes"), auth=_auth())


if __name__ == "__main__":
    main()
