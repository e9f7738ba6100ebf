import pytest
import torch

from helpers import connection_attempts
from finetune.core.config import ModelConfig
from finetune.core.hardware import profile_for
from finetune.core.models import (ModelSourceError, count_parameters, embedded_model_dir, load_model, load_tokenizer,
                                  model_source_kind, save_tokenizer, to_bnb_config)

CPU = profile_for("cpu", "CPU", 24.0)


def linear_class_names(model) -> set[str]:
    return {type(m).__name__ for m in model.model.layers[0].modules()}


@pytest.mark.parametrize("bits, layer", [(4, "Linear4bit"), (8, "Linear8bitLt"), (16, "Linear"), (32, "Linear")])
def test_loads_at_each_bit_width_on_cpu(tiny_model_dir, bits, layer):
    model = load_model(ModelConfig(source=str(tiny_model_dir), bits=bits), CPU)
    assert layer in linear_class_names(model)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def test_fewer_bits_use_less_memory(tiny_model_dir):
    # The decoder layers are what gets quantized; the tiny model's embedding table would hide the difference.
    def layer_bytes(bits: int) -> int:
        model = load_model(ModelConfig(source=str(tiny_model_dir), bits=bits), CPU)
        return sum(p.numel() * p.element_size() for p in model.model.layers.parameters())

    sizes = {bits: layer_bytes(bits) for bits in (4, 8, 16, 32)}
    assert sizes[4] < sizes[8] < sizes[16] < sizes[32]


def test_4bit_parameter_count_is_not_halved(tiny_model_dir):
    full = load_model(ModelConfig(source=str(tiny_model_dir), bits=32), CPU)
    quantized = load_model(ModelConfig(source=str(tiny_model_dir), bits=4), CPU)
    assert count_parameters(quantized)[1] == count_parameters(full)[1]


def test_bnb_config_follows_the_model_config():
    four = to_bnb_config(ModelConfig(bits=4, quant_type="fp4", double_quant=False), CPU)
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "fp4" and not four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.float32  # CPU rule
    t4 = profile_for("cuda", "T4", 15.0, (7, 5))
    assert to_bnb_config(ModelConfig(bits=4), t4).bnb_4bit_compute_dtype == torch.float16
    assert to_bnb_config(ModelConfig(bits=8), CPU).load_in_8bit
    assert to_bnb_config(ModelConfig(bits=16), CPU) is None


def test_embedded_model_loads_from_cache_and_chats(embedded_dir):
    """"From cache" means the GGUF is converted once: later loads read the converted folder and write nothing."""
    weights = embedded_dir / "model.safetensors"
    assert weights.is_file()
    before = {path.name: path.stat().st_mtime_ns for path in embedded_dir.parent.iterdir()}
    weights_before = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    cfg = ModelConfig(bits=32)
    model, tokenizer = load_model(cfg, CPU), load_tokenizer(cfg)
    assert embedded_model_dir() == embedded_dir
    # No new conversion (it would leave a staging folder or replace the weights file) happened.
    assert {path.name: path.stat().st_mtime_ns for path in embedded_dir.parent.iterdir()} == before
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == weights_before
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_a_saved_tokenizer_records_its_added_tokens_and_loads_the_same(embedded_dir, tmp_path, monkeypatch):
    """The added tokens go into tokenizer_config.json (a load without them parses the whole tokenizer.json in
    Python, 4x the CPU); the tokenizer loaded from either folder encodes, decodes and formats chats alike."""
    import json
    import shutil

    from transformers import AutoTokenizer

    plain = tmp_path / "plain"
    shutil.copytree(embedded_dir, plain, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder", None)  # as transformers 5 saves it, and as older caches hold it
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    original = AutoTokenizer.from_pretrained(plain)
    save_tokenizer(original, tmp_path / "recorded")
    recorded = json.loads((tmp_path / "recorded" / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert recorded["0"] == {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True}
    assert len(recorded) == len(original.added_tokens_decoder) > 2
    loaded = AutoTokenizer.from_pretrained(tmp_path / "recorded")
    text = "<|im_start|>user\nWhat does LoRA dropout do? 🧪<|im_end|> é"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_end|> there"}]
    assert loaded(text)["input_ids"] == original(text)["input_ids"]
    assert loaded.decode(original(text)["input_ids"]) == text
    assert loaded.apply_chat_template(chat, tokenize=True) == original.apply_chat_template(chat, tokenize=True)
    assert loaded.added_tokens_decoder == original.added_tokens_decoder
    assert loaded.all_special_tokens == original.all_special_tokens
    # A cache converted before the tokens were recorded gets them on its next use, nothing else rewritten.
    monkeypatch.setenv("LORA_LAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "models").mkdir(parents=True)
    old = shutil.copytree(plain, tmp_path / "cache" / "models" / embedded_dir.name)
    (old / "model.safetensors").write_bytes(b"")  # only its presence matters: the repair must not touch it
    assert embedded_model_dir(embedded_dir.name) == old
    assert json.loads((old / "tokenizer_config.json").read_text())["added_tokens_decoder"] == recorded
    assert (old / "model.safetensors").read_bytes() == b""
    assert sorted(p.name for p in old.iterdir()) == sorted([p.name for p in plain.iterdir()] + ["model.safetensors"])


def test_tokenizer_has_pad_token_and_chat_template(tiny_model_dir):
    tokenizer = load_tokenizer(ModelConfig(source=str(tiny_model_dir)))
    assert tokenizer.pad_token is not None and tokenizer.chat_template


def test_hub_id_offline_fails_fast_with_a_suggestion(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts = connection_attempts(monkeypatch)
    with pytest.raises(ModelSourceError) as caught:
        load_tokenizer(ModelConfig(source="someone/not-cached-model", bits=16))
    assert "Cannot reach the Hugging Face Hub" in str(caught.value)
    assert "smollm2-135m-instruct" in str(caught.value)
    assert attempts == []  # it knew without trying the network


# "../…" names a folder beside the checkout: pick one no machine has (a plain "../x" existed on one).
@pytest.mark.parametrize("source", ["not a model", "../no-such-lora-lab-model", "/no/such/folder"])
def test_unusable_sources_are_explained(source):
    with pytest.raises(ModelSourceError, match="neither the embedded model"):
        model_source_kind(source)


def test_folder_without_config_is_explained(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        load_model(ModelConfig(source=str(tmp_path), bits=32), CPU)
