"""Benchmark: JAX Shampoo's per-step time relative to JAX NadamW, side by side in one run.

Two models (``--model``, both by default), each trained on random data by both
optimizers with their default hyperparameters except ``precondition_frequency``:

- ``mlp``: an MLP (256-1024-512-256 by default, batch 256);
- ``transformer``: the model and batch of ``scripts/bench_shampoo_torch.py``
  part (a), in plain JAX with the torch parameter shapes (so that Shampoo cuts
  the same blocks): one pre-norm block of width 256 (4 heads, feed-forward
  1024, ReLU, causal) between tied embeddings of a 1000-token vocabulary with
  an output bias, 16 sequences of 256 tokens.

The amortized cost is the wall time of ``--steps`` jitted steps, root
recomputations included (with frequency 100 and 200 steps, every window holds
two root steps), as a median over ``--repeats`` interleaved repeats. Steps are
timed one by one, blocking on each (an unblocked stream of Shampoo updates
once stalled XLA's CPU runtime here), which also separates ordinary steps
from root steps. Compilation is timed apart and never enters the ratios.

Per model it prints the full-train-step and update-alone ratios and a FLOP
floor: the ratio implied by Shampoo's extra matmuls (statistics G₍ᵢ₎G₍ᵢ₎ᵀ and
preconditioning, 2·numel·dᵢ FLOPs each per block and mode) run at the FLOP
rate of the forward and backward pass alone (XLA's FLOP count of the gradient
over its measured time), added to NadamW's step. The root step is shown next
to ``torch.linalg.eigh`` (alone and with the twin's V·diag·Vᵀ) and a jitted
``jnp.linalg.eigh`` on the same matrices (the bias-corrected factors of a root
step), timed interleaved.

LAPACK threads: jaxlib's eigh runs in scipy's OpenBLAS, which by default
starts as many threads as cores next to XLA's own pool. On this 2-core host
under load that made a batch of 1024-wide eighs several times slower than
with one OpenBLAS thread, so ``--lapack_threads`` defaults to 1 (XLA already
spreads a batch over its pool). Torch's eigh uses MKL with ``--threads``
OpenMP threads and passive waiting, as in ``bench_shampoo_torch.py``.

Usage::

    python scripts/bench_shampoo_jax.py --threads=2
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from absl import app, flags

_MODEL = flags.DEFINE_enum("model", "both", ["mlp", "transformer", "both"], "Model(s) to train.")
_STEPS = flags.DEFINE_integer("steps", 200, "Jitted steps per timed window (>= 200 advised).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed windows per optimizer; medians are reported.")
_FREQUENCY = flags.DEFINE_integer("precondition_frequency", 100, "Shampoo's root interval.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "MLP: examples per step.")
_WIDTHS = flags.DEFINE_list(
    "widths", ["256", "1024", "512", "256"], "MLP: layer widths: input, hidden..., output."
)
_D_MODEL = flags.DEFINE_integer("d_model", 256, "Transformer: width.")
_HEADS = flags.DEFINE_integer("heads", 4, "Transformer: attention heads.")
_VOCAB = flags.DEFINE_integer("vocab", 1000, "Transformer: vocabulary size.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Transformer: tokens per sequence.")
_SEQUENCES = flags.DEFINE_integer("sequences", 16, "Transformer: sequences per batch.")
_THREADS = flags.DEFINE_integer("threads", 2, "CPU threads for XLA (and the process affinity).")
_LAPACK_THREADS = flags.DEFINE_integer(
    "lapack_threads", 1, "OpenBLAS threads behind jaxlib's eigh (see the module docstring)."
)
_TORCH_EIGH = flags.DEFINE_bool(
    "torch_eigh", True, "Time torch.linalg.eigh on the root step's matrices (if importable)."
)


def _limit_threads(threads: int, lapack_threads: int) -> None:
    """Must run before jax and torch are imported: XLA and OpenBLAS read these once."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    os.environ["OPENBLAS_NUM_THREADS"] = str(lapack_threads)
    # Spinning OpenMP threads steal a loaded host's cores (see bench_shampoo_torch.py).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if hasattr(os, "sched_setaffinity"):
        available = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, available[:threads])


@dataclasses.dataclass
class Problem:
    """A model's parameters, a loss of them (the batch is baked in) and a description."""

    name: str
    params: dict[str, Any]
    loss_fn: Callable[[dict[str, Any]], Any]
    description: str


def mlp_problem() -> Problem:
    import jax
    import jax.numpy as jnp
    import numpy as np

    widths = [int(w) for w in _WIDTHS.value]
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

    shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in params.items() if k.startswith("w"))
    return Problem("mlp", params, loss_fn, f"MLP {shapes} + biases; batch {_BATCH.value}")


def transformer_problem() -> Problem:
    """bench_shampoo_torch.py's TinyLanguageModel (one layer), with torch's parameter shapes."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    d, heads, vocab, seq_len = _D_MODEL.value, _HEADS.value, _VOCAB.value, _SEQ_LEN.value
    if d % heads:
        raise app.UsageError(f"d_model={d} must be a multiple of heads={heads}")
    rng = np.random.default_rng(0)

    def dense(fan_out: int, fan_in: int) -> jax.Array:  # torch's (out, in) layout
        bound = 1 / math.sqrt(fan_in)
        return jnp.asarray(rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32))

    params = {
        "embedding": jnp.asarray(rng.standard_normal((vocab, d)).astype(np.float32)),
        "in_proj_weight": dense(3 * d, d),
        "in_proj_bias": jnp.zeros((3 * d,), jnp.float32),
        "out_proj_weight": dense(d, d),
        "out_proj_bias": jnp.zeros((d,), jnp.float32),
        "linear1_weight": dense(4 * d, d),
        "linear1_bias": jnp.zeros((4 * d,), jnp.float32),
        "linear2_weight": dense(d, 4 * d),
        "linear2_bias": jnp.zeros((d,), jnp.float32),
        "head_bias": jnp.zeros((vocab,), jnp.float32),
    }
    for norm in ("norm1", "norm2", "norm"):
        params[f"{norm}_weight"] = jnp.ones((d,), jnp.float32)
        params[f"{norm}_bias"] = jnp.zeros((d,), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, vocab, (_SEQUENCES.value, seq_len + 1)), jnp.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    causal = jnp.tril(jnp.ones((seq_len, seq_len), jnp.bool_))

    def layer_norm(x: jax.Array, p: dict[str, Any], name: str) -> jax.Array:
        mean = jnp.mean(x, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(variance + 1e-5) * p[f"{name}_weight"] + p[f"{name}_bias"]

    def loss_fn(p: dict[str, Any]) -> jax.Array:
        x = p["embedding"][inputs]
        h = layer_norm(x, p, "norm1")
        qkv = h @ p["in_proj_weight"].T + p["in_proj_bias"]
        q, k, v = (
            t.reshape(t.shape[0], seq_len, heads, d // heads) for t in jnp.split(qkv, 3, axis=-1)
        )
        scores = jnp.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(d // heads)
        weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
        attended = jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(x.shape)
        x = x + attended @ p["out_proj_weight"].T + p["out_proj_bias"]
        h = layer_norm(x, p, "norm2")
        h = jax.nn.relu(h @ p["linear1_weight"].T + p["linear1_bias"])
        x = x + h @ p["linear2_weight"].T + p["linear2_bias"]
        logits = layer_norm(x, p, "norm") @ p["embedding"].T + p["head_bias"]
        log_probs = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], axis=-1))

    count = sum(int(np.prod(v.shape)) for v in params.values())
    return Problem(
        "transformer",
        params,
        loss_fn,
        f"transformer d_model={d}, 1 layer, {heads} heads, vocab {vocab}, "
        f"{count / 1e6:.2f}M params; {_SEQUENCES.value * seq_len} tokens/batch",
    )


def shampoo_matmul_flops(params: dict[str, Any], config: Any) -> int:
    """FLOPs of one step's statistics and preconditioning: 2·2·numel·dᵢ per block and mode."""
    from polyak.optim.shampoo_blocking import plan_parameter

    total = 0
    for leaf in params.values():
        for block in plan_parameter(tuple(leaf.shape), config).blocks:
            total += sum(4 * block.numel * dim for dim in block.dims)
    return total


def shampoo_state_of(tree: Any) -> Any:
    """The first node of an optax state tree that holds Shampoo factors."""
    if hasattr(tree, "factors") and isinstance(tree.factors, dict):
        return tree
    children = tree.values() if isinstance(tree, dict) else tree
    if isinstance(tree, tuple | list | dict):
        for child in children:
            found = shampoo_state_of(child)
            if found is not None:
                return found
    return None


def median_ms(values: list[float]) -> str:
    return f"{1e3 * statistics.median(values):9.2f}" if values else "        -"


def run_problem(problem: Problem) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from polyak.optim.nadamw_config import NadamWConfig
    from polyak.optim.nadamw_jax import make_nadamw
    from polyak.optim.shampoo_config import ShampooConfig
    from polyak.optim.shampoo_jax import make_shampoo

    step_hint = 10_000
    frequency = _FREQUENCY.value
    shampoo_config = ShampooConfig.from_hyperparameters({"precondition_frequency": frequency})
    optimizers = {
        "nadamw": make_nadamw(NadamWConfig.from_hyperparameters(None), step_hint),
        "shampoo": make_shampoo(shampoo_config, step_hint),
    }
    params, loss_fn = problem.params, problem.loss_fn

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

    print(f"\n=== {problem.name}: {problem.description}", flush=True)
    compile_seconds = {}
    compiled = {}
    for name, tx in optimizers.items():
        start = time.perf_counter()
        compiled[name] = compiled_steps(tx)
        compile_seconds[name] = time.perf_counter() - start
    start = time.perf_counter()
    gradient = jax.jit(jax.grad(loss_fn)).lower(params).compile()
    compile_seconds["gradient"] = time.perf_counter() - start
    print(
        "compile (not in any ratio): "
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in compile_seconds.items()),
        flush=True,
    )
    cost = gradient.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    gradient_flops = float(cost.get("flops", 0.0)) if cost else 0.0

    def fresh(name: str) -> tuple[Any, Any]:
        p = jax.tree.map(jnp.array, params)
        return p, optimizers[name].init(p)

    amortized: dict[str, dict[str, list[float]]] = {
        name: {"train": [], "update": []} for name in optimizers
    }
    per_step: dict[str, dict[str, list[float]]] = {
        name: {"ordinary": [], "root": []} for name in optimizers
    }
    gradient_times: list[float] = []
    steps = _STEPS.value
    root_state = None
    for repeat in range(_REPEATS.value):
        for name in optimizers:  # interleaved, so that drifts in machine load hit both
            train, update, grads = compiled[name]
            p, state = fresh(name)
            jax.block_until_ready((p, state))
            total = 0.0
            for step in range(1, steps + 1):
                if name == "shampoo" and step % frequency == 0 and root_state is None:
                    # The state going into a root step: its factors are the root's input.
                    root_state = (jax.tree.map(np.asarray, shampoo_state_of(state)), step)
                begin = time.perf_counter()
                p, state = train(p, state)
                jax.block_until_ready(p)
                elapsed = time.perf_counter() - begin
                total += elapsed
                is_root = name == "shampoo" and step % frequency == 0
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
        for _ in range(min(steps, 50)):
            begin = time.perf_counter()
            jax.block_until_ready(gradient(params))
            gradient_times.append(time.perf_counter() - begin)

    print()
    header = (
        f"{'optimizer':10s} {'train ms/step':>14s} {'update ms/step':>15s} "
        f"{'ordinary step':>14s} {'root step':>10s}"
    )
    print(header)
    print("-" * len(header))
    for name in optimizers:
        print(
            f"{name:10s} {median_ms(amortized[name]['train']):>14s} "
            f"{median_ms(amortized[name]['update']):>15s} "
            f"{median_ms(per_step[name]['ordinary']):>14s} {median_ms(per_step[name]['root']):>10s}"
        )
    print(f"{'(fwd+bwd)':10s} {median_ms(gradient_times):>14s}")
    print()
    ratios = {}
    for kind, label in (("train", "full train step"), ("update", "optimizer update alone")):
        ratios[kind] = statistics.median(amortized["shampoo"][kind]) / statistics.median(
            amortized["nadamw"][kind]
        )
        print(f"Shampoo / NadamW, {label} (amortized, median of repeats): {ratios[kind]:.2f}x")

    extra_flops = shampoo_matmul_flops(params, shampoo_config)
    gradient_seconds = statistics.median(gradient_times)
    nadamw_seconds = statistics.median(amortized["nadamw"]["train"])
    rate = gradient_flops / gradient_seconds
    ratios["floor"] = (nadamw_seconds + extra_flops / rate) / nadamw_seconds
    print(
        f"FLOP floor: fwd+bwd {gradient_flops / 1e9:.2f} GFLOP (XLA count) in "
        f"{1e3 * gradient_seconds:.2f} ms = {rate / 1e9:.1f} GFLOP/s; Shampoo's statistics and "
        f"preconditioning {extra_flops / 1e9:.2f} GFLOP/step = {1e3 * extra_flops / rate:.2f} ms "
        f"at that rate -> floor ratio {ratios['floor']:.2f}x (goal 1.3x)"
    )
    if root_state is not None:
        ratios.update(compare_eighs(root_state[0], root_state[1], shampoo_config, per_step))
    return ratios


def compare_eighs(
    state: Any, count: int, config: Any, per_step: dict[str, dict[str, list[float]]]
) -> dict[str, float]:
    """The root step against jnp.linalg.eigh and torch.linalg.eigh on its matrices."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    correction = 1.0 - config.beta2**count if config.use_bias_correction else 1.0
    by_size: dict[tuple[int, str], list[np.ndarray]] = {}
    for stack in state.factors.values():
        matrices = np.asarray(stack) / np.asarray(correction, stack.dtype)
        by_size.setdefault((stack.shape[-1], str(stack.dtype)), []).append(matrices)
    batches = {size: np.concatenate(parts) for size, parts in by_size.items()}
    jax_eigh = jax.jit(lambda m: jnp.linalg.eigh(m, UPLO="L", symmetrize_input=False))
    device_batches = {size: jnp.asarray(m) for size, m in batches.items()}
    for m in device_batches.values():
        jax.block_until_ready(jax_eigh(m))  # compile
    torch_eigh = None
    if _TORCH_EIGH.value:
        try:
            import torch

            torch.set_num_threads(_THREADS.value)
            torch_batches = {size: torch.from_numpy(m) for size, m in batches.items()}
            torch_eigh = torch.linalg.eigh
        except ImportError:
            print("torch is not importable: torch.linalg.eigh skipped")

    def torch_inverse_root(matrix: Any, reconstruct: bool) -> None:
        """As the torch twin: a float32 eigh that fails (MKL does on some
        rank-deficient factors) is retried in float64."""
        try:
            eigenvalues, eigenvectors = torch_eigh(matrix)
        except RuntimeError:
            torch_failures.append(matrix.shape[-1])
            eigenvalues, eigenvectors = torch_eigh(matrix.double())
        if reconstruct:
            eigenvectors * eigenvalues.clamp(min=1e-8).pow(-0.25).unsqueeze(0) @ eigenvectors.T

    torch_failures: list[int] = []
    times: dict[str, list[float]] = {"jax": [], "torch": [], "torch_root": []}
    for _ in range(3):
        begin = time.perf_counter()
        for m in device_batches.values():
            jax.block_until_ready(jax_eigh(m))
        times["jax"].append(time.perf_counter() - begin)
        if torch_eigh is not None:
            for kind, reconstruct in (("torch", False), ("torch_root", True)):
                begin = time.perf_counter()
                for m in torch_batches.values():
                    for matrix in m:  # one by one, as the torch twin does
                        torch_inverse_root(matrix, reconstruct)
                times[kind].append(time.perf_counter() - begin)
    sizes = ", ".join(f"{len(m)}x{size[0]} {size[1]}" for size, m in batches.items())
    root = statistics.median(per_step["shampoo"]["root"])
    ordinary = statistics.median(per_step["shampoo"]["ordinary"])
    print(
        f"root step vs eigh on the same matrices ({sizes}): root step {1e3 * root:.1f} ms "
        f"(root step - ordinary step {1e3 * (root - ordinary):.1f} ms) | jnp.linalg.eigh "
        f"{median_ms(times['jax']).strip()} ms | torch.linalg.eigh "
        f"{median_ms(times['torch']).strip()} ms (with V·diag·Vᵀ as the twin: "
        f"{median_ms(times['torch_root']).strip()} ms; float32 eighs retried in float64: "
        f"{len(torch_failures)})"
    )
    result = {"root_ms": 1e3 * root, "root_extra_ms": 1e3 * (root - ordinary)}
    result["jax_eigh_ms"] = 1e3 * statistics.median(times["jax"])
    if times["torch"]:
        result["torch_eigh_ms"] = 1e3 * statistics.median(times["torch"])
        result["torch_root_ms"] = 1e3 * statistics.median(times["torch_root"])
    return result


def main(argv: list[str]) -> None:
    del argv
    if _STEPS.value < 1 or _REPEATS.value < 1 or _FREQUENCY.value < 1 or _THREADS.value < 1:
        raise app.UsageError("steps, repeats, precondition_frequency and threads must be >= 1")
    if _LAPACK_THREADS.value < 1:
        raise app.UsageError(f"lapack_threads={_LAPACK_THREADS.value} must be >= 1")
    widths = [int(w) for w in _WIDTHS.value]
    if len(widths) < 2 or min(widths) < 1:
        raise app.UsageError(f"widths={_WIDTHS.value!r} needs at least two positive sizes")
    _limit_threads(_THREADS.value, _LAPACK_THREADS.value)

    import jax
    import optax

    print(
        f"jax {jax.__version__}, optax {optax.__version__}, python {sys.version.split()[0]}, "
        f"{platform.machine()}, {_THREADS.value} threads ({_LAPACK_THREADS.value} OpenBLAS), "
        f"device {jax.devices()[0].platform}, x64 {jax.config.jax_enable_x64}; "
        f"{_STEPS.value} steps x {_REPEATS.value} repeats; Shampoo precondition_frequency "
        f"{_FREQUENCY.value} (defaults otherwise: max_preconditioner_dim 1024, Adam grafting)"
    )
    builders = {"mlp": mlp_problem, "transformer": transformer_problem}
    names = list(builders) if _MODEL.value == "both" else [_MODEL.value]
    results = {name: run_problem(builders[name]()) for name in names}
    print("\nsummary (amortized Shampoo / NadamW, median of repeats)")
    print(
        f"{'model':12s} {'train':>7s} {'update':>7s} {'floor':>7s} {'root ms':>8s} "
        f"{'jax eigh':>9s} {'torch eigh':>11s} {'torch eigh+VDVt':>16s}"
    )
    for name, r in results.items():
        print(
            f"{name:12s} {r['train']:6.2f}x {r['update']:6.2f}x {r['floor']:6.2f}x "
            f"{r.get('root_ms', math.nan):8.1f} {r.get('jax_eigh_ms', math.nan):9.1f} "
            f"{r.get('torch_eigh_ms', math.nan):11.1f} {r.get('torch_root_ms', math.nan):16.1f}"
        )


if __name__ == "__main__":
    app.run(main)
