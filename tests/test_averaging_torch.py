"""The torch averager against the definitions of LAWA and EMA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from averaging_reference import averaging_settings, reference_average
from polyak.averaging.averager_torch import TorchAverager
from polyak.averaging.config import AveragingConfig


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _perturb(model: nn.Module, rng: np.random.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.from_numpy(rng.normal(size=tuple(p.shape))).float())
        for b in model.buffers():
            if torch.is_floating_point(b):
                b.add_(torch.from_numpy(rng.normal(size=tuple(b.shape))).float())


def _flat(tensors: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([t.detach().double().reshape(-1).numpy() for t in tensors])


def run_and_compare(config: AveragingConfig, steps: int, seed: int) -> None:
    model = _model()
    averager = TorchAverager(config, model)
    rng = np.random.default_rng(seed)
    collected = []
    for step in range(1, steps + 1):
        _perturb(model, rng)
        if averager.collect(step):
            collected.append(_flat(list(model.parameters())))
    live = _flat(list(model.parameters()))
    got = _flat(averager.average()[: len(list(model.parameters()))])
    if not collected:
        np.testing.assert_allclose(got, live, rtol=0, atol=0)
    else:
        np.testing.assert_allclose(got, reference_average(config, collected), rtol=1e-5, atol=1e-5)
    assert averager.num_collected == len(collected)


@settings(max_examples=15, deadline=None)
@given(**averaging_settings)
def test_matches_definitions(
    mode: str, every: int, window: int, beta: float, steps: int, seed: int
) -> None:
    config = AveragingConfig(mode=mode, every=every, window=window, beta=beta, step_hint=100)
    run_and_compare(config, steps, seed)


def test_swap_and_restore_round_trip_is_exact() -> None:
    model = _model()
    config = AveragingConfig(mode="lawa", every=1, window=3)
    averager = TorchAverager(config, model)
    rng = np.random.default_rng(0)
    for step in range(1, 6):
        _perturb(model, rng)
        averager.collect(step)
    live = [p.detach().clone() for p in model.parameters()]
    expected_average = averager.average()
    averager.swap_in_average()
    for p, a in zip(model.parameters(), expected_average):
        torch.testing.assert_close(p.detach(), a, rtol=0, atol=0)
    averager.restore_live()
    for p, original in zip(model.parameters(), live):
        assert torch.equal(p.detach(), original)


def test_before_first_collection_the_average_is_the_live_model() -> None:
    model = _model()
    averager = TorchAverager(AveragingConfig(mode="ema", every=10), model)
    live = [p.detach().clone() for p in model.parameters()]
    averager.collect(3)
    averager.swap_in_average()
    assert not averager.swapped
    for p, original in zip(model.parameters(), live):
        assert torch.equal(p.detach(), original)


@pytest.mark.parametrize("policy", ["live", "average"])
def test_buffer_policy(policy: str) -> None:
    model = _model()
    bn = model[1]
    config = AveragingConfig(mode="lawa", every=1, window=2, buffers=policy)
    averager = TorchAverager(config, model)
    rng = np.random.default_rng(1)
    means = []
    for step in range(1, 4):
        _perturb(model, rng)
        bn.num_batches_tracked += 1
        means.append(bn.running_mean.clone())
        averager.collect(step)
    live_mean = bn.running_mean.clone()
    averager.swap_in_average()
    if policy == "live":
        assert torch.equal(bn.running_mean, live_mean)
    else:
        torch.testing.assert_close(bn.running_mean, (means[-1] + means[-2]) / 2)
    # Integer buffers are never averaged.
    assert int(bn.num_batches_tracked) == 3
    averager.restore_live()
    assert torch.equal(bn.running_mean, live_mean)


def test_lawa_sum_stays_exact_over_many_windows() -> None:
    # Large offsets make naive running sums drift; the periodic recompute bounds it.
    model = nn.Linear(64, 64)
    config = AveragingConfig(mode="lawa", every=1, window=5)
    averager = TorchAverager(config, model)
    rng = np.random.default_rng(2)
    history = []
    with torch.no_grad():
        for step in range(1, 503):
            for p in model.parameters():
                p.copy_(torch.from_numpy(1e4 + rng.normal(size=tuple(p.shape))).float())
            averager.collect(step)
            history.append(_flat(list(model.parameters())))
    expected = np.mean(history[-5:], axis=0)
    np.testing.assert_allclose(_flat(averager.average()), expected, rtol=1e-6)


def test_nonfinite_weights_are_skipped_and_counted() -> None:
    model = _model()
    config = AveragingConfig(mode="lawa", every=1, window=4)
    averager = TorchAverager(config, model)
    rng = np.random.default_rng(3)
    collected = []
    for step in range(1, 8):
        _perturb(model, rng)
        if step == 4:
            saved = [p.detach().clone() for p in model.parameters()]
            with torch.no_grad():
                next(model.parameters())[0, 0] = float("nan")
            assert not averager.collect(step)
            with torch.no_grad():
                for p, s in zip(model.parameters(), saved):
                    p.copy_(s)
            continue
        assert averager.collect(step)
        collected.append(_flat(list(model.parameters())))
    assert averager.num_skipped_nonfinite == 1
    assert averager.num_collected == 6
    got = _flat(averager.average())
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, np.mean(collected[-4:], axis=0), rtol=1e-6, atol=1e-6)


def test_state_dict_round_trip_continues_identically() -> None:
    config = AveragingConfig(mode="lawa", every=2, window=3)
    model_a = _model()
    a = TorchAverager(config, model_a)
    rng = np.random.default_rng(4)
    for step in range(1, 8):
        _perturb(model_a, rng)
        a.collect(step)
    a.swap_in_average()
    saved_state = a.state_dict()
    saved_model = {k: v.clone() for k, v in model_a.state_dict().items()}

    model_b = _model()
    model_b.load_state_dict(saved_model)
    b = TorchAverager(config, model_b)
    b.load_state_dict(saved_state)
    assert b.swapped
    for averager, model in ((a, model_a), (b, model_b)):
        averager.restore_live()
        step_rng = np.random.default_rng(5)
        for step in range(8, 14):
            _perturb(model, step_rng)
            averager.collect(step)
    for x, y in zip(a.average(), b.average()):
        assert torch.equal(x, y)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)


def test_load_state_dict_rejects_other_settings() -> None:
    model = _model()
    saved = TorchAverager(AveragingConfig(mode="lawa", window=3), model).state_dict()
    with pytest.raises(ValueError, match="same averaging hyperparameters"):
        TorchAverager(AveragingConfig(mode="lawa", window=4), model).load_state_dict(saved)
