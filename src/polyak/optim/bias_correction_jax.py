"""Adam's bias correction 1 − βᵗ for JAX, exact to float rounding for β close to 1.

NadamW and Shampoo divide moment estimates by 1 − βᵗ, t counting the steps taken
(this one included). Rounding β to float32 moves 1 − β by up to 3e-5 relative for β
near 0.999 (1.3e-5 for β = 0.999 or 0.998), so ``1 − β**t`` in float32 could move an
update by 1.5e-5, more than the 1e-5 to which our torch and JAX twins agree (torch
computes the correction in float64 on the host). ``−expm1(t·log β)``, with log β
taken in float64 on the host, is exact to a few float32 roundings.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["bias_correction"]


def bias_correction(beta: float, count: jax.Array, dtype: Any = None) -> jax.Array:
    """1 − β^count as a scalar of ``dtype``.

    Args:
        beta: a Python number in [0, 1) (it is read on the host, not traced).
        count: integer steps taken, this one included; may be traced.
        dtype: the float dtype to compute in. ``None`` takes JAX's default float
            (float32, or float64 under ``jax_enable_x64``).

    A count of 0 gives +0 for every β (0⁰ = 1: nothing to correct yet); β = 0 gives 1
    from count 1 on; a large count saturates at 1.
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
        raise ValueError(f"beta={beta!r} must be a Python number in [0, 1)")
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    count = jnp.asarray(count)
    log_beta = math.log(beta) if beta > 0.0 else -math.inf
    correction = -jnp.expm1(count.astype(dtype) * log_beta)
    # At count 0, β = 0 would give 0·(−∞) = NaN and any other β −expm1(0) = −0.
    return jnp.where(count > 0, correction, jnp.zeros([], dtype))
