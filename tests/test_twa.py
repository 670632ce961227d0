"""TWA (trainable weight averaging) against its definition, on problems with known answers.

References are computed here, independently of ``polyak.averaging.twa_torch``: the
uniform average in float64 with numpy, the optimum of a quadratic placed in
the checkpoints' affine span, and BatchNorm statistics from the activations.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from polyak.averaging.averager_torch import TorchAverager
from polyak.averaging.config import AveragingConfig, AveragingError
from polyak.averaging.twa_torch import (
    TWAConfig,
    TWAError,
    blocks_for,
    build_subspace,
    fit_twa,
)

# -- helpers -------------------------------------------------------------------------


class TwoTensors(nn.Module):
    """A 'model' that is just two parameter tensors, for quadratic objectives."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(6, 5))
        self.b = nn.Parameter(torch.zeros(7))


def _flat(tensors: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([t.detach().double().reshape(-1).numpy() for t in tensors])


def _random_snapshots(shapes: list[tuple[int, ...]], k: int, seed: int) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=generator) for s in shapes] for _ in range(k)]


def _combination(snapshots: list[list[torch.Tensor]], weights: list[float]) -> list[torch.Tensor]:
    return [
        sum(w * snapshot[j].double() for w, snapshot in zip(weights, snapshots)).float()
        for j in range(len(snapshots[0]))
    ]


def _quadratic(targets: list[torch.Tensor], seed: int):
    """½ (θ − θ*)ᵀ A (θ − θ*) with A positive definite: its minimum, 0, is at θ*."""
    size = sum(t.numel() for t in targets)
    generator = torch.Generator().manual_seed(seed)
    root = torch.randn(size, size, generator=generator)
    curvature = root @ root.T / size + 0.1 * torch.eye(size)

    def loss(module: nn.Module) -> torch.Tensor:
        offset = torch.cat([(p - t).reshape(-1) for p, t in zip(module.parameters(), targets)])
        return 0.5 * offset @ curvature @ offset

    return loss


@torch.no_grad()
def _value(loss_fn, module: nn.Module) -> float:
    return float(loss_fn(module))


def _mlp(batch_norm: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(4, 8)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.ReLU(), nn.Linear(8, 3)]
    return nn.Sequential(*layers)


def _classification_batches(count: int, seed: int, size: int = 32):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, 4)) * 2
    batches = []
    for _ in range(count):
        labels = rng.integers(0, 3, size=size)
        inputs = centers[labels] + rng.normal(size=(size, 4))
        batches.append(
            (torch.tensor(inputs, dtype=torch.float32), torch.tensor(labels, dtype=torch.long))
        )
    return batches


def _cross_entropy(module: nn.Module, batch) -> torch.Tensor:
    inputs, labels = batch
    return nn.functional.cross_entropy(module(inputs), labels)


def _sgd_snapshots(model: nn.Module, batches, k: int, lr: float, every: int = 3):
    """Trains with plain SGD and keeps a snapshot every ``every`` steps."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    snapshots = []
    step = 0
    while len(snapshots) < k:
        for batch in batches:
            optimizer.zero_grad()
            _cross_entropy(model, batch).backward()
            optimizer.step()
            step += 1
            if step % every == 0 and len(snapshots) < k:
                snapshots.append([p.detach().clone() for p in model.parameters()])
    return snapshots


def _loss_at(model: nn.Module, weights: list[torch.Tensor], batches) -> float:
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
        model.train()
        return float(np.mean([float(_cross_entropy(model, b)) for b in batches]))


# -- the subspace --------------------------------------------------------------------


def test_basis_is_orthonormal_and_drops_duplicate_checkpoints() -> None:
    shapes = [(6, 5), (7,)]
    snapshots = _random_snapshots(shapes, 5, seed=1)
    snapshots.insert(2, [t.clone() for t in snapshots[0]])  # a duplicate adds no direction
    subspace = build_subspace(snapshots, shapes, TWAConfig())
    kept = subspace.kept[:, 0]
    assert subspace.num_directions == [4]  # K = 6 checkpoints, one duplicate: 6 − 1 − 1
    basis = subspace.basis[kept].double()
    np.testing.assert_allclose(basis @ basis.T, np.eye(4), atol=1e-6)
    # It spans the centered checkpoints: projecting them leaves nothing.
    stacked = torch.tensor(np.stack([_flat(s) for s in snapshots]))
    centered = stacked - stacked.mean(dim=0)
    residual = centered - centered @ basis.T @ basis
    assert float(residual.abs().max()) < 1e-5 * float(centered.abs().max())


def test_layerwise_blocks_split_the_tensors() -> None:
    assert blocks_for(5, TWAConfig(layerwise=False)) == [[0, 1, 2, 3, 4]]
    assert blocks_for(5, TWAConfig(layerwise=True)) == [[0], [1], [2], [3], [4]]
    assert blocks_for(5, TWAConfig(layerwise=2)) == [[0, 1], [2, 3], [4]]


# -- uniform LAWA before fitting ------------------------------------------------------------


def test_zero_steps_is_uniform_lawa() -> None:
    model = _mlp(batch_norm=True)
    live_buffers = [b.clone() for b in model.buffers()]
    snapshots = _random_snapshots([tuple(p.shape) for p in model.parameters()], 6, seed=2)
    config = TWAConfig(steps=0, recompute_batch_norm=False)
    result = fit_twa(model, snapshots, config, _cross_entropy, _classification_batches(2, 0))
    reference = np.mean([_flat(s) for s in snapshots], axis=0)
    np.testing.assert_allclose(_flat(list(model.parameters())), reference, rtol=0, atol=1e-6)
    assert result.chosen == "uniform"
    np.testing.assert_allclose(result.checkpoint_weights.numpy(), np.full((1, 6), 1 / 6))
    # Buffers are the live ones, untouched.
    for buffer, live in zip(model.buffers(), live_buffers):
        assert torch.equal(buffer, live)

    # The same as the LAWA averager fed the same snapshots, to fp32 rounding.
    lawa_model = _mlp(batch_norm=True)
    averager = TorchAverager(AveragingConfig(mode="lawa", window=6, every=1), lawa_model)
    for step, snapshot in enumerate(snapshots, start=1):
        with torch.no_grad():
            for p, s in zip(lawa_model.parameters(), snapshot):
                p.copy_(s)
        averager.collect(step)
    averaged = averager.average()[: len(snapshots[0])]
    np.testing.assert_allclose(_flat(list(model.parameters())), _flat(averaged), atol=1e-6)


# -- fitting -------------------------------------------------------------------------------


def test_recovers_an_optimum_in_the_span() -> None:
    model = TwoTensors()
    snapshots = _random_snapshots([(6, 5), (7,)], 5, seed=3)
    weights = [0.5, -0.3, 0.9, 0.2, -0.3]  # sums to 1: a point of the affine span
    optimum = _combination(snapshots, weights)
    loss_fn = _quadratic(optimum, seed=4)
    with torch.no_grad():
        for p, s in zip(model.parameters(), _combination(snapshots, [0.2] * 5)):
            p.copy_(s)
    start = _value(loss_fn, model)
    result = fit_twa(model, snapshots, TWAConfig(steps=300, lr=0.1), loss_fn)
    assert result.chosen == "twa"
    assert result.uniform_loss == pytest.approx(start, rel=1e-5)
    assert _value(loss_fn, model) < 1e-8 * start
    np.testing.assert_allclose(_flat(list(model.parameters())), _flat(optimum), atol=1e-4)
    np.testing.assert_allclose(result.checkpoint_weights[0].numpy(), weights, atol=1e-3)


def test_layerwise_reaches_what_one_global_vector_cannot() -> None:
    snapshots = _random_snapshots([(6, 5), (7,)], 5, seed=5)
    # Each tensor's optimum is a different combination of the checkpoints.
    per_tensor_weights = [[0.5, -0.3, 0.9, 0.2, -0.3], [-0.4, 0.1, 0.3, 0.6, 0.4]]
    optimum = [_combination(snapshots, weights)[j] for j, weights in enumerate(per_tensor_weights)]
    loss_fn = _quadratic(optimum, seed=6)

    global_model, layerwise_model = TwoTensors(), TwoTensors()
    global_result = fit_twa(global_model, snapshots, TWAConfig(steps=300, lr=0.1), loss_fn)
    layerwise_result = fit_twa(
        layerwise_model, snapshots, TWAConfig(steps=300, lr=0.1, layerwise=True), loss_fn
    )
    assert _value(loss_fn, layerwise_model) < 1e-8 * global_result.uniform_loss
    assert _value(loss_fn, global_model) > 1e-3 * global_result.uniform_loss
    np.testing.assert_allclose(
        layerwise_result.checkpoint_weights.numpy(), per_tensor_weights, atol=1e-3
    )
    # The reported weights over checkpoints rebuild each tensor.
    for j, weights in enumerate(layerwise_result.checkpoint_weights.tolist()):
        rebuilt = _combination(snapshots, weights)[j]
        got = list(layerwise_model.parameters())[j]
        np.testing.assert_allclose(got.detach().numpy(), rebuilt.numpy(), atol=1e-4)


def test_explicit_blocks_and_checkpoint_weights_sum_to_one() -> None:
    model = _mlp(batch_norm=False)
    batches = _classification_batches(3, seed=7)
    snapshots = _sgd_snapshots(model, batches, k=5, lr=0.2)
    result = fit_twa(
        model,
        snapshots,
        TWAConfig(steps=20, recompute_batch_norm=False),
        _cross_entropy,
        batches,
        blocks=[[0, 1], [2, 3]],
    )
    assert result.checkpoint_weights.shape == (2, 5)
    np.testing.assert_allclose(result.checkpoint_weights.sum(dim=1).numpy(), [1.0, 1.0])
    for j, p in enumerate(model.parameters()):
        weights = result.checkpoint_weights[j // 2].tolist()
        expected = _combination(snapshots, weights)[j]
        np.testing.assert_allclose(p.detach().numpy(), expected.numpy(), atol=1e-5)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 1000),
    lr=st.sampled_from([0.01, 0.1, 1.0, 30.0]),
    layerwise=st.booleans(),
)
def test_never_worse_than_uniform_lawa_on_its_batches(
    seed: int, lr: float, layerwise: bool
) -> None:
    model = _mlp(batch_norm=False, seed=seed)
    batches = _classification_batches(3, seed=seed)
    snapshots = _sgd_snapshots(model, batches, k=6, lr=0.5)
    uniform = _combination(snapshots, [1 / 6] * 6)
    uniform_loss = _loss_at(_mlp(batch_norm=False), uniform, batches)

    config = TWAConfig(steps=15, lr=lr, layerwise=layerwise)
    result = fit_twa(model, snapshots, config, _cross_entropy, batches)
    fitted = [p.detach().clone() for p in model.parameters()]
    fitted_loss = _loss_at(_mlp(batch_norm=False), fitted, batches)
    assert fitted_loss <= uniform_loss * (1 + 1e-5) + 1e-7
    assert result.uniform_loss == pytest.approx(uniform_loss, rel=1e-5)
    if result.chosen == "uniform":
        np.testing.assert_allclose(_flat(fitted), _flat(uniform), atol=1e-6)
    else:
        assert result.fitted_loss == pytest.approx(fitted_loss, rel=1e-5)


def test_validation_batches_decide_between_the_fit_and_uniform() -> None:
    """The fit follows its batches; batches it never saw decide whether it is kept."""
    snapshots = _random_snapshots([(6, 5), (7,)], 4, seed=5)
    uniform = _combination(snapshots, [0.25] * 4)
    pulled = _combination(snapshots, [0.1, 0.1, 0.1, 0.7])  # towards the newest

    def loss_fn(module: nn.Module, target: list[torch.Tensor]) -> torch.Tensor:
        return sum(((p - t) ** 2).sum() for p, t in zip(module.parameters(), target))

    config = TWAConfig(steps=200, lr=0.1)
    for validation, expected in (([uniform], "uniform"), ([pulled], "twa")):
        model = TwoTensors()
        result = fit_twa(model, snapshots, config, loss_fn, [pulled], validation_batches=validation)
        assert result.chosen == expected
        # Both losses are measured on the validation batches.
        reference = sum(float(((u - v) ** 2).sum()) for u, v in zip(uniform, validation[0]))
        assert result.uniform_loss == pytest.approx(reference, rel=1e-4, abs=1e-6)
    # A judge of its own: here one that prefers the uniform average.
    model = TwoTensors()
    result = fit_twa(
        model,
        snapshots,
        config,
        loss_fn,
        [pulled],
        validation_batches=[pulled],
        validation_loss_fn=lambda module, _: loss_fn(module, uniform),
    )
    assert result.chosen == "uniform"
    with pytest.raises(TWAError, match="empty list of validation batches"):
        fit_twa(TwoTensors(), snapshots, config, loss_fn, [pulled], validation_batches=[])


def test_a_diverging_fit_falls_back_to_uniform() -> None:
    model = _mlp(batch_norm=False)
    batches = _classification_batches(2, seed=8)
    snapshots = _sgd_snapshots(model, batches, k=5, lr=0.5)
    result = fit_twa(model, snapshots, TWAConfig(steps=10, lr=1e4), _cross_entropy, batches)
    assert result.chosen == "uniform"
    assert result.fitted_loss > result.uniform_loss or not math.isfinite(result.fitted_loss)
    np.testing.assert_allclose(
        _flat(list(model.parameters())), np.mean([_flat(s) for s in snapshots], axis=0), atol=1e-6
    )


def test_a_single_checkpoint_is_returned_as_is() -> None:
    model = _mlp(batch_norm=False)
    snapshot = [p.detach() + 1.0 for p in model.parameters()]
    result = fit_twa(
        model, [snapshot], TWAConfig(steps=5), _cross_entropy, _classification_batches(1, 0)
    )
    assert result.chosen == "uniform" and result.num_directions == (0,)
    np.testing.assert_allclose(_flat(list(model.parameters())), _flat(snapshot), atol=0)


# -- BatchNorm -------------------------------------------------------------------------


def test_batch_norm_statistics_are_recomputed_from_the_data() -> None:
    model = _mlp(batch_norm=True)
    batch_norm = model[1]
    with torch.no_grad():  # stale statistics, far from the data's
        batch_norm.running_mean.fill_(5.0)
        batch_norm.running_var.fill_(9.0)
    momentum = batch_norm.momentum
    batches = _classification_batches(4, seed=9)
    snapshots = _random_snapshots([tuple(p.shape) for p in model.parameters()], 4, seed=10)
    config = TWAConfig(steps=0, recompute_batch_norm=True)
    result = fit_twa(model, snapshots, config, _cross_entropy, batches)
    assert result.batch_norm_recomputed
    assert batch_norm.momentum == momentum

    # The statistics of the first layer's outputs at the averaged weights.
    weight, bias = model[0].weight.detach(), model[0].bias.detach()
    activations = [inputs @ weight.T + bias for inputs, _ in batches]
    expected_mean = torch.stack([a.mean(dim=0) for a in activations]).mean(dim=0)
    expected_var = torch.stack([a.var(dim=0, unbiased=True) for a in activations]).mean(dim=0)
    np.testing.assert_allclose(batch_norm.running_mean.numpy(), expected_mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(batch_norm.running_var.numpy(), expected_var.numpy(), rtol=1e-5)
    assert int(batch_norm.num_batches_tracked) == len(batches)


def test_a_loss_that_updates_batch_norm_leaves_no_trace_without_recompute() -> None:
    model = _mlp(batch_norm=True)
    batches = _classification_batches(2, seed=11)
    snapshots = _sgd_snapshots(model, batches, k=4, lr=0.2)
    before = [b.clone() for b in model.buffers()]
    config = TWAConfig(steps=5, recompute_batch_norm=False)
    result = fit_twa(model, snapshots, config, _cross_entropy, batches)
    assert not result.batch_norm_recomputed
    for buffer, saved in zip(model.buffers(), before):
        assert torch.equal(buffer, saved)


# -- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("twa_steps", -1),
        ("twa_steps", 2.5),
        ("twa_steps", True),
        ("twa_batches", 0),
        ("twa_batches", "8"),
        ("twa_lr", 0.0),
        ("twa_lr", -0.1),
        ("twa_lr", float("nan")),
        ("twa_lr", float("inf")),
        ("twa_layerwise", -1),
        ("twa_layerwise", 1.5),
        ("twa_layerwise", "yes"),
        ("twa_recompute_bn", "no"),
    ],
)
def test_bad_hyperparameters_name_the_value(name: str, value: object) -> None:
    with pytest.raises(TWAError) as error:
        TWAConfig.from_hyperparameters({name: value})
    assert name in str(error.value) and repr(value) in str(error.value)
    assert isinstance(error.value, AveragingError)


def test_hyperparameters_are_read_and_normalized() -> None:
    config = TWAConfig.from_hyperparameters(
        {"twa_steps": 30.0, "twa_batches": 4, "twa_lr": 1, "twa_layerwise": 2.0}
    )
    assert config == TWAConfig(steps=30, batches=4, lr=1.0, layerwise=2)
    assert isinstance(config.steps, int) and isinstance(config.lr, float)
    assert TWAConfig.from_hyperparameters(None) == TWAConfig()


def test_bad_inputs_give_clear_errors() -> None:
    model = _mlp(batch_norm=False)
    shapes = [tuple(p.shape) for p in model.parameters()]
    good = _random_snapshots(shapes, 3, seed=12)
    with pytest.raises(TWAError, match="at least one checkpoint"):
        fit_twa(model, [], TWAConfig(), _cross_entropy, _classification_batches(1, 0))
    with pytest.raises(TWAError, match="shape"):
        bad = [good[0], [t.T if t.ndim == 2 else t for t in good[1]], good[2]]
        fit_twa(model, bad, TWAConfig(), _cross_entropy, _classification_batches(1, 0))
    with pytest.raises(TWAError, match="holds 3 tensors"):
        fit_twa(model, [s[:3] for s in good], TWAConfig(), _cross_entropy, [None])
    with pytest.raises(TWAError, match="empty list of batches"):
        fit_twa(model, good, TWAConfig(), _cross_entropy, [])
    with pytest.raises(TWAError, match="each index once"):
        fit_twa(model, good, TWAConfig(), _cross_entropy, [None], blocks=[[0, 1], [1, 2, 3]])
