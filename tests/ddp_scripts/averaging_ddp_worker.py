"""One rank of test_averaging_ddp: sharded averaging under DDP (gloo, CPU).

Each rank trains a small DDP model on its own batches (the gradients are
all-reduced, so the replicas stay identical) and feeds two averagers the same
live weights: the sharded one under test and a replicated device one as the
reference. It saves, per rank, what the test compares: both averages, the
weights loaded by the swap, the slice sizes, and the averages after resuming
from rank 0's checkpoint (AlgoPerf saves only rank 0's optimizer state).

Run: torchrun --standalone --nproc_per_node=2 averaging_ddp_worker.py OUTPUT_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from polyak.averaging.averager_torch import TorchAverager
from polyak.averaging.config import AveragingConfig

SETTINGS = {
    "lawa": dict(mode="lawa", every=2, window=3),
    "ema": dict(mode="ema", every=2, beta=0.7),
}
STEPS, CHECKPOINT_AT, NAN_AT = 14, 8, 10


def _model() -> nn.Module:
    torch.manual_seed(0)
    # 42 + 7 + 7 + 21 + 3 = 80 parameters and 14 float buffers: 94 tracked.
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3))


def _train_step(ddp: nn.Module, optimizer: torch.optim.Optimizer, rng: np.random.Generator) -> None:
    x = torch.from_numpy(rng.normal(size=(8, 5)).astype(np.float32))
    y = torch.from_numpy(rng.normal(size=(8, 3)).astype(np.float32))
    optimizer.zero_grad(set_to_none=True)
    ((ddp(x) - y) ** 2).mean().backward()
    optimizer.step()


def _config(placement: str, mode: str) -> AveragingConfig:
    return AveragingConfig(placement=placement, buffers="average", step_hint=100, **SETTINGS[mode])


def run(mode: str, rank: int) -> dict:
    ddp = DistributedDataParallel(_model())
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    device = TorchAverager(_config("device", mode), ddp)
    sharded = TorchAverager(_config("sharded", mode), ddp)
    rng = np.random.default_rng(100 + rank)  # each rank its own batches
    live = list(ddp.parameters())
    resumed: TorchAverager | None = None
    out: dict = {}
    for step in range(1, STEPS + 1):
        _train_step(ddp, optimizer, rng)
        if step == NAN_AT:
            saved = live[2].detach().clone()
            with torch.no_grad():
                live[2][0] = float("nan")
        device.collect(step)
        sharded.collect(step)
        if resumed is not None:
            resumed.collect(step)
        if step == NAN_AT:
            with torch.no_grad():
                live[2].copy_(saved)
        if step == CHECKPOINT_AT:
            # AlgoPerf checkpoints on rank 0 only; every rank restores that file.
            sharded.swap_in_average()
            state = [sharded.state_dict() if rank == 0 else None]
            dist.broadcast_object_list(state, src=0)
            sharded.restore_live()
            out["device_state_at_checkpoint"] = device.state_dict()
            out["checkpoint"] = state[0]
            resumed = TorchAverager(_config("sharded", mode), ddp)
            resumed.load_state_dict(state[0])
            resumed.restore_live()
    assert resumed is not None
    store = sharded._store
    out["shard_numel"] = store.window[0][0].numel() if mode == "lawa" else store.ema[0].numel()
    out["num_skipped"] = (device.num_skipped_nonfinite, sharded.num_skipped_nonfinite)
    out["device"] = device.average()
    out["sharded"] = sharded.average()
    out["resumed"] = resumed.average()
    sharded.swap_in_average()
    out["swapped_in"] = [t.detach().clone() for t in ddp.module.state_dict().values()]
    sharded.restore_live()
    device.swap_in_average()
    out["device_swapped_in"] = [t.detach().clone() for t in ddp.module.state_dict().values()]
    device.restore_live()
    return out


def swap_identity(mode: str, rank: int) -> dict:
    """Training with a swap and restore around every other step equals training without.

    The swap exchanges storage under DDP (buckets as gradient views): the
    parameter objects, their gradients and the optimizer's state must stay
    the same objects, and the trajectory bit for bit the same.
    """
    models, optimizers = [], []
    for _ in range(2):
        ddp = DistributedDataParallel(_model(), gradient_as_bucket_view=True)
        models.append(ddp)
        optimizers.append(torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9))
    averager = TorchAverager(
        AveragingConfig(placement="device", step_hint=100, **{**SETTINGS[mode], "every": 1}),
        models[1],
    )
    rngs = [np.random.default_rng(200 + rank) for _ in range(2)]
    parameters = list(models[1].parameters())
    identity_kept = True
    for step in range(1, 9):
        for ddp, optimizer, rng in zip(models, optimizers, rngs):
            _train_step(ddp, optimizer, rng)
        averager.collect(step)
        if step % 2:
            continue
        grads = [p.grad for p in parameters]
        grad_pointers = [p.grad.data_ptr() for p in parameters]
        momentum = [optimizers[1].state[p]["momentum_buffer"] for p in parameters]
        averager.swap_in_average()
        models[1].eval()
        with torch.no_grad():
            models[1](torch.ones(4, 5))  # an eval forward under DDP
        models[1].train()
        averager.restore_live()
        identity_kept &= list(models[1].parameters()) == parameters
        identity_kept &= all(p.grad is g for p, g in zip(parameters, grads))
        identity_kept &= [p.grad.data_ptr() for p in parameters] == grad_pointers
        identity_kept &= all(
            optimizers[1].state[p]["momentum_buffer"] is m for p, m in zip(parameters, momentum)
        )
    return {
        "identity_kept": identity_kept,
        "trajectory_equal": all(
            torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters())
        ),
    }


def main() -> None:
    output = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    results = {"world_size": dist.get_world_size()}
    for mode in SETTINGS:
        results[mode] = run(mode, rank)
        results[f"{mode}_swap_identity"] = swap_identity(mode, rank)
    output.mkdir(parents=True, exist_ok=True)
    torch.save(results, output / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Every result is on disk and the group is closed: skip the interpreter's teardown,
    # where a C++ thread of the process group occasionally aborts the process
    # ("terminate called without an active exception") after the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
