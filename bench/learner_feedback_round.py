"""A learner-sized feedback round on the embedded model, through the app's own code path (issue 15): an SFT adapter
(configs/cpu-quick.yaml), about ten side-by-side chat turns on bundled questions, a vote on each, then the RLHF
tab's handlers: reward model and DPO from the SFT adapter on the collected feedback, step 4's comparison, and the
Evaluate tab's validation loss of base, SFT and DPO. Prints what the tab said and what the adapter did; the README
records one run. Not a test: it takes 15-30 minutes on a 2-core CPU.

    .venv/bin/python bench/learner_feedback_round.py --root /tmp/learner-round --votes 10

The votes follow one rule a learner of this course would: prefer the answer in the course's shape ("🧪 Lab
note" ... "Rule of thumb"), and when both or neither have it, the fine-tuned one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from components.eval_tab import _loss_summary  # noqa: E402
from components.rlhf_playground import compare_policy  # noqa: E402
from components.rlhf_runs import start_stage  # noqa: E402
from finetune.services.chat import ChatEngine, SamplingSettings  # noqa: E402
from finetune.core.config import DataConfig, load_config  # noqa: E402
from finetune.services.evaluate import candidate_loss, candidates, eval_rows  # noqa: E402
from finetune.services.feedback import FeedbackStore  # noqa: E402
from finetune.services.feedback_export import pair_rows  # noqa: E402
from finetune.core.run_status import read_metrics  # noqa: E402
from finetune.services.scoring import ScorerCache  # noqa: E402
from finetune.services.runs import RunManager  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def course_shaped(answer: str) -> bool:
    return "Lab note" in answer and "Rule of thumb" in answer


def questions(count: int) -> list[str]:
    """Bundled questions the SFT run does not train on (course_qa's validation split)."""
    rows = [json.loads(line) for line in (ROOT / "data/course_qa/validation.jsonl").read_text().splitlines()]
    return [row["prompt"] for row in rows[:count]]


def wait(manager: RunManager, run_id: str) -> dict:
    status = manager.wait(run_id, timeout=3600)
    if status["state"] != "completed":
        raise SystemExit(f"{run_id} ended {status['state']}: {manager.log_tail(run_id)}")
    return status


def chat_and_vote(engine: ChatEngine, store: FeedbackStore, manager: RunManager, sft_id: str, count: int,
                  max_new_tokens: int) -> list[dict]:
    """Chat turns and votes until ``count`` questions are voted on (an interrupted round goes on where it was)."""
    cfg = load_config(manager.run_dir(sft_id) / "config.yaml")
    done = {row["prompt"][-1]["content"] for row in pair_rows(store)}
    votes = [{"prompt": prompt, "earlier": True} for prompt in questions(count) if prompt in done]
    for seed, prompt in enumerate(questions(count)):
        if prompt in done:
            continue
        settings = SamplingSettings(max_new_tokens=max_new_tokens, seed=seed)  # the Chat tab's sampling otherwise
        base, tuned = engine.answer_pair(prompt, [], [], cfg.model, sft_id, manager.finished_adapters()[sft_id],
                                         settings)
        ids = store.record_turn(model=cfg.model.source, adapter=sft_id, prompt=prompt, base_history=[],
                                tuned_history=[], settings={"max_new_tokens": max_new_tokens, "seed": seed},
                                base_response=base, tuned_response=tuned)
        prefer_base = course_shaped(base) and not course_shaped(tuned)
        store.add_preference(ids["tuned"], ids["base"], "second" if prefer_base else "first")
        votes.append({"prompt": prompt, "base": base, "tuned": tuned, "chosen": "base" if prefer_base else "tuned"})
    return votes


def final(rows: list[dict], key: str) -> list[float]:
    return [round(r[key], 4) for r in rows if isinstance(r.get(key), (int, float))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="/tmp/learner-round")
    parser.add_argument("--votes", type=int, default=10)
    parser.add_argument("--sft-steps", type=int, default=30)
    parser.add_argument("--sft-run", help="a finished SFT run in --root to reuse instead of training one")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="per chat answer")
    parser.add_argument("--compare-tokens", type=int, default=64, help="per answer in step 4's comparison")
    parser.add_argument("--evaluate-only", action="store_true", help="recompute the validation losses of a "
                        "finished round in --root (its report.json)")
    args = parser.parse_args()
    root = Path(args.root)
    manager, engine, report = RunManager(root / "runs"), ChatEngine(), {}
    if args.evaluate_only:
        report = json.loads((root / "report.json").read_text())
        voted = {vote["prompt"] for vote in report["votes"]}
        report["evaluate"] = evaluate(manager, engine, report["sft"]["run"], report["dpo"]["run"], voted)
        (root / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
        print(json.dumps(report["evaluate"], indent=1, ensure_ascii=False))
        return
    started = time.time()

    sft_id = args.sft_run
    if not sft_id:
        sft = load_config(ROOT / "configs/cpu-quick.yaml")
        sft.training.max_steps = args.sft_steps
        sft_id = manager.start(sft)
        wait(manager, sft_id)
    report["sft"] = {"run": sft_id, "eval_loss": final(read_metrics(manager.run_dir(sft_id)), "eval_loss")}

    db = root / "feedback.db"
    report["votes"] = chat_and_vote(engine, FeedbackStore(db), manager, sft_id, args.votes, args.max_new_tokens)
    form = {"model_kind": "Embedded", "data_kind": "Collected feedback"}
    reward_id, reward_message = start_stage(manager, db, "reward", **form)
    wait(manager, reward_id)
    reward_rows = read_metrics(manager.run_dir(reward_id))
    report["reward"] = {"run": reward_id, "tab_said": reward_message, "accuracy": final(reward_rows, "accuracy"),
                        "eval_accuracy": final(reward_rows, "eval_accuracy"), "loss": final(reward_rows, "loss")}
    policy_id, policy_message = start_stage(manager, db, "policy", **form, method="DPO", start_adapter=sft_id,
                                            reward_run=reward_id)
    wait(manager, policy_id)
    rows = read_metrics(manager.run_dir(policy_id))
    report["dpo"] = {"run": policy_id, "tab_said": policy_message, "loss": final(rows, "loss"),
                     "margins": final(rows, "rewards/margins"), "eval_margins": final(rows, "eval_rewards/margins")}

    summary, table = compare_policy(manager, ScorerCache(), engine, reward_id, policy_id, 4, args.compare_tokens,
                                    progress=lambda *a, **k: None)
    report["step4"] = {"summary": summary, "table": table.to_dict("records")}

    report["evaluate"] = evaluate(manager, engine, sft_id, policy_id, {vote["prompt"] for vote in report["votes"]})
    report["minutes"] = round((time.time() - started) / 60, 1)
    (root / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    print(json.dumps(report, indent=1, ensure_ascii=False))


def evaluate(manager: RunManager, engine: ChatEngine, sft_id: str, policy_id: str, voted: set[str]) -> dict:
    """The Evaluate tab's validation loss of base, SFT and DPO, with paired-bootstrap intervals, on the
    course_qa validation rows nobody voted on (DPO trained on most voted prompts)."""
    chosen = candidates({sft_id: manager.run_dir(sft_id), policy_id: manager.run_dir(policy_id)})
    data = eval_rows(DataConfig(source="bundled:course_qa", split="validation"), 24)
    data = data.filter(lambda row: row["prompt"][-1]["content"] not in voted)
    results = [candidate_loss(engine, c, data) for c in chosen]
    losses = [[c.name, r.loss, r.perplexity, r.tokens, r.rows] for c, r in zip(chosen, results)]
    frame = pd.DataFrame(losses, columns=["model", "validation loss", "perplexity", "tokens", "rows"])
    return {"losses": {n: round(x, 4) for n, x, *_ in losses},
            "summary": _loss_summary(frame, chosen, {c.name: r for c, r in zip(chosen, results)})}


if __name__ == "__main__":
    main()
