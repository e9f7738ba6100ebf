"""A finished run as one GGUF file for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile beside it.

    python -m finetune.services.gguf_export runs/demo --type q8_0   # runs/demo/export/gguf/demo-q8_0.gguf + .Modelfile
    python -m finetune.services.gguf_export runs/demo --plan        # sizes, folders and free disk, before building
    HF_TOKEN=... python -m finetune.services.gguf_export runs/demo --push me/demo-gguf   # the file + model card
    result = write_gguf("runs/demo", "q4_0")                        # the same from Python; result.summary() says what

The adapter is first merged (``finetune.services.export.merge_adapter``; by default into the weights it trained
against, so the file answers like the Chat tab), then converted (gguf_convert.py). The build is planned first
(gguf_plan.py: refused before merging when the disk lacks room), one build per run at a time (``BuildLock``), and
a file of the same run, type and adapter built before is reused. Pushing is gguf_hub.py's, measuring
gguf_measure.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any

from finetune.core.data import first_line
from finetune.core.models import ModelSourceError
from finetune.core.run_folder import BUILDING_MARKER, EXPORT_DIR, GGUF_DIR, MERGED_DIR, PARTIAL_SUFFIX
from finetune.core.storage import disk_full_message, is_disk_full
from finetune.services.export import ExportError, Progress, check_merge_target, merge_adapter, no_progress
from finetune.services.gguf_convert import GGUF_TYPES, GgufExport, convert_folder, modelfile_text, ollama_command
from finetune.services.gguf_hub import push_gguf
from finetune.services.gguf_plan import (adapter_fingerprint, cached_export, checked_run, disk_plan, gguf_path,
                                         info_path, merged_reusable, metadata_name, plan_checked_run)


# --- one export per run at a time ---------------------------------------------------------------------------------

_building: set[str] = set()


# --- one export per run at a time ---------------------------------------------------------------------------------

_building_lock = threading.Lock()


class BuildLock:
    """Refuses a second GGUF export of the same run while one builds: in this process (a set) and across
    processes (a lock file holding host and pid; one left by a dead process is taken over)."""

    def __init__(self, run_dir: Path, out_type: str) -> None:
        self.key = str(run_dir.resolve())
        self.path = run_dir / EXPORT_DIR / GGUF_DIR / BUILDING_MARKER
        self.out_type = out_type

    def __enter__(self) -> "BuildLock":
        with _building_lock:
            if self.key in _building:
                raise ExportError(self._busy(self._holder()))
            _building.add(self.key)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._take_file()
        except BaseException:
            with _building_lock:
                _building.discard(self.key)
            raise
        return self

    def _take_file(self) -> None:
        for _ in range(2):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._alive(self._holder()):
                    raise ExportError(self._busy(self._holder())) from None
                self.path.unlink(missing_ok=True)  # left by a process that died mid-build
                continue
            with os.fdopen(handle, "w") as out:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "type": self.out_type}, out)
            return
        raise ExportError(self._busy(self._holder()))

    def _holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _alive(holder: dict[str, Any]) -> bool:
        if holder.get("host") not in (None, socket.gethostname()):
            return True  # another machine's build: cannot check, so respect it
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except (OSError, ValueError):
            return False
        return True

    def _busy(self, holder: dict[str, Any]) -> str:
        what = f" ({holder['type']})" if holder.get("type") else ""
        return (f"A GGUF export of run '{Path(self.key).name}'{what} is already being built; wait for it to "
                "finish, then export again (finished files are reused).")

    def __exit__(self, *exc: Any) -> None:
        self.path.unlink(missing_ok=True)
        with _building_lock:
            _building.discard(self.key)


# --- building -----------------------------------------------------------------------------------------------------

def merged_for(run_dir: Path, into: str, progress: Progress) -> Path:
    """The run's merged model, reusing run/merged when it is current (``merged_reusable``)."""
    if merged_reusable(run_dir, into):
        progress(0.3, "Reusing the merged model in merged/")
        return run_dir / MERGED_DIR
    return merge_adapter(run_dir, progress=lambda f, m: progress(0.3 * f, m), into=into)


def write_gguf(run_dir: str | Path, out_type: str = "q8_0", into: str = "trained",
               progress: Progress = no_progress, downloads: tuple[str | Path, ...] = ()) -> GgufExport:
    """Merge the run's adapter and write it as a GGUF of ``out_type`` plus an Ollama Modelfile, into
    ``run/export/gguf/``. Reuses a file of the same run, type and adapter written before; refuses before merging
    when the disk lacks room for the merged model, the file and a copy in each of ``downloads`` (``disk_plan``)."""
    run_dir = Path(run_dir)
    run = checked_run(run_dir, out_type, into)
    out_type, into = run.out_type, run.into
    with BuildLock(run_dir, out_type):
        cached = cached_export(run_dir, out_type, into)
        if cached is not None:
            progress(1.0, "Reusing the file exported before")
            return cached
        plan_checked_run(run_dir, run, downloads).check()
        fingerprint = adapter_fingerprint(run_dir, into)
        merged = merged_for(run_dir, into, progress)
        target = gguf_path(run_dir, out_type)
        result = convert_folder(merged, target, out_type, run.tokenizer, metadata_name(run_dir, out_type),
                                progress=lambda f, m: progress(0.3 + 0.68 * f, m))
        _finish(result, target, {"fingerprint": fingerprint, "into": into, "weights": result.weights,
                                 "tensor_types": result.tensor_types, "kept": result.kept}, run.tokenizer)
        progress(1.0, "GGUF written")
        return result


def _finish(result: GgufExport, target: Path, info: dict[str, Any], tokenizer: Any) -> None:
    """The Modelfile and the build record beside the GGUF. If either cannot be written (a full disk), the GGUF goes
    too: a file without its record would be built again anyway, and its space is what the visitor needs back."""
    try:
        result.modelfile.write_text(modelfile_text(target.name, tokenizer), encoding="utf-8")
        info_path(target).write_text(json.dumps(info), encoding="utf-8")
    except OSError as error:
        for path in (target, result.modelfile, info_path(target)):
            path.unlink(missing_ok=True)
        if is_disk_full(error):
            raise ExportError(disk_full_message("writing the GGUF's Modelfile (the GGUF was removed)",
                                                "build it again")) from None
        raise ExportError(f"Writing the GGUF's Modelfile failed ({first_line(error)}); the GGUF was removed.") \
            from None


def zip_merged(run_dir: str | Path, into: str = "trained", progress: Progress = no_progress) -> Path:
    """run/export/<run>-merged.zip: the merged model (safetensors, config, tokenizer, model card) for download,
    merging first when run/merged is missing, older than the adapter, or merged into another target."""
    run_dir = Path(run_dir)
    merged = merged_for(run_dir, check_merge_target(into), lambda f, m: progress(0.7 * f / 0.3, m))
    target = run_dir / EXPORT_DIR / f"{run_dir.name}-merged.zip"
    partial = target.with_name(target.name + PARTIAL_SUFFIX)  # a download never sees half a zip
    progress(0.75, "Zipping the merged model")
    try:
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as archive:  # weights do not compress
            for path in sorted(merged.rglob("*")):
                if path.is_file():
                    archive.write(path, f"{run_dir.name}-merged/{path.relative_to(merged).as_posix()}")
        os.replace(partial, target)
    except OSError as error:
        if is_disk_full(error):
            raise ExportError(disk_full_message("zipping the merged model (the partial zip was removed)")) from None
        raise ExportError(f"Zipping the merged model failed ({first_line(error)}); nothing was left behind.") \
            from None
    finally:
        partial.unlink(missing_ok=True)
    progress(1.0, "Zipped")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.services.gguf_export",
                                     description="Write a finished run as a GGUF file for llama.cpp / Ollama.")
    parser.add_argument("run_dir", help="the run folder (runs/<id>)")
    parser.add_argument("--type", default="q8_0", help=f"one of {', '.join(GGUF_TYPES)} (default q8_0)")
    parser.add_argument("--into", default="trained", help="merge target: trained (default) or original")
    parser.add_argument("--plan", action="store_true",
                        help="only say what building would write, how big, where, and the free disk there")
    parser.add_argument("--push", metavar="REPO_ID",
                        help="push the built file, its Modelfile and a model card to this Hub repo (token: HF_TOKEN)")
    parser.add_argument("--public", action="store_true", help="with --push: make a new repo public")
    args = parser.parse_args(argv)
    try:
        if args.plan:
            print(disk_plan(args.run_dir, args.type, args.into).summary())
            return 0
        if args.push:
            url = push_gguf(args.run_dir, args.type, args.push, os.environ.get("HF_TOKEN"), private=not args.public)
            print(f"Pushed to {url}")
            return 0
        result = write_gguf(args.run_dir, args.type, args.into,
                            progress=lambda f, m: print(f"[{f:4.0%}] {m}", file=sys.stderr))
    except (ExportError, ModelSourceError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # the Hub's own refusals (bad token, no write access), one line, never the token
        if not args.push:
            raise
        print(f"error: the Hub refused the push: {type(error).__name__}: {first_line(error)}", file=sys.stderr)
        return 2
    print(result.summary())
    print(f"Ollama: {ollama_command(result, in_folder=True)}")  # the CLI runs on the machine that has the file
    return 0


if __name__ == "__main__":
    sys.exit(main())
