"""PEFT vs LoRA vs QLoRA, measured: one dataset, seed and step budget, several techniques, one table.

A comparison is a small queue persisted as ``runs/comparisons/<id>.json``. A background thread starts its
techniques one after another through the RunManager (each one a normal run in the history, trained in a child
process), waits for each to finish, and moves on. Because the queue lives on disk, a reloaded page, or a
restarted app (``CompareQueue.ensure_worker``), picks it up again. Stop asks the current run to stop and skips
the rest.

The measurements come from the runs themselves: ``finetune.stages.measure`` runs in the training child at the end
(peak memory, weight bytes, size on disk, a greedy sample answer) and writes them to run_info.json; loss,
seconds per step and tokens/s come from metrics.jsonl.

    queue = CompareQueue(RunManager("runs"))
    comparison_id = queue.start(CompareRequest(techniques=["ia3", "lora16", "qlora4"], max_steps=6))
    queue.wait(comparison_id)
    print(results_frame(queue.manager, queue.load(comparison_id)))
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.core.access import LOCAL, Visitor, can_view, owned_by, require_owner, require_signed_in
from finetune.core.config import ConfigError, RunConfig, from_dict, load_config, to_dict
from finetune.core.estimate import model_shape
from finetune.core.models import ModelSourceError
from finetune.core.paths import CONFIGS_DIR, check_config
from finetune.core.run_folder import COMPARE_DIR, PROMPT_FILE, RUN_INFO_FILE
from finetune.core.run_status import FINAL_STATES, read_metrics
from finetune.services.admission import check_sources

PRESET = CONFIGS_DIR / "compare-cpu.yaml"


# --- the techniques -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Technique:
    label: str
    method: str
    bits: int
    double_quant: bool = False
    # Learning rate relative to the comparison's LoRA rate: full fine-tuning needs a much smaller step, IA3 and
    # prompt tuning (few parameters, far from the weights) a much larger one.
    lr_factor: float = 1.0
    init: str = "default"  # how the LoRA adapter starts (finetune/core/lora_init.py)


TECHNIQUES: dict[str, Technique] = {
    "full": Technique("Full fine-tune (32-bit)", "full", 32, lr_factor=0.1),
    "ia3": Technique("IA3 (16-bit)", "ia3", 16, lr_factor=10.0),
    "prompt_tuning": Technique("Prompt tuning (16-bit)", "prompt_tuning", 16, lr_factor=20.0),
    "lora16": Technique("LoRA 16-bit", "lora", 16),
    "lora8": Technique("LoRA 8-bit", "lora", 8),
    "qlora4": Technique("QLoRA 4-bit NF4", "lora", 4),
    "qlora4_dq": Technique("QLoRA 4-bit NF4 + double quant", "lora", 4, double_quant=True),
    # The same QLoRA, its adapter started as the best rank-r fix of the 4-bit rounding error: the table's "step-0
    # weight error" column shows how much closer the start is, "init (s)" what it cost.
    "qlora4_loftq": Technique("QLoRA 4-bit NF4 + LoftQ init", "lora", 4, init="loftq"),
    "dora": Technique("DoRA 16-bit", "dora", 16),
    "rslora": Technique("rsLoRA 16-bit", "rslora", 16),
}
DEFAULT_TECHNIQUES = ("full", "ia3", "lora16", "lora8", "qlora4", "qlora4_dq")

# The course's comparison table in the app's own words: what each technique is, what it updates, and when to use it.
QUALITATIVE_COLUMNS = ["technique", "description", "what it updates", "benefits", "use cases", "challenges"]
QUALITATIVE = [
    ("Full fine-tuning", "Continue training the whole network on your data.", "Every weight.",
     "Highest ceiling; no extra inference code.", "Large domain shifts when memory and data are plentiful.",
     "Weights + gradients + optimizer states for every parameter (~16 bytes each); one full copy per task; "
     "easy to overfit or forget."),
    ("PEFT (family)", "Freeze the pre-trained model and train a small add-on instead.",
     "A few extra parameters (adapters, vectors or virtual tokens).",
     "Memory and storage fall by orders of magnitude; one base serves many tasks.",
     "Many tasks or users on one base model; modest hardware.",
     "Choosing the method and its settings; can trail full fine-tuning on hard shifts."),
    ("LoRA", "Add a trainable low-rank product B·A beside chosen weight matrices.",
     "r·(in + out) numbers per targeted layer; the base stays frozen.",
     "Small adapters (MBs), no extra latency once merged, swap adapters per request.",
     "The default for instruction and style tuning.", "Rank, alpha and target layers to tune; base in 16-bit."),
    ("DoRA / rsLoRA", "LoRA variants: DoRA splits each weight into magnitude and direction; rsLoRA scales by "
     "alpha/sqrt(r).", "As LoRA (DoRA adds one magnitude per output).",
     "DoRA often closes part of the gap to full tuning; rsLoRA keeps high ranks stable.",
     "When plain LoRA underfits, or with large ranks.", "DoRA is slower per step, more so on a quantized base."),
    ("IA3", "Learn one scaling vector per targeted layer (keys, values, feed-forward).",
     "A vector the size of each layer's output (or input): the fewest parameters here.",
     "Tiny adapters, very low memory for the trainable part.", "Many small tasks, few-shot style adaptation.",
     "Less capacity than LoRA; needs a high learning rate."),
    ("Prompt tuning", "Learn a few 'virtual token' embeddings put in front of every input.",
     "num_virtual_tokens × hidden size numbers; no weight changes.",
     "Smallest footprint on disk; the model itself is untouched.", "Large models and light task steering.",
     "Weak on small models, slow to converge, uses context length."),
    ("QLoRA", "LoRA on a base quantized to 4-bit NormalFloat, adapters trained in 16/32-bit.",
     "The LoRA adapters only; the 4-bit base is frozen.",
     "Base weights ~4x smaller than 16-bit: large models fit a single consumer GPU.",
     "Fine-tuning models that do not fit in 16-bit (a T4, a laptop).",
     "Dequantizing costs time per step; a small quality loss; double quant saves ~0.4 bit more per weight."),
]


# --- the request and its configs -----------------------------------------------------------------------------

@dataclass
class CompareRequest:
    """What stays the same across the techniques of one comparison."""

    techniques: list[str] = field(default_factory=lambda: list(DEFAULT_TECHNIQUES))
    model_source: str = ""          # empty = the preset's (the embedded model)
    data_source: str = ""           # empty = the preset's (the bundled course Q&A)
    max_steps: int = 6
    max_seq_length: int = 128
    batch_size: int = 2
    max_samples: int | None = 120
    learning_rate: float = 5e-4
    seed: int = 42
    sample_prompt: str = "What does QLoRA change compared with LoRA?"


def base_config(request: CompareRequest) -> RunConfig:
    """The preset with the request's shared settings; ConfigError lists every bad value."""
    raw = to_dict(load_config(PRESET)) if PRESET.is_file() else to_dict(RunConfig())
    if request.model_source.strip():
        raw["model"]["source"] = request.model_source.strip()
    if request.data_source.strip():
        raw["data"]["source"] = request.data_source.strip()
    raw["data"].update(max_seq_length=request.max_seq_length, max_samples=request.max_samples or None)
    raw["training"].update(max_steps=request.max_steps, batch_size=request.batch_size,
                           learning_rate=request.learning_rate, seed=request.seed)
    return from_dict(raw)


def technique_config(base: RunConfig, key: str) -> RunConfig:
    """The base config turned into one technique: method, bit width and its learning rate."""
    technique = TECHNIQUES[key]
    raw = to_dict(base)
    raw["run_name"] = f"cmp-{key}"
    raw["lora"]["method"] = technique.method
    raw["lora"]["init"] = technique.init
    raw["model"].update(bits=technique.bits, double_quant=technique.double_quant, quant_type="nf4")
    raw["training"]["learning_rate"] = min(base.training.learning_rate * technique.lr_factor, 0.5)
    return from_dict(raw)


def validate_request(request: CompareRequest) -> list[RunConfig]:
    """Every technique's config, or one ConfigError naming every problem (unknown technique, bad value)."""
    problems: dict[str, str] = {}
    unknown = [t for t in request.techniques if t not in TECHNIQUES]
    if not request.techniques:
        problems["techniques"] = "choose at least one technique to compare"
    elif unknown:
        problems["techniques"] = f"unknown technique(s) {', '.join(unknown)}; choose from {', '.join(TECHNIQUES)}"
    if not str(request.sample_prompt or "").strip():
        problems["sample_prompt"] = "the sample prompt must not be empty"
    if request.max_steps in (None, -1):
        problems["max_steps"] = "a comparison needs a fixed step budget (max steps > 0)"
    if problems:
        raise ConfigError(problems)
    base = base_config(request)
    return [technique_config(base, key) for key in dict.fromkeys(request.techniques)]


def check_model(cfg: RunConfig) -> None:
    """Fail now, not once per technique, when the model cannot be found (an offline Hub id, a wrong folder)."""
    try:
        model_shape(cfg.model)
    except (ModelSourceError, OSError, ValueError) as error:
        raise CompareError(str(error)) from None


# --- the queue ---------------------------------------------------------------------------------------------

class CompareError(RuntimeError):
    """A comparison request that cannot be carried out; the message is meant for the user."""


class CompareQueue:
    """Runs the techniques of a comparison one after another, each run joining the run manager's job queue when the
    one before it ends (several visitors' comparisons take turns on the device).

    The queue itself is a list of named configs (``enqueue``); a subclass with its own FOLDER and PREFIX keeps
    another kind of queue (finetune/services/sweeps.py: hyperparameter trials) beside the comparisons, and may watch
    each run while it trains (``watch_run``)."""

    FOLDER = COMPARE_DIR
    PREFIX = "compare"
    NOUN = "Comparison"

    def __init__(self, manager: Any, poll_seconds: float = 1.0):
        self.manager = manager
        self.root = Path(manager.root) / self.FOLDER
        self.root.mkdir(parents=True, exist_ok=True)
        self.poll_seconds = poll_seconds
        self._lock = threading.RLock()
        self._workers: dict[str, threading.Thread] = {}

    # --- the file ----------------------------------------------------------------------------------------

    def path(self, comparison_id: str) -> Path:
        if not comparison_id or "/" in comparison_id or comparison_id.startswith("."):
            raise CompareError(f"Invalid comparison id {comparison_id!r}")
        return self.root / f"{comparison_id}.json"

    def load(self, comparison_id: str) -> dict[str, Any]:
        try:
            return json.loads(self.path(comparison_id).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            raise CompareError(f"No {self.NOUN.lower()} {comparison_id!r}") from None

    def _save(self, state: dict[str, Any]) -> None:
        path = self.path(state["id"])
        temporary = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
        temporary.write_text(json.dumps(state, indent=1), encoding="utf-8")
        os.replace(temporary, path)

    def _update(self, comparison_id: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            state = self.load(comparison_id)
            state.update(fields)
            self._save(state)
            return state

    def _update_item(self, comparison_id: str, index: int, **fields: Any) -> dict[str, Any]:
        with self._lock:
            state = self.load(comparison_id)
            state["items"][index].update(fields)
            self._save(state)
            return state

    def list_ids(self) -> list[str]:
        files = sorted(self.root.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        return [p.stem for p in files]

    def visible_ids(self, visitor: Visitor) -> list[str]:
        return [queue_id for queue_id in self.list_ids() if can_view(visitor, self.load(queue_id).get("owner"))]

    def watched(self, shown: str | None, visitor: Visitor = LOCAL) -> tuple[str, dict[str, Any] | None]:
        """(id, state) a live view shows ``visitor``: their running queue, else the one shown, else their newest
        (of those they may see); a running one gets its worker back after an app restart."""
        visible = self.visible_ids(visitor)
        running = [queue_id for queue_id in visible if self.load(queue_id).get("state") == "running"]
        mine = [queue_id for queue_id in running if self.load(queue_id).get("owner") == visitor.owner]
        queue_id = (mine or running or [shown if shown in visible else (visible[0] if visible else "")])[0]
        if not queue_id:
            return "", None
        self.ensure_worker(queue_id)
        return queue_id, self.load(queue_id)

    # --- actions -----------------------------------------------------------------------------------------

    def start(self, request: CompareRequest, visitor: Visitor = LOCAL) -> str:
        """Validate every technique's config, persist the queue and start working through it."""
        configs = validate_request(request)
        check_config(configs[0])  # the path gate: the request's model and data sources
        check_model(configs[0])

        check_sources(configs[0])
        items = [{"technique": cfg.run_name.removeprefix("cmp-"), "config": to_dict(cfg)} for cfg in configs]
        return self.enqueue(items, dataclasses.asdict(request), visitor)

    def enqueue(self, items: list[dict[str, Any]], request: dict[str, Any], visitor: Visitor = LOCAL) -> str:
        """Persist a queue of already validated configs (each item: its label under "technique", its config as a
        dict, anything else the caller wants kept) and start working through it; returns the queue's id. Its
        runs join the run manager's job queue one after another, so they take turns with everyone's runs."""
        require_signed_in(visitor, f"start a {self.NOUN.lower()}")
        for item in items:  # the visitor's limits (steps, minutes) and the disk, before anything is kept
            self.manager.check_job(from_dict(item["config"]), visitor)
        with self._lock:
            comparison_id = f"{self.PREFIX}-{time.strftime('%Y%m%d-%H%M%S')}"
            n = 1
            while self.path(comparison_id).exists():
                n += 1
                comparison_id = f"{self.PREFIX}-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
            items = [{**item, "run_id": None, "state": "pending"} for item in items]
            self._save({"id": comparison_id, "state": "running", "stop_requested": False, "created_at": time.time(),
                        "request": request, "items": items, "owner": visitor.owner})
            self._spawn_worker(comparison_id)
        return comparison_id

    def stop(self, comparison_id: str, visitor: Visitor = LOCAL) -> dict[str, Any]:
        """Stop the run in progress (it saves a checkpoint) and skip the techniques still waiting."""
        self.require_can_act(comparison_id, visitor, f"stop this {self.NOUN.lower()}")
        state = self._update(comparison_id, stop_requested=True)
        for item in state["items"]:
            if item["state"] == "running" and item["run_id"]:
                self.manager.request_stop(item["run_id"], visitor)
        return state

    def require_can_act(self, comparison_id: str, visitor: Visitor, what: str) -> None:
        """AccessDenied unless ``visitor`` owns it (or is an operator); one that does not exist reads the same."""
        try:
            owner = self.load(comparison_id).get("owner")
        except CompareError:
            if visitor.operator:
                raise
            owner = None
        require_owner(visitor, owner, what, f"{self.NOUN.lower()} {comparison_id}")

    def ensure_worker(self, comparison_id: str | None) -> None:
        """Re-attach: a running comparison with no worker in this process (the app restarted) continues."""
        if not comparison_id:
            return
        with self._lock:
            if self.load(comparison_id).get("state") == "running":
                self._spawn_worker(comparison_id)

    def _spawn_worker(self, comparison_id: str) -> None:
        worker = self._workers.get(comparison_id)
        if worker is not None and worker.is_alive():
            return
        worker = threading.Thread(target=self._work, args=(comparison_id,), daemon=True,
                                  name=f"queue-{comparison_id}")
        self._workers[comparison_id] = worker
        worker.start()

    def wait(self, comparison_id: str, timeout: float = 1800.0) -> dict[str, Any]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.load(comparison_id)
            if state["state"] != "running":
                return state
            time.sleep(self.poll_seconds)
        raise TimeoutError(f"comparison {comparison_id} did not finish within {timeout:.0f} s")

    # --- the worker --------------------------------------------------------------------------------------

    def _work(self, comparison_id: str) -> None:
        try:
            state = self.load(comparison_id)
            for index, item in enumerate(state["items"]):
                if item["state"] in FINAL_STATES or item["state"] == "skipped":
                    continue
                # A started run is waited for (Stop already reached it); only the ones never started are skipped.
                if self.load(comparison_id).get("stop_requested") and not item.get("run_id"):
                    self._update_item(comparison_id, index, state="skipped")
                    continue
                self._run_item(comparison_id, index, item)
            final = "stopped" if self.load(comparison_id).get("stop_requested") else "completed"
            self._update(comparison_id, state=final, finished_at=time.time())
        except Exception as error:  # keep the file truthful: a broken queue says so instead of "running" forever
            self._update(comparison_id, state="failed", error=f"{type(error).__name__}: {error}")

    def _run_item(self, comparison_id: str, index: int, item: dict[str, Any]) -> None:

        run_id = item.get("run_id")
        if not run_id:  # not started yet: it joins the job queue and starts when the jobs before it have run
            cfg = from_dict(item["config"])
            run_id = self.manager.new_run_id(cfg)
            folder = self.manager.run_dir(run_id)
            folder.mkdir(parents=True, exist_ok=True)
            prompt = self.load(comparison_id)["request"].get("sample_prompt")
            if prompt:  # a sweep's trials need no sample answer
                (folder / PROMPT_FILE).write_text(prompt, encoding="utf-8")
            state = self.load(comparison_id)
            if state.get("stop_requested"):
                self._update_item(comparison_id, index, state="skipped")
                return
            # Accepted as a whole when it was queued: its later runs are not held to the per-visitor job limit.
            self.manager.start(cfg, run_id, owned_by(state.get("owner")), check_limits=False)
            self._update_item(comparison_id, index, run_id=run_id, state="running", started_at=time.time())
            if self.load(comparison_id).get("stop_requested"):  # a stop that came while the run was starting
                self.manager.request_stop(run_id)
        while (status := self.manager.status(run_id)).get("state") not in FINAL_STATES:
            if not self.manager.run_dir(run_id).is_dir():  # its owner deleted it while it waited: it never ends
                status = {"state": "cancelled", "error": "Its run was deleted before it finished."}
                break
            self.watch_run(comparison_id, index, run_id)
            time.sleep(self.poll_seconds)
        self._update_item(comparison_id, index, state=status["state"], error=status.get("error"))

    def watch_run(self, comparison_id: str, index: int, run_id: str) -> None:
        """Called at every poll while an item's run trains; a comparison lets every technique run its course."""


# --- the results ---------------------------------------------------------------------------------------------

RESULT_COLUMNS = ["technique", "state", "learning rate", "trainable params", "trainable %",
                  "peak memory (MB)", "weights (MB)", "block linears (MB)", "s/step", "tokens/s",
                  "saved weights (MB)", "step-0 weight error (%)", "init (s)", "final train loss", "val loss",
                  "perplexity", "sample answer", "run id"]


def _last(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return values[-1] if values else None


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return sum(values) / len(values) if values else None


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def item_result(manager: Any, item: dict[str, Any]) -> dict[str, Any]:
    """One row of the table, from the run's folder (empty cells while it has not got that far)."""
    technique = TECHNIQUES.get(item["technique"])
    row: dict[str, Any] = dict.fromkeys(RESULT_COLUMNS)
    row.update({"technique": technique.label if technique else item["technique"], "state": item["state"],
                "run id": item.get("run_id") or "",
                "learning rate": item.get("config", {}).get("training", {}).get("learning_rate")})
    if not item.get("run_id"):
        return row
    folder = manager.run_dir(item["run_id"])
    try:
        info = json.loads((folder / RUN_INFO_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        info = {}
    rows = read_metrics(folder)
    trainable, total = info.get("trainable_parameters"), info.get("total_parameters")
    eval_loss = _last(rows, "eval_loss")
    status = manager.status(item["run_id"])
    state = status.get("state", item["state"])
    row.update({
        "state": f"{state}: {status['error']}" if state == "failed" and status.get("error") else state,
        "trainable params": trainable,
        "trainable %": _round(100 * trainable / total, 4) if trainable and total else None,
        "peak memory (MB)": info.get("peak_memory_mb"), "weights (MB)": info.get("weights_mb"),
        "block linears (MB)": info.get("linear_weights_mb"),
        "s/step": _round(_last(rows, "seconds_per_step"), 3), "tokens/s": _round(_mean(rows, "tokens_per_second"), 1),
        "saved weights (MB)": info.get("saved_weights_mb"),
        "step-0 weight error (%)": _round(100 * info["step0_weight_error"], 3)
        if isinstance(info.get("step0_weight_error"), (int, float)) else None,
        "init (s)": info.get("init_seconds"), "final train loss": _round(_last(rows, "loss"), 4),
        "val loss": _round(eval_loss, 4),
        "perplexity": _round(math.exp(eval_loss), 2) if eval_loss is not None and eval_loss < 700 else None,
        "sample answer": info.get("sample_answer"),
    })
    return row


def results(manager: Any, state: dict[str, Any]) -> list[dict[str, Any]]:
    return [item_result(manager, item) for item in state.get("items", [])]


def loss_points(manager: Any, state: dict[str, Any]) -> list[tuple[int, float | None, str]]:
    """(step, training loss, technique) for every queued technique; a blank point for each one that has not
    logged yet, so the plot's colour legend holds every technique from the first frame on."""
    points: list[tuple[int, float | None, str]] = []
    for item in state.get("items", []):
        label = TECHNIQUES[item["technique"]].label if item["technique"] in TECHNIQUES else item["technique"]
        rows = read_metrics(manager.run_dir(item["run_id"])) if item.get("run_id") else []
        mine = [(int(r["step"]), float(r["loss"]), label) for r in rows if isinstance(r.get("loss"), (int, float))]
        points += mine or [(0, None, label)]
    return points


def expected_seconds(configs: list[RunConfig], manager: Any) -> float | None:
    """Before a start: the techniques' steps at the seconds per step that this machine's completed runs of the
    same model and bit width took (the job queue's own measure); None when none has been timed yet."""
    times = [manager._job_seconds(cfg) for cfg in configs]
    return sum(times) if times and all(t is not None for t in times) else None


def seconds_left(state: dict[str, Any], manager: Any) -> tuple[float | None, float | None]:
    """(seconds left, the pace used) while a comparison runs: the running technique's own ETA (re-measured on
    its latest steps) plus the waiting techniques' steps at the latest pace this comparison measured."""
    left, pace, waiting_steps = 0.0, None, 0
    for item in state.get("items", []):
        status = manager.status(item["run_id"]) if item.get("run_id") else {}
        if item["state"] in FINAL_STATES or item["state"] == "skipped":
            if status.get("duration") and status.get("step"):
                pace = float(status["duration"]) / int(status["step"])
        elif status.get("state") == "running":
            pace = status.get("seconds_per_step") or pace
            left += float(status.get("eta_seconds") or 0.0)
        else:  # not started yet (or waiting in the job queue)
            waiting_steps += int(item["config"]["training"]["max_steps"])
    if waiting_steps and pace is None:
        return None, None
    return left + waiting_steps * (pace or 0.0), pace


def progress(state: dict[str, Any], manager: Any) -> tuple[int, int, float]:
    """(techniques finished, techniques queued, overall fraction counting the current run's steps)."""
    items = state.get("items", [])
    done = sum(item["state"] in FINAL_STATES or item["state"] == "skipped" for item in items)
    partial = 0.0
    for item in items:
        if item["state"] == "running" and item.get("run_id"):
            status = manager.status(item["run_id"])
            steps, total = int(status.get("step") or 0), int(status.get("max_steps") or 0)
            partial = steps / total if total else 0.0
    return done, len(items), (done + partial) / len(items) if items else 0.0
