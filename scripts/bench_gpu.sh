#!/usr/bin/env bash
# Every averaging ratio on one GPU, in one command (under 8 minutes):
#   (a) step time with averaging / without, LAWA and EMA in device and host placement,
#       at nu = 1 and nu = 64, and host placement / device placement;
#   (b) prepare_for_eval + restore / one copy of the parameters;
#   (c) polyak's EMA update / torch AveragedModel, timm ModelEmaV3, ema_pytorch;
#   (g) device -> pinned host copies on a side stream, and the EMA fold on the
#       background thread against the step it hides behind;
#   NadamW: polyak's NAdamW step / torch.optim.AdamW(fused=True), five runs, and the
#       first step and whole run of each NAdamW path in fresh processes;
#   TWA: its share of submission time and its steps to target against LAWA (textlm).
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
  "$PYTHON" scripts/bench_averaging.py --device=cpu --parts=a,b,c,g --every=1,64 \
    --nodigits --width=64 --big_batch=4 --big_rounds=1 --repeats=2
  "$PYTHON" scripts/bench_nadamw_torch.py --device=cpu --blocks=1 --warmup=1 --repeats=2 --runs=2
  "$PYTHON" scripts/bench_nadamw_torch_startup.py --device=cpu --blocks=1 --steps=2 \
    --processes=1 --variants=foreach,default
  exec "$PYTHON" scripts/bench_twa.py --workload=digits --seeds=0 --max_steps=30 \
    --eval_every=10 --every=2 --window=3
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
"$PYTHON" scripts/bench_averaging.py --device=cuda --parts=a,b,c,g --every=1,64 \
  --threads="$(nproc)" --big_batch=256 --big_rounds=5 --rounds=3 --repeats=15
"$PYTHON" scripts/bench_nadamw_torch.py --device=cuda --runs=5
"$PYTHON" scripts/bench_nadamw_torch_startup.py --device=cuda --processes=2
exec "$PYTHON" scripts/bench_twa.py --workload=textlm --seeds=0,1 --every=10 --window=10 \
  --eval_every=25
