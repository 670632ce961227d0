"""averaging_select="best": each eval gets the better of the average and the live
weights on the recent training batches, in both frameworks; training is untouched."""

from __future__ import annotations

import copy
from typing import Any

import jax
import numpy as np
import pytest
import torch

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
from polyak.averaging.config import AveragingConfig, AveragingError

JAX_SUBMISSION = builder_jax.build_submission(make_jax_sgd, SGDConfig)
TORCH_SUBMISSION = builder_torch.build_submission(make_torch_sgd, SGDConfig)
STEPS = 24
EVAL_STEPS = (1, 3, 6, 9, 12, 16, 20, 24)
KEPT = 3
# A slow EMA lags the live weights early on, and smooths their noise later, so
# both choices occur over the run.
EMA = {"averaging": "ema", "averaging_every": 1, "ema_beta": 0.8, "twa_batches": KEPT}
MODES = {
    "ema": EMA,
    "lawa": {"averaging": "lawa", "averaging_every": 2, "lawa_window": 4, "twa_batches": KEPT},
    "twa": {
        "averaging": "twa",
        "averaging_every": 2,
        "lawa_window": 4,
        "twa_batches": KEPT,
        "twa_steps": 5,
    },
    "lawa_host": {
        "averaging": "lawa",
        "averaging_every": 2,
        "lawa_window": 4,
        "twa_batches": KEPT,
        "averaging_placement": "host",
    },
}


def _mean_loss(kernel: np.ndarray, bias: np.ndarray, kept: list[dict[str, np.ndarray]]) -> float:
    """The eval loss on the kept batches, computed here in float64."""
    losses = []
    for batch in kept:
        out = batch["inputs"].astype(np.float64) @ kernel.astype(np.float64) + bias
        losses.append(((out - batch["targets"]) ** 2).sum(-1).mean())
    return float(np.mean(losses))


def test_a_bad_value_is_refused_naming_it() -> None:
    with pytest.raises(AveragingError, match=r"averaging_select='better'.*\('average', 'best'\)"):
        AveragingConfig.from_hyperparameters({"averaging_select": "better"}, 100)
    assert AveragingConfig.from_hyperparameters({}, 100).select == "average"


def _run_jax(hp: Any) -> tuple[list[Any], dict[int, Any], dict[int, dict[str, float]]]:
    workload = JaxLinearWorkload()
    params, model_state = workload.init_model_fn(0)
    state = JAX_SUBMISSION.init_optimizer_state(workload, params, model_state, hp, None)
    rng = jax.random.PRNGKey(0)
    live, evaluated, chosen = [], {}, {}
    for i, batch in enumerate(batches(0, STEPS)):
        state, params, model_state = JAX_SUBMISSION.update_params(
            workload, params, None, model_state, hp, batch, None, state, [], i, rng
        )
        live.append(jax.tree.map(np.array, params))
        if i + 1 in EVAL_STEPS:
            state, params, model_state = JAX_SUBMISSION.prepare_for_eval(
                workload, params, None, model_state, hp, None, state, [], i + 1, rng
            )
            evaluated[i + 1] = jax.tree.map(np.array, params)
            chosen[i + 1] = state[1].averager.metrics(state[0])
    return live, evaluated, chosen


def _run_torch(hp: Any) -> tuple[list[Any], dict[int, Any], dict[int, dict[str, float]]]:
    workload = TorchLinearWorkload()
    model, model_state = workload.init_model_fn(0)
    state = TORCH_SUBMISSION.init_optimizer_state(workload, model, model_state, hp, None)
    live, evaluated, chosen = [], {}, {}

    def weights(module: torch.nn.Module) -> dict[str, np.ndarray]:
        layer = module[0]
        return {
            "kernel": layer.weight.detach().numpy().T.copy(),
            "bias": layer.bias.detach().numpy().copy(),
        }

    for i, batch in enumerate(batches(0, STEPS)):
        state, model, _ = TORCH_SUBMISSION.update_params(
            workload, model, None, None, hp, batch, None, state, [], i, None
        )
        live.append(weights(model))
        if i + 1 in EVAL_STEPS:
            state, model, _ = TORCH_SUBMISSION.prepare_for_eval(
                workload, model, None, None, hp, None, state, [], i + 1, None
            )
            evaluated[i + 1] = weights(model)
            chosen[i + 1] = copy.deepcopy(state["averager"].metrics())
    return live, evaluated, chosen


RUNNERS = {"jax": _run_jax, "torch": _run_torch}


@pytest.mark.parametrize("framework", sorted(RUNNERS))
@pytest.mark.parametrize("mode", sorted(MODES))
def test_each_eval_gets_the_better_weights_and_training_is_untouched(
    framework: str, mode: str
) -> None:
    if framework == "jax" and mode == "twa":
        pytest.skip("averaging='twa' is PyTorch only")
    run = RUNNERS[framework]
    plain_live, _, _ = run(hparams())
    _, averages, _ = run(hparams(**MODES[mode]))
    best_live, evaluated, chosen = run(hparams(**MODES[mode], averaging_select="best"))
    for a, b in zip(plain_live, best_live):
        np.testing.assert_array_equal(a["kernel"], b["kernel"])
        np.testing.assert_array_equal(a["bias"], b["bias"])
    data = batches(0, STEPS)
    picks = []
    for step in EVAL_STEPS:
        kept = data[max(0, step - KEPT) : step]
        live = plain_live[step - 1]
        live_loss = _mean_loss(live["kernel"], live["bias"], kept)
        average_loss = _mean_loss(averages[step]["kernel"], averages[step]["bias"], kept)
        metrics = chosen[step]
        if abs(live_loss - average_loss) > 1e-5 * live_loss:
            uses_average = average_loss < live_loss
            assert metrics["averaging/eval_uses_average"] == float(uses_average), step
            expected = averages[step] if uses_average else live
            picks.append(uses_average)
            np.testing.assert_array_equal(evaluated[step]["kernel"], expected["kernel"])
        assert metrics["averaging/select_live_loss"] == pytest.approx(live_loss, rel=1e-5)
        assert "averaging/select_ms" in metrics
    assert True in picks and False in picks, picks


def test_the_default_evaluates_the_average_and_logs_no_selection() -> None:
    _, _, chosen = _run_jax(hparams(**EMA))
    assert all("averaging/eval_uses_average" not in m for m in chosen.values())
