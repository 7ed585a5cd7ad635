#!/usr/bin/env bash
# GPU smoke benchmark: the same small recipe trained a few steps by unsloth (4-bit QLoRA) and by the hf
# backend (4-bit QLoRA through bitsandbytes), one after the other on one GPU; prints trained tokens/s,
# peak GPU memory and the last validation loss of each.
#
#   bench/gpu_smoke.sh                       # MODEL=unsloth/Llama-3.2-1B-Instruct, 30 steps
#   MODEL=/path/to/model STEPS=60 bench/gpu_smoke.sh
#
# Needs: an NVIDIA GPU with nvidia-smi, the hub (or MODEL as a local folder), .venv (make setup) and
# .venv-unsloth (make env-unsloth) with a CUDA build of torch, e.g.
#   TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128" make setup env-unsloth
# Peak memory is what nvidia-smi saw on the GPU (sampled every 200 ms), so both backends are measured
# the same way; tokens/s is trained (assistant) tokens over wall seconds from metrics.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-unsloth/Llama-3.2-1B-Instruct}
STEPS=${STEPS:-30}
BATCH=${BATCH:-4}
SEQ=${SEQ:-1024}
GPU=${GPU:-0}
OUT=${OUT:-bench/results/gpu-smoke-$(date +%Y%m%d-%H%M%S)}
TUNEBOOK=${TUNEBOOK:-.venv/bin/tunebook}
PYTHON=${PYTHON:-.venv/bin/python}

command -v nvidia-smi >/dev/null || { echo "gpu_smoke: nvidia-smi not found: this needs an NVIDIA GPU" >&2; exit 2; }
nvidia-smi -i "$GPU" -L >/dev/null || { echo "gpu_smoke: no GPU $GPU" >&2; exit 2; }
[ -x "$TUNEBOOK" ] || { echo "gpu_smoke: $TUNEBOOK missing: run make setup" >&2; exit 2; }
[ -x .venv-unsloth/bin/python ] || [ -n "${TUNEBOOK_UNSLOTH:-}" ] ||
  { echo "gpu_smoke: .venv-unsloth missing: run make env-unsloth (with a CUDA torch, see above)" >&2; exit 2; }
.venv-unsloth/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null ||
  [ -n "${TUNEBOOK_UNSLOTH:-}" ] ||
  { echo "gpu_smoke: the torch in .venv-unsloth cannot see the GPU (a CPU build?): reinstall it with a CUDA index" >&2; exit 2; }

mkdir -p "$OUT"
RECIPE="$OUT/recipe.yaml"
cat >"$RECIPE" <<EOF
# written by bench/gpu_smoke.sh
name: gpu-smoke
output_dir: $OUT/runs
seed: 3407
model: {base: "$MODEL", load_in_4bit: true, chat_template: llama-3, max_seq_length: $SEQ}
lora: {r: 16, alpha: 16, target_modules: all-linear}
stages:
  - name: vet
    data: {source: $PWD/data/vet_qa.jsonl, format: messages, val_size: 32}
    train: {max_steps: $STEPS, learning_rate: 2e-4, micro_batch_size: $BATCH, gradient_accumulation_steps: 1,
            eval_steps: $STEPS, logging_steps: 1, warmup_steps: 3}
EOF

run() {  # run BACKEND: train it while sampling GPU memory
  local backend=$1 log="$OUT/$1.log" mem="$OUT/$1.mem"
  nvidia-smi -i "$GPU" --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$mem" &
  local sampler=$!
  local start=$SECONDS status=0
  CUDA_VISIBLE_DEVICES=$GPU "$TUNEBOOK" train "$RECIPE" --set "backend=$backend" --set "name=gpu-smoke-$backend" \
    >"$log" 2>&1 || status=$?
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  echo "$backend: exit $status after $((SECONDS - start)) s (log: $log)"
  return 0
}

baseline=$(nvidia-smi -i "$GPU" --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
run unsloth
run hf

"$PYTHON" - "$OUT" "$baseline" <<'EOF'
import json, sys
from pathlib import Path

out, baseline = Path(sys.argv[1]), float(sys.argv[2])
print(f"\n{'backend':<9} {'steps':>5} {'trained tok':>11} {'seconds':>8} {'tok/s':>8} {'peak GPU MiB':>12} {'val loss':>9}")
for backend in ("unsloth", "hf"):
    rows = [json.loads(l) for l in (out / "runs" / f"gpu-smoke-{backend}" / "vet" / "metrics.jsonl").read_text()
            .splitlines()] if (out / "runs" / f"gpu-smoke-{backend}" / "vet" / "metrics.jsonl").is_file() else []
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    mem = [float(x) for x in (out / f"{backend}.mem").read_text().split() if x.strip()] if (out / f"{backend}.mem").is_file() else []
    if not train:
        print(f"{backend:<9} failed: see {out / (backend + '.log')}")
        continue
    last = train[-1]
    # the first step includes compilation/warm-up: rate over steps 2..N when there are enough of them
    first = train[0] if len(train) < 3 else train[1]
    tokens, seconds = last["tokens_seen"] - first["tokens_seen"], last["seconds"] - first["seconds"]
    rate = tokens / seconds if seconds > 0 else float("nan")
    peak = max(mem) - baseline if mem else float("nan")
    print(f"{backend:<9} {last['step']:>5} {last['tokens_seen']:>11,} {last['seconds']:>8.1f} {rate:>8.0f} {peak:>12.0f} "
          f"{evals[-1]['eval_loss'] if evals else float('nan'):>9.4f}")
print(f"\npeak GPU MiB: nvidia-smi memory.used above the {baseline:.0f} MiB in use before; tok/s from step 2 on")
EOF
