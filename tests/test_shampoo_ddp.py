"""Shampoo under torchrun (gloo, 2 CPU processes) equals single-process Shampoo."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).resolve().parent / "ddp_scripts" / "shampoo_ddp_worker.py"


def _run(command: list[str], cwd: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # The workers run in another directory: a relative PYTHONPATH (PYTHONPATH=src
    # from a checkout) would silently import another copy of polyak there.
    paths = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    completed = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=180
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]


def _single_process_reference() -> dict:
    spec = importlib.util.spec_from_file_location("shampoo_ddp_worker", WORKER)
    assert spec is not None and spec.loader is not None
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers, so that every matmul takes the same path
    try:
        return worker.train(distributed=False)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.ddp
def test_two_ranks_equal_single_process(tmp_path: Path) -> None:
    double = tmp_path / "double"
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(WORKER),
            "--output",
            str(double),
        ],
        tmp_path,
    )
    reference = _single_process_reference()
    ranks = [torch.load(double / f"rank{r}.pt") for r in range(2)]
    assert reference["world_size"] == 1 and ranks[0]["world_size"] == 2

    for name, expected in reference["params"].items():
        for result in ranks:
            got = result["params"][name]
            assert not torch.equal(got, expected * 0), name
            # Directions are exchanged by adding zeros, so the match is exact.
            assert torch.equal(got, expected), (name, (got - expected).abs().max())

    # The blocks really were split between the ranks, and nothing was lost.
    blocks = [r["diagnostics"]["preconditioned_blocks"] for r in ranks]
    assert all(b > 0 for b in blocks)
    assert sum(blocks) == reference["diagnostics"]["preconditioned_blocks"]
    factors = [r["diagnostics"]["factor_elements"] for r in ranks]
    assert sum(factors) == reference["diagnostics"]["factor_elements"]
    assert max(factors) < reference["diagnostics"]["factor_elements"]
