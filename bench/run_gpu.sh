#!/usr/bin/env bash
# The GPU benchmarks behind docs/benchmarks.md, as one script for a lent machine (see ../shared/gpu/README.md):
# it lacks bitsandbytes, trl, datasets and liger-kernel, which travel as wheels in .whl/ (carry .whl and .gpu,
# where .gpu/tokenizer is the embedded model's saved tokenizer). Results land in $OUT (default: bench-out/).
# Make them here with the project's pins: bash ../shared/gpu/fetch_wheels.sh transformers==5.23.0 peft==0.21.2
#   accelerate==1.15.0 huggingface-hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 truststore   (the hub client needs
#   the last three), and: .venv/bin/python -c "from finetune.core.models import embedded_model_dir as d;
#   from transformers import AutoTokenizer as T; T.from_pretrained(str(d())).save_pretrained('.gpu/tokenizer')"
#   bash bench/run_gpu.sh          # training (1.2 B), T4 fit (8 B), chat latency
#   bash bench/run_gpu.sh train    # training only, plus the run without Liger
#   bash bench/run_gpu.sh chat     # chat latency only (about 4 minutes of device time)
set -u
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
export LORA_LAB_BENCH_TOKENIZER=${LORA_LAB_BENCH_TOKENIZER:-$PWD/.gpu/tokenizer} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
show() { grep -E '^(##|\||ratio|side by side|torch |Model alone)' "$1"; }
one_b="--model llama-1b --batch 8 --max-len 2048 --steps 14 --warmup 4"
chat() {  # base alone vs side by side (the app's per-row LoRA scale and peft's mixed batch), 4-bit and 16-bit
  (cd bench && timeout 290 python3 chat_latency.py --model llama-1b --bits 4,16 --tokens 64 --repeats 2) \
    >"$OUT/chat-1b.log" 2>&1
  show "$OUT/chat-1b.log"
}
if [ "${1:-all}" = chat ]; then
  chat
  grep -hE 'Error|Traceback' "$OUT"/*.log | head -5
  exit 0
fi

# 1. 1.2 B Llama shape: usual QLoRA recipe vs the default recipe, long-tailed rows up to 2048 tokens.
timeout 240 python3 bench/train_throughput.py $one_b --json "$OUT/train-1b.json" >"$OUT/train-1b.log" 2>&1
show "$OUT/train-1b.log"

if [ "${1:-all}" = train ]; then
  timeout 100 python3 bench/train_throughput.py $one_b --recipes default --no-liger >"$OUT/train-1b-noliger.log" 2>&1
  show "$OUT/train-1b-noliger.log"
else
  # 2. T4 fit: the default recipe on an 8 B Llama shape, 1024-token rows, memory capped at 15 GB.
  timeout 200 python3 bench/train_throughput.py --model llama-8b --recipes default --memory-cap-gb 15 --batch 1 \
    --max-len 1024 --fixed-len --steps 6 --warmup 2 --rows 16 --json "$OUT/t4-8b.json" >"$OUT/t4-8b.log" 2>&1
  show "$OUT/t4-8b.log"
  # 3. Chat: base alone vs side by side, 4-bit and 16-bit.
  chat
fi
grep -hE 'Error|Traceback' "$OUT"/*.log | head -5
