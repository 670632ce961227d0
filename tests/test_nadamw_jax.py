"""Tests for polyak.optim.nadamw_jax: math, schedule, jit, sharding and the torch twin.

The references here are written from the definitions (arXiv 1910.05446, Table 1,
and AlgoPerf's warmup + cosine schedule) in numpy float64, independent of the
code under test.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

from polyak.optim import nadamw_jax  # noqa: E402
from polyak.optim.nadamw_config import NadamWConfig  # noqa: E402
from polyak.optim.nadamw_jax import (  # noqa: E402
    EPSILON,
    ScaleByNadamState,
    make_nadamw,
    nadamw,
    scale_by_nadam,
    warmup_cosine_schedule,
)
from polyak.optim.schedules import warmup_cosine_multiplier, warmup_steps_for  # noqa: E402

DEFAULT_HYPERPARAMETERS = NadamWConfig.DEFAULT_HYPERPARAMETERS

# Large enough that the parameters move well beyond float32 rounding of θ, so a
# 1e-5 relative bound on the displacement is meaningful.
TEST_HPARAMS = {
    "learning_rate": 0.02,
    "one_minus_beta1": 0.1,
    "beta2": 0.998,
    "weight_decay": 0.1,
    "warmup_factor": 0.1,
}
STEPS = 100
Tree = dict[str, np.ndarray]
SCHEDULE_SAMPLES = 3003


# ---------------------------------------------------------------- references


def reference_learning_rate(count: int, peak: float, warmup_factor: float, step_hint: int) -> float:
    """AlgoPerf's schedule from its definition; count = steps already taken."""
    warmup = int(warmup_factor * step_hint)
    if count < warmup:
        return peak * count / warmup
    decay = max(step_hint - warmup, 1)
    progress = min(count - warmup, decay) / decay
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def reference_nadamw(
    params: Tree,
    grads: list[Tree],
    learning_rate: Callable[[int], float],
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
) -> Tree:
    """Simple NAdam (1910.05446 Table 1) with decoupled weight decay, float64."""
    theta = {k: np.asarray(v, np.float64).copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in theta.items()}
    v = {k: np.zeros_like(x) for k, x in theta.items()}
    for step, grad in enumerate(grads):
        t = step + 1
        lr = learning_rate(step)
        for k in theta:
            g = np.asarray(grad[k], np.float64)
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g**2
            m_hat = (b1 * m[k] + (1 - b1) * g) / (1 - b1**t)
            v_hat = v[k] / (1 - b2**t)
            theta[k] = theta[k] - lr * (m_hat / (np.sqrt(v_hat) + eps) + weight_decay * theta[k])
    return theta


# ---------------------------------------------------------------- helpers


def make_problem(seed: int, steps: int) -> tuple[Tree, list[Tree]]:
    """Params and a gradient sequence with per-leaf scales spanning 4 decades."""
    rng = np.random.default_rng(seed)
    params = {
        "kernel": rng.normal(size=(6, 5)).astype(np.float32),
        "bias": rng.normal(size=(5,)).astype(np.float32),
        "scale": rng.normal(size=(3,)).astype(np.float32),
    }
    scales = {"kernel": 1.0, "bias": 1e-2, "scale": 1e2}
    # A shared drift plus noise, so the moments build up rather than cancel.
    drift = {k: rng.normal(size=p.shape) for k, p in params.items()}
    grads = [
        {
            k: (scales[k] * (drift[k] + 0.5 * rng.normal(size=p.shape))).astype(np.float32)
            for k, p in params.items()
        }
        for _ in range(steps)
    ]
    return params, grads


def run_optax(
    tx: optax.GradientTransformation,
    params: Tree,
    grads: list[Tree],
    dtype: jnp.dtype = jnp.float32,
    jit: bool = True,
) -> Tree:
    theta = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    state = tx.init(theta)

    def step(theta, state, grad):
        updates, state = tx.update(grad, state, theta)
        return optax.apply_updates(theta, updates), state

    if jit:
        step = jax.jit(step)
    for grad in grads:
        theta, state = step(theta, state, jax.tree.map(lambda x: jnp.asarray(x, dtype), grad))
    return {k: np.asarray(v, np.float64) for k, v in theta.items()}


def displacement_error(got: Tree, want: Tree, start: Tree) -> float:
    """Worst per-leaf relative error of the movement θ_T − θ_0 (norm-wise)."""
    worst = 0.0
    for k in want:
        moved = np.asarray(want[k], np.float64) - np.asarray(start[k], np.float64)
        diff = np.asarray(got[k], np.float64) - np.asarray(want[k], np.float64)
        worst = max(worst, float(np.linalg.norm(diff) / np.linalg.norm(moved)))
    return worst


@contextlib.contextmanager
def float64_enabled() -> Iterator[None]:
    """x64 for the block only: jax >= 0.8 has jax.enable_x64, jax 0.7 the experimental one."""
    enable = getattr(jax, "enable_x64", None)
    if enable is not None:
        with enable(True):
            yield
    else:
        from jax.experimental import enable_x64

        with enable_x64():
            yield


def reference_for(hparams: dict[str, float], step_hint: int) -> Callable[[int], float]:
    return lambda count: reference_learning_rate(
        count, hparams["learning_rate"], hparams["warmup_factor"], step_hint
    )


# ---------------------------------------------------------------- math


@functools.cache
def float32_run(step_hint: int) -> tuple[Tree, list[Tree], Tree, Tree]:
    """(params, grads, float64 reference, make_nadamw in float32) for TEST_HPARAMS.

    Shared by the reference and the torch-twin tests; callers must not mutate it.
    """
    params, grads = make_problem(seed=0, steps=STEPS)
    hp = TEST_HPARAMS
    want = reference_nadamw(
        params,
        grads,
        reference_for(hp, step_hint),
        b1=1 - hp["one_minus_beta1"],
        b2=hp["beta2"],
        eps=EPSILON,
        weight_decay=hp["weight_decay"],
    )
    got = run_optax(make_nadamw(NadamWConfig.from_hyperparameters(hp), step_hint), params, grads)
    return params, grads, want, got


@pytest.mark.parametrize("step_hint", [120, 80])  # 80: the last 20 steps sit past step_hint
def test_matches_float64_reference_in_float32(step_hint: int) -> None:
    params, _, want, got = float32_run(step_hint)
    assert displacement_error(got, want, params) <= 1e-5
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_matches_float64_reference_in_float64() -> None:
    """With x64 the NAdam math agrees to rounding. (A constant lr: optax evaluates
    schedules at an int32 count, so in float32 even under x64.)"""
    params, grads = make_problem(seed=1, steps=STEPS)
    hp = TEST_HPARAMS
    b1, b2, wd = 1 - hp["one_minus_beta1"], hp["beta2"], hp["weight_decay"]
    want = reference_nadamw(
        params, grads, lambda _: 0.02, b1=b1, b2=b2, eps=EPSILON, weight_decay=wd
    )
    with float64_enabled():
        tx = nadamw(0.02, b1=b1, b2=b2, eps=EPSILON, weight_decay=wd)
        got = run_optax(tx, params, grads, dtype=jnp.float64)
    assert displacement_error(got, want, params) <= 1e-12


def test_defaults_match_reference_with_algoperf_betas() -> None:
    """The self-tuning defaults (β1 ≈ 0.973, β2 ≈ 0.998) through make_nadamw(None, ...)."""
    params, grads = make_problem(seed=2, steps=STEPS)
    hp = DEFAULT_HYPERPARAMETERS
    step_hint = 100
    want = reference_nadamw(
        params,
        grads,
        reference_for(hp, step_hint),
        b1=1 - hp["one_minus_beta1"],
        b2=hp["beta2"],
        eps=EPSILON,
        weight_decay=hp["weight_decay"],
    )
    got = run_optax(make_nadamw(NadamWConfig.from_hyperparameters(None), step_hint), params, grads)
    assert displacement_error(got, want, params) <= 1e-5


def test_optax_nadamw_is_a_different_algorithm() -> None:
    """Guards against "simplifying" to optax.nadamw: its Nesterov bias correction
    uses 1−β1ᵗ⁺¹ for the momentum term and drifts ~1% within 60 steps."""
    optax_nadamw = getattr(optax, "nadamw", None)
    if optax_nadamw is None:
        pytest.skip("this optax has no nadamw")
    params, grads = make_problem(seed=3, steps=60)
    # AlgoPerf's betas (β1 ≈ 0.973 is where the two corrections differ most); a
    # larger lr so that θ moves well beyond float32 rounding.
    hp = dict(DEFAULT_HYPERPARAMETERS, learning_rate=0.02)
    step_hint = 100
    b1, b2, wd = 1 - hp["one_minus_beta1"], hp["beta2"], hp["weight_decay"]
    want = reference_nadamw(
        params, grads, reference_for(hp, step_hint), b1=b1, b2=b2, eps=EPSILON, weight_decay=wd
    )
    schedule = warmup_cosine_schedule(hp["learning_rate"], hp["warmup_factor"], step_hint)
    ours = run_optax(make_nadamw(NadamWConfig.from_hyperparameters(hp), step_hint), params, grads)
    theirs = run_optax(
        optax_nadamw(schedule, b1=b1, b2=b2, eps=EPSILON, weight_decay=wd), params, grads
    )
    assert displacement_error(ours, want, params) <= 1e-5
    assert displacement_error(theirs, want, params) >= 3e-3


def test_first_step_is_one_plus_beta1_times_sign() -> None:
    """At t = 1: m̂ = (1+β1)·g and v̂ = g², so the direction is (1+β1)·g/(|g|+ε)."""
    g = jnp.array([3.0, -0.5, 0.0, 1e-3], jnp.float32)
    tx = scale_by_nadam(b1=0.9, b2=0.999)
    direction, _ = tx.update(g, tx.init(jnp.zeros_like(g)))
    want = 1.9 * np.asarray(g, np.float64) / (np.abs(np.asarray(g, np.float64)) + EPSILON)
    np.testing.assert_allclose(np.asarray(direction), want, rtol=1e-6)


@settings(max_examples=20, deadline=None)
@given(
    b1=st.floats(0.0, 0.999),
    b2=st.floats(0.0, 0.9999),
    # One fixed length, so that eager jax reuses its compiled ops across examples.
    grad=st.lists(
        st.floats(-1e3, 1e3, allow_nan=False, width=32).filter(lambda x: x == 0 or abs(x) > 1e-3),
        min_size=6,
        max_size=6,
    ),
    lr=st.floats(0.0, 1.0),
    weight_decay=st.floats(0.0, 1.0),
)
def test_first_update_property(
    b1: float, b2: float, grad: list[float], lr: float, weight_decay: float
) -> None:
    """For any β1, β2, lr and wd, step one moves θ by −lr·((1+β1)·g/(|g|+ε) + wd·θ)."""
    g = np.asarray(grad, np.float64)
    theta = np.linspace(-1.0, 1.0, g.size)
    tx = nadamw(learning_rate=lr, b1=b1, b2=b2, weight_decay=weight_decay)
    theta32 = jnp.asarray(theta, jnp.float32)
    updates, state = tx.update(jnp.asarray(g, jnp.float32), tx.init(theta32), theta32)
    want = -lr * ((1 + b1) * g / (np.abs(g) + EPSILON) + weight_decay * theta)
    np.testing.assert_allclose(np.asarray(updates), want, rtol=2e-6, atol=1e-6)
    nadam_state = state[0]
    assert isinstance(nadam_state, ScaleByNadamState)
    assert int(nadam_state.count) == 1


@settings(max_examples=10, deadline=None)
@given(
    b1=st.floats(0.5, 0.99),
    b2=st.floats(0.9, 0.9999),
    seed=st.integers(0, 2**16),
)
def test_scale_by_nadam_matches_reference_for_any_betas(b1: float, b2: float, seed: int) -> None:
    params, grads = make_problem(seed=seed, steps=8)
    want = reference_nadamw(
        params, grads, lambda _: 0.1, b1=b1, b2=b2, eps=EPSILON, weight_decay=0.0
    )
    tx = optax.chain(scale_by_nadam(b1=b1, b2=b2), optax.scale(-0.1))
    got = run_optax(tx, params, grads, jit=False)
    assert displacement_error(got, want, params) <= 1e-5


# ---------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    ("warmup_factor", "step_hint"),
    [(0.1, 100), (0.02, 1000), (0.0, 50), (0.5, 7), (0.3, 1), (0.05, 195_999)],
)
def test_schedule_equals_multiplier_times_lr(warmup_factor: float, step_hint: int) -> None:
    lr = 0.0017
    schedule = warmup_cosine_schedule(lr, warmup_factor, step_hint)
    warmup_steps = warmup_steps_for(warmup_factor, step_hint)
    # Every count up to 3·step_hint for small hints; a dense sample plus the
    # boundaries for the ImageNet-sized one. One fixed length, so that jax
    # compiles the schedule's ops once for all cases.
    if step_hint <= 1000:
        counts = np.arange(0, 3 * step_hint + 3)
    else:
        edges = [warmup_steps - 1, warmup_steps, warmup_steps + 1, step_hint - 1, step_hint]
        counts = np.unique(np.r_[np.arange(0, 3 * step_hint, 997), edges, 10 * step_hint])
    assert counts.size <= SCHEDULE_SAMPLES
    counts = np.sort(np.resize(counts, SCHEDULE_SAMPLES))
    got = np.asarray(schedule(jnp.asarray(counts, jnp.int32)), np.float64)
    want = np.array(
        [lr * warmup_cosine_multiplier(int(c), warmup_steps, step_hint) for c in counts]
    )
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7 * lr)
    # Past step_hint the rate holds at 0 rather than rising again.
    past = counts >= step_hint
    np.testing.assert_allclose(got[past], 0.0, atol=1e-7 * lr)


@settings(max_examples=30, deadline=None)
@given(
    lr=st.floats(1e-5, 1.0),
    warmup_factor=st.floats(0.0, 0.99),
    step_hint=st.integers(1, 300_000),
    count_fraction=st.floats(0.0, 2.0),
)
def test_schedule_property(lr: float, warmup_factor: float, step_hint: int, count_fraction: float):
    count = int(count_fraction * step_hint)
    warmup_steps = warmup_steps_for(warmup_factor, step_hint)
    got = float(warmup_cosine_schedule(lr, warmup_factor, step_hint)(count))
    want = lr * warmup_cosine_multiplier(count, warmup_steps, step_hint)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6 * lr)


def test_schedule_drives_the_optimizer() -> None:
    """During warmup step 0 uses lr(0) = 0: the params must not move on the first step."""
    tx = make_nadamw(NadamWConfig.from_hyperparameters(TEST_HPARAMS), step_hint=100)
    theta = {"w": jnp.ones(4)}
    updates, _ = tx.update({"w": jnp.ones(4)}, tx.init(theta), theta)
    np.testing.assert_array_equal(np.asarray(updates["w"]), 0.0)


# ---------------------------------------------------------------- jit, pytree, dtypes


def test_jit_matches_eager_and_state_is_a_float32_pytree() -> None:
    params, grads = make_problem(seed=4, steps=10)
    tx = make_nadamw(NadamWConfig.from_hyperparameters(TEST_HPARAMS), step_hint=20)
    eager = run_optax(tx, params, grads, jit=False)
    jitted = run_optax(tx, params, grads, jit=True)
    for k in eager:
        np.testing.assert_allclose(jitted[k], eager[k], rtol=1e-6, atol=1e-7)

    state = jax.jit(tx.init)(jax.tree.map(jnp.asarray, params))
    nadam_state = state[0]
    assert isinstance(nadam_state, ScaleByNadamState)
    assert nadam_state.count.dtype == jnp.int32
    for leaf in jax.tree.leaves((nadam_state.mu, nadam_state.nu)):
        assert leaf.dtype == jnp.float32
    # Flattening and rebuilding gives an equivalent state (checkpoints rely on it).
    leaves, treedef = jax.tree.flatten(state)
    rebuilt = jax.tree.unflatten(treedef, leaves)
    updates, _ = jax.jit(tx.update)(
        jax.tree.map(jnp.asarray, grads[0]), rebuilt, jax.tree.map(jnp.asarray, params)
    )
    assert jax.tree.structure(updates) == jax.tree.structure(params)


def test_update_with_sharded_batch_and_replicated_params() -> None:
    """AlgoPerf's JAX layout: params/state replicated, batch sharded over 8 devices."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip(f"needs 8 devices (XLA_FLAGS from conftest), found {len(devices)}")
    mesh = Mesh(np.asarray(devices[:8]), ("batch",))
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharded = NamedSharding(mesh, PartitionSpec("batch"))

    rng = np.random.default_rng(5)
    w0 = rng.normal(size=(4, 2)).astype(np.float32)
    b0 = np.zeros(2, np.float32)
    batches = [
        {
            "inputs": rng.normal(size=(64, 4)).astype(np.float32),
            "targets": rng.normal(size=(64, 2)).astype(np.float32),
        }
        for _ in range(3)
    ]
    tx = make_nadamw(
        NadamWConfig.from_hyperparameters(dict(TEST_HPARAMS, warmup_factor=0.0)), step_hint=10
    )

    def loss_fn(params, batch):
        predictions = batch["inputs"] @ params["w"] + params["b"]
        return jnp.mean((predictions - batch["targets"]) ** 2)

    def train_step(params, opt_state, batch):
        grads = jax.grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # Reference: the same steps on one device, without shardings.
    single_device_step = jax.jit(train_step)
    params = {"w": jnp.asarray(w0), "b": jnp.asarray(b0)}
    opt_state = tx.init(params)
    for batch in batches:
        params, opt_state = single_device_step(params, opt_state, jax.tree.map(jnp.asarray, batch))
    want = {k: np.asarray(v) for k, v in params.items()}

    sharded_step = jax.jit(
        train_step,
        in_shardings=(replicated, replicated, batch_sharded),
        out_shardings=(replicated, replicated),
        donate_argnums=(0, 1),
    )
    params = jax.device_put({"w": jnp.asarray(w0), "b": jnp.asarray(b0)}, replicated)
    opt_state = jax.device_put(tx.init(params), replicated)
    for batch in batches:
        device_batch = jax.device_put(batch, batch_sharded)
        assert len(device_batch["inputs"].addressable_shards) == 8
        assert device_batch["inputs"].addressable_shards[0].data.shape == (8, 4)
        params, opt_state = sharded_step(params, opt_state, device_batch)
    for leaf in jax.tree.leaves((params, opt_state)):
        assert leaf.sharding.is_fully_replicated
    for k in want:
        np.testing.assert_allclose(np.asarray(params[k]), want[k], rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(params["w"]), w0)


# ---------------------------------------------------------------- hyperparameters


def test_missing_names_fall_back_to_defaults_per_name() -> None:
    """A partial point (only the lr given) uses the defaults for the rest."""
    from types import SimpleNamespace

    params, grads = make_problem(seed=6, steps=20)
    step_hint = 30
    partial = SimpleNamespace(learning_rate=0.01, beta2=None)
    hp = dict(DEFAULT_HYPERPARAMETERS, learning_rate=0.01)
    want = reference_nadamw(
        params,
        grads,
        reference_for(hp, step_hint),
        b1=1 - hp["one_minus_beta1"],
        b2=hp["beta2"],
        eps=EPSILON,
        weight_decay=hp["weight_decay"],
    )
    got = run_optax(
        make_nadamw(NadamWConfig.from_hyperparameters(partial), step_hint), params, grads
    )
    assert displacement_error(got, want, params) <= 1e-5


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("learning_rate", -1e-3, "learning_rate=-0.001"),
        ("learning_rate", float("nan"), "learning_rate=nan"),
        ("learning_rate", "fast", "learning_rate='fast' must be a number"),
        ("one_minus_beta1", 0.0, "one_minus_beta1=0.0"),
        ("one_minus_beta1", 1.5, "one_minus_beta1=1.5"),
        ("beta2", 1.0, r"beta2=1.0 must lie in \[0, 1\)"),
        ("beta2", -0.1, "beta2=-0.1"),
        ("weight_decay", -0.1, "weight_decay=-0.1"),
        ("warmup_factor", 1.0, "warmup_factor=1.0"),
    ],
)
def test_bad_hyperparameters_raise_clear_errors(name: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_nadamw(NadamWConfig.from_hyperparameters({name: value}), step_hint=100)


def test_bad_step_hint_raises() -> None:
    with pytest.raises(ValueError, match="step_hint=0"):
        make_nadamw(NadamWConfig.from_hyperparameters(None), step_hint=0)


def test_bad_transform_arguments_raise() -> None:
    with pytest.raises(ValueError, match=r"b1=1\.0"):
        scale_by_nadam(b1=1.0)
    with pytest.raises(ValueError, match="eps=-1"):
        scale_by_nadam(eps=-1.0)
    with pytest.raises(ValueError, match="weight_decay=-1"):
        nadamw(1e-3, weight_decay=-1.0)


def test_without_scale_by_learning_rate_the_fallback_is_equivalent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Older optax spells the lr scaling with scale_by_schedule / scale."""
    params, grads = make_problem(seed=7, steps=5)
    step_hint = 8

    def both_runs() -> tuple[Tree, Tree]:
        scheduled = run_optax(
            make_nadamw(NadamWConfig.from_hyperparameters(TEST_HPARAMS), step_hint),
            params,
            grads,
            jit=False,
        )
        constant = run_optax(nadamw(0.01, weight_decay=0.1), params, grads, jit=False)
        return scheduled, constant

    with_helper, constant_with_helper = both_runs()
    monkeypatch.delattr(optax, "scale_by_learning_rate", raising=False)
    without_helper, constant = both_runs()
    monkeypatch.undo()
    for k in params:
        np.testing.assert_array_equal(with_helper[k], without_helper[k])
        np.testing.assert_array_equal(constant[k], constant_with_helper[k])


def test_module_does_not_import_torch() -> None:
    with open(nadamw_jax.__file__, encoding="utf-8") as module_file:
        source = module_file.read()
    assert "import torch" not in source


# ---------------------------------------------------------------- torch twin


@pytest.mark.parametrize("step_hint", [120, 80])
def test_matches_torch_twin(step_hint: int) -> None:
    torch = pytest.importorskip("torch")
    nadamw_torch = pytest.importorskip("polyak.optim.nadamw_torch")

    params, grads, reference, from_jax = float32_run(step_hint)
    tensors = [torch.nn.Parameter(torch.tensor(params[k])) for k in sorted(params)]
    optimizer, scheduler = nadamw_torch.make_nadamw(
        tensors, NadamWConfig.from_hyperparameters(TEST_HPARAMS), step_hint
    )
    for grad in grads:
        for tensor, k in zip(tensors, sorted(params), strict=True):
            tensor.grad = torch.tensor(grad[k], dtype=torch.float32)
        optimizer.step()
        scheduler.step()
    from_torch = {k: t.detach().numpy() for k, t in zip(sorted(params), tensors, strict=True)}

    error = displacement_error(from_torch, from_jax, params)
    assert error <= 1e-5, (
        f"torch vs jax {error:.2e}; against the float64 reference: "
        f"torch {displacement_error(from_torch, reference, params):.2e}, "
        f"jax {displacement_error(from_jax, reference, params):.2e}"
    )
    for k in params:
        np.testing.assert_allclose(from_torch[k], from_jax[k], rtol=1e-5, atol=1e-6)
