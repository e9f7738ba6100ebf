"""Files offered for download: a copy of each in gradio's own cache (the only folder it serves files from besides the
temp folder and the working directory), one per version of the file, under a name no visitor can guess from the
file's path. Not a tab: every tab that offers a download uses it."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from pathlib import Path

from finetune.core.paths import upload_folder

DOWNLOAD_FOLDER = "lora-lab-download"


def download_folder() -> Path:
    """Where downloads are copied: a folder inside gradio's own cache (its upload folder). gradio copies a file it
    is handed into that cache unless the file is already inside it (``Block.move_resource_to_block_cache``), so a
    copy made here is the only one."""
    return upload_folder() / DOWNLOAD_FOLDER


def _download_key(path: Path) -> str:
    """The same for every copy of one server file, so older copies can be found and removed."""
    return hashlib.sha256(str(path.resolve()).encode("utf-8")).hexdigest()[:16]


def _copies(path: Path) -> list[Path]:
    """The folders holding copies of ``path`` (one file each, possibly gone or of an older version)."""
    root = download_folder()
    return sorted(root.glob(f"{_download_key(path)}-*")) if root.is_dir() else []


def _same_version(copy: Path, path: Path) -> bool:
    """A copy keeps its source's size and modification time (copy2), so a rewritten source no longer matches."""
    try:
        mine, source = copy.stat(), path.stat()
    except OSError:
        return False
    return (mine.st_size, mine.st_mtime_ns) == (source.st_size, source.st_mtime_ns)


def current_download(path: Path) -> Path | None:
    """The copy of ``path`` already offered for download, if it still matches the file."""
    return next((folder / path.name for folder in _copies(path) if _same_version(folder / path.name, path)), None)


def downloadable(path: Path) -> str:
    """A copy of ``path`` for a gr.File: gradio serves files only from its cache, the temp folder or the working
    directory, and the runs folder may be elsewhere (a Space's /data). A second click on an unchanged file reuses
    its copy; a new version replaces the old copies. The folder name carries a random part, so a copy's address
    cannot be guessed from the file's path."""
    path = Path(path)
    copy = current_download(path) or _fresh_copy(path)
    for folder in _copies(path):
        if folder != copy.parent and _stale(folder, path):
            shutil.rmtree(folder, ignore_errors=True)
    return str(copy)


def _stale(folder: Path, path: Path) -> bool:
    """A copy of an older version, or an emptied folder (gradio's cache cleaning); not a copy another request is
    still writing, nor a second copy of this version made by a request at the same time."""
    copy = folder / path.name
    if copy.exists():
        return not _same_version(copy, path)
    return not _staging(folder, path).exists()


def _staging(folder: Path, path: Path) -> Path:
    return folder / f".{path.name}.partial"  # never offered: a copy is complete once it has its name


def _fresh_copy(path: Path) -> Path:
    folder = download_folder() / f"{_download_key(path)}-{secrets.token_hex(16)}"
    folder.mkdir(parents=True)
    staging = _staging(folder, path)
    try:
        shutil.copy2(path, staging)
        os.replace(staging, folder / path.name)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder / path.name
