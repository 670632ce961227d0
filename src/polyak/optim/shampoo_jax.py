"""Shampoo for JAX: blocked Kronecker-factored preconditioning with grafting, as optax transforms.

The twin of :mod:`polyak.optim.shampoo_torch`, with the same algorithm, names
and order of operations (the AlgoPerf v0.5 winner's Distributed Shampoo, as
its submission configures it; see the torch module for the formulas and the
deliberate numerical differences). In brief, with t counting the steps taken
from 1: the filtered gradient m̃ (NAdam look-ahead with ``use_nadam``), the
grafted direction a (Adam, RMSprop, AdaGrad, SGD; of the block-normalized
gradient with ``use_normalized_grafting``), per block the factors
``Lᵢ ← β2·Lᵢ + (1−β2)·G₍ᵢ₎G₍ᵢ₎ᵀ``, their roots
``(Lᵢ/(1−β2ᵗ) + ε'·I)^(−η/(2k))`` at t = start and every multiple of
``precondition_frequency`` after it, and ``d_B = p_B·‖a_B‖/‖p_B‖``.

:func:`scale_by_shampoo` computes d before weight decay; :func:`shampoo`
chains it with ``add_decayed_weights``, :func:`scale_by_ema_momentum` and the
learning rate, inside :func:`skip_unusable_steps`. :func:`training_metrics`
reads the counters for the training log.

JAX specifics:

- Blocks of the same shape (and dtype) are stacked, and so are their factors
  and roots, one stack per axis: every step's statistics and preconditioning
  are one batched contraction per stack and axis, reading the roots in place
  (a per-block loop over slices of larger stacks copied every root each step
  and dispatched many small ops). At a root step the factors of one size are
  concatenated into one ``vmap``-ed eigh. The roots are recomputed under
  ``lax.cond``, so steps between root refreshes pay only the matmuls. The
  sizes' eighs run one after another (see :func:`_update_roots` for why).
  jaxlib's eigh runs in OpenBLAS: on a busy CPU, ``OPENBLAS_NUM_THREADS=1``
  keeps its threads from fighting XLA's pool (several times faster here).
- Numerics follow the torch twin: the spectrum is shifted to >= 0 and
  floored at ``ε' = max(ε, λmax·c^(−2k/η))`` before the power. float64
  statistics and eigh (``preconditioner_precision``) need ``jax_enable_x64``;
  without it they are float32 and a warning says so once. With it, the twins
  agree to 1e-5 on the recorded problems. A non-finite root keeps the
  previous one (retried in float64 first when x64 is on) and counts in
  ``root_failures``; a block uses the grafted direction until all of its
  roots were computed once;
  summed statistics (β2 = 1) that would overflow are not accumulated
  (``skipped_statistics``); a non-finite Shampoo direction anywhere makes the
  step use the grafted directions (``direction_fallbacks``).
- A gradient leaf whose norm is non-finite or at least ``√max / 2`` skips the
  whole step (state and parameters untouched) in :func:`skip_unusable_steps`.
  The torch twin skips only the affected parameters; under jit a whole-step
  skip needs one ``lax.cond`` and no host synchronisation, and a non-finite
  loss poisons every gradient anyway.

Works with AlgoPerf's pins (jax 0.7.0, optax 0.2.2) and current releases.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from polyak.optim.bias_correction_jax import bias_correction
from polyak.optim.nadamw_jax import warmup_cosine_schedule
from polyak.optim.schedules import warmup_steps_for
from polyak.optim.shampoo_blocking import ParameterPlan, grafting_blocks, plan_parameter
from polyak.optim.shampoo_config import (
    COUNTER_NAMES,
    SKIPPED_WARNING_SECONDS,
    ShampooConfig,
    ShampooConfigError,
    counter_metrics,
)

__all__ = [
    "EmaMomentumState",
    "ScaleByShampooState",
    "SkipUnusableStepsState",
    "make_shampoo",
    "matrix_inverse_root",
    "scale_by_ema_momentum",
    "scale_by_shampoo",
    "shampoo",
    "shampoo_schedule",
    "skip_unusable_steps",
    "training_metrics",
]

# Keeps the grafting ratio ‖a‖ / ‖p‖ finite when the Shampoo direction vanishes.
_NORM_FLOOR = 1e-16

_HIGHEST = jax.lax.Precision.HIGHEST
# Graftings that keep a second moment of the gradient.
_SECOND_MOMENT_GRAFTINGS = ("adam", "rmsprop", "adagrad")


# ---------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class _Stack:
    """The blocks of one shape and dtype, stacked along a leading axis.

    Row r is block ``members[r] = (leaf, block index)``; the factors of axis i
    of every row live in the state's stack ``keys[i]``, of shape ``(rows, dᵢ, dᵢ)``.
    One batched contraction per stack and axis then computes the statistics
    and the preconditioned directions of all its blocks, and a block's roots
    are read from the state without copying them out of a larger stack.
    """

    dims: tuple[int, ...]
    dtype: Any  # of the roots and directions
    exponent: float
    members: tuple[tuple[int, int], ...]
    keys: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Layout:
    """The static bookkeeping of a parameter tree: plans and block stacks.

    ``places[leaf][block]`` is that block's ``(stack, row)``. Both ``init`` and
    ``update`` rebuild it from the leaves' shapes, so it never has to be
    stored in the state.
    """

    plans: tuple[ParameterPlan, ...]
    stacks: tuple[_Stack, ...]
    places: tuple[tuple[tuple[int, int], ...], ...]


def _factor_dtype(dtype: Any) -> Any:
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _statistics_dtype(config: ShampooConfig, root_dtype: Any) -> Any:
    """float64 statistics and eigh as configured, when JAX has float64 (``jax_enable_x64``)."""
    if config.preconditioner_precision == "float64" and bool(jax.config.jax_enable_x64):
        return jnp.float64
    return root_dtype


def _stack_key(dims: tuple[int, ...], axis: int, dtype: Any) -> str:
    key = f"{'x'.join(str(d) for d in dims)}/{axis}"
    return key if jnp.dtype(dtype) == jnp.float32 else f"{key}_{jnp.dtype(dtype).name}"


def _build_layout(leaves: Sequence[Any], config: ShampooConfig) -> _Layout:
    plans = tuple(plan_parameter(tuple(leaf.shape), config) for leaf in leaves)
    members: dict[tuple[tuple[int, ...], Any], list[tuple[int, int]]] = {}
    places = []
    for leaf_index, (leaf, plan) in enumerate(zip(leaves, plans, strict=True)):
        dtype = _factor_dtype(leaf.dtype)
        leaf_places = []
        for block in plan.blocks:
            rows = members.setdefault((block.dims, dtype), [])
            leaf_places.append((list(members).index((block.dims, dtype)), len(rows)))
            rows.append((leaf_index, block.index))
        places.append(tuple(leaf_places))
    stacks = tuple(
        _Stack(
            dims=dims,
            dtype=dtype,
            exponent=-config.exponent_multiplier / (config.inv_root_override or 2 * len(dims)),
            members=tuple(rows),
            keys=tuple(_stack_key(dims, axis, dtype) for axis in range(len(dims))),
        )
        for (dims, dtype), rows in members.items()
    )
    return _Layout(plans=plans, stacks=stacks, places=tuple(places))


def _stacked_blocks(
    leaves: Sequence[jax.Array], layout: _Layout, stack: _Stack, dtype: Any
) -> jax.Array:
    """The stack's blocks of these leaves, shape ``(rows, *dims)``; a reshape for a lone block."""
    parts = []
    for leaf_index, block_index in stack.members:
        plan = layout.plans[leaf_index]
        block = plan.blocks[block_index]
        merged = leaves[leaf_index].reshape(plan.merged_shape)
        if len(plan.blocks) > 1:
            merged = merged[block.slices]
        parts.append(merged.astype(dtype))
    return parts[0][None] if len(parts) == 1 else jnp.stack(parts)


# ---------------------------------------------------------------------- state


class ScaleByShampooState(NamedTuple):
    """State of :func:`scale_by_shampoo`.

    ``exp_avg`` and ``exp_avg_sq`` are shaped like the params, or None when
    β1 = 0 or the grafting is not Adam. ``factors``, ``roots`` and ``root_ok``
    map a stack key (the block shape and the axis, e.g. ``"256x1024/1"`` for
    the 1024×1024 factors of the 256×1024 blocks) to stacks of shape
    ``(n, d, d)``, ``(n, d, d)`` and ``(n,)``; grafted-only parameters own no
    rows in them.
    """

    count: jax.Array  # int32 scalar: steps taken
    exp_avg: optax.Updates | None
    exp_avg_sq: optax.Updates | None
    factors: dict[str, jax.Array]
    roots: dict[str, jax.Array]
    root_ok: dict[str, jax.Array]
    root_failures: jax.Array  # int32 scalar: factors whose root recomputation failed
    skipped_statistics: jax.Array  # int32 scalar: block updates dropped (summed statistics only)
    direction_fallbacks: jax.Array  # int32 scalar: steps that fell back to grafting on overflow


class EmaMomentumState(NamedTuple):
    momentum_buffer: optax.Updates


class SkipUnusableStepsState(NamedTuple):
    skipped_steps: jax.Array  # int32 scalar
    inner_state: optax.OptState


# ---------------------------------------------------------------------- math


def _eigh(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues and eigenvectors from the lower triangle, as torch.linalg.eigh reads it.

    A module-level function so that tests can make it fail.
    """
    eigenvalues, eigenvectors = jnp.linalg.eigh(matrix, UPLO="L", symmetrize_input=False)
    return eigenvalues, eigenvectors


def matrix_inverse_root(
    matrix: jax.Array, exponent: jax.Array | float, epsilon: float, max_condition: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """``(matrix + shift·I + ε'·I)^exponent`` of a symmetric PSD matrix, and whether it is finite.

    As in Distributed Shampoo, a negative smallest eigenvalue (round-off)
    shifts the whole spectrum up to 0 first, so the result is finite whenever
    eigh succeeds. ``ε' = max(ε, λmax·c^(1/exponent))`` caps the root's
    condition number at ``c = max_condition`` (0: ``ε' = ε``).
    """
    eigenvalues, eigenvectors = _eigh(matrix)
    eigenvalues = eigenvalues - jnp.minimum(jnp.min(eigenvalues), 0.0)
    floor = jnp.asarray(epsilon, eigenvalues.dtype)
    if max_condition > 0:
        cap = jnp.power(jnp.asarray(max_condition, eigenvalues.dtype), 1.0 / exponent)
        floor = jnp.maximum(floor, jnp.max(eigenvalues) * cap)
    scales = jnp.power(eigenvalues + floor, exponent)
    root = jnp.matmul(eigenvectors * scales, eigenvectors.T, precision=_HIGHEST)
    return root, jnp.all(jnp.isfinite(root))


def _factor_statistics(blocks: jax.Array) -> list[jax.Array]:
    """G₍ᵢ₎G₍ᵢ₎ᵀ of every block of a stack ``(rows, d₁, …, dₖ)``, for every mode i.

    One batched contraction over every other mode per i, shape ``(rows, dᵢ, dᵢ)``.
    """
    modes = range(1, blocks.ndim)
    return [
        jax.lax.dot_general(
            blocks,
            blocks,
            (([m for m in modes if m != i],) * 2, ((0,), (0,))),
            precision=_HIGHEST,
        )
        for i in modes
    ]


def _precondition(blocks: jax.Array, roots: Sequence[jax.Array]) -> jax.Array:
    """``block ×₁ Q₁ ×₂ … ×ₖ Qₖ`` for every block of a stack, with symmetric Qᵢ stacked alike.

    Each batched contraction moves the next mode last, so after k of them the
    modes are back in order.
    """
    result = blocks
    for root in roots:
        result = jax.lax.dot_general(result, root, (((1,), (1,)), ((0,), (0,))), precision=_HIGHEST)
    return result


def _norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(x)))


def _row_norms(x: jax.Array) -> jax.Array:
    """The norm of each row of a stack (over every axis but the first)."""
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim))))


def _per_row(values: jax.Array, ndim: int) -> jax.Array:
    """``(rows,)`` values shaped to broadcast against a stack of ``ndim`` axes."""
    return values.reshape(values.shape + (1,) * (ndim - 1))


# ---------------------------------------------------------------------- transforms


def scale_by_shampoo(config: ShampooConfig | None = None) -> optax.GradientTransformation:
    """The grafted Shampoo direction d (no weight decay, momentum or learning rate).

    Expects usable gradients: wrap the chain in :func:`skip_unusable_steps`
    (as :func:`shampoo` does) if a gradient may be non-finite.
    """
    config = ShampooConfig() if config is None else config
    if not isinstance(config, ShampooConfig):
        raise ShampooConfigError(f"config={config!r} must be a ShampooConfig")
    start = max(config.start_preconditioning_step, 1)
    frequency = config.precondition_frequency
    if config.preconditioner_precision == "float64" and not jax.config.jax_enable_x64:
        logging.log_first_n(
            logging.WARNING,
            "Shampoo: preconditioner_precision='float64' needs jax_enable_x64; the factor "
            "statistics and their eigh run in float32, where round-off on rank-deficient "
            "factors exceeds epsilon",
            1,
        )

    def init_fn(params: optax.Params) -> ScaleByShampooState:
        leaves = jax.tree.leaves(params)
        layout = _build_layout(leaves, config)
        factors, roots, root_ok = {}, {}, {}
        for stack in layout.stacks:
            rows = len(stack.members)
            statistics_dtype = _statistics_dtype(config, stack.dtype)
            for dim, key in zip(stack.dims, stack.keys, strict=True):
                factors[key] = jnp.zeros((rows, dim, dim), statistics_dtype)
                roots[key] = jnp.zeros((rows, dim, dim), stack.dtype)
                root_ok[key] = jnp.zeros((rows,), jnp.bool_)
        return ScaleByShampooState(
            count=jnp.zeros([], jnp.int32),
            exp_avg=jax.tree.map(jnp.zeros_like, params) if config.beta1 > 0.0 else None,
            exp_avg_sq=_second_moments_init(config, params),
            factors=factors,
            roots=roots,
            root_ok=root_ok,
            root_failures=jnp.zeros([], jnp.int32),
            skipped_statistics=jnp.zeros([], jnp.int32),
            direction_fallbacks=jnp.zeros([], jnp.int32),
        )

    def update_fn(
        updates: optax.Updates, state: ScaleByShampooState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, ScaleByShampooState]:
        del params
        grads, treedef = jax.tree.flatten(updates)
        layout = _build_layout(grads, config)
        count = state.count + jnp.array(1, jnp.int32)

        factors, skipped_statistics = _update_statistics(config, layout, grads, state.factors)
        exp_avg_sq, denominators = _update_grafting(config, layout, grads, state.exp_avg_sq, count)
        exp_avg, filtered = _filtered_gradients(config, grads, state.exp_avg, treedef, count)
        grafted = _divide(filtered, denominators)
        if config.use_normalized_grafting:
            graft_norm_source = _divide(_block_normalized(config, grads), denominators)
        else:
            graft_norm_source = grafted

        roots_due = (count == start) | ((count > start) & (count % frequency == 0))
        roots, root_ok, root_failures = jax.lax.cond(
            roots_due,
            lambda f, r, ok: _update_roots(config, layout, f, r, ok, count),
            lambda f, r, ok: (r, ok, jnp.zeros([], jnp.int32)),
            factors,
            state.roots,
            state.root_ok,
        )

        directions, fell_back = _shampoo_directions(
            config, layout, filtered, grafted, graft_norm_source, roots, root_ok, count >= start
        )
        new_state = ScaleByShampooState(
            count=count,
            exp_avg=exp_avg,
            exp_avg_sq=exp_avg_sq,
            factors=factors,
            roots=roots,
            root_ok=root_ok,
            root_failures=state.root_failures + root_failures,
            skipped_statistics=state.skipped_statistics + skipped_statistics,
            direction_fallbacks=state.direction_fallbacks + fell_back.astype(jnp.int32),
        )
        return jax.tree.unflatten(treedef, directions), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _filtered_gradients(
    config: ShampooConfig,
    grads: list[jax.Array],
    exp_avg: optax.Updates | None,
    treedef: Any,
    count: jax.Array,
) -> tuple[optax.Updates | None, list[jax.Array]]:
    """The new ``exp_avg`` and m̃ for each leaf."""
    beta1 = config.beta1
    if beta1 == 0.0:
        return None, grads
    averages = treedef.flatten_up_to(exp_avg)
    averages = [beta1 * m + (1.0 - beta1) * g for g, m in zip(grads, averages, strict=True)]
    if config.use_nadam:
        filtered = [beta1 * m + (1.0 - beta1) * g for g, m in zip(grads, averages, strict=True)]
    else:
        filtered = averages
    if config.use_bias_correction:
        correction = bias_correction(beta1, count, jnp.float32)
        filtered = [f / correction.astype(f.dtype) for f in filtered]
    return jax.tree.unflatten(treedef, averages), filtered


def _grafting_of(config: ShampooConfig, shape: Sequence[int]) -> str:
    """Large (grafted-only) leaves always get Adam grafting, as in the v0.5 submission."""
    if any(d >= config.preconditioning_dim_limit for d in shape):
        return "adam"
    return config.grafting


def _second_moments_init(config: ShampooConfig, params: optax.Params) -> optax.Updates | None:
    """Zeros for the leaves whose grafting keeps a second moment; None if no leaf does."""
    leaves, treedef = jax.tree.flatten(params)
    kinds = [_grafting_of(config, leaf.shape) for leaf in leaves]
    if not any(kind in _SECOND_MOMENT_GRAFTINGS for kind in kinds):
        return None
    return jax.tree.unflatten(
        treedef,
        [
            jnp.zeros_like(leaf) if kind in _SECOND_MOMENT_GRAFTINGS else jnp.zeros([], leaf.dtype)
            for leaf, kind in zip(leaves, kinds, strict=True)
        ],
    )


def _update_grafting(
    config: ShampooConfig,
    layout: _Layout,
    grads: list[jax.Array],
    exp_avg_sq: optax.Updates | None,
    count: jax.Array,
) -> tuple[optax.Updates | None, list[jax.Array | None]]:
    """The new second moments and each leaf's grafting denominator (None: SGD, none).

    Adam: √(v/(1−β2ᵗ)) + ε; RMSprop: √v + ε (EMA, no correction); AdaGrad:
    √(Σg²) + ε.
    """
    if exp_avg_sq is None:
        return None, [None] * len(grads)
    leaves, treedef = jax.tree.flatten(exp_avg_sq)
    sources = _block_normalized(config, grads) if config.use_normalized_grafting else grads
    new_leaves, denominators = [], []
    for source, v in zip(sources, leaves, strict=True):
        kind = _grafting_of(config, source.shape)
        if kind not in _SECOND_MOMENT_GRAFTINGS:
            new_leaves.append(v)
            denominators.append(None)
            continue
        beta2 = 1.0 if kind == "adagrad" else config.grafting_beta2
        squared = source * source
        v = v + squared if beta2 == 1.0 else beta2 * v + (1.0 - beta2) * squared
        corrected = v
        if kind == "adam" and config.use_bias_correction and beta2 < 1.0:
            corrected = v / bias_correction(beta2, count, jnp.float32).astype(v.dtype)
        new_leaves.append(v)
        denominators.append(jnp.sqrt(corrected) + config.grafting_epsilon)
    return jax.tree.unflatten(treedef, new_leaves), denominators


def _divide(numerators: list[jax.Array], denominators: list[jax.Array | None]) -> list[jax.Array]:
    return [n if d is None else n / d for n, d in zip(numerators, denominators, strict=True)]


def _block_normalized(config: ShampooConfig, grads: list[jax.Array]) -> list[jax.Array]:
    """Each block of each gradient divided by its norm (normalized grafting's input)."""
    result = []
    for grad in grads:
        merged_shape, blocks = grafting_blocks(tuple(grad.shape), config)
        source = grad.reshape(merged_shape)
        if len(blocks) == 1:
            result.append(grad / (_norm(grad) + _NORM_FLOOR))
            continue
        normalized = jnp.zeros(merged_shape, grad.dtype)
        for block in blocks:
            piece = source[block]
            normalized = normalized.at[block].set(piece / (_norm(piece) + _NORM_FLOOR))
        result.append(normalized.reshape(grad.shape))
    return result


def _update_statistics(
    config: ShampooConfig,
    layout: _Layout,
    grads: list[jax.Array],
    factors: dict[str, jax.Array],
) -> tuple[dict[str, jax.Array], jax.Array]:
    """Adds this step's G₍ᵢ₎G₍ᵢ₎ᵀ; returns the factors and how many blocks were skipped.

    With an EMA (β2 < 1) and a usable gradient (see :func:`skip_unusable_steps`)
    the new factors are finite: a PSD factor's entries are bounded by its trace,
    a convex mix of ‖G‖² values. Summed statistics (β2 = 1) can still grow past
    that, so, as in the torch twin, a block whose predicted trace
    ``trace(L₁) + ‖g‖²`` (g the whole parameter's gradient) reaches a quarter
    of the float32 maximum keeps its old factors.
    """
    beta2 = config.beta2
    squared_norms: dict[int, jax.Array] = {}
    limit = float(jnp.finfo(jnp.float32).max) / 4
    updated = {}
    skipped = jnp.zeros([], jnp.int32)
    for stack in layout.stacks:
        dtype = _statistics_dtype(config, stack.dtype)
        statistics = _factor_statistics(_stacked_blocks(grads, layout, stack, dtype))
        if beta2 < 1.0:
            for key, statistic in zip(stack.keys, statistics, strict=True):
                updated[key] = (1.0 - beta2) * statistic + beta2 * factors[key]
            continue
        for leaf, _ in stack.members:
            if leaf not in squared_norms:
                squared_norms[leaf] = jnp.sum(jnp.square(grads[leaf].astype(jnp.float32)))
        norms = jnp.stack([squared_norms[leaf] for leaf, _ in stack.members])
        # NaN compares False, so a poisoned factor stops accumulating too.
        safe = jnp.trace(factors[stack.keys[0]], axis1=1, axis2=2) + norms < limit
        for key, statistic in zip(stack.keys, statistics, strict=True):
            updated[key] = jnp.where(safe[:, None, None], statistic + factors[key], factors[key])
        skipped = skipped + jnp.sum(~safe).astype(jnp.int32)
    return updated, skipped


def _update_roots(
    config: ShampooConfig,
    layout: _Layout,
    factors: dict[str, jax.Array],
    roots: dict[str, jax.Array],
    root_ok: dict[str, jax.Array],
    count: jax.Array,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array], jax.Array]:
    """Recomputes every root, one vmapped eigh per factor size; failures keep the old root."""
    if config.use_bias_correction and config.beta2 < 1.0:
        correction = bias_correction(config.beta2, count, jnp.float32)
    else:
        correction = jnp.ones([], jnp.float32)
    by_size: dict[tuple[int, Any, Any], list[tuple[str, float]]] = {}
    for stack in layout.stacks:
        for dim, key in zip(stack.dims, stack.keys, strict=True):
            size = (dim, jnp.dtype(factors[key].dtype), jnp.dtype(stack.dtype))
            by_size.setdefault(size, []).append((key, stack.exponent))
    new_roots, new_ok = {}, {}
    failures = jnp.zeros([], jnp.int32)
    previous: jax.Array | None = None
    for entries in by_size.values():
        keys = [key for key, _ in entries]
        rows = [factors[key].shape[0] for key in keys]
        stack = factors[keys[0]] if len(keys) == 1 else jnp.concatenate([factors[k] for k in keys])
        exponents = jnp.asarray(np.repeat([exponent for _, exponent in entries], rows), stack.dtype)
        matrices = stack / correction.astype(stack.dtype)
        if previous is not None:
            # One size's eigh at a time: jaxlib 0.10's CPU LAPACK kernels block a
            # pool thread while they fan a batch out to the same pool, and as many
            # concurrent batched eighs as pool threads deadlock it (seen with two
            # 1024-wide groups on 2 cores). Adding an exact zero computed from the
            # previous size's roots makes each eigh wait for the one before; an
            # optimization barrier would not, as XLA drops it before scheduling.
            matrices = matrices + _zero_after(previous, matrices.dtype)
        candidate, finite = jax.vmap(
            lambda m, e: matrix_inverse_root(m, e, config.epsilon, config.max_root_condition)
        )(matrices, exponents)
        if stack.dtype == jnp.float32 and jax.config.jax_enable_x64:
            candidate, finite = _retry_in_float64(matrices, exponents, config, candidate, finite)
        candidate = candidate.astype(roots[keys[0]].dtype)
        finite = finite & jnp.all(jnp.isfinite(candidate), axis=(1, 2))
        failures = failures + jnp.sum(~finite).astype(jnp.int32)
        start = 0
        for key, count_of_rows in zip(keys, rows, strict=True):
            part = slice(start, start + count_of_rows)
            start += count_of_rows
            new_roots[key] = jnp.where(finite[part, None, None], candidate[part], roots[key])
            new_ok[key] = root_ok[key] | finite[part]
        previous = new_roots[keys[-1]]
    return new_roots, new_ok, failures


def _zero_after(value: jax.Array, dtype: Any) -> jax.Array:
    """An exact 0 that XLA cannot compute before ``value`` (never NaN, whatever ``value`` is)."""
    flag = jnp.isnan(value.reshape(-1)[0]).astype(dtype)
    return flag * jnp.zeros([], dtype)


def _retry_in_float64(
    matrices: jax.Array,
    exponents: jax.Array,
    config: ShampooConfig,
    candidate: jax.Array,
    finite: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Recomputes a group in float64 when any of its float32 roots failed."""

    def retry(operands: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        first, first_finite = operands
        second, second_finite = jax.vmap(
            lambda m, e: matrix_inverse_root(m, e, config.epsilon, config.max_root_condition)
        )(matrices.astype(jnp.float64), exponents.astype(jnp.float64))
        second = second.astype(jnp.float32)
        second_finite = second_finite & jnp.all(jnp.isfinite(second), axis=(1, 2))
        merged = jnp.where(first_finite[:, None, None], first, second)
        return merged, first_finite | second_finite

    return jax.lax.cond(jnp.all(finite), lambda ops: ops, retry, (candidate, finite))


def _shampoo_directions(
    config: ShampooConfig,
    layout: _Layout,
    filtered: list[jax.Array],
    grafted: list[jax.Array],
    graft_norm_source: list[jax.Array],
    roots: dict[str, jax.Array],
    root_ok: dict[str, jax.Array],
    started: jax.Array,
) -> tuple[list[jax.Array], jax.Array]:
    """Each leaf's direction, and whether this step fell back to grafting on overflow."""
    stacked_directions = []
    for stack in layout.stacks:
        momenta = _stacked_blocks(filtered, layout, stack, stack.dtype)
        grafts = _stacked_blocks(grafted, layout, stack, stack.dtype)
        direction = _precondition(momenta, [roots[key] for key in stack.keys])
        if config.grafting != "none":
            if graft_norm_source is grafted:
                graft_norms = _row_norms(grafts)
            else:
                graft_norms = _row_norms(
                    _stacked_blocks(graft_norm_source, layout, stack, stack.dtype)
                )
            scales = graft_norms / (_row_norms(direction) + _NORM_FLOOR)
            direction = direction * _per_row(scales, direction.ndim)
        # A block uses the grafted direction until all of its roots were computed once.
        ready = root_ok[stack.keys[0]]
        for key in stack.keys[1:]:
            ready = ready & root_ok[key]
        stacked_directions.append(jnp.where(_per_row(ready, direction.ndim), direction, grafts))

    directions: list[jax.Array] = []
    preconditioned: list[int] = []
    for leaf_grafted, plan, leaf_places in zip(grafted, layout.plans, layout.places, strict=True):
        if not plan.preconditioned:
            directions.append(leaf_grafted)
            continue
        blocks = [
            stacked_directions[stack][row]
            if len(layout.stacks[stack].members) > 1
            else stacked_directions[stack].reshape(layout.stacks[stack].dims)
            for stack, row in leaf_places
        ]
        merged = _assemble(plan, blocks)
        preconditioned.append(len(directions))
        directions.append(merged.reshape(plan.shape).astype(leaf_grafted.dtype))
    if not preconditioned:
        return directions, jnp.zeros([], jnp.bool_)
    # An overflow anywhere (conceivable only with extreme roots) falls back to the
    # grafted directions for the whole step, as the torch twin does per parameter group.
    total = sum(jnp.sum(directions[i].astype(jnp.float32)) for i in preconditioned)
    use_shampoo = started & jnp.isfinite(total)
    for i in preconditioned:
        directions[i] = jnp.where(use_shampoo, directions[i], grafted[i])
    return directions, started & ~jnp.isfinite(total)


def _assemble(plan: ParameterPlan, blocks: list[jax.Array]) -> jax.Array:
    """Writes block directions back into the parameter's merged shape."""
    if len(blocks) == 1:
        return blocks[0]
    merged = jnp.zeros(plan.merged_shape, blocks[0].dtype)
    for block, value in zip(plan.blocks, blocks, strict=True):
        merged = merged.at[block.slices].set(value)
    return merged


def scale_by_ema_momentum(momentum: float, nesterov: bool = True) -> optax.GradientTransformation:
    """b ← μ·b + (1−μ)·d, then d ← (1−μ)·d + μ·b (Nesterov) or d ← b.

    Distributed Shampoo's momentum on the final direction (after weight decay).
    """
    if not 0.0 <= momentum < 1.0:
        raise ShampooConfigError(f"momentum={momentum!r} must lie in [0, 1)")

    def init_fn(params: optax.Params) -> EmaMomentumState:
        return EmaMomentumState(momentum_buffer=jax.tree.map(jnp.zeros_like, params))

    def update_fn(
        updates: optax.Updates, state: EmaMomentumState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, EmaMomentumState]:
        del params
        buffer = jax.tree.map(
            lambda d, b: momentum * b + (1.0 - momentum) * d, updates, state.momentum_buffer
        )
        if nesterov:
            updates = jax.tree.map(
                lambda d, b: (1.0 - momentum) * d + momentum * b, updates, buffer
            )
        else:
            updates = buffer
        return updates, EmaMomentumState(momentum_buffer=buffer)

    return optax.GradientTransformation(init_fn, update_fn)


def skip_unusable_steps(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Runs ``inner`` only when every gradient leaf's norm is finite and below ``√max / 2``.

    The torch twin's bound (9.2e18 in float32): under it every g² and every
    new EMA statistic is finite. Otherwise the updates are zero, ``inner``'s
    state is left as it was and ``skipped_steps`` grows. The choice is one
    ``lax.cond``: no host synchronisation.
    """

    def init_fn(params: optax.Params) -> SkipUnusableStepsState:
        return SkipUnusableStepsState(
            skipped_steps=jnp.zeros([], jnp.int32), inner_state=inner.init(params)
        )

    def update_fn(
        updates: optax.Updates, state: SkipUnusableStepsState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, SkipUnusableStepsState]:
        usable = jnp.ones([], jnp.bool_)
        for leaf in jax.tree.leaves(updates):
            if leaf.size == 0:
                continue
            limit = math.sqrt(float(jnp.finfo(leaf.dtype).max)) / 2
            # Below the limit the squared norm cannot overflow in float32; NaN and
            # inf compare False.
            norm = jnp.sqrt(jnp.sum(jnp.square(leaf.astype(jnp.float32))))
            usable = usable & (norm < limit)
        shapes = jax.eval_shape(inner.update, updates, state.inner_state, params)[0]

        def run(operands: tuple[Any, Any, Any]) -> tuple[Any, Any]:
            return inner.update(*operands)

        def skip(operands: tuple[Any, Any, Any]) -> tuple[Any, Any]:
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            return zeros, operands[1]

        new_updates, inner_state = jax.lax.cond(
            usable, run, skip, (updates, state.inner_state, params)
        )
        return new_updates, SkipUnusableStepsState(
            skipped_steps=state.skipped_steps + (~usable).astype(jnp.int32),
            inner_state=inner_state,
        )

    return optax.GradientTransformation(init_fn, update_fn)


def training_metrics(opt_state: optax.OptState) -> dict[str, int]:
    """Counters for the training log (``shampoo/…``), read from the host; warns on skips.

    Reads (and so waits for) the counters of every Shampoo state in
    ``opt_state``: call it at the logging cadence, as the builders read the
    averager's counters. A positive ``skipped_steps`` logs a warning, at most
    once a minute.
    """
    totals = dict.fromkeys(COUNTER_NAMES, 0)
    for node in _shampoo_states(opt_state):
        if isinstance(node, SkipUnusableStepsState):
            totals["skipped_steps"] += int(node.skipped_steps)
        else:
            totals["root_failures"] += int(node.root_failures)
            totals["direction_fallbacks"] += int(node.direction_fallbacks)
            totals["skipped_statistics"] += int(node.skipped_statistics)
    if totals["skipped_steps"] > 0:
        logging.log_every_n_seconds(
            logging.WARNING,
            "Shampoo: %d step(s) had a non-finite or overflowing gradient and were skipped",
            SKIPPED_WARNING_SECONDS,
            totals["skipped_steps"],
        )
    return counter_metrics(totals)


def _shampoo_states(node: Any) -> list[Any]:
    """Every SkipUnusableStepsState and ScaleByShampooState in an optax state tree."""
    if isinstance(node, SkipUnusableStepsState):
        return [node, *_shampoo_states(node.inner_state)]
    if isinstance(node, ScaleByShampooState):
        return [node]
    if isinstance(node, tuple | list):
        return [found for child in node for found in _shampoo_states(child)]
    if isinstance(node, dict):
        return [found for child in node.values() for found in _shampoo_states(child)]
    return []


def shampoo(
    learning_rate: float | optax.Schedule, config: ShampooConfig | None = None
) -> optax.GradientTransformation:
    """Shampoo as an optax optimizer: θ ← θ − lr·momentum(d + wd·θ).

    ``add_decayed_weights`` sees the params before the update, so with
    momentum 0 the step is −lr·(d + wd·θ), as in the torch twin.
    """
    config = ShampooConfig() if config is None else config
    if not callable(learning_rate) and not (math.isfinite(learning_rate) and learning_rate >= 0.0):
        raise ShampooConfigError(f"learning_rate={learning_rate!r} must be a finite number >= 0")
    transforms = [scale_by_shampoo(config)]
    if config.weight_decay > 0.0:
        transforms.append(optax.add_decayed_weights(config.weight_decay))
    if config.momentum > 0.0:
        transforms.append(scale_by_ema_momentum(config.momentum, nesterov=config.use_nesterov))
    transforms.append(optax.scale_by_learning_rate(learning_rate))
    return skip_unusable_steps(optax.chain(*transforms))


# ---------------------------------------------------------------------- factory


def make_shampoo(config: ShampooConfig, step_hint: int) -> optax.GradientTransformation:
    """Shampoo with its schedule, as the JAX builder uses it."""
    return shampoo(shampoo_schedule(config, step_hint), config)


def shampoo_schedule(config: ShampooConfig, step_hint: int) -> optax.Schedule:
    """The learning rate at a count of steps already taken, as the torch twin's scheduler.

    Warmup then cosine decay to 0 over ``step_hint_factor · step_hint`` steps,
    or a constant rate after warmup when ``use_cosine_decay`` is False.
    """
    learning_rate = config.learning_rate
    horizon = max(1, int(config.step_hint_factor * step_hint))
    if config.use_cosine_decay:
        return warmup_cosine_schedule(learning_rate, config.warmup_factor, horizon)
    warmup_steps = warmup_steps_for(config.warmup_factor, horizon)
    if warmup_steps == 0:
        return optax.constant_schedule(learning_rate)
    return optax.linear_schedule(
        init_value=0.0, end_value=learning_rate, transition_steps=warmup_steps
    )
