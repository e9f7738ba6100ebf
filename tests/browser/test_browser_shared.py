"""Two visitors of a shared app in one headless Chromium, each in their own browser context (their own cookies),
signed in through the dev stand-in for "Sign in with Hugging Face" (/dev-sign-in?user=NAME; the real one needs
huggingface.co, which tests cannot reach). Alice's finished run is shown to her with Delete, not to Bob; her
Delete asks for confirmation, then removes it."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.core.config import save_config
from finetune.core.run_status import write_status

from helpers import ARGS, ARTIFACTS, CHROMIUM, patient_expect, served_app, tiny_run_config, UI_WAIT


def _alices_run(root: Path, tiny_model_dir: Path, qa_file: Path) -> str:
    """A finished run of Alice's as it lies on disk (config, status with its owner, an adapter-sized file)."""
    folder = root / "alice-run-20261130-000000"
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 4096)
    save_config(tiny_run_config(tiny_model_dir, qa_file), folder / "config.yaml")
    write_status(folder, state="completed", owner="alice", step=3, max_steps=3, duration=1.0)
    return folder.name


def test_each_visitor_sees_and_deletes_only_their_own_runs(tmp_path, monkeypatch, tiny_model_dir, qa_file):
    if not Path(CHROMIUM).is_file():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import expect, sync_playwright

    monkeypatch.setenv("LORA_LAB_SIGN_IN", "dev")
    root = tmp_path / "runs"
    run_id = _alices_run(root, tiny_model_dir, qa_file)
    with served_app(root) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        alice, bob = (browser.new_context(viewport={"width": 1400, "height": 1000}).new_page() for _ in range(2))
        patient_expect()
        for page, name in ((alice, "alice"), (bob, "bob")):
            page.set_default_timeout(UI_WAIT)
            page.goto(f"{url}dev-sign-in?user={name}")  # back on the app's page, signed in
            expect(page.locator("#who")).to_contain_text(f"Signed in as {name}", timeout=UI_WAIT)
            page.get_by_role("tab", name="Train").click()  # the app opens on the course ("Start here")
            expect(page.locator("#disk-usage")).to_contain_text("Runs use", timeout=UI_WAIT)

        expect(alice.locator("#run-history")).to_contain_text(run_id, timeout=UI_WAIT)
        expect(alice.locator("#run-history")).to_contain_text("owner")
        expect(bob.locator("#run-history")).not_to_contain_text(run_id)

        box = alice.locator("#delete-run-id input").first
        box.fill(run_id)
        box.press("Enter")
        alice.locator("#delete-run").click()
        expect(alice.locator("#delete-note")).to_contain_text("for good", timeout=UI_WAIT)
        assert (root / run_id).is_dir()  # the first press only asks
        alice.screenshot(path=str(ARTIFACTS / "shared-delete-confirm.png"), full_page=True)
        alice.locator("#confirm-delete").click()
        expect(alice.locator("#delete-note")).to_contain_text("Deleted run", timeout=UI_WAIT)
        expect(alice.locator("#run-history")).not_to_contain_text(run_id, timeout=UI_WAIT)
        assert not (root / run_id).exists()
        bob.screenshot(path=str(ARTIFACTS / "shared-bob.png"), full_page=True)
        browser.close()
