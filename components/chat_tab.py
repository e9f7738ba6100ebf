"""The Chat tab: one prompt, two chatbots side by side — the base model and a fine-tuned run — streaming together.

The ChatEngine keeps one base model in memory and attaches each run's adapter by name, so switching runs
is quick; the base answer is the same model with its adapters disabled.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import gradio as gr

from finetune.chat import ChatEngine, SamplingSettings, check_prompt, normalize_history
from finetune.config import ConfigError, load_config
from finetune.data import validation_prompts
from finetune.runs import RunError, RunManager

Chat = list[dict[str, str]]


def adapter_choices(manager: RunManager, current: str | None = None) -> Any:
    """Dropdown of finished runs with an adapter, newest first; keeps the current pick when it still exists."""
    ids = list(manager.finished_adapters())
    value = current if current in ids else (ids[0] if ids else None)
    return gr.Dropdown(choices=ids, value=value)


def select_adapter(manager: RunManager, run_id: str | None) -> tuple[Any, Any, Any]:
    """New label for the fine-tuned side, example prompts from the run's validation data, and empty chats."""
    if not run_id:
        return gr.Chatbot(label="Fine-tuned (pick a run)", value=[]), gr.Dataset(samples=[]), gr.Chatbot(value=[])
    try:
        cfg = load_config(manager.run_dir(run_id) / "config.yaml")
        examples = validation_prompts(cfg.data, limit=6)
    except (ConfigError, RunError):
        examples = []
    return (gr.Chatbot(label=f"Fine-tuned ({run_id})", value=[]),
            gr.Dataset(samples=[[p] for p in examples]), gr.Chatbot(label="Base model", value=[]))


def chat(manager: RunManager, engine: ChatEngine, prompt: str, run_id: str | None, base_chat: Chat | None,
         tuned_chat: Chat | None, max_new_tokens: float, temperature: float, top_p: float, seed: float
         ) -> Iterator[tuple[Chat, Chat, str]]:
    """Stream both answers: yields (base chat, fine-tuned chat, cleared prompt box) as the answers grow."""
    try:
        prompt = check_prompt(prompt)
        settings = SamplingSettings(max_new_tokens, temperature, top_p, seed)
        if not run_id:
            raise ValueError("Pick a finished run's adapter first (train one in the Train tab).")
        adapters = manager.finished_adapters()
        if run_id not in adapters:
            raise ValueError(f"Run '{run_id}' has no saved adapter.")
        cfg = load_config(manager.run_dir(run_id) / "config.yaml")
    except (ValueError, RunError) as error:  # ConfigError is a ValueError
        raise gr.Error(str(error)) from None
    base_history, tuned_history = normalize_history(base_chat), normalize_history(tuned_chat)
    user = {"role": "user", "content": prompt}
    try:
        for base_text, tuned_text in engine.stream_pair(prompt, base_history, tuned_history, cfg.model, run_id,
                                                        adapters[run_id], settings):
            yield (base_history + [user, {"role": "assistant", "content": base_text}],
                   tuned_history + [user, {"role": "assistant", "content": tuned_text}], "")
    except (ValueError, RuntimeError) as error:  # too long a prompt, a base model that cannot be loaded
        raise gr.Error(str(error)) from None


def clear_chats() -> tuple[Chat, Chat]:
    return [], []


def build_chat_tab(manager: RunManager, engine: ChatEngine) -> dict[str, Any]:
    with gr.Row():
        # allow_custom_value: API clients name a run that this session's dropdown has not listed yet.
        run = gr.Dropdown([], label="Fine-tuned run (adapter)", elem_id="adapter-pick", scale=3,
                          allow_custom_value=True,
                          info="Finished runs that saved an adapter. The base model stays loaded when you switch.")
        refresh = gr.Button("Refresh runs", size="sm", scale=1)
    with gr.Row():
        base_chat = gr.Chatbot(label="Base model", height=420, elem_id="base-chat")
        tuned_chat = gr.Chatbot(label="Fine-tuned (pick a run)", height=420, elem_id="tuned-chat")
    with gr.Row():
        prompt = gr.Textbox(placeholder="Ask both models the same question…", show_label=False, scale=5,
                            elem_id="chat-prompt")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        clear = gr.Button("Clear", scale=1)
    examples = gr.Dataset(components=[prompt], samples=[], label="Example prompts from the run's validation data")
    with gr.Accordion("Sampling (shared by both sides)", open=False):
        with gr.Row():
            max_new = gr.Slider(1, 512, value=128, step=1, label="Max new tokens", elem_id="max-new-tokens")
            temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature", info="0 = greedy")
            top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="Top-p")
            seed = gr.Number(value=0, precision=0, label="Seed", minimum=0)
    refresh_fn = functools.partial(adapter_choices, manager)
    refresh.click(refresh_fn, run, run, api_name="list_adapters")
    run.change(functools.partial(select_adapter, manager), run, [tuned_chat, examples, base_chat],
               api_name="select_adapter")
    examples.click(lambda sample: sample[0], examples, prompt, api_visibility="private")
    handler = functools.partial(chat, manager, engine)
    inputs = [prompt, run, base_chat, tuned_chat, max_new, temperature, top_p, seed]
    outputs = [base_chat, tuned_chat, prompt]
    send.click(handler, inputs, outputs, api_name="chat", concurrency_limit=1, concurrency_id="chat")
    prompt.submit(handler, inputs, outputs, api_visibility="private", concurrency_limit=1, concurrency_id="chat")
    clear.click(clear_chats, None, [base_chat, tuned_chat], api_name="clear_chat")
    page = gr.context.Context.root_block
    if page is not None:  # a page load picks the newest finished run
        page.load(refresh_fn, run, run, api_visibility="private")
    return {"run": run, "refresh": refresh, "base_chat": base_chat, "tuned_chat": tuned_chat, "prompt": prompt,
            "send": send, "clear": clear, "examples": examples, "max_new_tokens": max_new,
            "temperature": temperature, "top_p": top_p, "seed": seed}
