"""The Learn tab: the five competencies of the course, each in a few exact sentences and linked to the tab that
lets a learner see it with numbers from their own runs."""

from __future__ import annotations

from typing import Any

import gradio as gr

from components.shared import bind, on_page_load, visitor_of
from finetune.benchmarks import Z_95, BenchmarkService

# (competency, what to know, where the app shows it: tab label, what to do there)
COMPETENCIES: list[tuple[str, str, str, str]] = [
    ("PEFT (parameter-efficient fine-tuning)",
     "Freeze all of the pretrained model's weights and train a small number of new ones. Only those new weights "
     "get gradients and optimizer states, so memory and storage shrink by orders of magnitude; the saved result "
     "is a few MB that attaches to the unchanged base.",
     "Train", "the estimate above the form counts trainable vs frozen parameters before you start."),
    ("LoRA (low-rank adaptation)",
     "Each targeted weight matrix W (d_out x d_in) stays frozen; the layer computes W·x + (alpha/r)·B·A·x with "
     "A (r x d_in) and B (d_out x r) trainable. B starts at zero, so training starts exactly at the base model. "
     "Trainable parameters per layer: r·(d_in + d_out) instead of d_in·d_out.",
     "Train", "change the rank and watch the live trainable-parameter count in the LoRA box; compare runs "
     "in the run history and in Evaluate."),
    ("Quantization",
     "Store each weight in fewer bits: fp32 4 bytes, fp16/bf16 2, LLM.int8 1 byte plus a per-row scale, "
     "NF4/FP4 half a byte plus one scale per 64 weights (double quantization shrinks those scales too). "
     "Weights are dequantized block by block for each matrix multiply, so memory falls while the math stays 16/32-bit.",
     "Quantization", "load one model in every format and compare measured memory, perplexity and speed."),
    ("QLoRA",
     "LoRA on a frozen 4-bit NF4 base (double-quantized), with the adapters and their gradients in 16/32-bit, "
     "and a paged optimizer that moves optimizer states to CPU RAM when GPU memory spikes. It fine-tunes a model "
     "in about a quarter of the 16-bit LoRA memory at nearly the same quality.",
     "Train", "the cpu-quick preset is QLoRA (4-bit NF4, double quant); then Evaluate shows the adapter's "
     "validation loss against its 4-bit base."),
    ("RLHF (reinforcement learning from human feedback)",
     "1) Collect human preferences: two answers to one prompt, a person picks the better. 2) Train a reward model "
     "to score answers so that preferred ones score higher. 3) Optimize the policy (the LoRA model) to earn more "
     "reward while a KL penalty keeps it close to the reference model, with PPO-style RL, or skip the explicit "
     "reward model with DPO/KTO, which optimize the same objective directly from the preference pairs.",
     "RLHF", "the four steps in order, from your Chat votes to a reward model and a DPO/KTO adapter; "
     "Evaluate then shows each adapter's win rate with a 95% interval and its answers' reward scores."),
]


def learn_markdown() -> str:
    parts = ["Five ideas, each shown by this app with numbers from your own runs."]
    for number, (name, text, tab, where) in enumerate(COMPETENCIES, start=1):
        parts.append(f"### {number}. {name}\n{text}\n\n**See it:** the **{tab}** tab: {where}")
    return "\n\n".join(parts)


def tab_link_js(tab: str) -> str:
    """Client-side jump to a tab by its label (no server round trip, no dependency on how app.py nests tabs)."""
    return ("() => { const tab = [...document.querySelectorAll('button[role=tab]')]"
            f".find(b => b.innerText.trim() === {tab!r}); if (tab) {{ tab.click(); window.scrollTo(0, 0); }} }}")


def forgetting_markdown(service: BenchmarkService | None, request: gr.Request = None) -> str:
    """PEFT's promise that the base keeps what it knew, in the learner's own numbers: the newest benchmark job's
    (of those the visitor may see) base-vs-adapter differences, or where to run the check."""
    job = service.latest_job(visitor_of(request)) if service is not None else None
    rows = service.table(job) if job else []
    if not rows:
        return ("**Does PEFT keep what the base knew? Your numbers:** no forgetting check yet. Run one in the "
                "**Evaluate** tab (Benchmarks -> Forgetting check): the base and your adapter answer the same "
                "general questions, unrelated to your training data.")
    lines = ["**Does PEFT keep what the base knew? Your numbers** (newest forgetting check, general questions "
             "unrelated to your data):"]
    for row in rows:
        margin = (f" (95% interval ± {Z_95 * row.difference_stderr:.3f})" if row.difference_stderr is not None
                  else "")
        lines.append(f"- `{row.adapter}`, {row.task} ({row.metric}, {row.items} questions): base {row.base:.3f}, "
                     f"adapter {row.tuned:.3f}, difference {row.difference:+.3f}{margin}: **{row.verdict}**")
    return "\n".join(lines)


def build_learn_tab(benchmarks: BenchmarkService | None = None) -> dict[str, Any]:
    """The competencies as text, with one button per competency that jumps to the tab demonstrating it, and the
    learner's own forgetting check beside PEFT's promise."""
    ui: dict[str, Any] = {"text": gr.Markdown(learn_markdown(), elem_id="learn-text")}
    ui["forgetting"] = gr.Markdown(forgetting_markdown(None), elem_id="learn-forgetting")
    with gr.Row():
        for name, _, tab, _ in COMPETENCIES:
            short = name.split(" (")[0]
            ui[short] = gr.Button(f"{short} → {tab} tab", size="sm", elem_id=f"learn-{short.lower()}")
            ui[short].click(None, js=tab_link_js(tab))
    ui["refresh_forgetting"] = bind(forgetting_markdown, benchmarks)
    on_page_load(ui["refresh_forgetting"], None, ui["forgetting"])
    return ui
