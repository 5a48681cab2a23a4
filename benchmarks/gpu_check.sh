#!/usr/bin/env bash
# The GPU check: within 8 minutes on one H200 (any CUDA GPU with enough memory), writes
# benchmarks/results/gpu_check.json (or $1): the CUDA-only tests (tests/test_cuda.py: attention
# backends against math, a bf16 base, 8-bit AdamW, compile) and one DMD2-LoRA step at
# SDXL-1024 and Flux-1024 with random weights per attention backend (max_memory_allocated
# against benchmarks/memory_plan.py's figure, step time). Without a GPU it refuses (exit 2).
#   bash benchmarks/gpu_check.sh [OUT_JSON]
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_check: refused: $PY cannot import torch; set PYTHON=/path/to/venv/bin/python." >&2
  exit 2
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: refused: torch sees no CUDA device (torch.cuda.is_available() is False)." >&2
  echo "It measures GPU memory and kernels; run it on a machine with an NVIDIA GPU:" >&2
  echo "  bash benchmarks/gpu_check.sh   (or PYTHON=/path/to/venv/bin/python bash ...)" >&2
  exit 2
fi
exec "$PY" benchmarks/gpu_check.py --out "${1:-benchmarks/results/gpu_check.json}" \
  --budget-seconds 470
