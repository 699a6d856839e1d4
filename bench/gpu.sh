#!/usr/bin/env bash
# Every GPU measurement the issues ask for, in one run of under 8 minutes on one H100/H200,
# for a session that is lent a GPU. Prepare the wheels first (bench/gpu_wheels.sh), then:
#   device run: command `bash bench/gpu.sh`, carry [".whl"], timeout_s 540
# Figures go to $OUT/gpu_results.txt (and each bench's full output to $OUT/gpu_log.txt);
# copy them into BENCHMARKS.md with the date and the machine. A bench that fails or runs
# out of its time slot is noted in the results and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
results=$OUT/gpu_results.txt
log=$OUT/gpu_log.txt
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo 'wheel install failed' | tee -a "$results"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:$PWD/latent-diffusion:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch; print("torch", torch.__version__)'; } | tee "$results"

bench() {  # bench SECONDS NAME COMMAND...: runs one measurement, its output to the log
  local seconds=$1 name=$2; shift 2
  echo "== $name: $*" | tee -a "$results" >> "$log"
  local start=$SECONDS
  timeout "$seconds" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  cat "$OUT/$name.txt" >> "$log"
  tail -n 25 "$OUT/$name.txt" >> "$results"
  echo "-- $name: rc $rc in $((SECONDS - start)) s" | tee -a "$results"
  rm -f "$OUT/$name.txt"
}

# Issue 10: training throughput at 557M (original pipeline vs the latent cache), the speed
# options one by one, sampling speed, and the demo score's cost.
bench 65 train_throughput python3 bench/train_throughput.py --device cuda --batch-size 32 \
  --base-channels 128 --channel-multipliers 4,4,8,8 --precision bf16 --num-workers 8 --steps 10
bench 80 train_fast_paths python3 bench/train_fast_paths.py --device cuda --batch-size 32 \
  --base-channels 128 --channel-multipliers 4,4,8,8 --precision bf16 --compile
bench 35 sample_speed python3 bench/sample_speed.py
bench 30 demo_score python3 bench/demo_score.py --device cuda --base-channels 128 \
  --channel-multipliers 4,4,8,8 --prompts 16 --steps 50
# Issue 19: seconds per image of a distilled 4-step student against PLMS-50 guided, 557M.
bench 60 student_speed python3 bench/student_speed.py
# Issue 17: model states, peak and s/step of a 1.17B finetune on a 24 GB card (fp32 AdamW +
# EMA, + adamw8bit, + the EMA on the CPU, LoRA r=16 and r=64), bf16, gradient checkpointing.
# Each row prints as it ends, so a row cut off by the time slot leaves the others.
bench 120 train_memory python3 bench/train_memory.py --device cuda --base-channels 192 \
  --batch-size 8 --memory-gb 24 --common='--fprecision bf16 --gradient-checkpointing'
# (A bucket's row, --bucket 384x256, would need a slot of its own: the five rows fill this one.)
# Issue 25: host peak RSS and torch.cuda.max_memory_allocated of loading the 557M U-Net:
# sample.py on its fp16 export (the host should hold about one tensor above the imports)
# and a LoRA start on the fp32 state dict (export_model.py makes the export, on the CPU).
bench 60 load_memory python3 bench/load_memory.py --device cuda --rows export,sample16,lora
# Issue 26: what app.py's page adds to a request (its wall time against the library call
# that served it, timed in the server), PLMS 50 steps, 557M; and from starting app.py to its
# first image (Gradio: gpu_wheels.sh --gradio). --repeats 3: 8 sampler runs with the warm-ups,
# one fewer than the 9 of the earlier three-path bench at --repeats 2.
if python3 -c 'import gradio' 2>/dev/null; then
  bench 30 app_latency python3 bench/app_latency.py --repeats 3
else
  echo '== app_latency: skipped, no gradio here (bench/gpu_wheels.sh --gradio)' | tee -a "$results"
fi
echo "done in $SECONDS s" | tee -a "$results"
