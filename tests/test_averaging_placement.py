"""Placements (device, host, sharded) give the same averages, bit for bit.

The device placement is the reference: ``test_averaging_torch`` and
``test_averaging_jax`` check it against the definitions of LAWA and EMA.
Here every other placement must reproduce it exactly, also when a collection
is poisoned by a NaN, when the background fold is slow, across checkpoints,
and through the AlgoPerf builders. The sharded placement under a real
process group is in ``test_averaging_ddp``.
"""

from __future__ import annotations

import copy
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from fakes import (
    JaxLinearWorkload,
    SGDConfig,
    TorchLinearWorkload,
    batches,
    hparams,
    make_jax_sgd,
    make_torch_sgd,
)
from polyak.algoperf import builder_jax, builder_torch
from polyak.algoperf.trial_config import self_tuning_placement
from polyak.averaging import footprint, lawa_ema_jax, lawa_ema_torch, metrics, placements_jax
from polyak.averaging.averager_torch import TorchAverager
from polyak.averaging.config import AveragingConfig
from polyak.averaging.footprint import AveragingMemoryError

PLACEMENTS = ["device", "host", "sharded"]
CONFIGS = {
    "lawa": dict(mode="lawa", every=2, window=3),
    "ema": dict(mode="ema", every=2, beta=0.7),
}


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    # 16 + 8 + 10 parameters: the flat vector does not split evenly.
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def _perturb(model: nn.Module, rng: np.random.Generator, nan: bool = False) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.from_numpy(rng.normal(size=tuple(p.shape))).to(p.dtype))
        for b in model.buffers():
            if torch.is_floating_point(b):
                b.add_(torch.from_numpy(rng.normal(size=tuple(b.shape))).float())
        if nan:
            model[2].weight[1, 2] = float("nan")


def _run(
    placement: str,
    steps: int = 17,
    nan_at: int | None = None,
    skip: int | None = None,
    dtype: torch.dtype = torch.float32,
    **settings,
) -> tuple[TorchAverager, nn.Module]:
    """Trains a random walk; ``nan_at`` poisons the weights at that step only,
    ``skip`` leaves that step out of the averager altogether."""
    config = AveragingConfig(placement=placement, step_hint=100, **settings)
    model = _model(dtype)
    averager = TorchAverager(config, model)
    rng = np.random.default_rng(11)
    for step in range(1, steps + 1):
        _perturb(model, rng, nan=step == nan_at)
        if step != skip:
            averager.collect(step)
        if step == nan_at:  # the next step repairs the weights
            with torch.no_grad():
                model[2].weight[1, 2] = 0.0
    return averager, model


def _assert_identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x.cpu(), y.cpu())


def _swapped_weights(averager: TorchAverager, model: nn.Module) -> list[torch.Tensor]:
    averager.swap_in_average()
    weights = [t.detach().clone() for t in model.state_dict().values()]
    averager.restore_live()
    return weights


# -- torch: identical to device -------------------------------------------------


@pytest.mark.parametrize("placement", ["host", "sharded"])
@pytest.mark.parametrize("mode", ["lawa", "ema"])
@pytest.mark.parametrize("buffers", ["live", "average"])
def test_torch_placements_match_device_bitwise(placement: str, mode: str, buffers: str) -> None:
    reference, reference_model = _run("device", buffers=buffers, **CONFIGS[mode])
    got, model = _run(placement, buffers=buffers, **CONFIGS[mode])
    assert got.num_collected == reference.num_collected == 8
    _assert_identical(got.average(), reference.average())
    _assert_identical(_swapped_weights(got, model), _swapped_weights(reference, reference_model))
    # The live weights come back exactly.
    _assert_identical(
        list(model.state_dict().values()), list(reference_model.state_dict().values())
    )


@pytest.mark.parametrize("placement", ["host", "sharded"])
def test_torch_placements_match_device_in_bfloat16(placement: str) -> None:
    # bf16 weights, fp32 BatchNorm buffers: snapshots keep each dtype (host)
    # or widen losslessly to fp32 (sharded); the sums must not notice.
    settings = dict(mode="lawa", every=1, window=4, buffers="average", dtype=torch.bfloat16)
    reference, reference_model = _run("device", **settings)
    got, model = _run(placement, **settings)
    _assert_identical(got.average(), reference.average())
    _assert_identical(_swapped_weights(got, model), _swapped_weights(reference, reference_model))


def test_host_state_is_in_cpu_memory_and_sharded_state_is_one_flat_slice() -> None:
    host, _ = _run("host", mode="lawa", every=1, window=3)
    window = host._store.window  # type: ignore[union-attr]
    assert all(t.device.type == "cpu" for snapshot in window for t in snapshot)
    sharded, model = _run("sharded", mode="lawa", every=1, window=3)
    store = sharded._store
    num_elements = sum(p.numel() for p in model.parameters())
    assert [len(slot) for slot in store.window] == [1, 1, 1]  # type: ignore[union-attr]
    assert store.window[0][0].numel() == num_elements  # type: ignore[union-attr]


# -- faults ------------------------------------------------------------------------


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("mode", ["lawa", "ema"])
def test_nan_at_a_collection_step_is_left_out(
    placement: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    warnings = []
    monkeypatch.setattr(metrics, "warn_nonfinite", warnings.append)
    poisoned, model = _run(placement, nan_at=6, **CONFIGS[mode])
    clean, _ = _run("device", nan_at=6, skip=6, **CONFIGS[mode])
    assert poisoned.num_skipped_nonfinite == 1
    assert poisoned.num_collected == clean.num_collected == 7
    averaged = poisoned.average()
    assert all(torch.isfinite(t).all() for t in averaged)
    _assert_identical(averaged, clean.average())
    assert warnings == [1]
    poisoned.swap_in_average()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_swap_right_after_a_collection_sees_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # A slow fold: without the join, the swap would read the previous state.
    fold = lawa_ema_torch.fold

    def slow_fold(*args, **kwargs) -> None:
        time.sleep(0.15)
        fold(*args, **kwargs)

    monkeypatch.setattr(lawa_ema_torch, "fold", slow_fold)
    config = AveragingConfig(mode="ema", every=1, beta=0.5, placement="host")
    model = nn.Linear(2, 2, bias=False)
    averager = TorchAverager(config, model)
    with torch.no_grad():
        model.weight.fill_(1.0)
        averager.collect(1)
        model.weight.fill_(3.0)
        averager.collect(2)
        # Overwriting the weights at once must not leak into the snapshot.
        model.weight.fill_(100.0)
    averager.swap_in_average()
    assert torch.equal(model.weight.detach(), torch.full((2, 2), 2.0))
    averager.restore_live()
    assert torch.equal(model.weight.detach(), torch.full((2, 2), 100.0))


def test_state_dict_joins_the_background_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    fold = lawa_ema_torch.fold
    monkeypatch.setattr(lawa_ema_torch, "fold", lambda *a, **k: (time.sleep(0.15), fold(*a, **k)))
    averager, _ = _run("host", steps=4, mode="lawa", every=1, window=2)
    reference, _ = _run("device", steps=4, mode="lawa", every=1, window=2)
    state = averager.state_dict()
    assert state["num_collected"] == 4
    _assert_identical(state["sum"], reference.state_dict()["sum"])


# -- checkpoints across placements ----------------------------------------------------


@pytest.mark.parametrize(("saved_in", "loaded_in"), [("host", "device"), ("device", "sharded")])
def test_checkpoints_move_between_placements(saved_in: str, loaded_in: str) -> None:
    settings = CONFIGS["lawa"]
    first, first_model = _run(saved_in, steps=9, **settings)
    first.swap_in_average()
    saved = copy.deepcopy(first.state_dict())
    saved_model = copy.deepcopy(first_model.state_dict())

    def continue_run(averager: TorchAverager, model: nn.Module) -> list[torch.Tensor]:
        averager.restore_live()
        rng = np.random.default_rng(12)
        for step in range(10, 18):
            _perturb(model, rng)
            averager.collect(step)
        return averager.average() + list(model.state_dict().values())

    model = _model()
    model.load_state_dict(saved_model)
    resumed = TorchAverager(AveragingConfig(placement=loaded_in, step_hint=100, **settings), model)
    resumed.load_state_dict(saved)
    assert resumed.swapped
    _assert_identical(continue_run(resumed, model), continue_run(first, first_model))


# -- memory ------------------------------------------------------------------------------


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_state_that_does_not_fit_fails_at_init(
    placement: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(footprint, "available_host_bytes", lambda: 1000)
    model = nn.Linear(100, 100)  # 10,100 weights: 40 kB; L = 20 needs ~850 kB
    config = AveragingConfig(mode="lawa", window=20, placement=placement)
    with pytest.raises(AveragingMemoryError, match=r"lawa_window=20.*only 0\.00 GiB"):
        TorchAverager(config, model)
    roomy = 10 * footprint.estimate(config, 10_100, 40_400, staging=True).total
    monkeypatch.setattr(footprint, "available_host_bytes", lambda: roomy)
    TorchAverager(config, model)


def test_footprint_counts_window_accumulator_and_shards() -> None:
    lawa = AveragingConfig(mode="lawa", window=20)
    # Criteo's embedding: 2.1 GB of fp32.
    weights = 525_000_000
    replicated = footprint.estimate(lawa, weights, 4 * weights, stash=False)
    assert replicated.window == 20 * 4 * weights
    assert replicated.accumulator == 4 * weights
    sharded = footprint.estimate(lawa, weights, 4 * weights, stash=False, world=8)
    assert sharded.window == 20 * 4 * weights // 8
    assert footprint.estimate(AveragingConfig(mode="ema"), 10, 20).window == 0


def test_builders_fail_at_init_when_the_window_does_not_fit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(footprint, "available_host_bytes", lambda: 10)
    hp = hparams(averaging="lawa", lawa_window=20, averaging_placement="host")
    submission = builder_torch.build_submission(make_torch_sgd, SGDConfig)
    workload = TorchLinearWorkload()
    model, _ = workload.init_model_fn(0)
    with pytest.raises(AveragingMemoryError, match="host memory"):
        submission.init_optimizer_state(workload, model, None, hp, None)
    jax_submission = builder_jax.build_submission(make_jax_sgd, SGDConfig)
    jax_workload = JaxLinearWorkload()
    params, model_state = jax_workload.init_model_fn(0)
    with pytest.raises(AveragingMemoryError, match="cpu device memory"):
        jax_submission.init_optimizer_state(jax_workload, params, model_state, hp, None)


# -- the builders ---------------------------------------------------------------------


class _Logger:
    def __init__(self) -> None:
        self.metrics: list[dict] = []

    def append_scalar_metrics(self, metrics: dict, global_step: int) -> None:
        self.metrics.append(dict(metrics))


def _torch_builder_run(hp, steps: int = 14, evals=(5, 9)):
    submission = builder_torch.build_submission(make_torch_sgd, SGDConfig)
    workload = TorchLinearWorkload()
    workload.metrics_logger = _Logger()
    model, model_state = workload.init_model_fn(0)
    state = submission.init_optimizer_state(workload, model, model_state, hp, None)
    live, evaluated = [], []
    for global_step, batch in enumerate(batches(0, steps)):
        state, model, model_state = submission.update_params(
            workload, model, None, model_state, hp, batch, None, state, [], global_step, None
        )
        live.append([t.clone() for t in model.state_dict().values()])
        if global_step + 1 in evals:
            state, model, model_state = submission.prepare_for_eval(
                workload, model, None, model_state, hp, None, state, [], global_step + 1, None
            )
            evaluated.append([t.clone() for t in model.state_dict().values()])
    return live, evaluated, workload.metrics_logger.metrics


@pytest.mark.parametrize("placement", ["host", "sharded"])
def test_torch_builder_placements_evaluate_the_same_weights(placement: str) -> None:
    settings = dict(averaging="lawa", averaging_every=2, lawa_window=3)
    live, evaluated, _ = _torch_builder_run(hparams(**settings))
    got_live, got_evaluated, logged = _torch_builder_run(
        hparams(**settings, averaging_placement=placement)
    )
    for a, b in zip(live + evaluated, got_live + got_evaluated):
        _assert_identical(a, b)
    names = set().union(*logged)
    assert {"averaging/collect_ms", "averaging/swap_ms", "averaging/restore_ms"} <= names
    # The log never waits for a host fold in flight, so it may lag one behind.
    assert logged[-1]["averaging/num_collected"] in (6, 7)


def test_self_tuning_uses_host_placement_when_cuda_is_present(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert self_tuning_placement(False) == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    submission = builder_torch.build_submission(make_torch_sgd, SGDConfig)
    workload = TorchLinearWorkload()
    model, _ = workload.init_model_fn(0)
    state = submission.init_optimizer_state(workload, model, None, None, None)
    assert state["averager"].config.placement == "host"
    # A search-space point keeps its own choice (the default is device).
    state = submission.init_optimizer_state(workload, model, None, hparams(averaging="ema"), None)
    assert state["averager"].config.placement == "device"


def test_jax_self_tuning_uses_host_placement_with_an_accelerator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    submission = builder_jax.build_submission(make_jax_sgd, SGDConfig)
    workload = JaxLinearWorkload()
    params, model_state = workload.init_model_fn(0)
    _, programs = submission.init_optimizer_state(workload, params, model_state, None, None)
    assert programs.averager.config.placement == "device"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    state, programs = submission.init_optimizer_state(workload, params, model_state, None, None)
    assert programs.averager.config.placement == "host"
    assert state["averaging"].num_collected.devices() == {jax.devices("cpu")[0]}


# -- JAX: host placement identical to on-device ------------------------------------------


def _np(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def _jax_builder_run(hp, steps: int = 14, evals=(1, 5, 9)):
    submission = builder_jax.build_submission(make_jax_sgd, SGDConfig)
    workload = JaxLinearWorkload()
    workload.metrics_logger = _Logger()
    params, model_state = workload.init_model_fn(0)
    state = submission.init_optimizer_state(workload, params, model_state, hp, None)
    rng = jax.random.PRNGKey(0)
    live, evaluated = [], []
    for global_step, batch in enumerate(batches(0, steps)):
        state, params, model_state = submission.update_params(
            workload, params, None, model_state, hp, batch, None, state, [], global_step, rng
        )
        live.append(_np((params, model_state)))
        if global_step + 1 in evals:
            state, params, model_state = submission.prepare_for_eval(
                workload, params, None, model_state, hp, None, state, [], global_step + 1, rng
            )
            evaluated.append(_np((params, model_state)))
    return live, evaluated, state, workload.metrics_logger.metrics


def _assert_trees_identical(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, strict=True)


@pytest.mark.parametrize(
    "settings",
    [
        dict(averaging="lawa", averaging_every=2, lawa_window=3),
        dict(averaging="ema", averaging_every=1, ema_beta=0.8, averaging_buffers="average"),
    ],
    ids=["lawa", "ema-buffers"],
)
def test_jax_host_placement_matches_device_bitwise(settings: dict) -> None:
    live, evaluated, device_state, _ = _jax_builder_run(hparams(**settings))
    got_live, got_evaluated, host_state, logged = _jax_builder_run(
        hparams(**settings, averaging_placement="host")
    )
    _assert_trees_identical(live, got_live)
    _assert_trees_identical(evaluated, got_evaluated)
    _assert_trees_identical(_np(device_state[0]), _np(host_state[0]))
    # The averaging state lives on the CPU device, the rest is replicated.
    cpu = jax.devices("cpu")[0]
    for leaf in jax.tree.leaves(host_state[0]["averaging"]):
        assert leaf.devices() == {cpu}
    for leaf in jax.tree.leaves(host_state[0]["optimizer"]):
        assert len(leaf.devices()) == len(jax.devices())
    names = set().union(*logged)
    assert {"averaging/collect_ms", "averaging/swap_ms", "averaging/restore_ms"} <= names


def test_jax_host_placement_survives_a_checkpoint_round_trip() -> None:
    from flax import serialization

    hp = hparams(averaging="lawa", averaging_every=1, lawa_window=3, averaging_placement="host")
    submission = builder_jax.build_submission(make_jax_sgd, SGDConfig)
    workload = JaxLinearWorkload()
    data = batches(1, 12)
    rng = jax.random.PRNGKey(1)

    def train(params, model_state, state, start, stop):
        for i in range(start, stop):
            state, params, model_state = submission.update_params(
                workload, params, None, model_state, hp, data[i], None, state, [], i, rng
            )
        state, params, model_state = submission.prepare_for_eval(
            workload, params, None, model_state, hp, None, state, [], stop, rng
        )
        return params, model_state, state

    params, model_state = workload.init_model_fn(0)
    state = submission.init_optimizer_state(workload, params, model_state, hp, None)
    params, model_state, state = train(params, model_state, state, 0, 6)
    saved = serialization.to_bytes({"opt": state[0], "params": params, "model_state": model_state})
    final = train(params, model_state, state, 6, 12)

    fresh_params, fresh_model_state = workload.init_model_fn(3)
    fresh = submission.init_optimizer_state(workload, fresh_params, fresh_model_state, hp, None)
    target = {"opt": fresh[0], "params": fresh_params, "model_state": fresh_model_state}
    restored = serialization.from_bytes(target, saved)  # numpy arrays, placed nowhere
    resumed = train(restored["params"], restored["model_state"], (restored["opt"], fresh[1]), 6, 12)
    _assert_trees_identical(_np(final[:2]), _np(resumed[:2]))
    _assert_trees_identical(_np(final[2][0]), _np(resumed[2][0]))


def test_jax_nan_at_a_collection_step_is_left_out_on_host() -> None:
    config = AveragingConfig(mode="ema", every=1, beta=0.5, placement="host")
    rng = np.random.default_rng(0)
    sequence = [{"w": jnp.asarray(rng.normal(size=(5,)), jnp.float32)} for _ in range(5)]
    poisoned = [dict(p) for p in sequence]
    poisoned[2] = {"w": sequence[2]["w"].at[1].set(jnp.inf)}
    host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    collect = jax.jit(lambda s, p: lawa_ema_jax.collect(config, s, p), out_shardings=host)
    state = jax.device_put(lawa_ema_jax.init(config, sequence[0]), host)
    for params in poisoned:
        state = collect(state, jax.device_put(params, host))
    clean = lawa_ema_jax.init(config, sequence[0])
    for i, params in enumerate(sequence):
        if i != 2:
            clean = lawa_ema_jax.collect(config, clean, params)
    assert int(state.num_skipped_nonfinite) == 1
    got = lawa_ema_jax.average(config, state, sequence[-1])
    assert np.isfinite(np.asarray(got["w"])).all()
    np.testing.assert_array_equal(
        np.asarray(got["w"]), np.asarray(lawa_ema_jax.average(config, clean, sequence[-1])["w"])
    )


def test_jax_memory_check_names_the_hyperparameters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(footprint, "available_host_bytes", lambda: 4096)
    config = AveragingConfig(mode="lawa", window=20, placement="host")
    params = {"w": jax.ShapeDtypeStruct((1000,), jnp.float32)}
    with pytest.raises(AveragingMemoryError, match="averaging='lawa', lawa_window=20"):
        placements_jax.check_fits(config, params, jax.devices("cpu")[0])
    placements_jax.check_fits(AveragingConfig(mode="none"), params, jax.devices("cpu")[0])
