"""Whole-run time of polyak's torch NAdamW, first step included, in fresh processes.

AlgoPerf counts every second of ``update_params`` as submission time, the first
step included, in every process and after every resume. This script runs N
optimizer steps in a fresh Python process per run (same parameters as
``bench_nadamw_torch.py``: 120 tensors, about 14.8M parameters) and reports, per
variant, the median over processes of the first step, of the later steps and of the
whole run:

- ``foreach``: ``NAdamW(..., foreach=True)``, never compiles;
- ``default``: ``NAdamW(...)``, the default policy;
- ``compiled``: ``NAdamW(..., fused=True)``, the compiled kernel from the first step.

Variants run round-robin (one process each, in turn) so that machine load hits them
alike. Each process gets an empty inductor cache unless ``--warm_cache`` is given
(AlgoPerf runs each workload in a fresh container, so the cache starts cold there).

    python scripts/bench_nadamw_torch_startup.py [--steps 200] [--processes 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS: dict[str, dict[str, bool]] = {
    "foreach": {"foreach": True},
    "default": {},
    "compiled": {"fused": True},
}


def run_child(
    variant: str, steps: int, threads: int, blocks: int, device_name: str
) -> dict[str, float]:
    """One run in this process; returns the first step's and the whole run's seconds."""
    import torch

    from polyak.optim.nadamw_torch import NAdamW

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_nadamw_torch import make_parameters, parameter_shapes, synchronized

    torch.set_num_threads(threads)
    device = torch.device(device_name)
    params = make_parameters(parameter_shapes(blocks), seed=0, dtype=torch.float32, device=device)
    optimizer = NAdamW(params, lr=1e-3, betas=(0.97, 0.998), weight_decay=0.1, **VARIANTS[variant])
    step = synchronized(optimizer.step, device)
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(steps - 1):
        step()
    total = time.perf_counter() - start
    return {"first": first, "total": total}


def spawn(variant: str, args: argparse.Namespace, cache_dir: str) -> dict[str, float]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    command = [
        sys.executable,
        os.path.abspath(__file__),
        f"--child={variant}",
        f"--steps={args.steps}",
        f"--threads={args.threads}",
        f"--blocks={args.blocks}",
        f"--device={args.device}",
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"{variant} run failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per variant")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--blocks", type=int, default=20, help="blocks of 6 tensors each")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants"
    )
    parser.add_argument(
        "--warm_cache",
        action="store_true",
        help="share one inductor cache, filled by an untimed run first",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--child", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.steps, args.processes, args.threads, args.blocks) < 1:
        parser.error("--steps, --processes, --threads and --blocks must be >= 1")
    if args.child:
        print(json.dumps(run_child(args.child, args.steps, args.threads, args.blocks, args.device)))
        return
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; expected a subset of {list(VARIANTS)}")

    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="nadamw-startup-") as scratch:
        shared_cache = os.path.join(scratch, "shared")
        if args.warm_cache:
            spawn("compiled", argparse.Namespace(**{**vars(args), "steps": 1}), shared_cache)
        for round_index in range(args.processes):
            for name in variants:
                cache = (
                    shared_cache
                    if args.warm_cache
                    else os.path.join(scratch, f"{name}-{round_index}")
                )
                results[name].append(spawn(name, args, cache))
                print(f"  round {round_index + 1} {name}: {results[name][-1]}", file=sys.stderr)

    print(
        f"{args.steps} steps on {args.device}, {args.blocks * 6} tensors, {args.threads} threads, "
        f"median of {args.processes} fresh processes, "
        f"{'warm' if args.warm_cache else 'cold'} inductor cache, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    # The default's later steps include its compile when the run reaches the switch.
    print(f"{'variant':<10}  {'first step s':>12}  {'later steps ms':>14}  {'whole run s':>11}")
    for name in variants:
        runs = results[name]
        first = statistics.median(run["first"] for run in runs)
        later = statistics.median(
            (run["total"] - run["first"]) / max(args.steps - 1, 1) for run in runs
        )
        total = statistics.median(run["total"] for run in runs)
        print(f"{name:<10}  {first:12.2f}  {later * 1e3:14.2f}  {total:11.2f}")


if __name__ == "__main__":
    main()
