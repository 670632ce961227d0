"""Sharded averaging under torchrun (gloo, 2 CPU processes) equals device averaging.

The worker feeds a sharded and a replicated device averager the same DDP
weights; here their averages, the weights a swap loads, and the averages
after resuming from rank 0's checkpoint must agree bit for bit, while each
rank holds only half of the flattened state.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).resolve().parent / "ddp_scripts" / "averaging_ddp_worker.py"
# What the worker's model tracks: Linear(5, 7), BatchNorm1d(7), Linear(7, 3),
# parameters and float buffers.
TRACKED = (5 * 7 + 7) + (7 + 7) + (7 * 3 + 3) + (7 + 7)
NUM_PARAMETER_TENSORS = 6


def _assert_identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    output = tmp_path_factory.mktemp("averaging_ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(WORKER),
        str(output),
    ]
    completed = subprocess.run(
        command, cwd=output, env=env, capture_output=True, text=True, timeout=240
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return [torch.load(output / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.ddp
@pytest.mark.parametrize("mode", ["lawa", "ema"])
def test_sharded_matches_device_on_every_rank(ranks: list[dict], mode: str) -> None:
    assert [r["world_size"] for r in ranks] == [2, 2]
    # DDP keeps the parameters identical; each rank's BatchNorm statistics
    # are its own until the next forward broadcasts rank 0's, which are what
    # gets evaluated. So rank 0's device average is the reference.
    reference = ranks[0][mode]
    parameters = slice(0, NUM_PARAMETER_TENSORS)
    _assert_identical(reference["device"][parameters], ranks[1][mode]["device"][parameters])
    for result in ranks:
        got = result[mode]
        _assert_identical(got["sharded"], reference["device"])
        _assert_identical(got["swapped_in"], reference["device_swapped_in"])
        # The NaN collection was skipped by both, on both ranks.
        assert got["num_skipped"] == (1, 1)
        # Each rank holds half of the flattened state (padded to a multiple of 2).
        assert got["shard_numel"] == math.ceil(TRACKED / 2)


@pytest.mark.ddp
@pytest.mark.parametrize("mode", ["lawa", "ema"])
def test_rank_zero_checkpoint_resumes_every_rank(ranks: list[dict], mode: str) -> None:
    for result in ranks:
        got = result[mode]
        checkpoint = got["checkpoint"]
        reference = ranks[0][mode]["device_state_at_checkpoint"]
        # Rank 0's state_dict is the whole state, as a device averager's.
        assert "shard" not in checkpoint
        assert checkpoint["num_collected"] == reference["num_collected"] == 4
        for key in ("sum", "ema"):
            _assert_identical(checkpoint[key], reference[key])
        # Taken while the average was swapped in: the live weights ride along.
        assert checkpoint["swapped"] and len(checkpoint["stash"]) == 8
        for saved, expected in zip(checkpoint["window"], reference["window"]):
            _assert_identical(saved, expected)
        # Resumed from it, every rank continues exactly.
        _assert_identical(got["resumed"], ranks[0][mode]["device"])


@pytest.mark.ddp
@pytest.mark.parametrize("mode", ["lawa", "ema"])
def test_swap_keeps_parameters_buckets_and_optimizer_state_under_ddp(
    ranks: list[dict], mode: str
) -> None:
    for result in ranks:
        got = result[f"{mode}_swap_identity"]
        assert got["identity_kept"]
        assert got["trajectory_equal"]
