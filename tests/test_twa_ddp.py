"""TWA with the basis sharded over 2 ranks (torchrun, gloo) equals the single-process fit.

The worker fits under DDP, each rank holding half of θ̄ and of every basis
row and training on half of each batch; here the same problem is fitted in
this process, unsharded, on the full batches.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from polyak.averaging.twa_torch import TWAConfig, fit_twa

WORKER = Path(__file__).resolve().parent / "ddp_scripts" / "twa_ddp_worker.py"


def _load_worker() -> ModuleType:
    # The worker is a script, not a package module: load it by path.
    spec = importlib.util.spec_from_file_location("twa_ddp_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker()

NUM_PARAMETERS = 5 * 7 + 7 + 7 * 3 + 3


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    output = tmp_path_factory.mktemp("twa_ddp")
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


def _flat(tensors: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([t.detach().double().reshape(-1).numpy() for t in tensors])


@pytest.mark.ddp
@pytest.mark.parametrize("name", sorted(worker.CONFIGS))
def test_sharded_fit_equals_single_process(ranks: list[dict], name: str) -> None:
    config = worker.CONFIGS[name]
    module = worker.model()
    reference = fit_twa(
        module, worker.checkpoints(module), config, worker.mse, worker.global_batches()
    )
    assert reference.chosen == "twa"  # the fit did something to compare
    for result in [r[name] for r in ranks]:
        assert result["chosen"] == reference.chosen
        # Each rank holds K − 1 rows of half the (padded) coordinates.
        assert result["basis_shape"] == (worker.NUM_CHECKPOINTS - 1, math.ceil(NUM_PARAMETERS / 2))
        assert result["uniform_loss"] == pytest.approx(reference.uniform_loss, rel=1e-5)
        assert result["fitted_loss"] == pytest.approx(reference.fitted_loss, rel=1e-4)
        np.testing.assert_allclose(
            result["coefficients"].numpy(), reference.coefficients.numpy(), rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(
            _flat(result["weights"]), _flat(list(module.parameters())), rtol=1e-4, atol=1e-5
        )
    # The replicas end identical.
    np.testing.assert_array_equal(
        _flat(ranks[0][name]["weights"]), _flat(ranks[1][name]["weights"])
    )


@pytest.mark.ddp
def test_batch_norm_statistics_are_averaged_over_ranks(ranks: list[dict]) -> None:
    module = worker.model(batch_norm=True)
    config = TWAConfig(steps=0)
    fit_twa(module, worker.checkpoints(module), config, worker.mse, worker.global_batches())
    for result in [r["batch_norm"] for r in ranks]:
        np.testing.assert_allclose(_flat(result["weights"]), _flat(list(module.parameters())))
        # The mean over ranks of half-batch means is the full-batch mean.
        np.testing.assert_allclose(
            result["running_mean"].numpy(), module[1].running_mean.numpy(), atol=1e-6
        )
    for key in ("running_mean", "running_var"):
        np.testing.assert_array_equal(
            ranks[0]["batch_norm"][key].numpy(), ranks[1]["batch_norm"][key].numpy()
        )
