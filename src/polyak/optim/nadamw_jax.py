"""NadamW for JAX: AlgoPerf's NAdamW as a chain of optax transforms.

The moment update is the simple NAdam of arXiv 1910.05446, Table 1, as in
AlgoPerf's baseline, with decoupled weight decay and the AlgoPerf warmup +
cosine schedule (lr is evaluated at the count of steps already taken)::

    m ← β1·m + (1−β1)·g          v ← β2·v + (1−β2)·g²          t = count + 1
    m̂ = (β1·m + (1−β1)·g) / (1−β1ᵗ)          v̂ = v / (1−β2ᵗ)
    θ ← θ − lr(t−1)·(m̂ / (√v̂ + ε) + wd·θ)

This is deliberately not ``optax.nadamw``: optax bias-corrects the look-ahead
term with 1−β1ᵗ⁺¹ instead of 1−β1ᵗ, which drifts about 1% from AlgoPerf's
baseline (and from our torch twin) within 60 steps. The tests pin the
difference down so that nobody swaps one for the other.

Works with AlgoPerf's pins (jax 0.7.0, optax 0.2.2) and current releases.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from polyak.optim.nadamw_config import EPSILON, NadamWConfig
from polyak.optim.schedules import warmup_steps_for


class ScaleByNadamState(NamedTuple):
    """Step count and the two moment estimates, each shaped like the params."""

    count: jax.Array  # int32 scalar: steps already taken
    mu: optax.Updates
    nu: optax.Updates


def scale_by_nadam(
    b1: float = 0.9, b2: float = 0.999, eps: float = EPSILON
) -> optax.GradientTransformation:
    """Rescales gradients by AlgoPerf's NAdam rule (no learning rate, no decay)."""
    _check_beta("b1", b1)
    _check_beta("b2", b2)
    _check_non_negative("eps", eps)

    def init_fn(params: optax.Params) -> ScaleByNadamState:
        return ScaleByNadamState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(jnp.zeros_like, params),
            nu=jax.tree.map(jnp.zeros_like, params),
        )

    def update_fn(
        updates: optax.Updates, state: ScaleByNadamState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, ScaleByNadamState]:
        del params
        mu = jax.tree.map(lambda g, m: b1 * m + (1.0 - b1) * g, updates, state.mu)
        nu = jax.tree.map(lambda g, v: b2 * v + (1.0 - b2) * g * g, updates, state.nu)
        count = state.count + jnp.array(1, jnp.int32)
        first_correction = _one_minus_power(b1, count)
        second_correction = _one_minus_power(b2, count)

        def direction(g: jax.Array, m: jax.Array, v: jax.Array) -> jax.Array:
            m_hat = (b1 * m + (1.0 - b1) * g) / first_correction.astype(m.dtype)
            v_hat = v / second_correction.astype(v.dtype)
            return m_hat / (jnp.sqrt(v_hat) + eps)

        directions = jax.tree.map(direction, updates, mu, nu)
        return directions, ScaleByNadamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def nadamw(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = EPSILON,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """NAdam direction, plus decoupled weight decay, times −learning_rate(t).

    ``add_decayed_weights`` sees the params before the update, so the step is
    −lr·(direction + wd·θ), the same as torch's θ·(1 − lr·wd) − lr·direction.
    """
    if not callable(learning_rate):
        _check_non_negative("learning_rate", learning_rate)
    _check_non_negative("weight_decay", weight_decay)
    return optax.chain(
        scale_by_nadam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay),
        _scale_by_negative_learning_rate(learning_rate),
    )


def warmup_cosine_schedule(
    learning_rate: float, warmup_factor: float, step_hint: int
) -> optax.Schedule:
    """AlgoPerf's schedule: linear warmup from 0, cosine to 0 at step_hint, then 0.

    Equals ``learning_rate * schedules.warmup_cosine_multiplier(count, ...)``.
    """
    _check_non_negative("learning_rate", learning_rate)
    warmup_steps = warmup_steps_for(warmup_factor, step_hint)
    cosine = optax.cosine_decay_schedule(
        init_value=learning_rate, decay_steps=max(step_hint - warmup_steps, 1)
    )
    if warmup_steps == 0:
        # optax's linear_schedule logs a notice for zero transition steps.
        return cosine
    warmup = optax.linear_schedule(
        init_value=0.0, end_value=learning_rate, transition_steps=warmup_steps
    )
    return optax.join_schedules(schedules=[warmup, cosine], boundaries=[warmup_steps])


def make_nadamw(config: NadamWConfig, step_hint: int) -> optax.GradientTransformation:
    """NadamW with AlgoPerf's warmup + cosine schedule, as the JAX builder uses it."""
    schedule = warmup_cosine_schedule(config.learning_rate, config.warmup_factor, step_hint)
    return nadamw(
        learning_rate=schedule,
        b1=config.beta1,
        b2=config.beta2,
        eps=config.epsilon,
        weight_decay=config.weight_decay,
    )


def _one_minus_power(beta: float, count: jax.Array) -> jax.Array:
    """1 − βᵗ, accurate to float rounding even for β close to 1.

    Rounding β to float32 moves 1 − β by up to 3e-5 relative for β near 0.999
    (1.3e-5 for β = 0.999 or 0.998), so ``1 − β**t`` in float32 could move the
    update by 1.5e-5, more than the 1e-5 that our torch and jax twins agree to.
    ``−expm1(t·log β)``, with log β taken in float64 on the host, is exact to
    float32 rounding.
    """
    log_beta = math.log(beta) if beta > 0.0 else -math.inf
    return -jnp.expm1(count * log_beta)


def _scale_by_negative_learning_rate(
    learning_rate: float | optax.Schedule,
) -> optax.GradientTransformation:
    scale_by_learning_rate = getattr(optax, "scale_by_learning_rate", None)
    if scale_by_learning_rate is not None:
        return scale_by_learning_rate(learning_rate)
    if callable(learning_rate):
        return optax.scale_by_schedule(lambda count: -learning_rate(count))
    return optax.scale(-learning_rate)


def _check_beta(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value!r} must lie in [0, 1)")


def _check_non_negative(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name}={value!r} must be a finite number >= 0")
