"""Tests for polyak.optim.bias_correction_jax against float64 references of 1 − βᵗ."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from polyak.optim.bias_correction_jax import bias_correction  # noqa: E402

# −expm1(t·log β) rounds log β, the product and expm1 once each in float32: a few ulps.
FLOAT32_RTOL = 4 * float(np.finfo(np.float32).eps)
ALGOPERF_BETAS = (1.0 - 0.02686663061, 0.9981232922116359)  # NAdamW baseline's first point


@contextlib.contextmanager
def float64_enabled() -> Iterator[None]:
    enable = getattr(jax, "enable_x64", None)  # jax.experimental's before jax 0.8
    with enable(True) if enable is not None else jax.experimental.enable_x64():
        yield


def reference(beta: float, count: int) -> float:
    """1 − β^count in float64, from the definition."""
    return 1.0 - beta**count


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.999, *ALGOPERF_BETAS])
def test_count_zero_is_positive_zero(beta: float) -> None:
    value = float(bias_correction(beta, jnp.array(0, jnp.int32)))
    assert value == 0.0 and math.copysign(1.0, value) == 1.0


@pytest.mark.parametrize("count", [1, 2, 7, 10**6, 2**31 - 1])
def test_beta_zero_is_one_from_the_first_step(count: int) -> None:
    assert float(bias_correction(0.0, jnp.array(count, jnp.int32))) == 1.0


@pytest.mark.parametrize("beta", [0.9, 0.999, 0.9999999, 1.0 - 1e-12])
@pytest.mark.parametrize("count", [2**24, 10**8, 2**31 - 1])
def test_large_counts_stay_finite_and_exact(beta: float, count: int) -> None:
    value = float(bias_correction(beta, jnp.array(count, jnp.int32)))
    assert math.isfinite(value) and 0.0 < value <= 1.0
    np.testing.assert_allclose(value, reference(beta, count), rtol=FLOAT32_RTOL)


@pytest.mark.parametrize("beta", [0.9, 0.99, 0.999, 0.9999, *ALGOPERF_BETAS])
def test_float32_is_exact_where_the_naive_power_is_not(beta: float) -> None:
    counts = np.array([1, 2, 3, 10, 100, 1000, 10**4, 10**5], np.int32)
    got = np.asarray(jax.vmap(lambda c: bias_correction(beta, c))(jnp.asarray(counts)))
    want = np.array([reference(beta, int(c)) for c in counts])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=FLOAT32_RTOL)
    # The bound above means something: 1 − β**t in float32 misses it at t = 1
    # whenever rounding β to float32 moves 1 − β by more than a few ulps.
    naive = 1.0 - np.float32(beta) ** counts.astype(np.float32)
    if abs(float(np.float32(beta)) - beta) / (1.0 - beta) > FLOAT32_RTOL:
        assert abs(naive[0] - want[0]) / want[0] > FLOAT32_RTOL


@settings(max_examples=60, deadline=None)
@given(beta=st.floats(0.0, 0.9999999), count=st.integers(0, 2**31 - 1))
def test_property_matches_float64_reference(beta: float, count: int) -> None:
    value = float(bias_correction(beta, jnp.array(count, jnp.int32)))
    np.testing.assert_allclose(value, reference(beta, count), rtol=FLOAT32_RTOL, atol=0.0)


def test_traced_count_under_jit() -> None:
    beta = ALGOPERF_BETAS[1]
    corrections = jax.jit(lambda c: bias_correction(beta, c))
    for count in (0, 1, 50):
        assert float(corrections(jnp.array(count, jnp.int32))) == float(
            bias_correction(beta, jnp.array(count, jnp.int32))
        )


def test_dtype_follows_x64_unless_given() -> None:
    count = jnp.array(3, jnp.int32)
    assert bias_correction(0.9, count).dtype == jnp.float32
    with float64_enabled():
        count64 = jnp.array(3, jnp.int32)
        assert bias_correction(0.9, count64).dtype == jnp.float64
        assert bias_correction(0.9, count64, jnp.float32).dtype == jnp.float32
        np.testing.assert_allclose(
            float(bias_correction(0.999, count64)), reference(0.999, 3), rtol=1e-13
        )


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5, math.nan, True, "0.9"])
def test_bad_beta_raises_naming_it(beta: object) -> None:
    with pytest.raises(ValueError, match=r"beta=.* must be a Python number in \[0, 1\)"):
        bias_correction(beta, jnp.array(1, jnp.int32))  # type: ignore[arg-type]
