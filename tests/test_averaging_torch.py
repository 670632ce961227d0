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


@pytest.mark.parametrize("mode", ["lawa", "ema"])
def test_state_dict_round_trip_continues_identically(mode: str) -> None:
    # EMA: saved while its accumulator is lent to the module.
    config = AveragingConfig(mode=mode, every=2, window=3)
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


def _trained_averager(config: AveragingConfig, steps: int = 6) -> tuple[nn.Module, TorchAverager]:
    model = _model()
    averager = TorchAverager(config, model)
    rng = np.random.default_rng(6)
    for step in range(1, steps + 1):
        _perturb(model, rng)
        averager.collect(step)
    return model, averager


@pytest.mark.parametrize("mode", ["lawa", "ema"])
def test_swap_keeps_parameters_and_optimizer_state_and_copies_no_live_weights(mode: str) -> None:
    model, averager = _trained_averager(AveragingConfig(mode=mode, every=1, window=3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    parameters = list(model.parameters())
    grads = [p.grad for p in parameters]
    state_keys = list(optimizer.state)
    live = [p.detach().clone() for p in parameters]
    live_pointers = [p.data_ptr() for p in parameters]
    expected_average = averager.average()

    averager.swap_in_average()
    assert all(a is b for a, b in zip(model.parameters(), parameters))
    assert all(p.grad is g for p, g in zip(parameters, grads))
    assert list(optimizer.state) == state_keys and all(k in optimizer.state for k in parameters)
    for p, a in zip(parameters, expected_average):
        assert torch.equal(p.detach(), a)
    # The live weights were not copied: their memory now holds them elsewhere.
    assert not {p.data_ptr() for p in parameters} & set(live_pointers)
    if mode == "ema":
        # An fp32 EMA is lent to the module as is: no copy of the average either.
        store_pointers = {e.data_ptr() for e in averager.placement.ema}  # type: ignore[union-attr]
        assert store_pointers == set(live_pointers)

    averager.restore_live()
    assert [p.data_ptr() for p in parameters] == live_pointers
    for p, original in zip(parameters, live):
        assert torch.equal(p.detach(), original)
    # The optimizer trains the same tensors it trained before.
    optimizer.step()
    assert all(k in optimizer.state for k in parameters)


@pytest.mark.parametrize("mode", ["lawa", "ema"])
def test_state_dict_while_swapped_holds_the_live_weights_and_the_true_average(mode: str) -> None:
    config = AveragingConfig(mode=mode, every=1, window=3)
    model, averager = _trained_averager(config)
    unswapped = averager.state_dict()
    live = [p.detach().clone() for p in model.parameters()]
    averager.swap_in_average()
    swapped = averager.state_dict()
    for key in ("window", "sum", "ema"):
        flat_a = [t for x in unswapped[key] for t in (x if isinstance(x, list) else [x])]
        flat_b = [t for x in swapped[key] for t in (x if isinstance(x, list) else [x])]
        assert all(torch.equal(a, b) for a, b in zip(flat_a, flat_b, strict=True))
    assert all(torch.equal(s, t) for s, t in zip(swapped["stash"], live, strict=True))
    # Reading the state left the average in the module.
    for p, a in zip(model.parameters(), averager.average()):
        assert torch.equal(p.detach(), a)


def test_bf16_weights_get_the_fp32_ema_rounded_once_into_a_spare() -> None:
    model = _model().to(torch.bfloat16)
    averager = TorchAverager(AveragingConfig(mode="ema", every=1, beta=0.5), model)
    rng = np.random.default_rng(7)
    for step in range(1, 4):
        _perturb_typed(model, rng)
        averager.collect(step)
    ema = averager.average()
    averager.swap_in_average()
    for p, e in zip(model.parameters(), ema):
        assert p.dtype == torch.bfloat16
        assert torch.equal(p.detach(), e.to(torch.bfloat16))


def _perturb_typed(model: nn.Module, rng: np.random.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.from_numpy(rng.normal(size=tuple(p.shape))).to(p.dtype))


def test_a_verdict_replaces_the_check_and_each_step_is_collected_once() -> None:
    model = _model()
    averager = TorchAverager(AveragingConfig(mode="ema", every=1), model)
    assert averager.collect(1, finite=torch.tensor(True))
    assert not averager.collect(1)  # already collected
    # The caller's verdict is trusted: the weights are not read for the check.
    assert not averager.collect(2, finite=torch.tensor(False))
    assert averager.num_skipped_nonfinite == 1
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    assert not averager.collect(3)  # no verdict: the weights are checked
    assert averager.num_skipped_nonfinite == 2 and averager.num_collected == 1


def test_builder_never_collects_a_nonfinite_snapshot() -> None:
    from fakes import SGDConfig, TorchLinearWorkload, batches, hparams, make_torch_sgd
    from polyak.algoperf.builder_torch import build_submission

    submission = build_submission(make_torch_sgd, SGDConfig)
    hp = hparams(averaging="ema", averaging_every=1, ema_beta=0.5)
    workload = TorchLinearWorkload()
    model, model_state = workload.init_model_fn(0)
    state = submission.init_optimizer_state(workload, model, model_state, hp, None)
    for global_step, batch in enumerate(batches(0, 8)):
        if global_step == 4:
            with torch.no_grad():  # the weights after step 4 are poisoned
                next(model.parameters()).view(-1)[0] = float("nan")
        state, model, model_state = submission.update_params(
            workload, model, None, model_state, hp, batch, None, state, [], global_step, None
        )
    averager = state["averager"]
    # Steps 1-3 were judged by the next step's finite loss; 4-7 by a NaN loss;
    # step 8 by the averager's own check in prepare_for_eval.
    state, model, _ = submission.prepare_for_eval(
        workload, model, None, model_state, hp, None, state, [], 8, None
    )
    assert averager.num_collected == 3
    assert averager.num_skipped_nonfinite == 5
    assert all(torch.isfinite(p).all() for p in model.parameters())
