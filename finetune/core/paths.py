"""The one gate for every filesystem path a request can name.

A visitor of the app names sources in form fields: an uploaded file, a bundled dataset, a Hub id, a model folder,
an adapter folder. Each handler asks this module before it reads anything, and the CLI's config loading does too,
so one set of rules decides what a request can reach:

- an upload is accepted only from gradio's own upload folder for this server (a ``data_file`` value naming any
  other file was not uploaded: refused);
- a bundled dataset only by its plain name under ``data/`` (``bundled:<name>``, no separators, no ``..``);
- a Hub name only as a Hub id, ``owner/name``;
- local files and folders (models, data, adapters) are an operator setting: allowed anywhere for a local
  ``python app.py`` and the CLI, off on a Space (``SPACE_ID`` set) unless the operator lists roots in
  ``LORA_LAB_LOCAL_ROOTS`` (os.pathsep-separated; listing roots also confines a local app to them), and
  ``LORA_LAB_LOCAL_PATHS=0`` turns them off everywhere. Symlinks are resolved before containment is checked.

Every refusal carries the same text (``REFUSED``): a message that differed for a missing and an existing file
would tell a visitor what exists outside the allowed roots. Tables and messages name a source through
``display_name``, which shows no server path and no other visitor's upload name.

Basic module: it imports nothing of the project but the config and the run folder's names.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from finetune.core.config import EMBEDDED_MODEL, ConfigError, RunConfig
from finetune.core.run_folder import UPLOADS_DIR, is_run_id

# The checkout: finetune/core/paths.py is two folders below it.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = PROJECT_ROOT / "data"
CONFIGS_DIR = PROJECT_ROOT / "configs"  # the YAML presets every form offers
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BUNDLED_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")
LOCAL_ROOTS_ENV = "LORA_LAB_LOCAL_ROOTS"
LOCAL_PATHS_ENV = "LORA_LAB_LOCAL_PATHS"
UPLOADED = "uploaded file"

REFUSED = ("Source refused: this server reads only uploaded files, bundled datasets (bundled:NAME), Hub ids "
           "(owner/name) and local paths its operator allows.")


class PathRefused(ConfigError):
    """A request named a path it may not reach; the message is always REFUSED. A ConfigError, so every handler
    that reports a bad form field reports a refused source the same way."""

    def __init__(self, field_name: str = "source") -> None:
        ValueError.__init__(self, REFUSED)
        self.problems = {field_name: REFUSED}


# --- the operator's settings -------------------------------------------------------------------------------

def local_roots() -> list[Path]:
    """The operator-listed folders local paths must lie under (LORA_LAB_LOCAL_ROOTS), symlinks resolved."""
    listed = os.environ.get(LOCAL_ROOTS_ENV, "")
    return [Path(part).expanduser().resolve() for part in listed.split(os.pathsep) if part.strip()]


def local_paths_mode() -> str:
    """'anywhere', 'roots' (only under local_roots()) or 'off'."""
    setting = os.environ.get(LOCAL_PATHS_ENV, "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return "off"
    if local_roots():
        return "roots"
    # A Space is a public server: its visitors must not browse its disk unless the operator says so.
    if setting in ("1", "true", "yes", "on") or not os.environ.get("SPACE_ID"):
        return "anywhere"
    return "off"


def upload_folder() -> Path:
    """Gradio's upload folder for this server: the same rule as gradio.utils.get_upload_folder (a test checks
    they agree), spelled here so that this basic module and the CLI need not import gradio."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


# --- the checks --------------------------------------------------------------------------------------------

def _text(value: Any) -> str:
    """The value as clean text; NUL and other control characters never name a real source."""
    if isinstance(value, dict):  # gradio's FileData, when a caller sends the upload descriptor itself
        value = value.get("path")
    if value is None:
        return ""
    if not isinstance(value, (str, os.PathLike)):
        raise PathRefused()
    text = str(value).strip()
    if any(ord(char) < 32 or ord(char) == 127 for char in text):
        raise PathRefused()
    return text


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _resolve(text: str) -> Path:
    try:
        return Path(text).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, an unknown ~user
        raise PathRefused() from None


def uploaded_file(value: Any) -> str:
    """An upload's path, if it really is a file in gradio's upload folder; '' for no upload."""
    text = _text(value)
    if not text:
        return ""
    path = _resolve(text)
    if not _inside(path, upload_folder()) or not path.is_file():
        raise PathRefused()
    return str(path)


def bundled_name(value: Any) -> str:
    """'bundled:<name>' of a folder directly under data/; whether it exists is data_sources.py's (public) answer."""
    text = _text(value)
    name = text.removeprefix("bundled:")
    if not text.startswith("bundled:") or not BUNDLED_NAME.match(name) or ".." in name:
        raise PathRefused()
    if (DATA_DIR / name).resolve().parent != DATA_DIR:  # data/<name> is a symlink leading elsewhere
        raise PathRefused()
    return text


def hub_id(value: Any) -> str:
    """A Hub id 'owner/name' ('' stays '', for the config's own 'must not be empty')."""
    text = _text(value)
    if text and (not HUB_ID.match(text) or ".." in text):
        raise PathRefused()
    return text


def hub_dataset(value: Any) -> str:
    """A Hub dataset to list or preview: a Hub id, or, where the operator allows local paths, a folder laid out as
    a Hub dataset repository (README with ``configs:``), which ``datasets`` reads without the Hub."""
    text = _text(value)
    if not text or _looks_like_hub_id(text, False, ()):
        return text
    return local_path(text)


def local_path(value: Any, operator: bool = False) -> str:
    """A local file or folder the operator allows, symlinks resolved; ``operator`` is the CLI's own config."""
    text = _text(value)
    if not text:
        return ""
    mode = "anywhere" if operator else local_paths_mode()
    if mode == "off":
        raise PathRefused()
    if mode == "anywhere":
        return text  # nothing to contain: the operator's own machine, paths as the operator wrote them
    path = _resolve(text)
    if not any(_inside(path, root) for root in local_roots()):
        raise PathRefused()
    return str(path)  # the resolved path is the one read, so a symlink swapped in later cannot lead out


def _looks_like_hub_id(text: str, operator: bool, suffixes: tuple[str, ...]) -> bool:
    if not HUB_ID.match(text) or ".." in text or Path(text).suffix.lower() in suffixes:
        return False
    # Where local paths are unrestricted a relative folder such as 'runs/x' may be meant; elsewhere existence is
    # not consulted at all, so the answer cannot tell a visitor whether such a path exists.
    return not ((operator or local_paths_mode() == "anywhere") and Path(text).expanduser().exists())


def data_source(value: Any, operator: bool = False) -> str:
    """A free-text data source: bundled name, Hub id or allowed local file."""
    text = _text(value)
    if not text:
        return ""
    if text.startswith("bundled:"):
        return bundled_name(text)
    if _looks_like_hub_id(text, operator, DATA_FILE_SUFFIXES):
        return text
    return local_path(text, operator)


def model_source(value: Any, operator: bool = False) -> str:
    """A model source: the embedded model, a Hub id or an allowed local folder."""
    text = _text(value)
    if not text or text == EMBEDDED_MODEL:
        return text
    if _looks_like_hub_id(text, operator, ()):
        return text
    return local_path(text, operator)


def run_id_or_folder(value: Any, operator: bool = False) -> str:
    """An earlier run named by its id (looked up under the runs folder only), or else an allowed local folder."""
    text = _text(value)
    if not text or is_run_id(text):
        return text
    return local_path(text, operator)


def check_config(cfg: RunConfig, operator: bool = False, data: bool = True) -> None:
    """Every source a config names through the gate; ConfigError names the refused fields (same text each).
    ``data=False`` leaves out the data source, for a handler that has gated it itself and put the app's own copy
    (a kept upload, exported feedback) in its place."""
    checks = {"model.source": lambda: model_source(cfg.model.source, operator)}
    if data:
        checks["data.source"] = lambda: data_source(cfg.data.source, operator)
    for name in ("start_adapter", "reward_model"):
        checks[f"preference.{name}"] = lambda name=name: run_id_or_folder(getattr(cfg.preference, name), operator)
    problems = {}
    for field_name, check in checks.items():
        try:
            check()
        except PathRefused:
            problems[field_name] = REFUSED
    if problems:
        raise ConfigError(problems)


# --- what a page may show of a source ------------------------------------------------------------------------

def display_name(source: str) -> str:
    """A source as tables and messages show it: names and Hub ids as they are, an upload as 'uploaded file',
    any other local path by its last part only (no server path, no other visitor's upload name)."""
    if not source or source == EMBEDDED_MODEL or source.startswith("bundled:"):
        return source
    if HUB_ID.match(source) and ".." not in source and not Path(source).is_absolute() \
            and Path(source).suffix.lower() not in DATA_FILE_SUFFIXES:
        return source
    path = Path(source)
    if UPLOADS_DIR in path.parts or _inside(_resolve_quietly(path), upload_folder()):
        return UPLOADED
    return path.name or source


# An absolute or home-relative path inside free text (a log line, an error): the folders, then the last part.
_PATH_IN_TEXT = re.compile(r"(?<![\w.~/])(?:~/|/)(?:[^\s/'\"`:,()\[\]]+/)+([^\s/'\"`:,()\[\]]*)")


def for_visitors(text: str) -> str:
    """Free text a page shows to every visitor (a training log's tail, a run's error): where visitors may not
    name local paths, each server path is cut to its last part, so logs never map the server's folders."""
    if not text or local_paths_mode() == "anywhere":
        return text
    return _PATH_IN_TEXT.sub(lambda match: UPLOADED if display_name(match.group(0)) == UPLOADED
                             else f"…/{match.group(1)}", text)


def _resolve_quietly(path: Path) -> Path:
    try:
        return path.expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return path
