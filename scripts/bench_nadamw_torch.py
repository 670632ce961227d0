"""Step time of polyak's torch NAdamW against torch.optim.AdamW, side by side in one run.

A transformer-like set of parameters (by default 20 blocks of 6 tensors: 120 tensors,
about 14.8M parameters) with fixed random gradients. Every optimizer owns its own copy.
After a warmup, the variants are timed round-robin (one step each, in turn) so that
machine load hits them alike; the table shows the median and minimum step times and, as the
headline, the median over rounds of each variant's time divided by that of
``torch.optim.AdamW(fused=True)`` in the same round. Each step's CPU time (all of the
process's threads) is paired the same way: a variant that keeps two threads busy where
the reference keeps one shows it there, whatever the wall clock says. ``--runs`` repeats
the whole measurement with fresh optimizers and ends with every run's ratio, so
"<= 1.3x in every run" can be read off one command.

    python scripts/bench_nadamw_torch.py [--threads 2] [--repeats 50] [--warmup 5] [--runs 5]

``--device=cuda`` times the same steps on the GPU (each step synchronized, so its
time is the kernels', not the launch's); CPU time then measures the host's launch work.
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
    shapes: list[tuple[int, ...]], seed: int, dtype: torch.dtype, device: torch.device
) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        value = torch.randn(shape, generator=generator, dtype=dtype)
        param = torch.nn.Parameter(value.to(device))
        param.grad = torch.randn(shape, generator=generator, dtype=dtype).to(device)
        params.append(param)
    return params


def build_variants(
    shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device
) -> dict[str, torch.optim.Optimizer]:
    hyper = {"lr": 1e-3, "betas": (0.97, 0.998), "eps": 1e-8, "weight_decay": 0.1}

    def parameters() -> list[torch.nn.Parameter]:
        return make_parameters(shapes, 0, dtype, device)

    return {
        "polyak NAdamW fused (compiled)": NAdamW(parameters(), **hyper, fused=True),
        "polyak NAdamW foreach": NAdamW(parameters(), **hyper, foreach=True),
        "torch AdamW foreach": torch.optim.AdamW(parameters(), **hyper, foreach=True),
        "torch AdamW fused": torch.optim.AdamW(parameters(), **hyper, fused=True),
    }


def synchronized(step: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """``step`` and then a wait for its kernels, where they run asynchronously."""

    def run() -> None:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def time_call(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def time_call_with_cpu(function: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds and the process's CPU seconds (every thread) of one call."""
    cpu_start, start = time.process_time(), time.perf_counter()
    function()
    return time.perf_counter() - start, time.process_time() - cpu_start


REFERENCE = "torch AdamW fused"
COMPILED = "polyak NAdamW fused (compiled)"


def paired_median_ratios(
    times: dict[str, list[float]], reference: str = REFERENCE
) -> dict[str, float]:
    """Each round times every variant back to back, so a ratio within a round sees about
    the same machine load on both sides; the median over rounds is the robust figure."""
    return {
        name: statistics.median(t / r for t, r in zip(values, times[reference]) if r > 0)
        for name, values in times.items()
    }


def measure_once(
    shapes: list[tuple[int, ...]],
    dtype: torch.dtype,
    warmup: int,
    repeats: int,
    device: torch.device,
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, float]]:
    """Wall and CPU seconds per timed step of every variant, and each first step."""
    steps = {
        name: synchronized(optimizer.step, device)
        for name, optimizer in build_variants(shapes, dtype, device).items()
    }
    first_step = {name: time_call(step) for name, step in steps.items()}
    for _ in range(warmup):
        for step in steps.values():
            step()
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            seconds, cpu_seconds = time_call_with_cpu(step)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
    return wall, cpu, first_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--blocks", type=int, default=20, help="blocks of 6 tensors each")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant")
    parser.add_argument("--repeats", type=int, default=50, help="timed steps per variant")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--runs", type=int, default=1, help="whole measurements, fresh optimizers")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device=cuda: no CUDA device is visible")
    device = torch.device(args.device)
    if min(args.blocks, args.repeats, args.threads, args.runs) < 1 or args.warmup < 0:
        parser.error("--blocks, --repeats, --threads and --runs must be >= 1, --warmup >= 0")

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    shapes = parameter_shapes(args.blocks)
    num_params = sum(torch.Size(shape).numel() for shape in shapes)
    print(
        f"torch {torch.__version__}, {args.device}, {args.threads} threads, {len(shapes)} tensors, "
        f"{num_params / 1e6:.2f}M params, {args.dtype}, "
        f"median of {args.repeats} steps after {args.warmup} warmup, {args.runs} run(s)"
    )
    per_run: list[dict[str, float]] = []
    for run in range(1, args.runs + 1):
        wall, cpu, first_step = measure_once(shapes, dtype, args.warmup, args.repeats, device)
        ratios = paired_median_ratios(wall)
        cpu_ratios = paired_median_ratios(cpu)
        per_run.append(ratios)
        print(f"\nrun {run}: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        name_width = max(len(name) for name in wall)
        print(
            f"{'optimizer':<{name_width}}  {'median ms':>9}  {'min ms':>8}  "
            f"{'wall vs AdamW fused':>19}  {'CPU vs AdamW fused':>18}"
        )
        for name in wall:
            print(
                f"{name:<{name_width}}  {statistics.median(wall[name]) * 1e3:9.2f}  "
                f"{min(wall[name]) * 1e3:8.2f}  {ratios[name]:18.2f}x  {cpu_ratios[name]:17.2f}x"
            )
        print(f"first step of {COMPILED}, compile included: {first_step[COMPILED]:.1f} s")
    if args.runs > 1:
        print("\npaired wall-time ratio to torch AdamW fused, per run:")
        for name in per_run[0]:
            if name != REFERENCE:
                values = [ratios[name] for ratios in per_run]
                shown = ", ".join(f"{v:.2f}" for v in values)
                print(f"  {name}: {shown} (worst {max(values):.2f})")


if __name__ == "__main__":
    main()
