"""The RLHF stages after supervised fine-tuning: a reward model, then preference optimization (DPO, KTO or GRPO).

    python -m finetune.train configs/reward-cpu.yaml --output-dir runs/reward   # stage: reward
    python -m finetune.train configs/dpo-cpu.yaml --output-dir runs/dpo         # stage: dpo
    python -m finetune.train configs/kto-cpu.yaml --output-dir runs/kto         # stage: kto (thumbs)
    python -m finetune.train configs/grpo-cpu.yaml --output-dir runs/grpo       # stage: grpo (online)

``finetune.train`` dispatches here by ``cfg.stage``; everything else is shared with SFT: the run folder, the
metrics callback (metrics.jsonl, status.json, STOP), the run manager's child process and the history.

- reward: TRL ``RewardTrainer``, LoRA (``task_type=SEQ_CLS``, so the new score head is trained and saved too) on
  a one-output sequence-classification head over the base model, 4-bit when ``model.bits`` is 4. Saved under
  ``reward_model/`` (not ``adapter/``: it scores answers, it does not chat).
- dpo / kto: TRL ``DPOTrainer`` / ``KTOTrainer``, a fresh LoRA on the base or, with ``preference.start_adapter``,
  the SFT adapter trained further (the starting adapter is then the frozen reference). Saved under ``adapter/``
  like an SFT run, so the Chat tab lists it.
- grpo: TRL ``GRPOTrainer``, online: for each prompt of the preference data it samples
  ``preference.num_generations`` answers, scores them with the trained reward model (``preference.reward_model``)
  and pushes the policy towards the answers scored above their group's mean. Same LoRA and ``adapter/`` as DPO.

A reward run evaluates the held-out pairs once before training (step 0), so its accuracy curve starts at chance.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import torch

from finetune.config import KTO_LOSSES, ModelConfig, RunConfig, load_config, save_config
from finetune.hardware import HardwareProfile, detect
from finetune.lm_head import use_cpu_lm_head
from finetune.metrics import STOP_FILE, MetricsCallback
from finetune.models import ModelSourceError, count_parameters, load_model, load_tokenizer
from finetune.paths import RUN_ID
from finetune.preference import (PreferenceData, data_size, load_preferences, rows_per_step, size_statement,
                                 size_warnings)
from finetune.recipe import resolve_recipe
from finetune.runs import REWARD_DIR
from finetune.train import (ADAPTER_DIR, CONFIG_COPY, _write_run_info, keep_adapters_in_compute_dtype,
                            last_checkpoint, to_lora_config, training_args)

Messages = list[dict[str, str]]


# --- config -> library objects (pure) --------------------------------------------------------------------------

def to_reward_config(cfg: RunConfig, profile: HardwareProfile, run_dir: Path, has_eval: bool) -> Any:
    from trl import RewardConfig

    return RewardConfig(**training_args(cfg, profile, run_dir, has_eval))


def to_dpo_config(cfg: RunConfig, profile: HardwareProfile, run_dir: Path, has_eval: bool) -> Any:
    from trl import DPOConfig

    loss = cfg.preference.loss_type if cfg.preference.loss_type not in KTO_LOSSES else "sigmoid"
    return DPOConfig(**training_args(cfg, profile, run_dir, has_eval), beta=cfg.preference.beta, loss_type=[loss])


def to_kto_config(cfg: RunConfig, profile: HardwareProfile, run_dir: Path, has_eval: bool) -> Any:
    from trl import KTOConfig

    loss = cfg.preference.loss_type if cfg.preference.loss_type in KTO_LOSSES else "kto"
    return KTOConfig(**training_args(cfg, profile, run_dir, has_eval), beta=cfg.preference.beta, loss_type=loss)


def to_grpo_config(cfg: RunConfig, profile: HardwareProfile, run_dir: Path) -> Any:
    from trl import GRPOConfig

    args = training_args(cfg, profile, run_dir, has_eval=False)  # held-out rows would need sampling too
    args.pop("max_length")  # GRPO bounds the sampled answer instead (max_completion_length)
    p = cfg.preference
    return GRPOConfig(**args, beta=p.beta, num_generations=p.num_generations,
                      max_completion_length=p.max_completion_length)


# --- locating earlier runs -------------------------------------------------------------------------------------

def resolve_run_folder(value: str, runs_root: Path, sub: str) -> Path:
    """A run id (looked up under runs_root) or a folder -> the folder holding the adapter (``sub`` of a run)."""
    # A run id is looked up among the runs only: 'data' must not reach ./data of whatever folder the app runs in.
    # A folder has passed the path gate (finetune.paths) in the tab, or is the operator's own in the CLI.
    folder = Path(value).expanduser()
    candidates = (runs_root / value / sub,) if RUN_ID.match(value) and ".." not in value else (folder / sub, folder)
    for candidate in candidates:
        if (candidate / "adapter_config.json").is_file():
            return candidate
    what = "reward model" if sub == REWARD_DIR else "adapter"
    raise ModelSourceError(f"No {what} found for '{value}': give the id of a finished run or a folder with "
                           "adapter_config.json.")


# --- models --------------------------------------------------------------------------------------------------

def load_reward_base(model_cfg: ModelConfig, tokenizer: Any, profile: HardwareProfile) -> Any:
    """The base model with a one-output classification head (new, randomly initialised) at the configured bits."""
    from transformers import AutoModelForSequenceClassification

    # load_model's placement: under `accelerate launch` each process's own GPU (this copy used to send every
    # rank to GPU 0)
    model = load_model(model_cfg, profile, AutoModelForSequenceClassification, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-padding token
    return model


def _adapters_to_compute_dtype(model: torch.nn.Module, profile: HardwareProfile) -> None:
    """TRL casts QLoRA adapters to bf16; on the CPU (and for fp16 AMP) every LoRA weight, frozen reference
    copies included, stays fp32 or each forward pays bf16's slow CPU path."""
    keep_adapters_in_compute_dtype(model, profile)
    if profile.is_cuda and profile.compute_dtype == "bfloat16":
        return
    for name, parameter in model.named_parameters():
        if "lora_" in name and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


# --- trainers ------------------------------------------------------------------------------------------------

def _load_data(cfg: RunConfig, want: str) -> PreferenceData:
    """The split data; its size and what training on it will do go to the log (the CLI's user sees no tab)."""
    data = load_preferences(cfg.data, cfg.preference.format, want=want, seed=cfg.training.seed)
    size, per_step = data_size(data), rows_per_step(cfg)
    print(size_statement(size, cfg.training.max_steps, per_step).replace("**", ""), flush=True)
    for warning in size_warnings(size, cfg.training.max_steps, per_step):
        print(f"Warning: {warning}", flush=True)
        data.notes.append(warning)
    return data


def _record(trainer: Any, run_dir: Path, profile: HardwareProfile, data: PreferenceData, **extra: Any) -> None:
    if not trainer.is_world_process_zero():
        return
    trainable, total = count_parameters(trainer.model)
    _write_run_info(run_dir, stage=trainer.__class__.__name__, hardware=profile.summary(),
                    compute_dtype=profile.compute_dtype, world_size=trainer.args.world_size,
                    data_format=data.source_format, train_rows=len(data.train),
                    eval_rows=len(data.eval) if data.eval is not None else 0, data_notes=data.notes,
                    trainable_parameters=trainable, total_parameters=total, **extra)


def build_reward_trainer(cfg: RunConfig, run_dir: Path) -> tuple[Any, MetricsCallback, PreferenceData]:
    from trl import RewardTrainer

    profile = detect()
    tokenizer = load_tokenizer(cfg.model)
    data = _load_data(cfg, "paired")
    model = load_reward_base(cfg.model, tokenizer, profile)
    callback = MetricsCallback(run_dir, stage="reward", final_eval=data.eval is not None)  # see main()
    trainer = RewardTrainer(model=model, args=to_reward_config(cfg, profile, run_dir, data.eval is not None),
                            train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer,
                            peft_config=to_lora_config(cfg, task_type="SEQ_CLS"), callbacks=[callback])
    _adapters_to_compute_dtype(trainer.model, profile)
    _record(trainer, run_dir, profile, data)
    return trainer, callback, data


def _policy_model(cfg: RunConfig, run_dir: Path, profile: HardwareProfile) -> tuple[Any, Any, str]:
    """(model, peft_config or None, what it starts from): a fresh LoRA, or the SFT adapter to keep training."""
    use_cpu_lm_head(resolve_recipe(cfg, profile).cpu_lm_head)  # DPO, KTO and GRPO score tokens like SFT does
    model = load_model(cfg.model, profile)
    if not cfg.preference.start_adapter:
        return model, to_lora_config(cfg), "base model"
    from peft import PeftModel

    folder = resolve_run_folder(cfg.preference.start_adapter, run_dir.parent, ADAPTER_DIR)
    return PeftModel.from_pretrained(model, str(folder), is_trainable=True), None, str(folder)


def build_preference_trainer(cfg: RunConfig, run_dir: Path) -> tuple[Any, MetricsCallback, PreferenceData]:
    """DPOTrainer (pairs) or KTOTrainer (thumbs), on a fresh LoRA or on the SFT adapter to start from."""
    from trl import DPOTrainer, KTOTrainer

    profile = detect()
    tokenizer = load_tokenizer(cfg.model)
    is_kto = cfg.stage == "kto"
    data = _load_data(cfg, "unpaired" if is_kto else "paired")
    model, peft_config, start = _policy_model(cfg, run_dir, profile)
    make_args = to_kto_config if is_kto else to_dpo_config
    callback = MetricsCallback(run_dir, stage=cfg.stage, final_eval=data.eval is not None)  # see main()
    trainer = (KTOTrainer if is_kto else DPOTrainer)(
        model=model, args=make_args(cfg, profile, run_dir, data.eval is not None), train_dataset=data.train,
        eval_dataset=data.eval, processing_class=tokenizer, peft_config=peft_config, callbacks=[callback])
    _adapters_to_compute_dtype(trainer.model, profile)
    _record(trainer, run_dir, profile, data, started_from=start)
    return trainer, callback, data


class RewardModelReward:
    """GRPO's reward function: the trained reward model's score of each sampled answer to its prompt."""

    __name__ = "reward_model"  # TRL logs each reward function under its name (rewards/reward_model/mean)

    def __init__(self, scorer: "RewardScorer"):
        self.scorer = scorer

    def __call__(self, prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        return self.scorer.score(list(prompts), list(completions))


def _prompts(data: PreferenceData) -> Any:
    """The prompts of the preference pairs, each once: GRPO writes its own answers."""
    from datasets import Dataset

    seen: set[str] = set()
    rows = []
    for prompt in data.train["prompt"]:
        key = repr(prompt)
        if key not in seen:
            seen.add(key)
            rows.append({"prompt": prompt})
    return Dataset.from_list(rows)


def build_grpo_trainer(cfg: RunConfig, run_dir: Path) -> tuple[Any, MetricsCallback, PreferenceData]:
    """GRPOTrainer on the preference data's prompts, rewarded by a trained reward model."""
    from trl import GRPOTrainer

    profile = detect()
    tokenizer = load_tokenizer(cfg.model)
    data = _load_data(cfg, "paired")
    reward_dir = resolve_run_folder(cfg.preference.reward_model, run_dir.parent, REWARD_DIR)
    reward = RewardModelReward(RewardScorer(reward_dir, profile))
    model, peft_config, start = _policy_model(cfg, run_dir, profile)
    callback = MetricsCallback(run_dir, stage="grpo")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=to_grpo_config(cfg, profile, run_dir),
                          train_dataset=_prompts(data), processing_class=tokenizer, peft_config=peft_config,
                          callbacks=[callback])
    _adapters_to_compute_dtype(trainer.model, profile)
    _record(trainer, run_dir, profile, data, started_from=start, reward_model=str(reward_dir))
    return trainer, callback, PreferenceData(data.train, None, data.format, data.source_format, data.notes)


def main(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> Path:
    """Train the configured RLHF stage; returns the saved reward model or adapter folder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")  # transformers 5 reads it from env
    build = {"reward": build_reward_trainer, "grpo": build_grpo_trainer}.get(cfg.stage, build_preference_trainer)
    trainer, callback, data = build(cfg, run_dir)
    checkpoint = last_checkpoint(run_dir) if resume else None
    if cfg.stage == "reward" and data.eval is not None and checkpoint is None:
        # Step 0 of the held-out accuracy: the random score head's chance level. (DPO/KTO need no such point:
        # the policy starts equal to its reference, so their margins start at exactly 0.)
        trainer.evaluate()
    trainer.train(resume_from_checkpoint=checkpoint)
    stopped = (run_dir / STOP_FILE).exists()
    if data.eval is not None and not stopped and callback.last_eval_step != trainer.state.global_step:
        trainer.evaluate()
    return _save(cfg, trainer, run_dir)


def _save(cfg: RunConfig, trainer: Any, run_dir: Path) -> Path:
    target = run_dir / (REWARD_DIR if cfg.stage == "reward" else ADAPTER_DIR)
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        # DPO on a started adapter also holds TRL's frozen "ref" copy; the run's result is "default" alone.
        model.save_pretrained(str(target), selected_adapters=["default"])
        trainer.processing_class.save_pretrained(target)
        save_config(cfg, target / CONFIG_COPY)
    return target


# --- using a trained reward model ------------------------------------------------------------------------------

class RewardScorer:
    """A trained reward model in memory: scores (prompt, answer) pairs with one scalar each."""

    def __init__(self, reward_dir: str | Path, profile: HardwareProfile | None = None):
        from peft import PeftModel

        self.folder = Path(reward_dir)
        if not (self.folder / "adapter_config.json").is_file():
            raise ModelSourceError(f"{self.folder} is not a trained reward model (no adapter_config.json).")
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


class ScorerCache:
    """One reward model in memory at a time, shared by the app's tabs (the CPU has no room for several next to
    the chat model, and loading one per click cost seconds)."""

    def __init__(self, profile: HardwareProfile | None = None) -> None:
        self._lock = threading.Lock()
        self._profile = profile
        self._folder: Path | None = None
        self._scorer: RewardScorer | None = None
        self.loads = 0  # how many reward models were loaded from disk (tests check reuse)

    def get(self, folder: str | Path) -> RewardScorer:
        folder = Path(folder)
        with self._lock:
            if self._folder != folder or self._scorer is None:
                self._scorer, self._folder = None, None  # drop the old one before loading the next
                self._scorer, self._folder = RewardScorer(folder, self._profile), folder
                self.loads += 1
            return self._scorer
