"""Export on the CPU with real peft/transformers: the zip reloads, the merge equals the adapter, the card renders.

One short real QLoRA run of the tiny model (4-bit base) feeds every test. The Hub cannot be reached here, so the
push tests hand ``push_folder`` a recording stand-in for huggingface_hub's HfApi and check the calls it gets.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from finetune.core.config import save_config
from finetune.services.export import (ExportError, adapter_format, draw_loss_plot, losses, merge_adapter, model_card,
                                      push_folder, write_model_card, zip_adapter)

from helpers import copy_run, tiny_run_config

IDS = torch.tensor([[1, 20, 300, 4000, 50, 600, 7000, 80]])


@pytest.fixture(scope="module")
def trained_run(lab_note_run, tmp_path_factory) -> Path:
    return copy_run(lab_note_run, tmp_path_factory.mktemp("export"))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def test_zip_reloads_with_peft_from_pretrained(trained_run, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    archive = zip_adapter(trained_run)
    with zipfile.ZipFile(archive) as handle:
        names = set(handle.namelist())
        handle.extractall(tmp_path / "unzipped")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "loss.png"} <= names
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain = _logits(base)
    from_zip = _logits(PeftModel.from_pretrained(base, tmp_path / "unzipped"))
    assert not torch.allclose(plain, from_zip)  # the adapter does something...
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    from_run = _logits(PeftModel.from_pretrained(base, trained_run / "adapter"))
    assert torch.equal(from_zip, from_run)  # ...and the zip carries exactly the trained weights


def test_merge_into_original_precision_equals_full_precision_base_plus_adapter(trained_run, tiny_model_dir,
                                                                               tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged_dir = merge_adapter(trained_run, tmp_path / "merged", into="original")
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config  # a standalone, dequantized model
    assert not list(merged_dir.glob("adapter_*"))  # no adapter left: the update is inside the weights
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    # The adapter was trained on the 4-bit base; this merge adds it to the unquantized base in fp32 (CPU compute).
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                          trained_run / "adapter")
    expected, got = _logits(reference), _logits(merged)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
    assert not torch.allclose(got, _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir)), atol=1e-3)
    assert (merged_dir / "tokenizer.json").is_file() and (merged_dir / "README.md").is_file()
    assert "original-precision base" in (merged_dir / "README.md").read_text(encoding="utf-8")


def _greedy(model, tokenizer, prompt: str) -> str:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_default_merge_is_the_model_chatted_with(trained_run, tmp_path):
    """The default merge folds the adapter into the dequantized 4-bit base it trained against: its logits equal
    the adapter on the 4-bit base (as in Chat), its greedy answer equals the Chat tab's, and the merge into
    original-precision weights is measurably further away on the run's own held-out rows."""
    from transformers import AutoModelForCausalLM

    from finetune.services.chat import ChatEngine, SamplingSettings
    from finetune.services.export import merge_report, run_config

    merged_dir = merge_adapter(trained_run, tmp_path / "merged")
    assert "dequantized" in (merged_dir / "README.md").read_text(encoding="utf-8")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    cfg = run_config(trained_run)
    engine = ChatEngine()
    entry = engine.attach(cfg.model, "run", trained_run / "adapter")
    entry.model.set_adapter("run")
    with torch.no_grad():
        chatted = entry.model(input_ids=IDS).logits.float()
    original_dir = merge_adapter(trained_run, tmp_path / "original", into="original")
    original = AutoModelForCausalLM.from_pretrained(original_dir).eval()
    # Not bit-equal: the CPU 4-bit kernel rounds differently from a float matmul (1e-3 here, the base alone
    # too); the original-precision merge carries the whole quantization error (5e-2 here).
    trained_gap, original_gap = ((_logits(m) - chatted).abs().max() for m in (merged, original))
    assert trained_gap * 10 < original_gap, (trained_gap, original_gap)
    for prompt in ("What does setting 3 control?", "Hello there"):
        chat_answer = engine.answer_pair(prompt, [], [], cfg.model, "run", trained_run / "adapter",
                                         SamplingSettings(max_new_tokens=12, temperature=0.0))[1]
        assert _greedy(merged, entry.tokenizer, prompt) == chat_answer

    trained_report, original_report = merge_report(trained_run, merged_dir), merge_report(trained_run, original_dir)
    assert trained_report.held_out and trained_report.rows >= 2
    assert trained_report.adapter_loss == original_report.adapter_loss  # same rows, same adapter
    assert abs(trained_report.difference) < abs(original_report.difference)
    assert f"{trained_report.merged_loss:.4f}" in trained_report.summary()


def test_merge_refuses_an_unknown_target(trained_run, tmp_path):
    with pytest.raises(ExportError, match="Merge into 'trained' or 'original'"):
        merge_adapter(trained_run, tmp_path / "merged", into="fp8")


def test_model_card_renders_with_losses_and_plot(trained_run):
    from markdown_it import MarkdownIt
    from PIL import Image

    card_path = write_model_card(trained_run, trained_run / "adapter")
    text = card_path.read_text(encoding="utf-8")
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["library_name"] == "peft" and "lora" in header["tags"]
    assert "base_model" not in header  # a local folder is not a Hub id: no broken link on the Hub
    from finetune.services.export import run_config

    cfg = run_config(trained_run)  # the card is shown and published: no server path in it (issue 16)
    assert cfg.model.source not in text and cfg.data.source not in text
    assert f"`{Path(cfg.model.source).name}`" in text and f"`{Path(cfg.data.source).name}`" in text
    curves = losses(trained_run)
    assert len(curves.train) == 4 and len(curves.eval) >= 2
    html = MarkdownIt().enable("table").render(text.split("---\n", 2)[2])
    assert "<table>" in html and '<img src="loss.png"' in html
    assert f"<td>{curves.final_train:.4f}</td>" in html and f"<td>{curves.final_eval:.4f}</td>" in html
    assert "<td>4 / 8 / 0</td>" in html  # rank / alpha / dropout of tiny_run_config
    image = Image.open(trained_run / "adapter" / "loss.png")
    assert image.format == "PNG" and image.size == (640, 360)
    colours = {c for _, c in image.getcolors(maxcolors=1 << 16)}
    assert (37, 99, 235) in colours and (234, 88, 12) in colours  # both curves were drawn


def test_card_names_hub_base_and_dataset(tmp_path, tiny_model_dir):
    from finetune.core.config import from_dict

    run_dir = tmp_path / "hub-run"
    run_dir.mkdir()
    cfg = from_dict({"model": {"source": "smollm2-135m-instruct"}, "data": {"source": "tatsu-lab/alpaca"}})
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.5}) + "\n")
    header = yaml.safe_load(model_card(run_dir, merged=True).split("---\n")[1])
    assert header["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert header["datasets"] == ["tatsu-lab/alpaca"] and header["library_name"] == "transformers"
    assert draw_loss_plot(losses(tmp_path), tmp_path / "none.png") is None  # no metrics, no empty plot


class RecordingHfApi:
    """Stands in for huggingface_hub.HfApi (the Hub cannot be reached here): records each call."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name):
        def record(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return f"https://huggingface.co/{args[0] if args else kwargs.get('repo_id')}"
        return record


def test_push_creates_the_repo_and_uploads_the_folder(trained_run):
    api = RecordingHfApi()
    write_model_card(trained_run, trained_run / "adapter")
    url = push_folder(trained_run / "adapter", "me/tiny-lora", "hf_user_token", private=True, api=api)
    assert url == "https://huggingface.co/me/tiny-lora"
    (create, args, kwargs), (upload, _, upload_kwargs) = api.calls
    assert create == "create_repo" and args == ("me/tiny-lora",)
    assert kwargs == {"token": "hf_user_token", "private": True, "repo_type": "model", "exist_ok": True}
    assert upload == "upload_folder" and upload_kwargs["repo_id"] == "me/tiny-lora"
    assert Path(upload_kwargs["folder_path"]) == trained_run / "adapter"
    assert upload_kwargs["token"] == "hf_user_token" and upload_kwargs["repo_type"] == "model"


def test_push_refuses_bad_input_before_touching_the_hub(trained_run, tmp_path):
    api = RecordingHfApi()
    with pytest.raises(ExportError, match="user/name"):
        push_folder(trained_run / "adapter", "not a repo", "hf_x", api=api)
    with pytest.raises(ExportError, match="write token"):
        push_folder(trained_run / "adapter", "me/x", "  ", api=api)
    with pytest.raises(ExportError, match="neither an adapter nor a model"):
        push_folder(tmp_path, "me/x", "hf_x", api=api)
    assert api.calls == []
    from finetune.core.models import ModelSourceError

    with pytest.raises(ModelSourceError, match="Cannot reach the Hugging Face Hub"):  # HF_HUB_OFFLINE=1 here
        push_folder(trained_run / "adapter", "me/x", "hf_x")


def test_export_of_a_run_without_adapter_says_so(tmp_path, tiny_model_dir, qa_file):
    save_config(tiny_run_config(tiny_model_dir, qa_file), tmp_path / "config.yaml")
    with pytest.raises(ExportError, match="no saved adapter"):
        zip_adapter(tmp_path)
    with pytest.raises(ExportError, match="no saved adapter"):
        merge_adapter(tmp_path)
    from finetune.services.export import run_config

    with pytest.raises(ExportError, match="not a LoRA Lab run folder"):
        run_config(tmp_path / "missing")


def test_adapter_format_tells_apart_different_adapters(trained_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained_run / "adapter", copy)
    assert adapter_format(copy) == adapter_format(trained_run / "adapter")
    config = json.loads((copy / "adapter_config.json").read_text())
    config["r"] = 16
    (copy / "adapter_config.json").write_text(json.dumps(config))
    assert adapter_format(copy) != adapter_format(trained_run / "adapter")


def test_model_card_names_the_stage_and_method_that_trained_it(trained_run, tmp_path):
    """A DPO run and an IA3 SFT run must not both be described as 'SFTTrainer, PEFT LoRA'."""
    import shutil

    from finetune.core.config import save_config
    from finetune.services.export import run_config

    for stage, method, trainer, rank_row in (("dpo", "lora", "DPOTrainer", True), ("sft", "ia3", "SFTTrainer", False)):
        run_dir = tmp_path / f"{stage}-{method}"
        shutil.copytree(trained_run, run_dir)
        cfg = run_config(run_dir)
        cfg.stage, cfg.lora.method = stage, method
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "adapter" / "lora_lab_config.yaml").unlink()  # so the card reads the edited config
        card = model_card(run_dir)
        header = yaml.safe_load(card.split("---\n")[1])
        assert stage in header["tags"] and method in header["tags"]
        assert f"TRL `{trainer}`" in card and ("LoRA rank / alpha / dropout" in card) == rank_row


class SnapshotHfApi(RecordingHfApi):
    """RecordingHfApi that also keeps the uploaded folder's file texts (the copy is removed after the push)."""

    def __init__(self):
        super().__init__()
        self.uploaded: dict[str, str] = {}

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", (), kwargs))
        folder = Path(kwargs["folder_path"])
        self.uploaded = {p.name: p.read_text(encoding="utf-8", errors="replace") for p in folder.rglob("*")
                         if p.is_file() and p.suffix in (".json", ".yaml", ".md")}


def test_zip_and_push_name_no_server_path(trained_run):
    """A shared Space lets anyone download any run's zip: the sources inside are names, never server paths."""
    from finetune.services.export import run_config

    cfg = run_config(trained_run)
    server_paths = [cfg.data.source, cfg.model.source, str(Path(cfg.model.source).parent)]
    assert all("/" in path for path in server_paths)  # this run's sources really are server paths
    with zipfile.ZipFile(zip_adapter(trained_run)) as archive:
        texts = {name: archive.read(name).decode("utf-8", "replace") for name in archive.namelist()
                 if not name.endswith((".png", ".safetensors"))}
    api = SnapshotHfApi()
    push_folder(trained_run / "adapter", "me/tiny-lora", "hf_user_token", api=api, run_dir=trained_run)
    for shared in (texts, api.uploaded):
        assert {"adapter_config.json", "lora_lab_config.yaml"} <= set(shared)
        assert not [name for name, text in shared.items() for path in server_paths if path in text]
        assert yaml.safe_load(shared["lora_lab_config.yaml"])["data"]["source"] == "qa.jsonl"
    assert not list(Path(api.calls[-1][2]["folder_path"]).parent.glob("*"))  # the temporary copy is gone
    assert cfg.data.source in (trained_run / "adapter" / "lora_lab_config.yaml").read_text()  # run kept intact
