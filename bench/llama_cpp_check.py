"""Optional check, not part of `make test`: llama.cpp itself (llama-cpp-python) runs a run's exported GGUF files.

    pip install llama-cpp-python          # a source package: builds llama.cpp, several minutes on 2 cores
    python bench/llama_cpp_check.py runs/cpu-quick --types f16,q8_0

For each type (exported first when missing) and each prompt: are llama.cpp's token ids for the chat prompt and for
a multilingual sample the same as the transformers tokenizer's, and is llama.cpp's greedy answer (formatted by
the chat template stored in the file) the same as the merged model's in transformers?
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.services.gguf_export import write_gguf  # noqa: E402

SAMPLE = ("Hello, world! Ça va? Größe straße. Привет, мир. 你好，世界。 🧪🚀 x² ≤ 3.14159 — tabs\tand  double  "
          "spaces\n")
PROMPTS = ("What does LoRA's rank control?", "What is QLoRA?")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--types", default="f16,q8_0")
    parser.add_argument("--tokens", type=int, default=40)
    args = parser.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed (pip install llama-cpp-python); nothing checked.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = {t: write_gguf(args.run_dir, t).path for t in args.types.split(",")}
    tokenizer = AutoTokenizer.from_pretrained(args.run_dir / "merged")
    merged = AutoModelForCausalLM.from_pretrained(args.run_dir / "merged", dtype=torch.float32).eval()
    for out_type, path in files.items():
        llm = Llama(str(path), n_ctx=1024, verbose=False, seed=0)
        same_sample = (llm.tokenize(SAMPLE.encode(), add_bos=False, special=False)
                       == tokenizer(SAMPLE, add_special_tokens=False)["input_ids"])
        for prompt in PROMPTS:
            messages = [{"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                out = merged.generate(torch.tensor([ids]), max_new_tokens=args.tokens, do_sample=False)
            expected = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
            answer = llm.create_chat_completion(messages, temperature=0.0, top_k=1, max_tokens=args.tokens)
            got = answer["choices"][0]["message"]["content"].strip()
            same_prompt = llm.tokenize(text.encode(), add_bos=False, special=True) == ids
            print(f"[{out_type}] {prompt!r}: prompt ids equal {same_prompt}, multilingual ids equal {same_sample}, "
                  f"greedy answer equal {got == expected}\n  transformers: {expected!r}\n  llama.cpp:    {got!r}")


if __name__ == "__main__":
    main()
