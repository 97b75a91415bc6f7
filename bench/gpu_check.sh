#!/usr/bin/env bash
# The one prepared GPU check (issue #21): on one H100/H200, no network, <= 8 minutes, one results file.
#
#   bash bench/gpu_check.sh [RESULTS_FILE]        # default: $OUT/gpu_check.txt, else ./gpu_check.txt
#
# Run from anywhere; it works in the repository root. diffusers (the benchmarks' and parity tests' yardstick)
# comes as wheels in .whl/ (bench/BENCHMARKS.md, "GPU check", says how to download them), installed into a
# temporary target. Each part has its own time limit, so a part that fails or hangs costs only its limit; the
# script goes on and ends with a summary (part, exit status, seconds). Exit status: the number of failed parts.
set -u
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-.}/gpu_check.txt}
PY=${PYTHON:-python3}
# No GPU: say so in one line and stop, before installing or compiling anything.
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing run" | tee "$RESULTS"
    exit 1
fi
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
        || { echo "gpu_check: installing .whl/*.whl failed" | tee "$RESULTS"; exit 1; }
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# One inductor cache for every part: a graph compiled once (e.g. the SD1.5 UNet at 2x4x64x64 in bf16, in the
# parity tests) is a cache hit where a later part compiles the same one.
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

{
    echo "# gpu_check $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    "$PY" -c "import torch, diffusers, transformers as t; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| diffusers', diffusers.__version__, '| transformers', t.__version__)" 2>&1
} | tee "$RESULTS"

SUMMARY=()
FAILED=0
part() {  # part NAME SECONDS COMMAND...: run it under its limit, its output into the results
    local name=$1 limit=$2 start rc
    shift 2
    echo -e "\n## $name (limit ${limit}s): $*" | tee -a "$RESULTS"
    start=$(date +%s)
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$RESULTS"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo "TIMEOUT after ${limit}s" | tee -a "$RESULTS"
    [ "$rc" -ne 0 ] && FAILED=$((FAILED + 1))
    SUMMARY+=("$(printf '%-12s rc %-4s %4ss' "$name" "$rc" "$(($(date +%s) - start))")")
}

# 1. parity at the full SD1.5 / SD2.1 configs (fp32 1e-4, bf16, SD2 fp16 without NaN, compiled vs eager)
part pytest 150 "$PY" -m pytest -q -s -m cuda tests/test_cuda.py -p no:cacheprovider
# 2. NCCL DDP through train.py (torchrun as python -m torch.distributed.run: no PATH needed): bf16 + compile
#    inside DDP, fused AdamW, DataLoader workers with pin_memory, cuda:LOCAL_RANK; then --resume to 5 steps
#    (its log must read steps 1..5)
TRAIN=(train.py --ckpt "$WORK/tiny/tiny.safetensors" --data "$WORK/tiny" --out "$WORK/run" --resolution 32
       --batch-size 4 --workers 2 --compile --bf16 --sample-every 0 --save-every 0 --warmup 1 --ema 0.9)
part ddp 65 bash -c "$PY bench/gpu_check.py tiny $WORK/tiny && \
    $PY -m torch.distributed.run --standalone --nproc_per_node=1 ${TRAIN[*]} --steps 3 && $PY bench/gpu_check.py log $WORK/run 3"
part resume 35 bash -c "$PY -m torch.distributed.run --standalone --nproc_per_node=1 ${TRAIN[*]} --steps 5 --resume && \
    $PY bench/gpu_check.py log $WORK/run 5"
# 3. training step at the SD1.5 config, 64x64 latents, batch 4, bf16 + compile: Diff2Flow vs diffusion
#    (target <= 1.02), LoRA vs full peak memory
part train 120 "$PY" bench/bench_train.py --device cuda --unet sd15 --size 64 --batch 4 --bf16 --compile \
    --repeat 5 --warmup 2
# 4. 25-step guided sampling vs diffusers + torch.compile on the same weights (target: ours/ref <= 1)
part sample 65 "$PY" bench/bench.py --device cuda --compile --only sample --unets sd15 --steps 25 \
    --sample-size 64 --sample-precision bf16 --sample-repeat 2 --warmup 1
# 5. the UNet's achieved FLOP/s at batch 8, 64x64, bf16, compiled, as a fraction of a bf16 8192^3 matmul's
#    measured in the same run (target >= 0.5)
part flops 45 "$PY" bench/bench.py --device cuda --compile --only flops --unets sd15 --repeat 5 --warmup 2

{
    echo -e "\n## summary ($FAILED failed)"
    printf '%s\n' "${SUMMARY[@]}"
} | tee -a "$RESULTS"
rm -rf "$WORK"
exit "$FAILED"
