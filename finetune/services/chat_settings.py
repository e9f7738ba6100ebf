"""What a chat request may ask, checked before any model works on it: the operator's server-side limits (stricter on
a public Space), the sampling settings, a prompt and a history as the model reads them, and the note that marks an
answer the time limit cut (the UI's, never the model's words).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from transformers import GenerationConfig

Messages = list[dict[str, str]]


def _operator_setting(name: str, local: str, space: str) -> float:
    """An operator's environment setting, with a stricter default on a public Space (``SPACE_ID`` set), where
    strangers share one CPU."""
    return float(os.environ.get(name, space if os.environ.get("SPACE_ID") else local))


# Server-side limits (a public Space gets API calls that skip the UI's sliders); the operator may change them.
MAX_PROMPT_CHARS = int(_operator_setting("LORA_LAB_MAX_PROMPT_CHARS", "20000", "8000"))
MAX_NEW_TOKENS = int(_operator_setting("LORA_LAB_MAX_NEW_TOKENS", "1024", "512"))
# Seconds of generation one request may use (0 = no limit): the longest a waiting visitor can be held up by one
# answer (plus the prompt's first forward pass, which cannot be interrupted).
MAX_SECONDS = _operator_setting("LORA_LAB_MAX_SECONDS", "600", "60")
# The Chat tab's default answer length: on a CPU a long default ran into the time limit on a busy machine.
DEFAULT_NEW_TOKENS = {"cpu": 64, "gpu": 128}


def budget_note(seconds: float) -> str:
    """Appended to an answer that the time budget cut short, so nobody mistakes it for the model's whole answer."""
    return f"\n\n[cut: this answer reached the server's time limit of {seconds:g} s per request]"


# The note as shown, whatever the limit was (an earlier server may have had another): what split_budget_note finds.
BUDGET_NOTE = re.compile(r"\n\n\[cut: this answer reached the server's time limit of [^\]\n]* s per request\]\Z")


def split_budget_note(text: str) -> tuple[str, str | None]:
    """(what the model wrote, the time-limit notice shown after it or None). The notice is the UI's, not the
    model's: stored answers, histories fed back to the model and exported pairs must not carry it."""
    found = BUDGET_NOTE.search(text or "")
    if found is None:
        return text, None
    return text[:found.start()], found.group(0).strip()


@dataclass
class SamplingSettings:
    """Shared by both sides. temperature 0 means greedy decoding (then top_p and seed do not matter)."""

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        # Text, None or bools from an API call become NaN, which fails every range check below with a message.
        new_tokens, temperature, top_p, seed = (
            float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")
            for v in (self.max_new_tokens, self.temperature, self.top_p, self.seed))
        if not new_tokens.is_integer() or not 1 <= new_tokens <= MAX_NEW_TOKENS:
            problems.append(f"max new tokens must be a whole number from 1 to {MAX_NEW_TOKENS}, "
                            f"got {self.max_new_tokens!r}")
        if not 0 <= temperature <= 5:
            problems.append(f"temperature must be between 0 (greedy) and 5, got {self.temperature!r}")
        if not 0 < top_p <= 1:
            problems.append(f"top-p must be above 0 and at most 1, got {self.top_p!r}")
        if not seed.is_integer() or seed < 0:
            problems.append(f"seed must be a whole number >= 0, got {self.seed!r}")
        if problems:
            raise ValueError("Invalid sampling settings: " + "; ".join(problems) + ".")
        self.max_new_tokens, self.seed = int(self.max_new_tokens), int(self.seed)

    def generation_config(self, tokenizer: Any, eos: list[int]) -> GenerationConfig:
        sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p} \
            if self.temperature > 0 else {"do_sample": False}
        return GenerationConfig(max_new_tokens=self.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=eos, use_cache=True, **sampling)


def normalize_history(history: Any) -> Messages:
    """Chat history as plain {'role', 'content': str} dicts; gradio 6 hands content as a list of parts."""
    messages = []
    for message in history or []:
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content
                              if isinstance(part, dict) and part.get("type", "text") == "text")
        if message.get("role") == "assistant" and isinstance(content, str):
            content = split_budget_note(content)[0]  # the model never said the UI's time-limit notice
        if message.get("role") in ("system", "user", "assistant") and isinstance(content, str):
            messages.append({"role": message["role"], "content": content})
    return messages


def check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("Type a prompt first: the message is empty.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"The prompt is {len(prompt):,} characters long; keep it under {MAX_PROMPT_CHARS:,}.")
    return prompt.strip()
