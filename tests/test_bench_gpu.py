"""scripts/bench_gpu.sh --cpu-check runs end to end and prints every figure.

Not a timing test: the numbers on a CPU are not the GPU's. It keeps the
script that the first GPU will run correct.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_gpu_cpu_check_prints_every_ratio() -> None:
    src = str(ROOT / "src")
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
    )
    completed = subprocess.run(
        ["bash", str(ROOT / "scripts" / "bench_gpu.sh"), "--cpu-check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    out = completed.stdout
    for every in (1, 64):
        assert f"nu = {every}" in out
    # (a): LAWA and EMA, device and host, at nu = 1 and nu = 64; host against device.
    assert out.count("(goal <= 1.01)") == 8
    assert out.count("host placement / device placement") == 4
    # (b): swap + restore for every mode and placement.
    assert out.count("(goal <= 1.2)") == 6
    assert "vs torch AveragedModel" in out
    assert "own check" in out
    assert "EMA fold on the worker thread" in out
    # NadamW: both runs' ratios, and the fresh-process start-up of the two paths.
    assert "paired wall-time ratio to torch AdamW fused, per run" in out
    assert "polyak NAdamW fused (compiled): " in out
    assert "fresh processes" in out and "default " in out and "foreach " in out
    # TWA: every setting's share of submission time, and TWA's steps against LAWA.
    assert out.count("steps / LAWA (per seed)") == 3
    assert "nan" not in out.lower().replace("nanoseconds", "")


def test_bench_gpu_refuses_unknown_arguments() -> None:
    completed = subprocess.run(
        ["bash", str(ROOT / "scripts" / "bench_gpu.sh"), "--gpus=2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 2
    assert "usage" in completed.stderr
