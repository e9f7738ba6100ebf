"""Downloads (components.shared.downloadable): one copy per file version, inside gradio's own cache, so gradio
serves it without copying it again, and repeated clicks do not pile copies up. Real gradio, real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture()
def gradio_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "gradio-cache"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    return cache


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_a_download_is_copied_once_and_gradio_serves_that_copy(gradio_cache, tmp_path):
    import gradio as gr

    from components.downloads import download_folder, downloadable

    source = tmp_path / "runs" / "demo" / "demo-q8_0.gguf"
    source.parent.mkdir(parents=True)
    source.write_bytes(b"GGUF" + os.urandom(4096))
    first = Path(downloadable(source))
    assert first.read_bytes() == source.read_bytes() and first.name == source.name
    assert download_folder() in first.parents and Path(gr.utils.get_upload_folder()).resolve() in first.parents
    with gr.Blocks():
        files = gr.File()  # gradio's own step for a handler's output file: copy into the cache unless inside it
        assert files.move_resource_to_block_cache(str(first)) == str(first)
    assert Path(downloadable(source)) == first  # a second click on the same file: the same copy
    assert _files(gradio_cache) == [first]


def test_a_new_version_replaces_the_old_copy_and_other_files_keep_theirs(gradio_cache, tmp_path):
    from components.downloads import downloadable

    source = tmp_path / "a" / "pairs.jsonl"
    same_name = tmp_path / "b" / "pairs.jsonl"  # another run's file of the same name: its own copy
    for path, text in ((source, "one\n"), (same_name, "other\n")):
        path.parent.mkdir()
        path.write_text(text)
    old, other = Path(downloadable(source)), Path(downloadable(same_name))
    source.write_text("two, longer\n")  # rewritten: a new size (the mtime may not tick on a coarse clock)
    new = Path(downloadable(source))
    assert new != old and new.read_text() == "two, longer\n" and not old.parent.exists()
    assert other.read_text() == "other\n"
    assert _files(gradio_cache) == sorted([new, other])


def test_a_copy_still_being_written_is_left_alone(gradio_cache, tmp_path):
    """Another request copying the same file at this moment has a folder without the finished file: not removed."""
    from components.downloads import _download_key, download_folder, downloadable

    source = tmp_path / "demo.Modelfile"
    source.write_text("FROM ./demo.gguf\n")
    busy = download_folder() / f"{_download_key(source)}-0123"
    busy.mkdir(parents=True)
    (busy / ".demo.Modelfile.partial").write_text("FROM")
    emptied = download_folder() / f"{_download_key(source)}-4567"  # gradio's cache cleaning removed its file
    emptied.mkdir()
    copy = Path(downloadable(source))
    assert copy.read_text() == "FROM ./demo.gguf\n" and busy.is_dir() and not emptied.exists()
