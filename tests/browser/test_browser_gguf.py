"""The Export tab's "Take it home" section in a real headless Chromium: before building, the plan shows the sizes
of what a build writes; a q8_0 GGUF of a trained run is built, the page shows its size, bits per weight and the
Ollama command, both downloads (the GGUF file and its Modelfile) come through the browser as the files the run
wrote, and the plan then says nothing new is written. The Hub push cannot reach the Hub here: its API endpoint is
called through gradio_client for the refusals it makes before any upload (an unbuilt type, an empty token).

One short real QLoRA run of the tiny Llama (4-bit base) is trained first. Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import app_client, ARTIFACTS, browser_page, copy_run, served_app, UI_WAIT

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app_with_a_run(tmp_path_factory, lab_note_run):
    root = tmp_path_factory.mktemp("gguf-runs")
    run_dir = copy_run(lab_note_run, root)
    with served_app(root) as url:
        yield url, run_dir


def _download(page, files_id: str, name: str) -> Path:
    """Click the named file's link in a gr.File (the link shows the size; its download attribute holds the name)
    and return where the browser saved it."""
    with page.expect_download(timeout=UI_WAIT) as download:
        page.locator(f'#{files_id} a[download="{name}"]').click()
    return Path(download.value.path())


def test_take_it_home_builds_a_q8_0_gguf_and_its_downloads_work(app_with_a_run):
    from gguf import GGUFReader, LlamaFileType
    from playwright.sync_api import expect

    from finetune.services.gguf_plan import disk_plan, gguf_path

    url, run_dir = app_with_a_run
    with browser_page(url) as page:
        page.get_by_role("tab", name="Export").click()
        expect(page.locator("#export-run input").first).to_have_value(run_dir.name, timeout=UI_WAIT)
        page.get_by_text("Take it home: GGUF for llama.cpp / Ollama").click()
        expect(page.locator("#export-gguf-type input").first).to_have_value("q8_0")
        plan = page.locator("#export-gguf-plan")
        before = disk_plan(run_dir, "q8_0")  # sizes counted from the config and tokenizer, nothing built yet
        merged, gguf = before.landings
        expect(plan).to_contain_text(f"merged model: about {merged.size_bytes / 2**20:.1f} MB", timeout=UI_WAIT)
        expect(plan).to_contain_text(f"q8_0 GGUF: about {gguf.size_bytes / 2**20:.1f} MB")
        expect(plan).to_contain_text("download copy")
        expect(plan).to_contain_text("There is room for it.")
        assert not gguf_path(run_dir, "q8_0").exists()  # the plan wrote nothing
        page.locator("#export-gguf").click()
        message = page.locator("#export-gguf-message")
        expect(message).to_contain_text("bits per weight", timeout=180_000)  # merge + write on a shared CPU

        written = gguf_path(run_dir, "q8_0")  # what the build left in the run's folder
        size = written.stat().st_size
        expect(message).to_contain_text(f"{written.name}: {size / 2**20:.1f} MB")
        expect(message).to_contain_text(f"ollama create {written.stem} -f {written.stem}.Modelfile")
        expect(message).to_contain_text(f"llama-cli -m {written.name}")

        gguf_file = _download(page, "export-gguf-files", written.name)
        assert gguf_file.read_bytes() == written.read_bytes()
        assert GGUFReader(gguf_file).fields["general.file_type"].contents() == LlamaFileType.MOSTLY_Q8_0
        modelfile = _download(page, "export-gguf-files", f"{written.stem}.Modelfile")
        assert f"FROM ./{written.name}\n" in modelfile.read_text(encoding="utf-8")
        assert size == gguf.size_bytes  # what the plan said before building
        expect(plan).to_contain_text("Nothing new is written", timeout=UI_WAIT)
        expect(plan).to_contain_text("already built, reused")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "export-gguf.png"), full_page=True)


def test_the_push_endpoint_refuses_an_unbuilt_type_and_an_empty_token(app_with_a_run):
    """No Hub here: the refusals made before any upload, through the app's own API (the 'Push GGUF file' button)."""
    from gradio_client.exceptions import AppError

    url, run_dir = app_with_a_run
    client = app_client(url)
    with pytest.raises(AppError, match="has no f16 GGUF yet: build it first"):
        client.predict(run_dir.name, "f16", "me/tiny-gguf", "hf_not_a_real_token", True, api_name="/push_gguf")
    with pytest.raises(AppError, match="write token is needed"):
        client.predict(run_dir.name, "q8_0", "me/tiny-gguf", "", True, api_name="/push_gguf")
    plan = client.predict(run_dir.name, "f16", "Weights it trained against (answers as in Chat)",
                          api_name="/gguf_plan")
    assert "f16 GGUF: about" in plan and "Nothing new" not in plan  # an unbuilt type is still to be written
