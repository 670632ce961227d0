"""LAWA and EMA of a JAX params pytree, as pure functions.

The twin of ``lawa_ema_torch``: the same config, collection rule and fp32
accumulators, written as ``init`` / ``collect`` / ``average`` over an
explicit state pytree, so it can live inside AlgoPerf's JAX
``optimizer_state`` and be jitted into the train step. Where torch keeps a
running LAWA sum, a collection here only writes its window slot, and the
sum is taken when the average is (see :class:`AveragingState`).

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
    params' own dtype); ``ema`` the fp32 EMA. The unused one is an empty
    tuple, so the structure is fixed by the config and checkpoints restore
    into a freshly built state.

    Unlike the torch twin, LAWA keeps no running sum: updating one would
    read the window slot that the collection overwrites, and XLA then copies
    the whole window (twice, on CPU) rather than writing the slot in place.
    A collection writes one slot and nothing else; the sum is taken at the
    swap (:func:`summarize`), once per eval.
    """

    num_collected: jax.Array
    num_skipped_nonfinite: jax.Array
    window: PyTree
    ema: PyTree


class Summary(NamedTuple):
    """What the average is computed from: the count and the fp32 sum (LAWA) or EMA."""

    num_collected: jax.Array
    accumulator: PyTree


def init(config: AveragingConfig, params: PyTree) -> AveragingState:
    """A fresh state; params give shapes and dtypes only."""
    window: PyTree = ()
    ema: PyTree = ()
    if config.mode == "lawa":
        window = jax.tree.map(lambda p: jnp.zeros((config.window, *p.shape), p.dtype), params)
    elif config.mode == "ema":
        ema = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    return AveragingState(
        num_collected=jnp.zeros([], jnp.int32),
        num_skipped_nonfinite=jnp.zeros([], jnp.int32),
        window=window,
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
    finite = all_finite(params)
    fold = _collect_lawa if config.mode == "lawa" else _collect_ema
    state = fold(config, state, params, finite)
    return state._replace(
        num_collected=state.num_collected + finite.astype(jnp.int32),
        num_skipped_nonfinite=state.num_skipped_nonfinite + (~finite).astype(jnp.int32),
    )


# A skipped collection is a select, not a ``lax.cond`` around the fold: XLA
# copies every buffer a conditional threads through, which for LAWA is the
# whole window, L times the params, on each collection.


def _collect_lawa(
    config: AveragingConfig, state: AveragingState, params: PyTree, finite: jax.Array
) -> AveragingState:
    slot = state.num_collected % config.window

    def fold_leaf(snapshots: jax.Array, new: jax.Array) -> jax.Array:
        # A skipped collection writes the slot's own snapshot back. That read
        # is fused into the slot's update, so the window is still written in
        # place; any other read of it would make XLA copy it first.
        oldest = jax.lax.dynamic_index_in_dim(snapshots, slot, keepdims=False)
        kept = jnp.where(finite, new.astype(snapshots.dtype), oldest)
        return jax.lax.dynamic_update_index_in_dim(snapshots, kept, slot, 0)

    return state._replace(window=jax.tree.map(fold_leaf, state.window, params))


def _collect_ema(
    config: AveragingConfig, state: AveragingState, params: PyTree, finite: jax.Array
) -> AveragingState:
    first = state.num_collected == 0
    beta = jnp.float32(config.beta)

    def fold_leaf(ema: jax.Array, new: jax.Array) -> jax.Array:
        new = new.astype(jnp.float32)
        folded = jnp.where(first, new, ema + (1.0 - beta) * (new - ema))
        return jnp.where(finite, folded, ema)

    return state._replace(ema=jax.tree.map(fold_leaf, state.ema, params))


def summarize(config: AveragingConfig, state: AveragingState) -> Summary:
    """The count and the fp32 sum of the window (LAWA) or the EMA.

    The window's slots that were never written hold zeros, so summing all L
    of them is exact before the window is full.
    """
    if config.mode == "lawa":
        accumulator = jax.tree.map(lambda w: jnp.sum(w.astype(jnp.float32), axis=0), state.window)
    else:
        accumulator = state.ema
    return Summary(num_collected=state.num_collected, accumulator=accumulator)


def average(config: AveragingConfig, state: AveragingState, params: PyTree) -> PyTree:
    """The averaged params in the params' dtypes; ``params`` before any collection."""
    if not config.enabled:
        return params
    return average_of_summary(config, summarize(config, state), params)


def average_of_summary(config: AveragingConfig, summary: Summary, params: PyTree) -> PyTree:
    """:func:`average` from a :func:`summarize` taken elsewhere (host placement):
    it never needs the window."""
    if not config.enabled:
        return params
    if config.mode == "lawa":
        count = jnp.minimum(summary.num_collected, config.window).astype(jnp.float32)
        mean = jax.tree.map(lambda t: t / jnp.maximum(count, 1.0), summary.accumulator)
    else:
        mean = summary.accumulator
    none_yet = summary.num_collected == 0
    return jax.tree.map(lambda m, p: jnp.where(none_yet, p, m.astype(p.dtype)), mean, params)
