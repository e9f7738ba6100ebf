"""The reward model: TRL ``RewardTrainer``, LoRA (``task_type=SEQ_CLS``, so the new score head is trained and
saved too) on a one-output sequence-classification head over the base model, 4-bit when ``model.bits`` is 4.
Saved under ``reward_model/`` (not ``adapter/``: it scores answers, it does not chat). A reward run evaluates the
held-out pairs once before training (step 0), so its accuracy curve starts at chance.

``RewardScorer`` loads a trained reward model to score answers: GRPO's reward, and the app's scoring service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from finetune.core.config import ModelConfig, RunConfig, load_config
from finetune.core.hardware import HardwareProfile, detect
from finetune.core.metrics import MetricsCallback
from finetune.core.models import ModelSourceError, load_model, load_tokenizer
from finetune.core.run_folder import ADAPTER_CONFIG, CONFIG_COPY, REWARD_DIR, has_adapter
from finetune.stages.common import (Built, keep_adapters_in_compute_dtype, load_preference_data, preference_data_fields,
                                    record_run_info, save_default_adapter, to_lora_config, training_args)

Messages = list[dict[str, str]]


def to_reward_config(cfg: RunConfig, profile: HardwareProfile, run_dir: Path, has_eval: bool) -> Any:
    from trl import RewardConfig

    return RewardConfig(**training_args(cfg, profile, run_dir, has_eval))


def load_reward_base(model_cfg: ModelConfig, tokenizer: Any, profile: HardwareProfile) -> Any:
    """The base model with a one-output classification head (new, randomly initialised) at the configured bits."""
    from transformers import AutoModelForSequenceClassification

    # load_model's placement: under `accelerate launch` each process's own GPU (this copy used to send every
    # rank to GPU 0)
    model = load_model(model_cfg, profile, AutoModelForSequenceClassification, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-padding token
    return model


def build(cfg: RunConfig, run_dir: Path) -> Built:
    from trl import RewardTrainer

    profile = detect()
    tokenizer = load_tokenizer(cfg.model)
    data = load_preference_data(cfg, "paired")
    model = load_reward_base(cfg.model, tokenizer, profile)
    has_eval = data.eval is not None
    callback = MetricsCallback(run_dir, stage="reward", final_eval=has_eval)
    trainer = RewardTrainer(model=model, args=to_reward_config(cfg, profile, run_dir, has_eval),
                            train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer,
                            peft_config=to_lora_config(cfg, task_type="SEQ_CLS"), callbacks=[callback])
    keep_adapters_in_compute_dtype(trainer.model, profile)
    record_run_info(trainer, run_dir, profile, stage=type(trainer).__name__, **preference_data_fields(data))
    # Step 0 of the held-out accuracy: the random score head's chance level. (DPO/KTO need no such point: the
    # policy starts equal to its reference, so their margins start at exactly 0.)
    return Built(trainer, callback, has_eval=has_eval, evaluate_first=has_eval)


def save(cfg: RunConfig, trainer: Any, run_dir: Path) -> Path:
    return save_default_adapter(cfg, trainer, run_dir / REWARD_DIR)


# --- using a trained reward model ------------------------------------------------------------------------------

class RewardScorer:
    """A trained reward model in memory: scores (prompt, answer) pairs with one scalar each."""

    def __init__(self, reward_dir: str | Path, profile: HardwareProfile | None = None):
        from peft import PeftModel

        self.folder = Path(reward_dir)
        if not has_adapter(self.folder):
            raise ModelSourceError(f"{self.folder} is not a trained reward model (no {ADAPTER_CONFIG}).")
        self.cfg = load_config(self.folder / CONFIG_COPY)
        self.profile = profile or detect()
        self.tokenizer = load_tokenizer(self.cfg.model)
        base = load_reward_base(self.cfg.model, self.tokenizer, self.profile)
        self.model = PeftModel.from_pretrained(base, str(self.folder)).eval()

    def _ids(self, prompt: str | Messages, answer: str | Messages) -> list[int]:
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        answer = [{"role": "assistant", "content": answer}] if isinstance(answer, str) else answer
        # The same tokenization as TRL's RewardTrainer: the chat template over the whole conversation.
        ids = self.tokenizer.apply_chat_template(prompt + answer, tokenize=True, return_dict=True)["input_ids"]
        return list(ids)[-self.cfg.data.max_seq_length:]

    @torch.no_grad()
    def score(self, prompts: list[str | Messages], answers: list[str | Messages], batch_size: int = 8
              ) -> list[float]:
        if len(prompts) != len(answers):
            raise ValueError("score() needs one answer per prompt")
        scores: list[float] = []
        for start in range(0, len(prompts), batch_size):
            rows = [self._ids(p, a) for p, a in zip(prompts[start:start + batch_size],
                                                    answers[start:start + batch_size])]
            batch = self.tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
            device = next(self.model.parameters()).device
            logits = self.model(input_ids=batch["input_ids"].to(device),
                                attention_mask=batch["attention_mask"].to(device)).logits
            scores.extend(logits[:, 0].float().tolist())
        return scores

    def rank(self, prompt: str, answer_a: str, answer_b: str) -> tuple[float, float]:
        """Scores of two answers to one prompt; the higher one is what the reward model prefers."""
        a, b = self.score([prompt, prompt], [answer_a, answer_b])
        return a, b
