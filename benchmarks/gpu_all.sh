#!/usr/bin/env bash
# The GPU benchmarks in one go, one after the other on one GPU (their memory peaks must not mix):
#   1. benchmarks/gpu_memory.py  peak GPU memory of one GRPO step, Qwen2.5-VL-7B architecture (random
#                                weights), 4-bit QLoRA, G = 8, 256 new tokens, one 448x448 image (target < 20 GB)
#   2. benchmarks/trl_speed.py   GRPO step speed and peak memory, this project vs TRL's GRPOTrainer,
#                                Qwen2.5-VL-3B architecture, LoRA, bf16, G = 8, 2 prompts/step, 256 new tokens, 448 px
# JSON goes to benchmarks/results/ (gpu_memory_cuda_7b_qlora.json, trl_speed_cuda_3b_lora.json); each run's
# log goes beside it (.log). Offline: the checkpoints are built locally (7B: ~16 GB in the built-in model
# cache, $ANATOMY_LIGHTNING_CACHE or ~/.cache/anatomy_lightning; 3B: ~8 GB under $WORKDIR), no download.
#
#   bash benchmarks/gpu_all.sh                   # both
#   ONLY=memory bash benchmarks/gpu_all.sh       # or ONLY=speed
#   STEPS=3 ROUNDS=2 WORKDIR=/scratch/bench bash benchmarks/gpu_all.sh
#
# TRL is a benchmark-only dependency (pip install -r benchmarks/requirements.txt); without it the speed
# run measures this project alone and says so. Exit status: 0 if every run passed, 1 if one failed, 2 if
# there is no CUDA device.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PY=${PYTHON:-python}
RESULTS=${RESULTS:-benchmarks/results}
WORKDIR=${WORKDIR:-${TMPDIR:-/tmp}/anatomy_lightning_gpu_all}
ONLY=${ONLY:-all}          # all | memory | speed
STEPS=${STEPS:-3}          # trl_speed: timed steps after one warm-up step
ROUNDS=${ROUNDS:-1}        # trl_speed: systems run alternately this many times
THREADS=${THREADS:-4}      # torch CPU threads (the GPU does the work; a few threads keep CPU-side steps quick)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

case "$ONLY" in all|memory|speed) ;; *) echo "ONLY=$ONLY: use all, memory or speed" >&2; exit 1 ;; esac
mkdir -p "$RESULTS" "$WORKDIR"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device visible to torch: these benchmarks need one (CPU checks: benchmarks/profile_step.py)" >&2
    exit 2
fi
"$PY" - <<'EOF'
import torch, transformers
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, transformers {transformers.__version__}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv

failed=0
run() {  # run NAME CMD...: log to $RESULTS/NAME.log, keep going if it fails
    local name=$1; shift
    local start=$SECONDS
    echo; echo "== $name: $*"
    "$@" 2>&1 | tee "$RESULTS/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || failed=1
}

if [ "$ONLY" = all ] || [ "$ONLY" = memory ]; then
    run gpu_memory_cuda_7b_qlora "$PY" benchmarks/gpu_memory.py --model 7b --device cuda \
        --G 8 --new-tokens 256 --image-size 448 --prompts-per-step 1 --steps 2 \
        --workdir "$WORKDIR/gpu_memory" --out "$RESULTS/gpu_memory_cuda_7b_qlora.json"
fi

if [ "$ONLY" = all ] || [ "$ONLY" = speed ]; then
    systems=anatomy_lightning,trl
    if ! "$PY" -c 'import trl' 2>/dev/null; then
        echo "TRL is not installed (pip install -r benchmarks/requirements.txt): measuring this project alone" >&2
        systems=anatomy_lightning
    fi
    run trl_speed_cuda_3b_lora "$PY" benchmarks/trl_speed.py --model 3b --device cuda --finetune lora \
        --G 8 --prompts-per-step 2 --new-tokens 256 --image-size 448 --threads "$THREADS" \
        --steps "$STEPS" --rounds "$ROUNDS" --systems "$systems" \
        --workdir "$WORKDIR/trl_speed" --out "$RESULTS/trl_speed_cuda_3b_lora.json"
fi

echo
ls -l "$RESULTS"/*cuda*.json 2>/dev/null
exit "$failed"
