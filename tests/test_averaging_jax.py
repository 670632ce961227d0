"""The JAX averager against the definitions, and against its torch twin."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from averaging_reference import averaging_settings, reference_average
from polyak.averaging import lawa_ema_jax
from polyak.averaging.config import AveragingConfig


def _params(rng: np.random.Generator) -> dict:
    return {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)},
        "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
    }


def _flat(tree: object) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in jax.tree.leaves(tree)])


def _sequence(steps: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [_params(rng) for _ in range(steps)]


@settings(max_examples=15, deadline=None)
@given(**averaging_settings)
def test_matches_definitions(
    mode: str, every: int, window: int, beta: float, steps: int, seed: int
) -> None:
    config = AveragingConfig(mode=mode, every=every, window=window, beta=beta)
    sequence = _sequence(steps, seed)
    first = sequence[0] if sequence else _params(np.random.default_rng(0))
    state = lawa_ema_jax.init(config, first)
    collect = jax.jit(lambda s, p: lawa_ema_jax.collect(config, s, p))
    collected = []
    for step, params in enumerate(sequence, start=1):
        if config.should_collect(step):
            state = collect(state, params)
            collected.append(_flat(params))
    live = sequence[-1] if sequence else _params(np.random.default_rng(0))
    got = _flat(lawa_ema_jax.average(config, state, live))
    if collected:
        np.testing.assert_allclose(got, reference_average(config, collected), rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_array_equal(got, _flat(live))
    assert int(state.num_collected) == len(collected)


def test_nonfinite_params_are_skipped_and_counted() -> None:
    config = AveragingConfig(mode="lawa", every=1, window=3)
    sequence = _sequence(6, 1)
    poisoned = jax.tree.map(lambda x: x.at[0].set(jnp.nan), sequence[2])
    state = lawa_ema_jax.init(config, sequence[0])
    collect = jax.jit(lambda s, p: lawa_ema_jax.collect(config, s, p))
    for i, params in enumerate(sequence):
        state = collect(state, poisoned if i == 2 else params)
    assert int(state.num_skipped_nonfinite) == 1
    assert int(state.num_collected) == 5
    clean = [_flat(p) for i, p in enumerate(sequence) if i != 2]
    got = _flat(lawa_ema_jax.average(config, state, sequence[-1]))
    np.testing.assert_allclose(got, np.mean(clean[-3:], axis=0), rtol=1e-6)


def test_bf16_params_keep_fp32_accumulators() -> None:
    config = AveragingConfig(mode="ema", every=1, beta=0.9)
    params = {"w": jnp.ones((4,), jnp.bfloat16)}
    state = lawa_ema_jax.init(config, params)
    assert state.ema["w"].dtype == jnp.float32
    state = lawa_ema_jax.collect(config, state, params)
    assert lawa_ema_jax.average(config, state, params)["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize("mode", ["lawa", "ema"])
def test_matches_torch_twin(mode: str) -> None:
    torch = pytest.importorskip("torch")
    from polyak.averaging.averager_torch import TorchAverager

    config = AveragingConfig(mode=mode, every=2, window=4, beta=0.9)
    sequence = _sequence(30, 7)
    module = torch.nn.Module()
    module.kernel = torch.nn.Parameter(torch.zeros(3, 4))
    module.bias = torch.nn.Parameter(torch.zeros(4))
    averager = TorchAverager(config, module)
    state = lawa_ema_jax.init(config, sequence[0])
    collect = jax.jit(lambda s, p: lawa_ema_jax.collect(config, s, p))
    for step, params in enumerate(sequence, start=1):
        with torch.no_grad():
            module.kernel.copy_(torch.from_numpy(np.array(params["dense"]["kernel"])))
            module.bias.copy_(torch.from_numpy(np.array(params["bias"])))
        averager.collect(step)
        if config.should_collect(step):
            state = collect(state, params)
    torch_avg = averager.average()
    jax_avg = lawa_ema_jax.average(config, state, sequence[-1])
    np.testing.assert_allclose(
        torch_avg[0].numpy(), np.asarray(jax_avg["dense"]["kernel"]), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(
        torch_avg[1].numpy(), np.asarray(jax_avg["bias"]), rtol=1e-6, atol=1e-6
    )
