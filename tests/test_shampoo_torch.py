"""Shampoo for torch: math against a dense numpy reference, robustness, state, factory."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from polyak.optim.schedules import warmup_cosine_multiplier
from polyak.optim.shampoo_config import ShampooConfig, ShampooConfigError
from polyak.optim.shampoo_torch import Shampoo, make_shampoo

DEFAULT_HYPERPARAMETERS = ShampooConfig.DEFAULT_HYPERPARAMETERS
shampoo_config_from_hyperparameters = ShampooConfig.from_hyperparameters

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    # These problems are tiny: a second thread only adds contention on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- dense reference


def _inverse_root(
    matrix: np.ndarray, root: int, epsilon: float, max_condition: float = 100.0
) -> np.ndarray:
    """Spectrum shifted to >= 0, then floored at max(ε, λmax·c^(−root)): condition <= c."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    eigenvalues = eigenvalues - min(eigenvalues.min(), 0.0)
    floor = max(epsilon, eigenvalues.max() * max_condition ** (-root)) if max_condition else epsilon
    return eigenvectors @ np.diag((eigenvalues + floor) ** (-1.0 / root)) @ eigenvectors.T


def _unfold(tensor: np.ndarray, mode: int) -> np.ndarray:
    return np.moveaxis(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def _mode_product(tensor: np.ndarray, matrix: np.ndarray, mode: int) -> np.ndarray:
    return np.moveaxis(np.tensordot(matrix, tensor, axes=([1], [mode])), 0, mode)


class DenseBlock:
    """Full-matrix Shampoo statistics for one block, written from the definitions."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.factors = [np.zeros((d, d)) for d in shape]
        self.roots: list[np.ndarray] | None = None


def reference_run(
    params: list[np.ndarray],
    gradients: list[list[np.ndarray]],
    blocks_of: list[list[tuple[tuple[int, ...], tuple[slice, ...]]]],
    config: ShampooConfig,
    lr: float,
) -> list[np.ndarray]:
    """``blocks_of[k]`` lists (merged shape, slices) per block of parameter k, by hand."""
    theta = [p.astype(np.float64).copy() for p in params]
    m = [np.zeros_like(p) for p in theta]
    v = [np.zeros_like(p) for p in theta]
    buf = [np.zeros_like(p) for p in theta]
    stats = [[DenseBlock(tuple(s.stop - s.start for s in sl)) for _, sl in b] for b in blocks_of]
    b1, b2, gb2, mu = config.beta1, config.beta2, config.grafting_beta2, config.momentum
    start = max(config.start_preconditioning_step, 1)
    for t, grads in enumerate(gradients, start=1):
        for k, g in enumerate(grads):
            g = g.astype(np.float64)
            m[k] = b1 * m[k] + (1 - b1) * g
            m_hat = (b1 * m[k] + (1 - b1) * g) / (1 - b1**t)
            v[k] = gb2 * v[k] + (1 - gb2) * g * g
            adam = m_hat / (np.sqrt(v[k] / (1 - gb2**t)) + config.grafting_epsilon)
            direction = adam.copy()
            for (merged, sl), block in zip(blocks_of[k], stats[k], strict=True):
                gb = g.reshape(merged)[sl]
                order = gb.ndim
                for i in range(order):
                    unfolded = _unfold(gb, i)
                    block.factors[i] = b2 * block.factors[i] + (1 - b2) * unfolded @ unfolded.T
                if t == start or (t > start and t % config.precondition_frequency == 0):
                    block.roots = [
                        _inverse_root(
                            f / (1 - b2**t), 2 * order, config.epsilon, config.max_root_condition
                        )
                        for f in block.factors
                    ]
                if t >= start:
                    p_dir = m_hat.reshape(merged)[sl]
                    for i, root in enumerate(block.roots):
                        p_dir = _mode_product(p_dir, root, i)
                    a_blk = adam.reshape(merged)[sl]
                    p_dir = p_dir * np.linalg.norm(a_blk) / np.linalg.norm(p_dir)
                    direction.reshape(merged)[sl] = p_dir
            direction = direction + config.weight_decay * theta[k]
            buf[k] = mu * buf[k] + (1 - mu) * direction
            direction = (1 - mu) * direction + mu * buf[k]
            theta[k] = theta[k] - lr * direction
    return theta


def test_matches_dense_reference_with_blocks_of_order_one_two_and_three():
    rng = np.random.default_rng(0)
    # With blocks of 16: (20, 12) → two 2-D blocks split along rows; (7,) → one
    # 7x7 factor; (2, 3, 4) → merged to (6, 4) (6·4 > 16); (5, 6, 7) stays 3-D.
    shapes = [(20, 12), (7,), (2, 3, 4), (5, 6, 7)]
    blocks_of = [
        [((20, 12), (slice(0, 16), slice(0, 12))), ((20, 12), (slice(16, 20), slice(0, 12)))],
        [((7,), (slice(0, 7),))],
        [((6, 4), (slice(0, 6), slice(0, 4)))],
        [((5, 6, 7), (slice(0, 5), slice(0, 6), slice(0, 7)))],
    ]
    config = ShampooConfig(
        max_preconditioner_dim=16,
        precondition_frequency=1,
        start_preconditioning_step=2,
        beta1=0.9,
        beta2=0.95,
        epsilon=1e-3,
        weight_decay=0.05,
        grafting="adam",
        grafting_beta2=0.99,
        grafting_epsilon=1e-8,
        momentum=0.5,
    )
    lr = 0.05
    params0 = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    steps = 6
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(steps)]

    torch_params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params0]
    optimizer = Shampoo(torch_params, lr=lr, config=config)
    for step_grads in grads:
        for p, g in zip(torch_params, step_grads, strict=True):
            p.grad = torch.from_numpy(g.copy())
        optimizer.step()

    expected = reference_run(params0, grads, blocks_of, config, lr)
    for p, want, p0 in zip(torch_params, expected, params0, strict=True):
        got = p.detach().numpy().astype(np.float64)
        assert np.abs(got - p0).max() > 1e-2  # it moved
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_preconditioned_direction_differs_from_adam():
    # Guards the reference test against a Shampoo that silently does Adam.
    torch.manual_seed(1)
    make = lambda start: Shampoo(
        [torch.nn.Parameter(torch.ones(8, 6))],
        lr=0.1,
        config=ShampooConfig(
            max_preconditioner_dim=8, precondition_frequency=1, start_preconditioning_step=start
        ),
    )
    shampoo, adam_only = make(1), make(10_000)
    for _ in range(3):
        g = torch.randn(8, 6)
        for opt in (shampoo, adam_only):
            opt.param_groups[0]["params"][0].grad = g.clone()
            opt.step()
    a = shampoo.param_groups[0]["params"][0]
    b = adam_only.param_groups[0]["params"][0]
    assert (a - b).abs().max() > 1e-3


# ---------------------------------------------------------------- blocking in the optimizer


def test_factor_shapes_follow_the_blocking():
    shapes = {"w": (40, 12), "conv": (8, 3, 3, 3), "bias": (1, 1, 24), "scalar": ()}
    params = {k: torch.nn.Parameter(torch.randn(s)) for k, s in shapes.items()}
    optimizer = Shampoo(params.values(), lr=0.1, config=ShampooConfig(max_preconditioner_dim=16))
    for p in params.values():
        p.grad = torch.randn_like(p)
    optimizer.step()

    def factor_shapes(p):
        blocks = optimizer.state[p].get("blocks", {})
        return [[tuple(f.shape) for f in blocks[b]["factors"]] for b in sorted(blocks)]

    assert factor_shapes(params["w"]) == [[(16, 16), (12, 12)]] * 2 + [[(8, 8), (12, 12)]]
    # (8, 3, 3, 3): 8·3 = 24 > 16 starts a new group, 3·3 = 9 fits, 9·3 = 27 does not.
    assert factor_shapes(params["conv"]) == [[(8, 8), (9, 9), (3, 3)]]
    assert factor_shapes(params["bias"]) == [[(16, 16)], [(8, 8)]]
    assert "blocks" not in optimizer.state[params["scalar"]]


def test_large_embedding_gets_no_factor_matrices():
    embedding = torch.nn.Parameter(torch.zeros(1_000_000, 4))
    dense = torch.nn.Parameter(torch.zeros(64, 32))  # 64·32 > 1024: not merged
    optimizer = Shampoo([embedding, dense], lr=0.1, config=ShampooConfig(momentum=0.9))
    embedding.grad = torch.full_like(embedding, 1e-3)
    dense.grad = torch.randn_like(dense)
    optimizer.step()
    state = optimizer.state[embedding]
    assert "blocks" not in state
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    assert len(tensors) == 3  # exp_avg, exp_avg_sq, momentum_buffer
    assert all(t.numel() <= embedding.numel() for t in tensors)
    assert sum(t.numel() for t in tensors) == 3 * embedding.numel()
    assert "blocks" in optimizer.state[dense]
    assert optimizer.diagnostics()["factor_elements"] == 2 * (64 * 64 + 32 * 32)
    assert embedding.abs().max() > 0


# ---------------------------------------------------------------- convergence


def _ill_conditioned_problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    d, k, n = 24, 6, 512
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    spectrum = torch.logspace(0, 2, d)  # condition number 1e4 for XᵀX
    features = torch.randn(n, d, generator=gen) @ torch.diag(spectrum) @ rotation
    target_w = torch.randn(d, k, generator=gen)
    targets = features @ target_w
    return features, targets


def _train(make_optimizer, steps: int, seed: int = 0) -> float:
    features, targets = _ill_conditioned_problem(seed)
    weight = torch.nn.Parameter(torch.zeros(features.shape[1], targets.shape[1]))
    optimizer = make_optimizer([weight])
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ((features @ weight - targets) ** 2).mean()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float(((features @ weight - targets) ** 2).mean())


def _nadamw(params, lr):
    try:
        from polyak.optim.nadamw_config import NadamWConfig
        from polyak.optim.nadamw_torch import make_nadamw
    except ImportError:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    hp = {
        "learning_rate": lr,
        "one_minus_beta1": 0.1,
        "beta2": 0.999,
        "weight_decay": 0.0,
        "warmup_factor": 0.0,
    }
    # A constant rate: no scheduler steps.
    optimizer, _ = make_nadamw(params, NadamWConfig(**hp), 10**9)
    return optimizer


def test_beats_nadamw_on_ill_conditioned_least_squares():
    steps = 150
    # Blocks of 32 keep the (24, 6) weight a 2-D block (24·6 > 32); with the
    # default 1024 it would merge into one 144-vector with a full-matrix factor.
    config = ShampooConfig(
        max_preconditioner_dim=32,
        precondition_frequency=10,
        start_preconditioning_step=10,
        beta2=0.99,
        epsilon=1e-8,
    )
    lrs = [0.1, 0.3, 1.0, 3.0]  # each optimizer gets its best rate
    shampoo = min(_train(lambda p, lr=lr: Shampoo(p, lr=lr, config=config), steps) for lr in lrs)
    nadamw = min(_train(lambda p, lr=lr: _nadamw(p, lr), steps) for lr in lrs)
    assert math.isfinite(shampoo)
    assert shampoo < 0.5 * nadamw, (shampoo, nadamw)


# ---------------------------------------------------------------- robustness


def _small_setup(config: ShampooConfig | None = None):
    torch.manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(12, 10)),
        torch.nn.Parameter(torch.randn(10)),
    ]
    config = config or ShampooConfig(
        max_preconditioner_dim=16, precondition_frequency=2, start_preconditioning_step=2
    )
    return params, Shampoo(params, lr=0.01, config=config)


def _set_grads(params, make):
    for p in params:
        p.grad = make(p)


def test_zero_gradients_leave_parameters_finite_and_unchanged():
    params, optimizer = _small_setup()
    before = [p.detach().clone() for p in params]
    for _ in range(5):
        _set_grads(params, torch.zeros_like)
        optimizer.step()
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)
    assert optimizer.diagnostics()["root_failures"] == 0


def test_rank_one_gradients_stay_finite_and_descend():
    params, optimizer = _small_setup()
    u, w = torch.randn(12), torch.randn(10)
    before = [p.detach().clone() for p in params]
    for _ in range(8):
        params[0].grad = torch.outer(u, w)
        params[1].grad = w.clone()
        optimizer.step()
    for p in params:
        assert torch.isfinite(p).all()
    # The update opposes the (constant) gradient.
    assert float(((params[0].detach() - before[0]) * torch.outer(u, w)).sum()) < 0


def test_skipped_steps_are_a_training_metric_and_warned_about(monkeypatch):
    params, optimizer = _small_setup()
    warnings: list[tuple] = []
    monkeypatch.setattr(
        "polyak.optim.shampoo_torch.absl_logging.log_every_n_seconds",
        lambda *args: warnings.append(args),
    )
    _set_grads(params, torch.randn_like)
    optimizer.step()
    assert optimizer.metrics()["shampoo/skipped_steps"] == 0 and not warnings
    _set_grads(params, lambda p: torch.full_like(p, math.nan))
    optimizer.step()
    assert optimizer.metrics()["shampoo/skipped_steps"] == len(params)
    assert len(warnings) == 1 and "were not updated" in warnings[0][1]
    assert set(optimizer.metrics()) == {
        "shampoo/skipped_steps",
        "shampoo/root_failures",
        "shampoo/direction_fallbacks",
        "shampoo/skipped_statistics",
    }


def test_nonfinite_and_huge_gradients_are_skipped():
    params, optimizer = _small_setup()
    for _ in range(3):
        _set_grads(params, torch.randn_like)
        optimizer.step()
    before = [p.detach().clone() for p in params]
    for bad in (1e30, math.inf, math.nan):
        _set_grads(params, lambda p, bad=bad: torch.full_like(p, bad))
        optimizer.step()
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)
        assert optimizer.state[p]["step"] == 3
        assert optimizer.state[p]["skipped_steps"] == 3
    for _ in range(4):
        _set_grads(params, torch.randn_like)
        optimizer.step()
    for p in params:
        assert torch.isfinite(p).all()
        assert optimizer.state[p]["step"] == 7


def test_summed_statistics_that_would_overflow_are_skipped():
    params, optimizer = _small_setup(
        ShampooConfig(
            max_preconditioner_dim=16,
            precondition_frequency=2,
            start_preconditioning_step=2,
            beta2=1.0,
        )
    )
    # ‖g‖ of the matrix is 7e18, below the 9.2e18 gradient bound, so the step
    # is taken; the summed trace reaches 4.9e37 and then 9.8e37 > max/4.
    value = 7e18 / math.sqrt(120)
    for _ in range(2):
        _set_grads(params, lambda p: torch.full_like(p, value))
        optimizer.step()
    counters = optimizer.diagnostics()
    assert counters["skipped_statistics"] == 1
    assert counters["skipped_steps"] == 0
    for _ in range(3):
        _set_grads(params, torch.randn_like)
        optimizer.step()
    for p in params:
        assert torch.isfinite(p).all()
        for block in optimizer.state[p]["blocks"].values():
            assert all(torch.isfinite(f).all() for f in block["factors"] + block["roots"])


def test_eigh_failure_keeps_previous_root_and_continues(monkeypatch):
    params, optimizer = _small_setup()
    for _ in range(4):  # roots at steps 2 and 4
        _set_grads(params, torch.randn_like)
        optimizer.step()
    roots_before = {
        id(p): [r.clone() for b in optimizer.state[p]["blocks"].values() for r in b["roots"]]
        for p in params
    }

    def broken_eigh(*args, **kwargs):
        raise torch.linalg.LinAlgError("forced failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken_eigh)
    before = [p.detach().clone() for p in params]
    for _ in range(2):  # step 6 recomputes roots
        _set_grads(params, torch.randn_like)
        optimizer.step()
    # 3 factors (12, 10 and 10) fail once each.
    assert optimizer.diagnostics()["root_failures"] == 3
    for p, b in zip(params, before, strict=True):
        assert torch.isfinite(p).all()
        assert not torch.equal(p, b)
        roots = [r for blk in optimizer.state[p]["blocks"].values() for r in blk["roots"]]
        for r, r0 in zip(roots, roots_before[id(p)], strict=True):
            assert torch.equal(r, r0)


def test_float32_eigh_failure_is_retried_in_float64(monkeypatch):
    params, optimizer = _small_setup()
    real_eigh = torch.linalg.eigh
    calls = []

    def flaky_eigh(matrix, *args, **kwargs):
        calls.append(matrix.dtype)
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("float32 failure")
        return real_eigh(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky_eigh)
    for _ in range(2):
        _set_grads(params, torch.randn_like)
        optimizer.step()
    assert torch.float64 in calls
    assert optimizer.diagnostics()["root_failures"] == 0
    assert all(all(b["root_ok"]) for p in params for b in optimizer.state[p]["blocks"].values())


def test_without_any_good_root_the_step_is_the_grafted_one(monkeypatch):
    def broken_eigh(*args, **kwargs):
        raise torch.linalg.LinAlgError("forced failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken_eigh)
    params, optimizer = _small_setup()
    grafted_params, grafted_only = _small_setup(
        ShampooConfig(max_preconditioner_dim=16, start_preconditioning_step=10**6)
    )
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for group in (params, grafted_params):
            for p, g in zip(group, grads, strict=True):
                p.grad = g.clone()
        optimizer.step()
        grafted_only.step()
    for a, b in zip(params, grafted_params, strict=True):
        assert torch.equal(a, b)


def test_overflowing_shampoo_direction_falls_back_to_grafting(monkeypatch):
    import polyak.optim.shampoo_torch as shampoo_torch

    monkeypatch.setattr(
        shampoo_torch, "_precondition", lambda block, roots: torch.full_like(block, math.inf)
    )
    params, optimizer = _small_setup()
    grafted_params, grafted_only = _small_setup(
        ShampooConfig(max_preconditioner_dim=16, start_preconditioning_step=10**6)
    )
    gen = torch.Generator().manual_seed(4)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for group in (params, grafted_params):
            for p, g in zip(group, grads, strict=True):
                p.grad = g.clone()
        optimizer.step()
        grafted_only.step()
    for a, b in zip(params, grafted_params, strict=True):
        assert torch.equal(a, b)
    # Steps 2, 3 and 4 preconditioned (start 2) and fell back, for both parameters.
    assert optimizer.diagnostics()["direction_fallbacks"] == 6


# ---------------------------------------------------------------- state


def _train_steps(params, optimizer, scheduler, gen, steps):
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
        scheduler.step()


def _fresh(seed=0):
    torch.manual_seed(seed)
    params = [
        torch.nn.Parameter(torch.randn(20, 12)),
        torch.nn.Parameter(torch.randn(7)),
        torch.nn.Parameter(torch.randn(3, 4, 5)),
    ]
    hp = dict(
        DEFAULT_HYPERPARAMETERS,
        max_preconditioner_dim=16,
        precondition_frequency=3,
        use_momentum=True,
        one_minus_momentum=0.1,
        warmup_factor=0.1,
    )
    optimizer, scheduler = make_shampoo(
        params, ShampooConfig.from_hyperparameters(hp), step_hint=40
    )
    return params, optimizer, scheduler


def test_state_dict_round_trip_continues_bit_for_bit():
    params, optimizer, scheduler = _fresh()
    gen = torch.Generator().manual_seed(7)
    _train_steps(params, optimizer, scheduler, gen, 7)
    snapshot = io.BytesIO()
    torch.save(
        {
            "params": [p.detach().clone() for p in params],
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "gen": gen.get_state(),
        },
        snapshot,
    )
    _train_steps(params, optimizer, scheduler, gen, 8)

    snapshot.seek(0)
    saved = torch.load(snapshot, weights_only=False)
    params2, optimizer2, scheduler2 = _fresh(seed=123)
    with torch.no_grad():
        for p, v in zip(params2, saved["params"], strict=True):
            p.copy_(v)
    loaded_dict = saved["optimizer"]
    reference = copy.deepcopy(loaded_dict)
    optimizer2.load_state_dict(loaded_dict)
    scheduler2.load_state_dict(saved["scheduler"])
    gen2 = torch.Generator()
    gen2.set_state(saved["gen"])
    _train_steps(params2, optimizer2, scheduler2, gen2, 8)

    for a, b in zip(params, params2, strict=True):
        assert torch.equal(a, b)
    assert optimizer.state[params[0]]["step"] == 15
    # Loading did not alias the caller's dict.
    assert torch.equal(
        loaded_dict["state"][0]["blocks"][0]["factors"][0],
        reference["state"][0]["blocks"][0]["factors"][0],
    )


@pytest.mark.parametrize(
    ("precision", "factor_dtype"), [("float32", torch.float32), ("float64", torch.float64)]
)
def test_load_keeps_the_factor_dtype_of_bfloat16_parameters(precision, factor_dtype):
    config = ShampooConfig(max_preconditioner_dim=16, preconditioner_precision=precision)
    p = torch.nn.Parameter(torch.randn(20, 12, dtype=torch.bfloat16))
    optimizer = Shampoo([p], config=config)
    p.grad = torch.randn_like(p)
    optimizer.step()
    other = Shampoo([p], config=config)
    other.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    block = other.state[p]["blocks"][0]
    assert block["factors"][0].dtype == factor_dtype
    assert block["roots"][0].dtype == torch.float32
    assert torch.equal(block["factors"][0], optimizer.state[p]["blocks"][0]["factors"][0])


def test_load_rejects_state_with_other_blocking():
    p = torch.nn.Parameter(torch.randn(20, 12))
    optimizer = Shampoo([p], config=ShampooConfig(max_preconditioner_dim=16))
    p.grad = torch.randn_like(p)
    optimizer.step()
    other = Shampoo([p], config=ShampooConfig(max_preconditioner_dim=8))
    with pytest.raises(ValueError, match="max_preconditioner_dim=8"):
        other.load_state_dict(optimizer.state_dict())


# ---------------------------------------------------------------- factory and search spaces


def _points(name: str) -> list[dict]:
    return json.loads((REPO / "tuning_search_spaces" / name).read_text())


def test_search_spaces_are_the_five_v05_points_plus_averaging():
    points = _points("shampoo.json")
    assert len(points) == 5
    for point in points:
        assert point["max_preconditioner_dim"] == 1024
        assert point["precondition_frequency"] == 100
        assert point["epsilon"] == 1e-8
        assert point["use_cosine_decay"] is True
    assert [p["grafting_type"] for p in points] == ["ADAM", "ADAM", "SGD", "ADAM", "ADAM"]
    assert points[0] == DEFAULT_HYPERPARAMETERS
    lawa, ema = _points("shampoo_lawa.json"), _points("shampoo_ema.json")
    for base, la, em in zip(points, lawa, ema, strict=True):
        assert la == dict(base, averaging="lawa", averaging_every=64, lawa_window=20)
        assert em == dict(base, averaging="ema", averaging_every=64, ema_beta=0.9)


def test_every_search_space_point_builds_a_config():
    configs = [shampoo_config_from_hyperparameters(p) for p in _points("shampoo.json")]
    first, _, sgd, root_two, _ = configs
    assert first.beta1 == pytest.approx(1 - 0.06733926164)
    assert first.beta2 == first.grafting_beta2 == pytest.approx(1 - 0.00448403102)
    assert first.start_preconditioning_step == 100  # -1 → precondition_frequency
    assert first.momentum == 0.0 and first.use_nesterov
    assert sgd.grafting == "sgd" and sgd.beta1 == 0.0
    assert sgd.use_nesterov  # the submission's momentum was always Nesterov
    assert sgd.momentum == pytest.approx(1 - 0.03150207249544311)
    assert root_two.inv_root_override == 2 and root_two.momentum == 0.5


def test_factory_defaults_and_schedule():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    optimizer, scheduler = make_shampoo(
        [p], ShampooConfig.from_hyperparameters(None), step_hint=1000
    )
    assert optimizer.config == shampoo_config_from_hyperparameters(DEFAULT_HYPERPARAMETERS)
    peak = DEFAULT_HYPERPARAMETERS["learning_rate"]
    warmup = int(0.02 * 1000)
    for count in range(0, 1100):
        if count in (0, 5, 20, 21, 500, 999, 1000, 1099):
            if count < warmup:
                expected = peak * count / warmup
            else:
                progress = min(count - warmup, 1000 - warmup) / (1000 - warmup)
                expected = peak * 0.5 * (1 + math.cos(math.pi * progress))
            assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12)
            assert expected == pytest.approx(
                peak * warmup_cosine_multiplier(count, warmup, 1000), abs=1e-12
            )
        p.grad = torch.zeros_like(p)
        optimizer.step()
        scheduler.step()


def test_step_hint_factor_shortens_the_horizon():
    p = torch.nn.Parameter(torch.zeros(3))
    hp = dict(DEFAULT_HYPERPARAMETERS, step_hint_factor=0.6, warmup_factor=0.0)
    optimizer, scheduler = make_shampoo([p], ShampooConfig.from_hyperparameters(hp), step_hint=100)
    for _ in range(60):
        p.grad = torch.zeros_like(p)
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"max_preconditioner_dim": 2.7}, "max_preconditioner_dim=2.7 must be an integer"),
        ({"max_preconditioner_dim": 0}, "max_preconditioner_dim=0"),
        ({"precondition_frequency": 0.5}, "precondition_frequency=0.5 must be an integer"),
        ({"beta2": 0.9}, "beta2=0.9 and one_minus_beta2=0.00448403102 disagree"),
        ({"one_minus_beta2": 1.0}, "one_minus_beta2=1.0 must lie in"),
        ({"one_minus_beta1": -0.1}, "one_minus_beta1=-0.1 must lie in"),
        ({"grafting_type": "LION"}, "grafting_type='LION'"),
        ({"exponent_multiplier": 0.0}, "exponent_multiplier=0.0 must be > 0"),
        ({"inv_root_override": [2, 4]}, r"inv_root_override=\[2, 4\] must be an integer"),
        ({"start_preconditioning_step": 50}, "start_preconditioning_step=50 must be -1 or"),
        ({"use_momentum": True, "one_minus_momentum": 0.0}, "one_minus_momentum=0.0"),
        ({"communication_dtype": "BF16"}, "communication_dtype='BF16'"),
        ({"use_nadam": "yes"}, "use_nadam='yes' must be true or false"),
    ],
)
def test_bad_hyperparameters_fail_clearly(override, message):
    with pytest.raises(ShampooConfigError, match=message):
        shampoo_config_from_hyperparameters(dict(DEFAULT_HYPERPARAMETERS, **override))


@pytest.mark.parametrize(
    ("override", "field", "value"),
    [
        ({"one_minus_beta2": 0.0}, "grafting_beta2", 1.0),  # summed, as the submission allows
        ({"grafting_type": "RMSPROP"}, "grafting", "rmsprop"),
        ({"grafting_type": "ADAGRAD"}, "grafting", "adagrad"),
        ({"grafting_type": "SGD"}, "grafting", "sgd"),
        ({"use_normalized_grafting": True}, "use_normalized_grafting", True),
        ({"exponent_multiplier": 0.5}, "exponent_multiplier", 0.5),
        ({"use_nadam": False}, "use_nadam", False),
        ({"use_momentum": True, "one_minus_momentum": 0.1}, "momentum", 0.9),
        ({"max_preconditioner_dim": 512.0}, "max_preconditioner_dim", 512),
        ({"one_minus_beta2": None, "beta2": 0.95}, "beta2", 0.95),
    ],
)
def test_search_space_fields_are_honoured(override, field, value):
    config = shampoo_config_from_hyperparameters(dict(DEFAULT_HYPERPARAMETERS, **override))
    assert getattr(config, field) == pytest.approx(value)


@pytest.mark.parametrize(
    "override",
    [
        {"grafting": "rmsprop"},
        {"grafting": "adagrad"},
        {"grafting": "sgd"},
        {"use_normalized_grafting": True},
        {"exponent_multiplier": 0.5},
        {"use_nadam": False},
        {"momentum": 0.5},
        {"momentum": 0.5, "use_nesterov": False},
    ],
)
def test_each_honoured_field_changes_the_trajectory(override):
    """A field that is read must act: the trajectory differs from the baseline's."""
    base = ShampooConfig(
        max_preconditioner_dim=8, precondition_frequency=2, start_preconditioning_step=2
    )
    finals = []
    for config in (base, dataclasses.replace(base, **override)):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(6, 5))
        optimizer = Shampoo([p], lr=0.1, config=config)
        for step in range(6):
            p.grad = torch.sin(p.detach() * (step + 1)) + 0.1 * step
            optimizer.step()
        finals.append(p.detach().clone())
    assert not torch.allclose(finals[0], finals[1], rtol=1e-5, atol=1e-7), override


def test_bad_inputs_fail_clearly():
    p = torch.nn.Parameter(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="lr=-1"):
        Shampoo([p], lr=-1.0)
    with pytest.raises(ValueError, match="ShampooConfig"):
        Shampoo([p], config={"beta1": 0.9})  # type: ignore[arg-type]
    optimizer = Shampoo([p])
    p.grad = torch.zeros(5, 3).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        optimizer.step()
