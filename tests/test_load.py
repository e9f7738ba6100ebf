"""Load: two users press Start at once, then 20 chat sessions at once, all through gradio_client on the CPU.

The run that wins the Start race is a real (tiny) training run; its adapter then serves 20 concurrent sessions,
each asking one question and voting on the answers. Every session must be answered without error and every vote
stored. Latencies are printed (run with -s) and written to tests/artifacts/load_latency.json; they are a
measurement for docs/reliability.md, not asserted.
"""

from __future__ import annotations

import json
import sqlite3
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gradio_client import Client, handle_file

from helpers import ROOT, app_client, served_app, wait_for_completion
from finetune.core.run_status import read_status

SESSIONS = 20


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _start_form(model_dir: Path, data_file: Path) -> dict:
    return {"data_kind": "Uploaded file", "data_file": handle_file(str(data_file)), "run_name": "race",
            "model_source": str(model_dir), "model_bits": 32, "training_max_steps": 2, "training_save_steps": 2,
            "training_batch_size": 2, "data_max_seq_length": 128, "training_eval_steps": 0, "lora_rank": 4,
            "lora_alpha": 8, "lora_dropout": 0.0, "training_learning_rate": 0.01, "training_warmup_ratio": 0.0}


def _text(message: dict) -> str:
    """A chat message's text (gradio 6 hands content back as a list of typed parts)."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def _session(client: Client, run_id: str, index: int) -> dict:
    started = time.perf_counter()
    base_chat, tuned_chat, box = client.predict(f"Question {index}: what does LoRA train?", run_id, [], [], 8, 0.8,
                                                0.9, index, api_name="/chat")
    latency = time.perf_counter() - started
    saved = client.predict("right", f"session {index} vote", "", "both", api_name="/submit_feedback")
    return {"latency": latency, "base": base_chat, "tuned": tuned_chat, "box": box, "saved": saved[0]}


def test_start_race_then_twenty_concurrent_chats(tmp_path, tiny_model_dir, qa_file):
    root = tmp_path / "runs"
    with served_app(root) as url:
        # Two users press Start at the same moment: exactly one run starts, the other waits in the queue behind it
        # (and is taken out again here, so the chats below have the device to themselves).
        clients = [app_client(url) for _ in range(2)]
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda c: c.predict(**_start_form(tiny_model_dir, qa_file),
                                                        api_name="/start_run"), clients))
        started = [a for a in answers if "Started" in a[1]]
        queued = [a for a in answers if "Queued" in a[1]]
        assert len(started) == 1 and len(queued) == 1, answers
        run_id = started[0][0]
        assert "waits in the queue (2nd in line" in queued[0][1] and queued[0][0] != run_id
        assert "cancelled" in clients[1].predict(queued[0][0], api_name="/stop_run")
        states = {p.name: read_status(p)["state"] for p in root.iterdir() if (p / "status.json").is_file()}
        assert states[queued[0][0]] == "cancelled" and set(states) == {run_id, queued[0][0]}
        wait_for_completion(clients[0], run_id)

        # 20 sessions at once, each its own gradio session: one question, then a vote on its answers. The
        # clients connect first (opening the page is not what is measured; a slow /info under load would be).
        sessions = [app_client(url) for _ in range(SESSIONS)]
        wall = time.perf_counter()
        with ThreadPoolExecutor(SESSIONS) as pool:
            results = list(pool.map(lambda i: _session(sessions[i], run_id, i), range(SESSIONS)))
        wall = time.perf_counter() - wall

    for index, result in enumerate(results):
        assert _text(result["base"][0]) == f"Question {index}: what does LoRA train?"
        assert result["tuned"][-1]["role"] == "assistant" and result["box"] == ""
        assert result["saved"].startswith("Saved: vote, comment")
    with sqlite3.connect(root / "feedback.db") as db:
        generations = db.execute("SELECT COUNT(*) FROM generations").fetchone()[0]
        votes = db.execute("SELECT comment FROM feedback WHERE kind = 'preference'").fetchall()
    assert generations == 2 * SESSIONS  # every base and fine-tuned answer stored
    assert sorted(v[0] for v in votes) == sorted(f"session {i} vote" for i in range(SESSIONS))  # none lost

    latencies = [r["latency"] for r in results]
    report = {"sessions": SESSIONS, "max_new_tokens": 8, "wall_seconds": round(wall, 2),
              "p50": round(_percentile(latencies, 0.5), 2), "p95": round(_percentile(latencies, 0.95), 2),
              "max": round(max(latencies), 2), "mean": round(statistics.mean(latencies), 2),
              "errors": 0, "feedback_lost": 0}
    (ROOT / "tests" / "artifacts").mkdir(exist_ok=True)
    (ROOT / "tests" / "artifacts" / "load_latency.json").write_text(json.dumps(report, indent=1))
    print(f"\nload: {report}")
