"""Benchmark: JAX Shampoo's per-step time relative to JAX NadamW, side by side in one run.

Both optimizers train the same MLP (a few 256–1024-wide matrices) on random
data with their default hyperparameters, except ``precondition_frequency``.
The amortized cost is the wall time of ``--steps`` jitted steps, root
recomputations included (with frequency 100 and 200 steps, every window holds
two root steps), as a median over ``--repeats`` interleaved repeats. Steps are
timed one by one, blocking on each (an unblocked stream of Shampoo updates
once stalled XLA's CPU runtime here), which also separates ordinary steps
from root steps. Two ratios are reported: the full train step (forward,
backward and update) and the optimizer update alone.

Usage::

    python scripts/bench_shampoo_jax.py --threads=2
"""

from __future__ import annotations

import itertools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from absl import app, flags

_STEPS = flags.DEFINE_integer("steps", 200, "Jitted steps per timed window (>= 200 advised).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed windows per optimizer; medians are reported.")
_FREQUENCY = flags.DEFINE_integer("precondition_frequency", 100, "Shampoo's root interval.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Examples per step.")
_WIDTHS = flags.DEFINE_list(
    "widths", ["256", "1024", "512", "256"], "Layer widths: input, hidden..., output."
)
_THREADS = flags.DEFINE_integer("threads", 2, "CPU threads for XLA (and the process affinity).")


def _limit_threads(threads: int) -> None:
    """Must run before jax is imported: XLA reads its flags once."""
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if hasattr(os, "sched_setaffinity"):
        available = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, available[:threads])


def main(argv: list[str]) -> None:
    del argv
    if _STEPS.value < 1 or _REPEATS.value < 1 or _FREQUENCY.value < 1 or _THREADS.value < 1:
        raise app.UsageError("steps, repeats, precondition_frequency and threads must be >= 1")
    widths = [int(w) for w in _WIDTHS.value]
    if len(widths) < 2 or min(widths) < 1:
        raise app.UsageError(f"widths={_WIDTHS.value!r} needs at least two positive sizes")
    _limit_threads(_THREADS.value)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from polyak.optim.nadamw_config import NadamWConfig
    from polyak.optim.nadamw_jax import make_nadamw
    from polyak.optim.shampoo_config import ShampooConfig
    from polyak.optim.shampoo_jax import make_shampoo

    step_hint = 10_000
    rng = np.random.default_rng(0)
    params = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        params[f"w{i}"] = jnp.asarray(
            rng.standard_normal((fan_in, fan_out)).astype(np.float32) / np.sqrt(fan_in)
        )
        params[f"b{i}"] = jnp.zeros((fan_out,), jnp.float32)
    inputs = jnp.asarray(rng.standard_normal((_BATCH.value, widths[0])).astype(np.float32))
    targets = jnp.asarray(rng.standard_normal((_BATCH.value, widths[-1])).astype(np.float32))

    def loss_fn(p: dict[str, Any]) -> jax.Array:
        hidden = inputs
        for i in range(len(widths) - 1):
            hidden = hidden @ p[f"w{i}"] + p[f"b{i}"]
            if i < len(widths) - 2:
                hidden = jax.nn.gelu(hidden)
        return jnp.mean((hidden - targets) ** 2)

    optimizers = {
        "nadamw": make_nadamw(NadamWConfig.from_hyperparameters(None), step_hint),
        "shampoo": make_shampoo(
            ShampooConfig.from_hyperparameters({"precondition_frequency": _FREQUENCY.value}),
            step_hint,
        ),
    }

    def compiled_steps(tx: optax.GradientTransformation) -> tuple[Callable, Callable, Any]:
        def train_step(p, state):
            grads = jax.grad(loss_fn)(p)
            updates, state = tx.update(grads, state, p)
            return optax.apply_updates(p, updates), state

        def update_only(grads, state, p):
            return tx.update(grads, state, p)

        state = tx.init(params)
        grads = jax.grad(loss_fn)(params)
        train = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, state).compile()
        update = jax.jit(update_only, donate_argnums=(1,)).lower(grads, state, params).compile()
        return train, update, grads

    compiled = {}
    for name, tx in optimizers.items():
        start = time.perf_counter()
        compiled[name] = compiled_steps(tx)
        print(f"compiled {name} in {time.perf_counter() - start:.1f} s", flush=True)

    def fresh(name: str) -> tuple[Any, Any]:
        p = jax.tree.map(jnp.array, params)
        return p, optimizers[name].init(p)

    amortized: dict[str, dict[str, list[float]]] = {
        name: {"train": [], "update": []} for name in optimizers
    }
    per_step: dict[str, dict[str, list[float]]] = {
        name: {"ordinary": [], "root": []} for name in optimizers
    }
    steps = _STEPS.value
    for repeat in range(_REPEATS.value):
        for name in optimizers:  # interleaved, so that drifts in machine load hit both
            train, update, grads = compiled[name]
            p, state = fresh(name)
            jax.block_until_ready((p, state))
            total = 0.0
            for step in range(1, steps + 1):
                begin = time.perf_counter()
                p, state = train(p, state)
                jax.block_until_ready(p)
                elapsed = time.perf_counter() - begin
                total += elapsed
                is_root = name == "shampoo" and step % _FREQUENCY.value == 0
                per_step[name]["root" if is_root else "ordinary"].append(elapsed)
            amortized[name]["train"].append(total / steps)

            p, state = fresh(name)
            jax.block_until_ready((p, state))
            total = 0.0
            for _ in range(steps):
                begin = time.perf_counter()
                _, state = update(grads, state, p)
                jax.block_until_ready(state)
                total += time.perf_counter() - begin
            amortized[name]["update"].append(total / steps)
            print(
                f"repeat {repeat + 1}: {name} train {1e3 * amortized[name]['train'][-1]:.1f} "
                f"ms/step, update {1e3 * amortized[name]['update'][-1]:.1f} ms/step",
                flush=True,
            )

    def ms(values: list[float]) -> str:
        return f"{1e3 * statistics.median(values):9.2f}" if values else "        -"

    shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in params.items() if k.startswith("w"))
    print()
    print(
        f"jax {jax.__version__}, optax {optax.__version__}, python {sys.version.split()[0]}, "
        f"{platform.machine()}, {_THREADS.value} threads, device {jax.devices()[0].platform}"
    )
    print(
        f"model: MLP {shapes} + biases; batch {_BATCH.value}; {steps} steps x "
        f"{_REPEATS.value} repeats; Shampoo precondition_frequency {_FREQUENCY.value} "
        "(defaults otherwise: max_preconditioner_dim 1024, Adam grafting)"
    )
    print()
    header = (
        f"{'optimizer':10s} {'train ms/step':>14s} {'update ms/step':>15s} "
        f"{'ordinary step':>14s} {'root step':>10s}"
    )
    print(header)
    print("-" * len(header))
    for name in optimizers:
        print(
            f"{name:10s} {ms(amortized[name]['train']):>14s} {ms(amortized[name]['update']):>15s} "
            f"{ms(per_step[name]['ordinary']):>14s} {ms(per_step[name]['root']):>10s}"
        )
    print()
    for kind, label in (("train", "full train step"), ("update", "optimizer update alone")):
        ratio = statistics.median(amortized["shampoo"][kind]) / statistics.median(
            amortized["nadamw"][kind]
        )
        print(f"Shampoo / NadamW, {label} (amortized, median of repeats): {ratio:.2f}x")


if __name__ == "__main__":
    app.run(main)
