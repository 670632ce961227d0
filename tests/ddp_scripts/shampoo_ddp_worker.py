"""Trains a small model with Shampoo, alone or as one rank under torchrun.

Used by tests/test_shampoo_ddp.py. Every rank sees the same full batch, so the
gradients DDP averages are identical to the single-process ones bit for bit,
and any difference in the final parameters comes from the optimizer.

    python shampoo_ddp_worker.py --output DIR                      # one process
    python -m torch.distributed.run --standalone --nproc_per_node=2 \\
        shampoo_ddp_worker.py --output DIR                         # two ranks

Each rank writes ``DIR/rank{r}.pt`` with the final parameters and its
optimizer diagnostics. The test imports :func:`train` to get the
single-process reference in its own process.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from polyak.optim.shampoo_config import ShampooConfig
from polyak.optim.shampoo_torch import Shampoo

STEPS = 20
CONFIG = ShampooConfig(
    max_preconditioner_dim=16,
    precondition_frequency=5,
    start_preconditioning_step=5,
    beta1=0.9,
    beta2=0.99,
    epsilon=1e-6,
    weight_decay=0.01,
    momentum=0.5,
    preconditioning_dim_limit=50,  # the (60, 4) embedding is grafted only
)


class SmallNet(torch.nn.Module):
    """Parameters of many shapes: conv kernel, matrices split into blocks, vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(60, 4)
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.hidden = torch.nn.Linear(128, 20)
        self.head = torch.nn.Linear(20, 5)
        self.token_head = torch.nn.Linear(4, 5, bias=False)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv(images)).flatten(1)
        logits = self.head(torch.relu(self.hidden(features)))
        return logits + self.token_head(self.embedding(tokens).mean(1))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    images = torch.randn(32, 3, 6, 6, generator=gen)
    tokens = torch.randint(0, 60, (32, 7), generator=gen)
    labels = torch.randint(0, 5, (32,), generator=gen)
    return images, tokens, labels


def train(distributed: bool) -> dict:
    """Runs the training; returns the final parameters and the optimizer's diagnostics."""
    torch.manual_seed(0)
    model = SmallNet()
    module = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    optimizer = Shampoo(model.parameters(), lr=0.05, config=CONFIG)
    for step in range(STEPS):
        images, tokens, labels = batch(step)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(module(images, tokens), labels)
        loss.backward()
        optimizer.step()
    return {
        "params": {name: p.detach().clone() for name, p in model.named_parameters()},
        "diagnostics": optimizer.diagnostics(),
        "world_size": dist.get_world_size() if distributed else 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)

    distributed = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    result = train(distributed)

    args.output.mkdir(parents=True, exist_ok=True)
    final = args.output / f"rank{rank}.pt"
    temporary = final.with_suffix(".tmp")
    torch.save(result, temporary)
    os.replace(temporary, final)
    if distributed:
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
