"""A run interrupted after a checkpoint and resumed in a new process continues
bit for bit like an uninterrupted one, with averaging on (CPU, both frameworks).

The local loop (``polyak.workloads.loop``) checkpoints as AlgoPerf does: after
every eval, right after ``prepare_for_eval`` has swapped the average in, so
the raw weights, the averaging state and its counters must all come back
from the optimizer state. The interruption is a crash right after the
checkpoint at step 7: the output directory is copied as it stands right
after that checkpoint, and a fresh Python process resumes from the copy.

This file is also the resumed process: ``python test_resume.py FRAMEWORK DIR``.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS, EVAL_EVERY, CRASH_AFTER = 20, 6, 7
# Times differ between runs; everything else in an eval row must not.
TIMING_COLUMNS = {
    "score",
    "total_duration",
    "accumulated_submission_time",
    "accumulated_eval_time",
    "accumulated_logging_time",
    "preemption_count",
}
AVERAGING = {
    "pytorch": {"averaging": "lawa", "averaging_every": 2, "lawa_window": 3},
    "jax": {"averaging": "ema", "averaging_every": 2, "ema_beta": 0.8},
}


def _submission(framework: str) -> tuple[Any, dict[str, Any]]:
    """The real NadamW submission, loaded by file path, and its optimizer's defaults."""
    path = REPO / "submissions" / "nadamw" / framework / "submission.py"
    spec = importlib.util.spec_from_file_location(f"nadamw_{framework}_submission", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, dict(module.DEFAULT_HYPERPARAMETERS)


def train(framework: str, output_dir: str, *, resume: bool, interrupted: str | None = None) -> None:
    """Trains digits with averaging; ``interrupted`` receives a copy of the output
    directory right after the checkpoint at step ``CRASH_AFTER`` (a preemption there)."""
    submission, defaults = _submission(framework)
    hyperparameters = {**defaults, **AVERAGING[framework], "averaging_placement": "host"}

    def progress(line: str) -> None:
        if interrupted is not None and f"step {CRASH_AFTER}:" in line:
            shutil.copytree(output_dir, interrupted)

    threads = None
    if framework == "pytorch":
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # every process takes the same kernels
    try:
        _run(framework, output_dir, submission, hyperparameters, progress, resume)
    finally:
        if threads is not None:
            torch.set_num_threads(threads)


def _run(
    framework: str,
    output_dir: str,
    submission: Any,
    hyperparameters: dict[str, Any],
    progress: Callable[[str], None],
    resume: bool,
) -> None:
    from polyak.workloads.loop import LoopConfig, run_training
    from polyak.workloads.registry import make_workload

    run_training(
        make_workload("digits", framework),
        submission,
        hyperparameters,
        framework=framework,
        config=LoopConfig(
            max_steps=MAX_STEPS,
            eval_every_steps=EVAL_EVERY,
            stop_at_target=False,
            max_runtime_sec=1e9,  # a busy machine must not end the run early
            rng_seed=3,
        ),
        output_dir=output_dir,
        progress=progress,
        resume=resume,
    )


def _final_checkpoint(output_dir: Path, framework: str) -> dict[str, Any]:
    path = output_dir / f"checkpoint_{MAX_STEPS}"
    if framework == "pytorch":
        import torch

        return torch.load(path, map_location="cpu", weights_only=False)
    with open(path, "rb") as file:
        return pickle.load(file)


def _eval_rows(output_dir: Path) -> list[dict[str, str]]:
    with open(output_dir / "eval_measurements.csv", newline="") as file:
        return [
            {k: v for k, v in row.items() if k not in TIMING_COLUMNS}
            for row in csv.DictReader(file)
        ]


def _assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Exact equality of nested containers of tensors / arrays / scalars."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    elif hasattr(a, "detach"):  # a torch tensor
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert bool((a == b).all()) or a.numel() == 0, where
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where, strict=True)
    else:
        assert a == b, where


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["pytorch", "jax"])
def test_resumed_run_continues_bit_for_bit(framework: str, tmp_path: Path) -> None:
    if framework == "jax":
        pytest.importorskip("jax")
    else:
        pytest.importorskip("torch")
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    train(framework, str(uninterrupted), resume=False, interrupted=str(interrupted))
    assert [p.name for p in interrupted.glob("checkpoint_*")] == [f"checkpoint_{CRASH_AFTER}"]

    env = dict(os.environ, OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, __file__, framework, str(interrupted)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    expected = _final_checkpoint(uninterrupted, framework)
    resumed = _final_checkpoint(interrupted, framework)
    assert resumed["preemption_count"] == 1
    for key in ("model_params", "optimizer_state", "model_state", "global_step"):
        _assert_identical(resumed[key], expected[key], key)
    averaging = (
        resumed["optimizer_state"]["averager"]
        if framework == "pytorch"
        else resumed["optimizer_state"]
    )
    assert averaging  # the averaging state is in the checkpoint, and was compared above
    # The evaluated (averaged) models scored the same at every eval.
    rows = _eval_rows(interrupted)
    assert [int(r["global_step"]) for r in rows] == [1, 7, 13, 19, 20]
    assert rows == _eval_rows(uninterrupted)


if __name__ == "__main__":
    train(sys.argv[1], sys.argv[2], resume=True)
