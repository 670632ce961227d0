"""Step time of polyak's torch NAdamW against torch.optim.AdamW, side by side in one run.

A transformer-like set of parameters (by default 20 blocks of 6 tensors: 120 tensors,
about 14.8M parameters) with fixed random gradients. Every optimizer owns its own copy.
After a warmup, the variants are timed round-robin (one step each, in turn) so that
machine load hits them alike; the table shows the median and minimum step times and, as the
headline, the median over rounds of each variant's time divided by that of
``torch.optim.AdamW(fused=True)`` in the same round.

    python scripts/bench_nadamw_torch.py [--threads 2] [--repeats 50] [--warmup 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from polyak.optim.nadamw_torch import NAdamW

# One block: attention (qkv, out), MLP (in, out), a norm scale and an MLP bias.
_BLOCK_SHAPES: tuple[tuple[int, ...], ...] = (
    (256, 720),
    (256, 240),
    (256, 960),
    (960, 256),
    (256,),
    (960,),
)


def parameter_shapes(num_blocks: int) -> list[tuple[int, ...]]:
    return [shape for _ in range(num_blocks) for shape in _BLOCK_SHAPES]


def make_parameters(
    shapes: list[tuple[int, ...]], seed: int, dtype: torch.dtype
) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype))
        param.grad = torch.randn(shape, generator=generator, dtype=dtype)
        params.append(param)
    return params


def build_variants(
    shapes: list[tuple[int, ...]], dtype: torch.dtype
) -> dict[str, torch.optim.Optimizer]:
    hyper = {"lr": 1e-3, "betas": (0.97, 0.998), "eps": 1e-8, "weight_decay": 0.1}
    return {
        "polyak NAdamW fused (compiled)": NAdamW(
            make_parameters(shapes, 0, dtype), **hyper, fused=True
        ),
        "polyak NAdamW foreach": NAdamW(make_parameters(shapes, 0, dtype), **hyper, foreach=True),
        "torch AdamW foreach": torch.optim.AdamW(
            make_parameters(shapes, 0, dtype), **hyper, foreach=True
        ),
        "torch AdamW fused": torch.optim.AdamW(
            make_parameters(shapes, 0, dtype), **hyper, fused=True
        ),
    }


def time_call(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--blocks", type=int, default=20, help="blocks of 6 tensors each")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant")
    parser.add_argument("--repeats", type=int, default=50, help="timed steps per variant")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    if args.blocks < 1 or args.warmup < 0 or args.repeats < 1 or args.threads < 1:
        parser.error("--blocks, --repeats and --threads must be >= 1, --warmup >= 0")

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    shapes = parameter_shapes(args.blocks)
    num_params = sum(torch.Size(shape).numel() for shape in shapes)
    variants = build_variants(shapes, dtype)

    first_step = {name: time_call(optimizer.step) for name, optimizer in variants.items()}
    for _ in range(args.warmup):
        for optimizer in variants.values():
            optimizer.step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, optimizer in variants.items():
            times[name].append(time_call(optimizer.step))

    medians = {name: statistics.median(values) for name, values in times.items()}
    reference = times["torch AdamW fused"]
    # Each round times every variant back to back, so a ratio within a round sees about
    # the same machine load on both sides; the median over rounds is the robust figure.
    paired_ratios = {
        name: statistics.median(t / r for t, r in zip(values, reference))
        for name, values in times.items()
    }
    print(
        f"torch {torch.__version__}, {args.threads} threads, {len(shapes)} tensors, "
        f"{num_params / 1e6:.2f}M params, {args.dtype}, "
        f"median of {args.repeats} steps after {args.warmup} warmup, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    name_width = max(len(name) for name in variants)
    print(
        f"{'optimizer':<{name_width}}  {'median ms':>9}  {'min ms':>8}  "
        f"{'vs AdamW fused (paired median)':>30}"
    )
    for name in variants:
        print(
            f"{name:<{name_width}}  {medians[name] * 1e3:9.2f}  {min(times[name]) * 1e3:8.2f}  "
            f"{paired_ratios[name]:29.2f}x"
        )
    compiled = "polyak NAdamW fused (compiled)"
    print(f"first step of {compiled}, compile included: {first_step[compiled]:.1f} s")


if __name__ == "__main__":
    main()
