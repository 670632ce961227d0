#!/usr/bin/env bash
# Every averaging ratio on one GPU, in one command (under 8 minutes):
#   (a) step time with averaging / without, LAWA and EMA in device and host placement,
#       at nu = 1 and nu = 64, and host placement / device placement;
#   (b) prepare_for_eval + restore / one copy of the parameters;
#   (c) polyak's EMA update / torch AveragedModel, timm ModelEmaV3, ema_pytorch;
#   (g) device -> pinned host copies on a side stream, and the EMA fold on the
#       background thread against the step it hides behind.
#
#   scripts/bench_gpu.sh              # on a CUDA machine
#   scripts/bench_gpu.sh --cpu-check  # tiny sizes on CPU, a few seconds: keeps the script correct
#
# Needs the package and the rival libraries:
#   pip install -e . timm ema-pytorch     (timm brings a torchvision matching torch)
# Rivals that do not import are reported and skipped. PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

if [[ "${1:-}" == "--cpu-check" ]]; then
  exec "$PYTHON" scripts/bench_averaging.py --device=cpu --parts=a,b,c,g --every=1,64 \
    --nodigits --width=64 --big_batch=4 --big_rounds=1 --repeats=2
fi
if [[ $# -gt 0 ]]; then
  echo "usage: $0 [--cpu-check]" >&2
  exit 2
fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "$0: no CUDA device visible to $PYTHON; run with --cpu-check for the CPU check" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# 25M parameters; threads as many as the host has, for the host-side folds.
exec "$PYTHON" scripts/bench_averaging.py --device=cuda --parts=a,b,c,g --every=1,64 \
  --threads="$(nproc)" --big_batch=256 --big_rounds=5 --rounds=3 --repeats=15
