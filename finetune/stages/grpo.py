"""Online optimization: TRL ``GRPOTrainer``. For each prompt it samples ``preference.num_generations`` answers,
scores them with every reward term (rule rewards declared in ``preference.rewards``, the trained reward model
``preference.reward_model``, an operator-allowed Python function), each times its weight, and pushes the policy
towards the answers scored above their group's mean. Same LoRA and ``adapter/`` as DPO.

    python -m finetune.train configs/grpo-drills-cpu.yaml --output-dir runs/grpo-drills   # rule rewards only

With rule rewards the held-out prompts are answered greedily before and after training and scored by the same
terms (``held_out_answers.json``): the app's verdict on accuracy and reward is computed from them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

from finetune.core.config import ConfigError, RunConfig, python_rewards_refusal
from finetune.core.hardware import HardwareProfile, detect
from finetune.core.metrics import MetricsCallback
from finetune.core.models import load_tokenizer, resolve_run_folder
from finetune.core.data_sources import load_raw
from finetune.core.preference import PreferenceData
from finetune.core.prompt_data import PromptRows, check_reference_columns, is_preference_columns, load_prompt_rows
from finetune.core.rewards import RewardRule, answer_text, parse_rules
from finetune.core.run_folder import ADAPTER_DIR, HELD_OUT_ANSWERS, REWARD_DIR
from finetune.stages.common import (Built, keep_adapters_in_compute_dtype, load_preference_data, preference_data_fields,
                                    record_run_info, save_default_adapter, training_args)
from finetune.stages.measure import sample_answer
from finetune.stages.policy import policy_model
from finetune.stages.reward import RewardScorer

def to_grpo_config(cfg: RunConfig, profile: HardwareProfile, run_dir: Path) -> Any:
    from trl import GRPOConfig

    args = training_args(cfg, profile, run_dir, has_eval=False)  # held-out rows would need sampling too
    args.pop("max_length")  # GRPO bounds the sampled answer instead (max_completion_length)
    p = cfg.preference
    return GRPOConfig(**args, beta=p.beta, num_generations=p.num_generations,
                      max_completion_length=p.max_completion_length, temperature=p.temperature,
                      reward_weights=list(p.reward_weights().values()))


class RuleReward:
    """One declared rule as a GRPO reward function: 1 or 0 per answer (TRL applies the weight), reading the row's
    reference column from the dataset columns TRL passes along."""

    def __init__(self, rule: RewardRule):
        self.rule = rule
        self.__name__ = rule.name  # TRL logs each reward function under its name (rewards/<name>/mean)

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        rows = [{k: v[i] for k, v in columns.items() if isinstance(v, list) and len(v) == len(completions)}
                for i in range(len(completions))]
        return [self.rule.score(answer_text(c), row) for c, row in zip(completions, rows)]


class RewardModelReward:
    """GRPO's reward function: the trained reward model's score of each sampled answer to its prompt."""

    __name__ = "reward_model"  # TRL logs each reward function under its name (rewards/reward_model/mean)

    def __init__(self, scorer: RewardScorer):
        self.scorer = scorer

    def __call__(self, prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        return self.scorer.score(list(prompts), list(completions))


def python_reward(spec: str) -> Callable[..., list[float]]:
    """The operator's reward function from 'file.py:function' (refused again here: the config may come from a
    file written elsewhere)."""
    refusal = python_rewards_refusal()
    if refusal:
        raise ConfigError({"preference.reward_file": refusal})
    path, _, name = spec.rpartition(":")
    loader = importlib.util.spec_from_file_location("lora_lab_reward", path)
    if loader is None or not Path(path).is_file():
        raise ConfigError({"preference.reward_file": f"no Python file at {path}"})
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError({"preference.reward_file": f"{path} has no function '{name}'"})
    function.__name__ = "python_reward"
    return function


def reward_functions(cfg: RunConfig, run_dir: Path, profile: HardwareProfile) -> list[Any]:
    """Every reward term, in the order of PreferenceConfig.reward_weights (GRPOConfig.reward_weights follows it)."""
    p = cfg.preference
    functions: list[Any] = [RuleReward(rule) for rule in parse_rules(p.rewards)]
    if p.reward_model:
        reward_dir = resolve_run_folder(p.reward_model, run_dir.parent, REWARD_DIR)
        functions.append(RewardModelReward(RewardScorer(reward_dir, profile)))
    if p.reward_file:
        functions.append(python_reward(p.reward_file))
    return functions


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


class HeldOutCheck(TrainerCallback):
    """Greedy answers to the held-out prompts at the start and the end of training, scored by every reward term:
    what the app's before/after verdict is computed from (a rise of the training reward alone proves nothing)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, rows: list[dict[str, Any]], rewards: list[Any],
                 tokenizer: Any):
        self.path, self.rows, self.rewards = run_dir / HELD_OUT_ANSWERS, rows, rewards
        self.tokenizer, self.max_new_tokens = tokenizer, cfg.preference.max_completion_length
        checks = [rule for rule in parse_rules(cfg.preference.rewards) if rule.kind in ("match", "numeric")]
        self.header = {"weights": cfg.preference.reward_weights(),
                       # accuracy: the first rule that checks the answer against the reference
                       "accuracy_term": checks[0].name if checks else None,
                       "reference_columns": sorted({rule.reference for rule in checks}),
                       "prompts": [row["prompt"][-1]["content"] for row in rows],
                       "rows": [{k: v for k, v in row.items() if k != "prompt"} for row in rows]}

    def _measure(self, model: Any) -> dict[str, Any]:
        was_training = model.training
        answers = [sample_answer(model, self.tokenizer, row["prompt"][-1]["content"], self.max_new_tokens)
                   for row in self.rows]
        model.train(was_training)
        completions = [[{"role": "assistant", "content": a}] for a in answers]
        columns = {k: [row[k] for row in self.rows] for k in self.rows[0] if k != "prompt"}
        prompts = [row["prompt"] for row in self.rows]
        scores = {f.__name__: [float(x) for x in f(prompts=prompts, completions=completions, **columns)]
                  for f in self.rewards}
        return {"answers": answers, "scores": scores}

    def _write(self, key: str, model: Any) -> None:
        data = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else dict(self.header)
        data[key] = self._measure(model)
        self.path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **_: Any) -> None:
        if state.is_world_process_zero and self.rows and not self.path.is_file():  # a resumed run keeps its start
            self._write("before", model)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **_: Any) -> None:
        if state.is_world_process_zero and self.rows:
            self._write("after", model)


def _data(cfg: RunConfig) -> tuple[Any, PromptRows | None, dict[str, Any]]:
    """(training prompts as a Dataset, prompt rows with their held-out part or None, run-info fields): the
    prompts of preference pairs, or prompt rows with reference columns for rule rewards."""
    from datasets import Dataset

    if is_preference_columns(load_raw(cfg.data)[0].column_names):
        check_reference_columns(cfg, ["prompt"])  # pairs give GRPO their prompts only
        data = load_preference_data(cfg, "paired")
        return _prompts(data), None, preference_data_fields(data)
    rows = load_prompt_rows(cfg.data, cfg.training.seed)
    check_reference_columns(cfg, rows.columns)
    fields = dict(data_format="prompts", train_rows=len(rows.train), eval_rows=len(rows.held_out),
                  data_notes=rows.notes)
    return Dataset.from_list(rows.train), rows, fields


def build(cfg: RunConfig, run_dir: Path) -> Built:
    """GRPOTrainer on the data's prompts, rewarded by the rule rewards and/or a trained reward model."""
    from trl import GRPOTrainer

    profile = detect()
    tokenizer = load_tokenizer(cfg.model)
    dataset, rows, data_fields = _data(cfg)
    rewards = reward_functions(cfg, run_dir, profile)
    model, peft_config, start = policy_model(cfg, run_dir, profile)
    callbacks: list[Any] = [MetricsCallback(run_dir, stage="grpo")]
    if rows is not None and rows.held_out:
        callbacks.append(HeldOutCheck(cfg, run_dir, rows.held_out, rewards, tokenizer))
    trainer = GRPOTrainer(model=model, reward_funcs=rewards, args=to_grpo_config(cfg, profile, run_dir),
                          train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
                          callbacks=callbacks)
    keep_adapters_in_compute_dtype(trainer.model, profile)
    reward_dir = next((str(f.scorer.folder) for f in rewards if isinstance(f, RewardModelReward)), "")
    record_run_info(trainer, run_dir, profile, stage=type(trainer).__name__, started_from=start,
                    reward_model=reward_dir, reward_terms=described_terms(cfg), **data_fields)
    return Built(trainer, callbacks[0], has_eval=False)  # held-out prompts are answered by HeldOutCheck instead


def described_terms(cfg: RunConfig) -> list[dict[str, Any]]:
    """Each reward term in words with its weight, for the run history."""
    weights = cfg.preference.reward_weights()
    described = {rule.name: rule.describe() for rule in parse_rules(cfg.preference.rewards)}
    described.update(reward_model="the trained reward model's score", python_reward=cfg.preference.reward_file)
    return [{"name": name, "weight": weight, "rule": described.get(name, "")} for name, weight in weights.items()]


def save(cfg: RunConfig, trainer: Any, run_dir: Path) -> Path:
    return save_default_adapter(cfg, trainer, run_dir / ADAPTER_DIR)
