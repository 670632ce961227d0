"""One rank of test_twa_ddp: TWA with the basis sharded over 2 gloo ranks.

Each rank builds the same checkpoints and global batches from fixed seeds,
wraps the model in DDP and fits TWA on its half of every batch (DDP averages
the gradients, so they equal the full-batch gradient). It saves what the
test compares with a single-process fit on the full batches: the fitted
weights, coefficients, choice and losses, the size of its basis slice, and
the BatchNorm statistics recomputed at the uniform average.

Run: torchrun --standalone --nproc_per_node=2 twa_ddp_worker.py OUTPUT_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from polyak.averaging.twa_torch import TWAConfig, build_subspace, fit_twa

NUM_CHECKPOINTS, NUM_BATCHES, BATCH_SIZE = 6, 3, 16
CONFIGS = {
    "global": TWAConfig(steps=25, lr=0.1),
    "layerwise": TWAConfig(steps=25, lr=0.1, layerwise=2),
}


def model(batch_norm: bool = False) -> nn.Module:
    """A small MLP; 5·7+7 + 7·3+3 = 66 parameters."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(5, 7)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(7))
    layers += [nn.Tanh(), nn.Linear(7, 3)]
    return nn.Sequential(*layers)


def checkpoints(module: nn.Module) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        [p.detach() + 0.3 * torch.randn(p.shape, generator=generator) for p in module.parameters()]
        for _ in range(NUM_CHECKPOINTS)
    ]


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    return [
        (
            torch.randn(BATCH_SIZE, 5, generator=generator),
            torch.randn(BATCH_SIZE, 3, generator=generator),
        )
        for _ in range(NUM_BATCHES)
    ]


def mse(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    inputs, targets = batch
    return ((module(inputs) - targets) ** 2).mean()


def local_half(batch: tuple[torch.Tensor, ...], rank: int, world: int) -> tuple[torch.Tensor, ...]:
    size = batch[0].shape[0] // world
    return tuple(t[rank * size : (rank + 1) * size] for t in batch)


def main(output: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = [local_half(b, rank, world) for b in global_batches()]
    out: dict = {"world_size": world}
    for name, config in CONFIGS.items():
        ddp = DistributedDataParallel(model())
        snapshots = checkpoints(ddp)
        shapes = [p.shape for p in ddp.parameters()]
        subspace = build_subspace(snapshots, shapes, config)
        result = fit_twa(ddp, subspace, config, mse, batches)
        out[name] = {
            "weights": [p.detach().clone() for p in ddp.parameters()],
            "coefficients": result.coefficients,
            "chosen": result.chosen,
            "uniform_loss": result.uniform_loss,
            "fitted_loss": result.fitted_loss,
            "basis_shape": tuple(subspace.basis.shape),
        }
    ddp = DistributedDataParallel(model(batch_norm=True))
    fit_twa(ddp, checkpoints(ddp), TWAConfig(steps=0), mse, batches)
    batch_norm = ddp.module[1]
    out["batch_norm"] = {
        "weights": [p.detach().clone() for p in ddp.parameters()],
        "running_mean": batch_norm.running_mean.clone(),
        "running_var": batch_norm.running_var.clone(),
    }
    torch.save(out, output / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    # Every result is on disk and the group is closed: skip the interpreter's teardown,
    # where a C++ thread of the process group occasionally aborts the process
    # ("terminate called without an active exception") after the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
