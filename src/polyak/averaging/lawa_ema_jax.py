"""LAWA and EMA of a JAX params pytree, as pure functions.

The twin of ``lawa_ema_torch``: the same config, collection rule, fp32
accumulators and O(1) LAWA running sum, written as ``init`` / ``collect`` /
``average`` over an explicit state pytree, so it can live inside AlgoPerf's
JAX ``optimizer_state`` and be jitted into the train step.

The functions run wherever their inputs live; :class:`~polyak.averaging.
averager_jax.JaxAverager` decides where (``placements_jax``).

``collect`` does not check the collection rule itself: the caller knows the
step on the host (AlgoPerf passes ``global_step`` as a Python int) and calls a
program that collects only on collection steps, so other steps do no extra
work and nothing waits on the device.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from polyak.averaging.config import AveragingConfig

PyTree = Any


class AveragingState(NamedTuple):
    """Everything the average needs; a pytree of arrays.

    ``window`` holds LAWA's last L snapshots stacked on a leading axis (in the
    params' own dtype); ``total`` their fp32 running sum; ``ema`` the fp32
    EMA. Unused fields are empty tuples, so the structure is fixed by the
    config and checkpoints restore into a freshly built state.
    """

    num_collected: jax.Array
    num_skipped_nonfinite: jax.Array
    window: PyTree
    total: PyTree
    ema: PyTree


def init(config: AveragingConfig, params: PyTree) -> AveragingState:
    """A fresh state; params give shapes and dtypes only."""
    zeros32 = lambda p: jnp.zeros(p.shape, jnp.float32)
    window: PyTree = ()
    total: PyTree = ()
    ema: PyTree = ()
    if config.mode == "lawa":
        window = jax.tree.map(lambda p: jnp.zeros((config.window, *p.shape), p.dtype), params)
        total = jax.tree.map(zeros32, params)
    elif config.mode == "ema":
        ema = jax.tree.map(zeros32, params)
    return AveragingState(
        num_collected=jnp.zeros([], jnp.int32),
        num_skipped_nonfinite=jnp.zeros([], jnp.int32),
        window=window,
        total=total,
        ema=ema,
    )


def all_finite(tree: PyTree) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def collect(config: AveragingConfig, state: AveragingState, params: PyTree) -> AveragingState:
    """Folds ``params`` into the average; non-finite params are skipped and counted."""
    if not config.enabled:
        return state
    fold = _collect_lawa if config.mode == "lawa" else _collect_ema
    return jax.lax.cond(
        all_finite(params),
        lambda s: fold(config, s, params),
        lambda s: s._replace(num_skipped_nonfinite=s.num_skipped_nonfinite + 1),
        state,
    )


def _collect_lawa(config: AveragingConfig, state: AveragingState, params: PyTree) -> AveragingState:
    slot = state.num_collected % config.window

    def fold_leaf(
        snapshots: jax.Array, total: jax.Array, new: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        # Until the window is full the slot holds zeros, so subtracting it is exact.
        oldest = jax.lax.dynamic_index_in_dim(snapshots, slot, keepdims=False)
        snapshots = jax.lax.dynamic_update_index_in_dim(
            snapshots, new.astype(snapshots.dtype), slot, 0
        )
        total = total - oldest.astype(jnp.float32) + new.astype(jnp.float32)
        return snapshots, total

    folded = jax.tree.map(fold_leaf, state.window, state.total, params)
    window = jax.tree.map(lambda _, pair: pair[0], params, folded)
    total = jax.tree.map(lambda _, pair: pair[1], params, folded)
    # Once per full window the sum restarts from the snapshots, which bounds
    # its rounding drift at O(1) amortized cost.
    total = jax.lax.cond(
        slot == config.window - 1,
        lambda: jax.tree.map(lambda w: jnp.sum(w.astype(jnp.float32), axis=0), window),
        lambda: total,
    )
    return state._replace(num_collected=state.num_collected + 1, window=window, total=total)


def _collect_ema(config: AveragingConfig, state: AveragingState, params: PyTree) -> AveragingState:
    first = state.num_collected == 0
    beta = jnp.float32(config.beta)

    def fold_leaf(ema: jax.Array, new: jax.Array) -> jax.Array:
        new = new.astype(jnp.float32)
        return jnp.where(first, new, ema + (1.0 - beta) * (new - ema))

    ema = jax.tree.map(fold_leaf, state.ema, params)
    return state._replace(num_collected=state.num_collected + 1, ema=ema)


def average(config: AveragingConfig, state: AveragingState, params: PyTree) -> PyTree:
    """The averaged params in the params' dtypes; ``params`` before any collection.

    Reads only the counters and the sum (LAWA) or the EMA, never the window,
    so a caller may pass a state whose window stayed elsewhere.
    """
    if not config.enabled:
        return params
    if config.mode == "lawa":
        count = jnp.minimum(state.num_collected, config.window).astype(jnp.float32)
        mean = jax.tree.map(lambda t: t / jnp.maximum(count, 1.0), state.total)
    else:
        mean = state.ema
    none_yet = state.num_collected == 0
    return jax.tree.map(lambda m, p: jnp.where(none_yet, p, m.astype(p.dtype)), mean, params)
