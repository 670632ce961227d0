"""The JAX builder: jit with shardings, donation, and the averaging swap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from fakes import JaxLinearWorkload, SGDConfig, batches, hparams, make_jax_sgd
from polyak.algoperf import builder_jax
from polyak.algoperf.builder_jax import build_submission
from polyak.averaging import averager_jax
from polyak.averaging.config import AveragingError
from polyak.hyperparameters import (
    STRICT_ENV_VAR,
    UnknownHyperparameterError,
    UnknownHyperparameterWarning,
)
from polyak.optim.nadamw_config import NadamWConfig
from polyak.optim.nadamw_jax import make_nadamw
from polyak.optim.shampoo_config import ShampooConfig
from polyak.optim.shampoo_jax import make_shampoo

SUBMISSION = build_submission(make_jax_sgd, SGDConfig)
EVAL_STEPS = {1, 6, 12, 18}


def _np(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def _run(hp, steps: int = 20, with_evals: bool = True):
    workload = JaxLinearWorkload()
    params, model_state = workload.init_model_fn(0)
    state = SUBMISSION.init_optimizer_state(workload, params, model_state, hp, None)
    rng = jax.random.PRNGKey(0)
    live, evaluated = [], {}
    for global_step, batch in enumerate(batches(0, steps)):
        state, params, model_state = SUBMISSION.update_params(
            workload, params, None, model_state, hp, batch, None, state, [], global_step, rng
        )
        live.append((_np(params), _np(model_state)))
        if with_evals and global_step + 1 in EVAL_STEPS:
            state, params, model_state = SUBMISSION.prepare_for_eval(
                workload, params, None, model_state, hp, None, state, [], global_step + 1, rng
            )
            evaluated[global_step + 1] = (_np(params), _np(model_state))
    return live, evaluated, state


def _assert_tree_equal(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("mode", ["lawa", "ema"])
def test_averaging_never_changes_the_training_trajectory(mode: str) -> None:
    plain, _, _ = _run(hparams(), with_evals=False)
    averaged, evaluated, _ = _run(
        hparams(averaging=mode, averaging_every=2, lawa_window=3, ema_beta=0.8)
    )
    for a, b in zip(plain, averaged):
        _assert_tree_equal(a, b)
    for step, (params, model_state) in evaluated.items():
        collected = [plain[s - 1][0] for s in range(1, step + 1) if s % 2 == 0]
        if not collected:
            _assert_tree_equal(params, plain[step - 1][0])
            continue
        for key in ("kernel", "bias"):
            snaps = [c[key].astype(np.float64) for c in collected]
            if mode == "lawa":
                expected = np.mean(snaps[-3:], axis=0)
            else:
                expected = snaps[0]
                for w in snaps[1:]:
                    expected = 0.8 * expected + 0.2 * w
            np.testing.assert_allclose(params[key], expected, rtol=1e-5, atol=1e-6)
        _assert_tree_equal(model_state, plain[step - 1][1])


def test_average_buffers_policy_averages_model_state_and_restores_it() -> None:
    hp = hparams(averaging="lawa", averaging_every=1, lawa_window=2, averaging_buffers="average")
    plain, _, _ = _run(hparams(), with_evals=False)
    averaged, evaluated, _ = _run(hp)
    for a, b in zip(plain, averaged):
        _assert_tree_equal(a, b)
    expected = (plain[4][1]["running_scale"] + plain[5][1]["running_scale"]) / 2
    np.testing.assert_allclose(evaluated[6][1]["running_scale"], expected, rtol=1e-6)


def test_state_is_replicated_and_optimizer_state_is_a_pair() -> None:
    _, _, state = _run(hparams(averaging="lawa", averaging_every=2, lawa_window=3), steps=4)
    pytree, programs = state
    assert callable(programs)
    for leaf in jax.tree.leaves(pytree):
        assert leaf.sharding.is_fully_replicated
        assert len(leaf.sharding.device_set) == len(jax.devices())


@pytest.mark.parametrize("mode", ["lawa", "ema"])
def test_checkpoint_round_trip_after_eval_continues_identically(mode: str) -> None:
    # A LAWA window of 4 collected every step wraps before and after the checkpoint.
    hp = hparams(averaging=mode, averaging_every=1, lawa_window=4, ema_beta=0.9)
    workload = JaxLinearWorkload()
    data = batches(1, 12)
    rng = jax.random.PRNGKey(1)

    def train(params, model_state, state, start, stop):
        for i in range(start, stop):
            state, params, model_state = SUBMISSION.update_params(
                workload, params, None, model_state, hp, data[i], None, state, [], i, rng
            )
        return params, model_state, state

    params, model_state = workload.init_model_fn(0)
    state = SUBMISSION.init_optimizer_state(workload, params, model_state, hp, None)
    params, model_state, state = train(params, model_state, state, 0, 6)
    state, params, model_state = SUBMISSION.prepare_for_eval(
        workload, params, None, model_state, hp, None, state, [], 6, rng
    )
    # AlgoPerf's JAX checkpoint: the pytree half, restored into a fresh one.
    saved = serialization.to_bytes({"opt": state[0], "params": params, "model_state": model_state})
    final = train(params, model_state, state, 6, 12)

    fresh_params, fresh_model_state = workload.init_model_fn(3)
    fresh_state = SUBMISSION.init_optimizer_state(
        workload, fresh_params, fresh_model_state, hp, None
    )
    target = {"opt": fresh_state[0], "params": fresh_params, "model_state": fresh_model_state}
    restored = serialization.from_bytes(target, saved)
    resumed_state = (jax.tree.map(jnp.asarray, restored["opt"]), fresh_state[1])
    resumed = train(restored["params"], restored["model_state"], resumed_state, 6, 12)
    _assert_tree_equal(_np(final[:2]), _np(resumed[:2]))
    # And so does the average.
    averages = [
        SUBMISSION.prepare_for_eval(workload, p, None, ms, hp, None, s, [], 12, rng)[1]
        for p, ms, s in (final, resumed)
    ]
    _assert_tree_equal(_np(averages[0]), _np(averages[1]))


def test_self_tuning_and_bad_hyperparameters() -> None:
    workload = JaxLinearWorkload()
    params, model_state = workload.init_model_fn(0)
    _, programs = SUBMISSION.init_optimizer_state(workload, params, model_state, None, None)
    assert programs.averager.config.mode == "lawa"
    assert programs.averager.config.selects_best
    with pytest.raises(AveragingError, match="ema_beta=0"):
        SUBMISSION.init_optimizer_state(
            workload, params, model_state, hparams(averaging="ema", ema_beta=0), None
        )


# -- hyperparameters are resolved once, at init ---------------------------------


def test_unknown_hyperparameter_names_warn_naming_them(monkeypatch) -> None:
    workload = JaxLinearWorkload()
    params, model_state = workload.init_model_fn(0)
    monkeypatch.delenv(STRICT_ENV_VAR, raising=False)
    with pytest.warns(UnknownHyperparameterWarning, match=r"\['averagin'\].*'averaging'"):
        _, programs = SUBMISSION.init_optimizer_state(
            workload, params, model_state, hparams(averagin="lawa"), None
        )
    assert not programs.averager.config.enabled  # the misspelled name had no effect
    monkeypatch.setenv(STRICT_ENV_VAR, "1")
    with pytest.raises(UnknownHyperparameterError, match="averagin"):
        SUBMISSION.init_optimizer_state(
            workload, params, model_state, hparams(averagin="lawa"), None
        )


@pytest.mark.parametrize("learning_rate", [float("inf"), float("nan"), 0.0, -1.0])
@pytest.mark.parametrize("optimizer", ["nadamw", "shampoo"])
def test_a_learning_rate_that_is_not_finite_and_positive_is_refused(
    optimizer: str, learning_rate: float
) -> None:
    make, config_type = {
        "nadamw": (make_nadamw, NadamWConfig),
        "shampoo": (make_shampoo, ShampooConfig),
    }[optimizer]
    submission = build_submission(make, config_type)
    workload = JaxLinearWorkload()
    params, model_state = workload.init_model_fn(0)
    with pytest.raises(ValueError, match=f"learning_rate={learning_rate!r}"):
        submission.init_optimizer_state(
            workload, params, model_state, {"learning_rate": learning_rate}, None
        )


def _leaf_shapes(tree) -> set[tuple[int, ...]]:
    return {tuple(x.shape) for x in jax.tree.leaves(tree)}


@pytest.mark.parametrize("placement", ["device", "host"])
def test_each_step_is_one_program_and_each_is_traced_once(
    placement: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One jitted dispatch per step; a collection is folded into the step's program
    (device) and steps that do not collect never take the window; the steps and
    the swap are traced once however many evals come between them."""
    traces: list[str] = []

    def counted(name: str, function):
        def traced(*args, **kwargs):
            traces.append(name if name != "step" else f"step collect={kwargs['collect']}")
            return function(*args, **kwargs)

        return traced

    monkeypatch.setattr(builder_jax, "_train_step", counted("step", builder_jax._train_step))
    monkeypatch.setattr(
        averager_jax, "_swap_in_average", counted("swap", averager_jax._swap_in_average)
    )
    submission = builder_jax.build_submission(make_jax_sgd, SGDConfig)
    hp = hparams(averaging="lawa", averaging_every=3, lawa_window=4, averaging_placement=placement)
    workload = JaxLinearWorkload()
    params, model_state = workload.init_model_fn(0)
    state = submission.init_optimizer_state(workload, params, model_state, hp, None)
    programs = state[1]
    # Replicated, as AlgoPerf hands them over (arrays of another sharding
    # would make the first step's trace its own).
    params, model_state = jax.device_put((params, model_state), programs.replicated)
    calls: list[tuple[str, set[tuple[int, ...]]]] = []

    def counting(name: str, program):
        def call(model_state, pytree, params, batch, rng):
            calls.append((name, _leaf_shapes(pytree)))
            return program(model_state, pytree, params, batch, rng)

        return call

    plain, collecting = programs.train_step, programs.train_step_and_collect
    programs.train_step = counting("plain", plain)
    programs.train_step_and_collect = counting("collect", collecting)
    rng = jax.random.PRNGKey(0)
    data = batches(0, 12)
    for i, batch in enumerate(data):
        state, params, model_state = submission.update_params(
            workload, params, None, model_state, hp, batch, None, state, [], i, rng
        )
        if (i + 1) % 4 == 0:
            state, params, model_state = submission.prepare_for_eval(
                workload, params, None, model_state, hp, None, state, [], i + 1, rng
            )
    window_shape = (4, *params["kernel"].shape)
    on_device = placement == "device"
    expected = ["collect" if (i + 1) % 3 == 0 and on_device else "plain" for i in range(12)]
    assert [name for name, _ in calls] == expected
    for name, shapes in calls:
        assert (window_shape in shapes) == (name == "collect"), name
    expected_traces = {"step collect=False": 1, "swap": 1}
    if on_device:
        expected_traces["step collect=True"] = 1
    assert {name: traces.count(name) for name in set(traces)} == expected_traces
    if on_device:
        # The collecting step's program writes the window in place; the other
        # has nothing of the averaging in it.
        lowered = collecting.lower(model_state, state[0], params, data[0], rng)
        assert "dynamic_update_slice" in lowered.as_text()
        # In place means XLA copies no window (it would around a conditional,
        # or to let a read of the overwritten slot see the old value).
        window_type = f"f32[{','.join(map(str, window_shape))}]"
        copies = [
            line
            for line in lowered.compile().as_text().splitlines()
            if window_type in line and " copy(" in line
        ]
        assert not copies, copies
        rest = programs.averager.split_off(state[0], 1)[1]
        assert (
            "dynamic_update_slice"
            not in plain.lower(model_state, rest, params, data[0], rng).as_text()
        )
