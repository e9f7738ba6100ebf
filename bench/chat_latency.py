"""Chat latency: time to first token and tokens/s, base alone vs adapter alone vs the Chat tab's side-by-side path.

    python bench/chat_latency.py                          # CPU: the embedded model, 4-bit and 32-bit
    python bench/chat_latency.py --model llama-1b         # GPU: random-init 1.2 B Llama shape, 4-bit and 16-bit

The side-by-side path (``ChatEngine.stream_pair``) answers base and adapter in ONE generate call, a batch of two
rows where each LoRA layer's scale is 0 for the base row; the sequential path is two separate calls. Every answer
is forced to the same length (min_new_tokens = max_new_tokens, greedy), so times compare like for like. The
adapter is a LoRA r=16 on all linear layers with random (non-zero) weights, which costs exactly what a trained
one costs. The target: side-by-side time <= 1.3 x the base answer alone.

The second table times the model alone: ``generate`` called directly in this thread (no streamer, no worker
thread), for the base alone and for the pair both ways, the per-row scale and peft's mixed-adapter batch
(``adapter_names``, the previous side-by-side path), so the two pair paths compare on the same rows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.services.chat import ChatEngine, SamplingSettings, in_own_thread  # noqa: E402
from finetune.core.config import ModelConfig  # noqa: E402

PROMPT = "Explain in a few sentences what LoRA changes in a transformer layer and why it saves memory."


@dataclass
class FixedLength(SamplingSettings):
    """Greedy answers of exactly max_new_tokens tokens: no early end-of-sequence to skew the timing."""

    def generation_config(self, tokenizer: Any, eos: list[int]) -> Any:
        config = super().generation_config(tokenizer, eos)
        config.min_new_tokens = self.max_new_tokens
        return config


def random_adapter(model_dir: str, bits: int) -> Path:
    from peft import LoraConfig, get_peft_model

    from finetune.core.models import load_model

    model = load_model(ModelConfig(source=model_dir, bits=bits))
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False,
                      task_type="CAUSAL_LM")
    folder = Path(tempfile.mkdtemp(prefix="bench-adapter-"))
    get_peft_model(model, lora).save_pretrained(folder)
    del model
    return folder


def timed(stream: Iterator[Any]) -> tuple[float, float]:
    """(seconds to the first streamed text, seconds to the end)."""
    started = time.perf_counter()
    first = None
    for _ in stream:
        if first is None:
            first = time.perf_counter() - started
    return first or 0.0, time.perf_counter() - started


def measure(engine: ChatEngine, cfg: ModelConfig, adapter: Path, settings: SamplingSettings,
            repeats: int) -> dict[str, tuple[float, float]]:
    paths = {
        "base alone": lambda: engine.stream(PROMPT, [], cfg, settings=settings),
        "adapter alone": lambda: engine.stream(PROMPT, [], cfg, "bench", adapter, settings=settings),
        "side by side (one batched call)": lambda: engine.stream_pair(PROMPT, [], [], cfg, "bench", adapter,
                                                                     settings),
    }
    for make in paths.values():  # warm-up: loads, attaches, first-call kernel setup
        timed(make())
    results = {}
    for name, make in paths.items():
        runs = [timed(make()) for _ in range(repeats)]
        results[name] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
    base, tuned = results["base alone"], results["adapter alone"]
    results["sequential (base, then adapter)"] = (base[0], base[1] + tuned[1])
    return results


def measure_model_only(engine: ChatEngine, cfg: ModelConfig, adapter: Path, settings: SamplingSettings,
                       repeats: int) -> dict[str, float]:
    """Seconds per generate call for the base alone and for both ways of answering a pair (median of repeats)."""
    entry = engine.attach(cfg, "bench", adapter)
    layers = engine._row_switchable_layers(entry, "bench")
    messages = [{"role": "user", "content": PROMPT}]
    pair = engine._inputs(entry, [messages, messages], settings)
    alone = {key: value[:1] for key, value in pair.items()}
    config = settings.generation_config(entry.tokenizer, engine._eos(entry))

    def base() -> None:
        with entry.model.disable_adapter():
            entry.model.generate(**alone, generation_config=config)

    def row_scale() -> None:
        with engine._adapter_on_rows(entry, "bench", layers, [False, True]):
            entry.model.generate(**pair, generation_config=config)

    def peft_mixed() -> None:
        entry.model.generate(**pair, generation_config=config, adapter_names=["__base__", "bench"])

    paths = {"base alone": base, "pair, per-row LoRA scale (the app's path)": row_scale,
             "pair, peft mixed-adapter batch (previous path)": peft_mixed}
    def seconds(call: Any) -> float:
        with torch.inference_mode():
            started = time.perf_counter()
            call()
            return time.perf_counter() - started

    # Each call in a thread that ends with it, as the app does (see finetune.services.chat.in_own_thread).
    results = {}
    for name, call in paths.items():
        in_own_thread(lambda: seconds(call))  # warm-up
        results[name] = statistics.median(in_own_thread(lambda: seconds(call)) for _ in range(repeats))
    return results


def report_model_only(results: dict[str, float]) -> None:
    print("\nModel alone (generate called directly, no streamer):")
    print("| path | total s | x base alone |")
    print("| --- | --- | --- |")
    for name, seconds in results.items():
        print(f"| {name} | {seconds:.2f} | {seconds / results['base alone']:.2f} |")


def report(bits: int, results: dict[str, tuple[float, float]], tokens: int, device: str) -> None:
    print(f"\n## {bits}-bit on {device}, {tokens} new tokens per answer")
    print("| path | time to first token s | total s | answer tokens/s |")
    print("| --- | --- | --- | --- |")
    for name, (first, total) in results.items():
        answers = 2 if name.startswith(("side", "sequential")) else 1
        print(f"| {name} | {first:.3f} | {total:.2f} | {answers * tokens / total:,.1f} |")
    ratio = results["side by side (one batched call)"][1] / results["base alone"][1]
    sequential = results["sequential (base, then adapter)"][1] / results["base alone"][1]
    print(f"\nside by side / base alone: x{ratio:.2f} (target <= 1.3); sequential / base alone: x{sequential:.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded", help="embedded, a local folder, or a bench shape "
                                                            "(llama-1b, llama-8b, llama-tiny)")
    parser.add_argument("--bits", default=None, help="comma list (default 4,32 on the CPU, 4,16 on a GPU)")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per answer (default 32 CPU, 128 GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    bits = [int(b) for b in (args.bits or ("4,16" if cuda else "4,32")).split(",")]
    tokens = args.tokens or (128 if cuda else 32)
    from train_throughput import SHAPES, bench_tokenizer, random_model_dir

    if args.model == "embedded":
        from finetune.core.models import embedded_model_dir

        model_dir = str(embedded_model_dir())
    elif args.model in SHAPES:
        model_dir = str(in_own_thread(lambda: random_model_dir(args.model, bench_tokenizer(),
                                                               torch.bfloat16 if cuda else torch.float32)))
    else:
        model_dir = args.model
    device = torch.cuda.get_device_name() if cuda else "CPU"
    for b in bits:
        engine, cfg = ChatEngine(), ModelConfig(source=model_dir, bits=b)
        adapter = in_own_thread(lambda: random_adapter(model_dir, b))  # this thread stays free of torch work
        settings = FixedLength(max_new_tokens=tokens, temperature=0.0)
        report(b, measure(engine, cfg, adapter, settings, args.repeats), tokens, device)
        report_model_only(measure_model_only(engine, cfg, adapter, settings, args.repeats))
        del engine
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
