#!/usr/bin/env bash
# One GPU check, under 8 minutes on one GPU: (1) the tests marked `cuda` (fused = explicit on CUDA in float32 and
# bfloat16, the fused primitives against dense float32 formulas, cached decoding = recomputation), then (2) the
# overhead of every method against the unmodified model at 7B sizes in bf16 (random weights; LLaVA-1.5-7B with 576
# image tokens, and the same decoder with 2,916 image tokens, LLaVA-NeXT's length on a square grid), with the
# eager `output_attentions` approach of the official code in the same table.
#
#   bash benchmarks/device_check.sh OUTDIR        # OUTDIR defaults to $OUT, else ./device_check
#
# Installs nothing (a GPU machine may have no package registry): run it in an environment where
# `pip install -e ".[dev]"` (with a CUDA torch) was done. Writes OUTDIR/cuda_tests.txt, OUTDIR/overhead_cuda.json
# and OUTDIR/overhead_cuda.md; exits non-zero when a test fails or no GPU is visible.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-device_check}}"
mkdir -p "$out"
python=${PYTHON:-python}
start=$SECONDS

"$python" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"device_check: no CUDA GPU visible to torch {torch.__version__}; nothing to measure")
print(f"device_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY

echo "== 1. tests marked cuda"
timeout 180 "$python" -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tee "$out/cuda_tests.txt"
echo "   ($((SECONDS - start)) s so far)"

echo "== 2. overhead at 7B sizes, bf16, every method"
timeout 270 "$python" benchmarks/overhead.py --device cuda --shapes llava15-7b next-7b-2916 --repeats 3 \
    --new-tokens 16 --out "$out/overhead_cuda.json" --markdown "$out/overhead_cuda.md"
cat "$out/overhead_cuda.md"
echo "device_check: done in $((SECONDS - start)) s; results in $out"
