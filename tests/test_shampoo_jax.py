"""Shampoo for JAX: math against a dense float64 reference, parity with the torch twin,
sharded jit, robustness, grafted-only memory, optax composition and checkpoints."""

from __future__ import annotations

import dataclasses
import math
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from polyak.optim import shampoo_jax
from polyak.optim.schedules import constant_multiplier, warmup_cosine_multiplier
from polyak.optim.shampoo_config import ShampooConfig, ShampooConfigError
from polyak.optim.shampoo_jax import (
    make_shampoo,
    scale_by_shampoo,
    shampoo,
    shampoo_schedule,
)

# ---------------------------------------------------------------------- helpers


def _shampoo_state(state):
    """The ScaleByShampooState inside shampoo()'s skip wrapper and chain."""
    return state.inner_state[0]


def _random_tree(rng: np.random.Generator, shapes: dict[str, tuple[int, ...]], scale=1.0):
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def _fresh_jit(tx: optax.GradientTransformation):
    # A new function object, so that jit traces again (e.g. after a monkeypatch).
    return jax.jit(lambda g, s, p: tx.update(g, s, p))


def _dense_inverse_root(
    matrix: np.ndarray, root: int, epsilon: float, max_condition: float = 100.0
) -> np.ndarray:
    """Spectrum shifted to >= 0, then floored at max(ε, λmax·c^(−root)): condition <= c."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    eigenvalues = eigenvalues - min(eigenvalues.min(), 0.0)
    floor = max(epsilon, eigenvalues.max() * max_condition ** (-root)) if max_condition else epsilon
    scales = (eigenvalues + floor) ** (-1.0 / root)
    return (eigenvectors * scales) @ eigenvectors.T


def _unfold(tensor: np.ndarray, mode: int) -> np.ndarray:
    return np.moveaxis(tensor, mode, 0).reshape(tensor.shape[mode], -1)


class DenseReference:
    """One-block Shampoo in float64 numpy with the full Kronecker preconditioner.

    Written from the formulas of the module docstring, not from the code: the
    preconditioner is the explicit ``kron(Q₁, …, Qₖ)`` acting on the flattened
    filtered gradient.
    """

    def __init__(self, shape: tuple[int, ...], config: ShampooConfig, lr: float):
        self.config, self.lr, self.t = config, lr, 0
        self.m = np.zeros(shape)
        self.v = np.zeros(shape)
        self.factors = [np.zeros((d, d)) for d in shape]
        self.roots: list[np.ndarray] | None = None

    def update(self, g: np.ndarray, theta: np.ndarray) -> np.ndarray:
        c = self.config
        self.t += 1
        t = self.t
        g = g.astype(np.float64)
        self.m = c.beta1 * self.m + (1 - c.beta1) * g
        filtered = (c.beta1 * self.m + (1 - c.beta1) * g) / (1 - c.beta1**t)
        self.v = c.grafting_beta2 * self.v + (1 - c.grafting_beta2) * g**2
        adam = filtered / (np.sqrt(self.v / (1 - c.grafting_beta2**t)) + c.grafting_epsilon)
        for mode in range(g.ndim):
            unfolded = _unfold(g, mode)
            self.factors[mode] = c.beta2 * self.factors[mode] + (1 - c.beta2) * (
                unfolded @ unfolded.T
            )
        start = max(c.start_preconditioning_step, 1)
        if t == start or (t > start and t % c.precondition_frequency == 0):
            self.roots = [
                _dense_inverse_root(
                    f / (1 - c.beta2**t), 2 * g.ndim, c.epsilon, c.max_root_condition
                )
                for f in self.factors
            ]
        if t >= start:
            kron = self.roots[0]
            for root in self.roots[1:]:
                kron = np.kron(kron, root)
            preconditioned = (kron @ filtered.reshape(-1)).reshape(g.shape)
            direction = preconditioned * np.linalg.norm(adam) / np.linalg.norm(preconditioned)
        else:
            direction = adam
        return -self.lr * (direction + c.weight_decay * theta)


# ---------------------------------------------------------------------- math


def test_one_block_per_parameter_matches_dense_float64_reference():
    shapes = {"matrix": (6, 4), "tensor": (4, 6, 4), "vector": (4,)}  # one block each
    config = ShampooConfig(
        max_preconditioner_dim=6,
        precondition_frequency=3,
        start_preconditioning_step=4,
        beta1=0.9,
        beta2=0.95,
        epsilon=1e-6,
        weight_decay=0.01,
        grafting_beta2=0.99,
    )
    tx = shampoo(0.5, config)
    rng = np.random.default_rng(1)
    params = {k: jnp.asarray(v) for k, v in _random_tree(rng, shapes).items()}
    state = tx.init(params)
    references = {k: DenseReference(shape, config, lr=0.5) for k, shape in shapes.items()}
    update = jax.jit(tx.update)
    for _ in range(13):
        grads = _random_tree(rng, shapes)
        updates, state = update(grads, state, params)
        for k, reference in references.items():
            expected = reference.update(grads[k], np.asarray(params[k], np.float64))
            np.testing.assert_allclose(np.asarray(updates[k]), expected, rtol=0, atol=1e-5)
        params = optax.apply_updates(params, updates)
    assert int(_shampoo_state(state).root_failures) == 0


def test_inverse_root_of_known_matrix():
    rotation, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((5, 5)))
    eigenvalues = np.array([4.0, 1.0, 0.25, 1e-3, -1e-9])  # a tiny negative is clamped
    matrix = (rotation * eigenvalues) @ rotation.T
    root, finite = shampoo_jax.matrix_inverse_root(jnp.asarray(matrix, jnp.float32), -0.25, 1e-6)
    expected = (rotation * (np.maximum(eigenvalues, 0) + 1e-6) ** -0.25) @ rotation.T
    assert bool(finite)
    np.testing.assert_allclose(np.asarray(root), expected, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------- torch parity

# Factor sizes are few (16, 8 and 3), so that the update compiles quickly.
PARITY_SHAPES = {
    "matrix": (16, 8),
    "blocked": (40, 8),  # three blocks at max_preconditioner_dim=16
    "vector": (3,),
    "tensor": (3, 8, 16),  # one block of order 3
    "merged": (2, 4, 8),  # merged to (8, 8)
    "scalar": (),  # grafted only
}


def _torch_shampoo():
    pytest.importorskip("torch")
    return pytest.importorskip("polyak.optim.shampoo_torch")


def test_parity_with_torch_twin_over_30_steps():
    torch = pytest.importorskip("torch")
    shampoo_torch = _torch_shampoo()
    config = ShampooConfig(
        max_preconditioner_dim=16,
        precondition_frequency=5,
        start_preconditioning_step=5,
        beta1=0.9,
        beta2=0.99,
        epsilon=1e-8,
        weight_decay=0.01,
        momentum=0.5,
        grafting_beta2=0.99,
    )
    lr = 0.1
    rng = np.random.default_rng(0)
    initial = _random_tree(rng, PARITY_SHAPES)
    torch_params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in initial.items()}
    optimizer = shampoo_torch.Shampoo(list(torch_params.values()), lr=lr, config=config)
    tx = shampoo(lr, config)
    params = {k: jnp.asarray(v) for k, v in initial.items()}
    state = tx.init(params)
    update = jax.jit(tx.update)
    assert not optimizer.state  # the torch twin allocates lazily
    for _ in range(30):
        grads = _random_tree(rng, PARITY_SHAPES)
        before = {k: p.detach().numpy().copy() for k, p in torch_params.items()}
        for k, p in torch_params.items():
            p.grad = torch.tensor(grads[k])
        optimizer.step()
        updates, state = update({k: jnp.asarray(v) for k, v in grads.items()}, state, params)
        for k, p in torch_params.items():
            torch_update = p.detach().numpy() - before[k]
            np.testing.assert_allclose(np.asarray(updates[k]), torch_update, rtol=0, atol=1e-4)
        params = optax.apply_updates(params, updates)
    for k, p in torch_params.items():
        np.testing.assert_allclose(np.asarray(params[k]), p.detach().numpy(), rtol=0, atol=1e-4)
    diagnostics = optimizer.diagnostics()
    jax_state = _shampoo_state(state)
    assert diagnostics["preconditioned_blocks"] == 7
    factor_elements = sum(2 * f.size for f in jax_state.factors.values())  # factors and roots
    assert factor_elements == diagnostics["factor_elements"]


def test_make_shampoo_follows_torch_factory_with_its_schedule():
    torch = pytest.importorskip("torch")
    shampoo_torch = _torch_shampoo()
    hyperparameters = {
        "learning_rate": 0.05,
        "precondition_frequency": 4,
        "warmup_factor": 0.2,
        "step_hint_factor": 0.8,
        "use_momentum": True,
        "one_minus_momentum": 0.3,
    }
    step_hint = 15  # horizon 12, warmup 2: the run reaches the end of the decay
    shapes = {"w": (40, 30), "b": (3,)}  # 40·30 > 1024: not merged
    rng = np.random.default_rng(3)
    initial = _random_tree(rng, shapes)
    torch_params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in initial.items()}
    config = ShampooConfig.from_hyperparameters(hyperparameters)
    optimizer, scheduler = shampoo_torch.make_shampoo(
        list(torch_params.values()), config, step_hint
    )
    tx = make_shampoo(config, step_hint)
    params = {k: jnp.asarray(v) for k, v in initial.items()}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(14):
        grads = _random_tree(rng, shapes)
        for k, p in torch_params.items():
            p.grad = torch.tensor(grads[k])
        optimizer.step()
        scheduler.step()
        updates, state = update({k: jnp.asarray(v) for k, v in grads.items()}, state, params)
        params = optax.apply_updates(params, updates)
        for k, p in torch_params.items():
            np.testing.assert_allclose(np.asarray(params[k]), p.detach().numpy(), atol=2e-5)


@pytest.mark.parametrize("use_cosine_decay", [True, False])
def test_schedule_is_warmup_then_cosine_or_constant(use_cosine_decay):
    hyperparameters = {
        "learning_rate": 0.3,
        "warmup_factor": 0.1,
        "step_hint_factor": 0.5,
        "use_cosine_decay": use_cosine_decay,
    }
    schedule = shampoo_schedule(
        ShampooConfig.from_hyperparameters(hyperparameters), step_hint=400
    )  # horizon 200, warmup 20
    multiplier = warmup_cosine_multiplier if use_cosine_decay else constant_multiplier
    for count in (0, 1, 10, 19, 20, 21, 100, 199, 200, 250):
        expected = 0.3 * multiplier(count, 20, 200)
        assert float(schedule(count)) == pytest.approx(expected, abs=1e-6)
    assert float(schedule(10)) == pytest.approx(0.15, abs=1e-6)


# ---------------------------------------------------------------------- sharded jit


def _mlp_loss(params, batch):
    hidden = jnp.tanh(batch["x"] @ params["w1"])
    prediction = hidden @ params["w2"]
    return jnp.mean((prediction - batch["y"]) ** 2)


def test_runs_under_jit_with_sharded_batch_and_replicated_state():
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 (simulated) devices: XLA_FLAGS set by tests/conftest.py")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(devices[:8]), ("batch",))
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("batch"))
    config = ShampooConfig(  # 16: no merging of 16×16 into a 256-vector
        max_preconditioner_dim=16, precondition_frequency=3, start_preconditioning_step=3
    )
    tx = shampoo(0.05, config)
    rng = np.random.default_rng(0)
    # No bias: a vector's factor has rank ≤ t, and its near-null directions would
    # amplify the float rounding in which sharded and single-device gradients differ.
    initial = _random_tree(rng, {"w1": (16, 16), "w2": (16, 16)}, scale=0.3)

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(_mlp_loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    sharded_step = jax.jit(
        train_step,
        in_shardings=(replicated, replicated, sharded),
        out_shardings=(replicated, replicated, replicated),
    )
    single_step = jax.jit(train_step)
    params = jax.device_put({k: jnp.asarray(v) for k, v in initial.items()}, replicated)
    opt_state = jax.device_put(tx.init(params), replicated)
    single_params = {k: jnp.asarray(v) for k, v in initial.items()}
    single_state = tx.init(single_params)
    losses = []
    for _ in range(10):
        x = rng.standard_normal((64, 16)).astype(np.float32)
        batch = {"x": x, "y": np.sin(x)}
        params, opt_state, loss = sharded_step(params, opt_state, jax.device_put(batch, sharded))
        single_params, single_state, _ = single_step(single_params, single_state, batch)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    for leaf in jax.tree.leaves((params, opt_state)):
        assert leaf.sharding.is_fully_replicated
    for k in params:
        np.testing.assert_allclose(np.asarray(params[k]), np.asarray(single_params[k]), atol=1e-5)
    assert int(_shampoo_state(opt_state).count) == 10


# ---------------------------------------------------------------------- robustness

# "w" is cut into two 6×6 blocks, stacked, with a stack per axis; v's factor has its
# own stack, and all five (four of root 4, v's of root 2) share one batched eigh.
# Roots are due at steps 6, 9, 12, …, when every factor has full rank.
ROBUST_SHAPES = {"w": (12, 6), "v": (6,)}
STACKS = {"6x6/0": (2, 6, 6), "6x6/1": (2, 6, 6), "6/0": (1, 6, 6)}
ROBUST_CONFIG = ShampooConfig(
    max_preconditioner_dim=6, precondition_frequency=3, start_preconditioning_step=6, epsilon=1e-8
)


@pytest.fixture(scope="module")
def robust():
    """One Shampoo, compiled once for the tests below that share its shapes and config."""
    tx = shampoo(0.1, ROBUST_CONFIG)
    return tx, jax.jit(tx.update)


def _finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(tree))


def _robust_params(rng: np.random.Generator):
    return {k: jnp.asarray(v) for k, v in _random_tree(rng, ROBUST_SHAPES).items()}


def test_state_layout_stacks_blocks_by_shape(robust):
    tx, _ = robust
    inner = _shampoo_state(tx.init(_robust_params(np.random.default_rng(0))))
    assert {k: v.shape for k, v in inner.factors.items()} == STACKS
    assert {k: v.shape for k, v in inner.roots.items()} == STACKS
    assert {k: v.shape for k, v in inner.root_ok.items()} == {k: v[:1] for k, v in STACKS.items()}


def test_zero_gradients_give_zero_updates(robust):
    tx, update = robust
    params = {k: jnp.ones(s) for k, s in ROBUST_SHAPES.items()}
    state = tx.init(params)
    zeros = jax.tree.map(np.zeros_like, params)
    for _ in range(8):
        updates, state = update(zeros, state, params)
        assert all(bool(jnp.all(u == 0.0)) for u in jax.tree.leaves(updates))
    assert int(_shampoo_state(state).root_failures) == 0
    assert _finite(state)


def test_rank_one_gradients_keep_their_direction_per_block(robust):
    tx, update = robust  # singular factors: only ε keeps their roots finite
    rng = np.random.default_rng(0)
    left, right = rng.standard_normal(12), rng.standard_normal(6)
    gradient = np.outer(left, right).astype(np.float32)
    vector = rng.standard_normal(6).astype(np.float32)
    params = {k: jnp.zeros(s) for k, s in ROBUST_SHAPES.items()}
    state = tx.init(params)
    for step in range(1, 12):
        updates, state = update({"w": gradient * step, "v": vector * step}, state, params)
        assert _finite(updates)
        if step >= 6:  # preconditioned: each block's direction stays along its rank-1 gradient
            direction = np.asarray(updates["w"])
            for rows in (slice(0, 6), slice(6, 12)):
                d, g = direction[rows].ravel(), gradient[rows].ravel()
                cosine = d @ g / np.linalg.norm(d) / np.linalg.norm(g)
                # Not 1e-6: ε^(−1/4) = 100 on each side's null space amplifies float32
                # rounding of the gradient's null-space components by up to 1e4.
                assert cosine == pytest.approx(-1.0, abs=1e-2)
        params = optax.apply_updates(params, updates)
    inner = _shampoo_state(state)
    assert all(bool(jnp.all(ok)) for ok in inner.root_ok.values())
    assert int(inner.root_failures) == 0


def test_unusable_gradients_skip_the_step_and_large_ones_stay_finite(robust):
    tx, update = robust
    rng = np.random.default_rng(0)
    params = _robust_params(rng)
    state = tx.init(params)
    bound = math.sqrt(float(np.finfo(np.float32).max)) / 2  # 9.2e18, the torch twin's
    # One unusable leaf is enough: a norm just over the bound, then inf and NaN.
    for value in (1.01 * bound / math.sqrt(72), np.inf, np.nan):
        grads = {"w": np.full(ROBUST_SHAPES["w"], value, np.float32), "v": np.ones(6, np.float32)}
        updates, new_state = update(grads, state, params)
        assert all(bool(jnp.all(u == 0.0)) for u in jax.tree.leaves(updates))
        for old, new in zip(
            jax.tree.leaves(state.inner_state), jax.tree.leaves(new_state.inner_state), strict=True
        ):
            np.testing.assert_array_equal(np.asarray(old), np.asarray(new))
        state = new_state
    assert int(state.skipped_steps) == 3
    assert shampoo_jax.training_metrics(state)["shampoo/skipped_steps"] == 3
    assert shampoo_jax.training_metrics((state, None))["shampoo/root_failures"] == 0
    # Just under the bound: used, and the EMA statistics stay finite.
    signs = {k: np.sign(v) for k, v in _random_tree(rng, ROBUST_SHAPES).items()}
    value = np.float32(0.99 * bound / math.sqrt(72 + 6))
    updates, state = update({k: value * v for k, v in signs.items()}, state, params)
    assert int(state.skipped_steps) == 3
    assert _finite(_shampoo_state(state).factors)
    assert float(np.max(_shampoo_state(state).factors["6x6/0"])) > 1e33
    params = optax.apply_updates(params, updates)
    assert _finite(params)
    for _ in range(9):  # root steps 6 and 9 on those statistics
        updates, state = update(_random_tree(rng, ROBUST_SHAPES, scale=1e15), state, params)
        params = optax.apply_updates(params, updates)
        assert _finite(params)
    inner = _shampoo_state(state)
    assert int(inner.count) == 10
    assert int(inner.root_failures) == int(inner.skipped_statistics) == 0
    assert int(inner.direction_fallbacks) == 0


def test_summed_statistics_stop_before_overflow_and_directions_fall_back(monkeypatch):
    config = ShampooConfig(  # 4: no merging of 4×3 into a 12-vector
        max_preconditioner_dim=4, precondition_frequency=1, start_preconditioning_step=1, beta2=1.0
    )
    tx = shampoo(0.1, config)
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}
    state = tx.init(params)
    update = _fresh_jit(tx)
    # ‖g‖² = 6.4e37 per step: the second would take trace(L) past float32 max / 4.
    grads = {"w": np.full((4, 3), np.sqrt(6.4e37 / 12), np.float32)}
    updates, state = update(grads, state, params)
    first = jax.tree.map(np.asarray, _shampoo_state(state).factors)
    updates, state = update(grads, state, params)
    inner = _shampoo_state(state)
    assert int(inner.skipped_statistics) == 1
    for key, factor in inner.factors.items():
        np.testing.assert_array_equal(np.asarray(factor), first[key])
    assert _finite(updates) and _finite(inner.roots)

    # A Shampoo direction that overflows: the whole step uses the grafted directions.
    grafted_only = shampoo(0.1, dataclasses.replace(config, start_preconditioning_step=10_000))
    graft_state = grafted_only.init(params)
    for _ in range(2):
        _, graft_state = grafted_only.update(grads, graft_state, params)
    monkeypatch.setattr(shampoo_jax, "_precondition", lambda block, roots: block * jnp.inf)
    updates, state = _fresh_jit(tx)(grads, state, params)
    expected, _ = jax.jit(grafted_only.update)(grads, graft_state, params)
    assert int(_shampoo_state(state).direction_fallbacks) == 1
    np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)


def test_failed_eigh_keeps_previous_root_and_grafts_until_a_root_exists(monkeypatch):
    tx = shampoo(0.1, ROBUST_CONFIG)
    grafted_only = shampoo(
        0.1, dataclasses.replace(ROBUST_CONFIG, start_preconditioning_step=10_000)
    )
    graft_update = jax.jit(grafted_only.update)
    rng = np.random.default_rng(0)
    params = _robust_params(rng)
    state, graft_state = tx.init(params), grafted_only.init(params)
    factors = 5  # each root step
    real_eigh = shampoo_jax._eigh

    def failing_eigh(matrix):
        eigenvalues, eigenvectors = real_eigh(matrix)
        return eigenvalues * jnp.nan, eigenvectors * jnp.nan

    def run(update, steps):
        nonlocal state, graft_state, params
        graft_differences = []
        for _ in range(steps):
            grads = _random_tree(rng, ROBUST_SHAPES)
            updates, state = update(grads, state, params)
            graft_updates, graft_state = graft_update(grads, graft_state, params)
            assert _finite(updates)
            graft_differences.append(
                max(float(np.max(np.abs(updates[k] - graft_updates[k]))) for k in updates)
            )
            params = optax.apply_updates(params, updates)
        return graft_differences

    monkeypatch.setattr(shampoo_jax, "_eigh", failing_eigh)
    failing_update = _fresh_jit(tx)  # traced now, with the failing eigh
    # The root step 6 fails: there is no root yet, so the grafted direction is used.
    assert max(run(failing_update, 7)) < 1e-7
    inner = _shampoo_state(state)
    assert int(inner.root_failures) == factors
    assert not any(bool(jnp.any(ok)) for ok in inner.root_ok.values())

    monkeypatch.setattr(shampoo_jax, "_eigh", real_eigh)
    assert min(run(_fresh_jit(tx), 2)[1:]) > 1e-4  # root step 9 succeeds: preconditioned
    good_roots = jax.tree.map(np.asarray, _shampoo_state(state).roots)
    assert _finite(good_roots)

    # The root step 12 fails: step 9's roots stay in use, still preconditioned.
    assert min(run(failing_update, 3)) > 1e-4
    inner = _shampoo_state(state)
    assert int(inner.root_failures) == 2 * factors
    for key, root in inner.roots.items():
        np.testing.assert_array_equal(np.asarray(root), good_roots[key])
    assert all(bool(jnp.all(ok)) for ok in inner.root_ok.values())


def test_float32_root_failure_is_retried_in_float64_when_x64_is_on(monkeypatch):
    real_eigh = shampoo_jax._eigh

    def fails_in_float32(matrix):
        eigenvalues, eigenvectors = real_eigh(matrix)
        if matrix.dtype == jnp.float32:
            return eigenvalues * jnp.nan, eigenvectors * jnp.nan
        return eigenvalues, eigenvectors

    monkeypatch.setattr(shampoo_jax, "_eigh", fails_in_float32)
    enable_x64 = getattr(jax, "enable_x64", None)  # jax.experimental's before jax 0.8
    x64 = enable_x64(True) if enable_x64 is not None else jax.experimental.enable_x64()
    config = ShampooConfig(  # 5: no merging of 5×3 into a 15-vector
        max_preconditioner_dim=5, precondition_frequency=2, start_preconditioning_step=2
    )
    rng = np.random.default_rng(0)
    with x64:
        tx = shampoo(0.1, config)
        params = {"w": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)}
        state = tx.init(params)
        update = _fresh_jit(tx)
        for _ in range(2):
            _, state = update(_random_tree(rng, {"w": (5, 3)}), state, params)
    inner = _shampoo_state(state)
    assert int(inner.root_failures) == 0
    assert all(bool(jnp.all(ok)) for ok in inner.root_ok.values())
    assert inner.roots["5x3/0"].dtype == jnp.float32
    correction = 1 - config.beta2**2
    for key in ("5x3/0", "5x3/1"):
        factor = np.asarray(inner.factors[key][0], np.float64) / correction
        expected = _dense_inverse_root(factor, 4, config.epsilon)
        np.testing.assert_allclose(np.asarray(inner.roots[key][0]), expected, rtol=1e-4)


# ---------------------------------------------------------------------- memory


def test_huge_dimension_is_grafted_only_without_factors():
    tx = shampoo(0.1, ShampooConfig(precondition_frequency=2, start_preconditioning_step=2))
    params = {"embedding": jnp.zeros((1_000_000, 2)), "w": jnp.zeros((40, 40))}
    state = tx.init(params)
    inner = _shampoo_state(state)
    stacks = {"40x40/0": (1, 40, 40), "40x40/1": (1, 40, 40)}
    assert {k: v.shape for k, v in inner.factors.items()} == stacks
    assert {k: v.shape for k, v in inner.roots.items()} == stacks
    largest = max(leaf.size for leaf in jax.tree.leaves(state))
    assert largest == 2_000_000  # the elementwise moments only
    grads = {"embedding": jnp.ones((1_000_000, 2)), "w": jnp.ones((40, 40))}
    update = jax.jit(tx.update)
    for _ in range(3):
        updates, state = update(grads, state, params)
    assert _finite(updates)
    # Adam grafting alone on a constant gradient g = 1 after t = 3 steps: v̂ = 1, and the
    # NAdam look-ahead m̃ = (β1·(1−β1³) + 1−β1) / (1−β1³).
    beta1 = 0.9
    look_ahead = (beta1 * (1 - beta1**3) + 1 - beta1) / (1 - beta1**3)
    np.testing.assert_allclose(np.asarray(updates["embedding"][:3]), -0.1 * look_ahead, rtol=1e-5)


# ---------------------------------------------------------------------- composition


def test_composes_with_clip_by_global_norm(robust):
    tx, plain_update = robust
    clipped_tx = optax.chain(optax.clip_by_global_norm(0.5), tx)
    clipped_update = jax.jit(clipped_tx.update)
    rng = np.random.default_rng(0)
    params = _robust_params(rng)
    clipped_state, plain_state = clipped_tx.init(params), tx.init(params)
    for _ in range(8):
        grads = _random_tree(rng, ROBUST_SHAPES, scale=3.0)
        # The clip factor changes from step to step, which Adam grafting does not cancel
        # (a constant factor it nearly would). Clipped the way clip_by_global_norm does it,
        # in float32, so both updates see the same gradient bits: float32 eigh would
        # amplify a one-ulp difference past rtol.
        norm = optax.global_norm(grads)
        assert float(norm) > 0.5  # the clip is active
        by_hand = {k: g / norm * 0.5 for k, g in grads.items()}
        updates, clipped_state = clipped_update(grads, clipped_state, params)
        expected, plain_state = plain_update(by_hand, plain_state, params)
        for k in updates:
            np.testing.assert_allclose(updates[k], expected[k], rtol=1e-5, atol=1e-6)
        params = optax.apply_updates(params, updates)


def test_scale_by_shampoo_alone_and_bad_inputs():
    tx = scale_by_shampoo(ShampooConfig(grafting="sgd", beta1=0.0))
    params = {"w": jnp.ones((3, 2))}
    state = tx.init(params)
    assert state.exp_avg is None and state.exp_avg_sq is None
    updates, _ = jax.jit(tx.update)({"w": jnp.full((3, 2), 2.0)}, state)
    np.testing.assert_allclose(updates["w"], 2.0)  # SGD before preconditioning starts
    with pytest.raises(ShampooConfigError, match="config="):
        scale_by_shampoo({"beta1": 0.9})
    with pytest.raises(ShampooConfigError, match="learning_rate=-1"):
        shampoo(-1.0)
    with pytest.raises(ShampooConfigError, match="grafting_type='LION'"):
        ShampooConfig.from_hyperparameters({"grafting_type": "LION"})
    with pytest.raises(ShampooConfigError, match="precondition_frequency=0"):
        ShampooConfig.from_hyperparameters({"precondition_frequency": 0})


# ---------------------------------------------------------------------- checkpoints


def _through_flax(state, target):
    serialization = pytest.importorskip("flax.serialization")
    return serialization.from_bytes(target, serialization.to_bytes(state))


def _through_pickle(state, target):
    del target
    leaves, treedef = jax.tree.flatten(state)
    blob = pickle.dumps([np.asarray(leaf) for leaf in leaves])
    return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in pickle.loads(blob)])


@pytest.mark.parametrize("codec", [_through_flax, _through_pickle], ids=["flax", "pickle"])
def test_checkpoint_round_trip_continues_identically(robust, codec):
    tx, update = robust
    rng = np.random.default_rng(0)
    params = _robust_params(rng)
    state = tx.init(params)
    gradients = [_random_tree(rng, ROBUST_SHAPES) for _ in range(13)]
    for grads in gradients[:5]:
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)

    restored = codec(state, tx.init(params))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    restored_params = jax.tree.map(np.array, params)
    for grads in gradients[5:]:  # crosses the root steps 6, 9 and 12
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        updates, restored = update(grads, restored, restored_params)
        restored_params = optax.apply_updates(restored_params, updates)
    for k in params:
        np.testing.assert_array_equal(np.asarray(params[k]), np.asarray(restored_params[k]))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
