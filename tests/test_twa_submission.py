"""TWA (averaging="twa") through the AlgoPerf builders: validation, training untouched,
at least as good as LAWA on its batches, exact resume, JAX rejection, and end to end."""

from __future__ import annotations

import copy
import importlib.util
import json
import types
from pathlib import Path

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
from polyak.algoperf.builder_torch import build_submission
from polyak.algoperf.export import ExportError, ExportRequest
from polyak.averaging.config import AveragingConfig, AveragingError, TWAError

REPO = Path(__file__).resolve().parent.parent
SUBMISSION = build_submission(make_torch_sgd, SGDConfig)
EVAL_STEPS = {1, 5, 9, 13, 17}
# A budget that pays for a fit at every eval: these tests are about the fit.
TWA = {
    "averaging": "twa",
    "averaging_every": 2,
    "lawa_window": 4,
    "twa_batches": 3,
    "twa_budget": 1e6,
}


def _init(hp):
    workload = TorchLinearWorkload()
    model, model_state = workload.init_model_fn(0)
    state = SUBMISSION.init_optimizer_state(workload, model, model_state, hp, None)
    return workload, model, state


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"twa_steps": -1}, "twa_steps=-1"),
        ({"twa_steps": 2.5}, "twa_steps=2.5"),
        ({"twa_batches": 0}, "twa_batches=0"),
        ({"twa_lr": 0.0}, "twa_lr=0.0"),
        ({"twa_lr": "fast"}, "twa_lr='fast'"),
        ({"twa_layerwise": -2}, "twa_layerwise=-2"),
        ({"twa_recompute_bn": "yes"}, "twa_recompute_bn='yes'"),
        ({"averaging_buffers": "average"}, "averaging_buffers='average'"),
    ],
)
def test_bad_twa_values_fail_at_init_naming_the_value(overrides, named) -> None:
    with pytest.raises(TWAError) as info:
        _init(hparams(**{**TWA, **overrides}))
    assert named in str(info.value)
    assert isinstance(info.value, AveragingError)


def test_twa_values_are_type_checked_whatever_the_mode() -> None:
    with pytest.raises(TWAError, match="twa_batches=0"):
        _init(hparams(averaging="lawa", twa_batches=0))
    # Valid ones are harmless for other modes, and the config round-trips for resume.
    config = AveragingConfig.from_hyperparameters(hparams(**TWA, twa_steps=7.0), 40)
    assert config.twa.steps == 7 and isinstance(config.twa.steps, int)
    assert AveragingConfig.from_dict(config.to_dict()) == config


def _train(hp, steps: int = 20, evals: set[int] = EVAL_STEPS):
    workload, model, state = _init(hp)
    data = batches(0, steps)
    live, evaluated = [], {}
    for i, batch in enumerate(data):
        state, model, _ = SUBMISSION.update_params(
            workload, model, None, None, hp, batch, None, state, [], i, None
        )
        live.append(copy.deepcopy(model.state_dict()))
        if i + 1 in evals:
            state, model, _ = SUBMISSION.prepare_for_eval(
                workload, model, None, None, hp, None, state, [], i + 1, None
            )
            evaluated[i + 1] = copy.deepcopy(model.state_dict())
    return workload, model, state, live, evaluated, data


def test_twa_never_changes_the_training_trajectory() -> None:
    *_, plain, _, _ = _train(hparams(), evals=set())
    *_, with_twa, evaluated, _ = _train(hparams(**TWA, twa_steps=5))
    for a, b in zip(plain, with_twa):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    # Before the first collection (step 1) TWA evaluates the live weights.
    assert all(torch.equal(evaluated[1][k], plain[0][k]) for k in plain[0])
    # Afterwards it evaluates something else.
    assert not torch.equal(evaluated[13]["0.weight"], plain[12]["0.weight"])


def _mean_loss(workload, model, kept) -> float:
    with torch.no_grad():
        total = 0.0
        for batch in kept:
            x = torch.as_tensor(batch["inputs"])
            per_example = ((model(x) - torch.as_tensor(batch["targets"])) ** 2).sum(-1)
            total += float(per_example.sum() / per_example.shape[0])
    return total / len(kept)


def test_twa_is_at_least_as_good_as_lawa_on_the_held_out_batches() -> None:
    hp = hparams(**TWA, twa_steps=30, twa_lr=0.3)
    workload, model, state, live, _, data = _train(hp, steps=13, evals=set())
    averager = state["averager"]
    fit, held_out = averager.twa_batches()
    # Collections at even steps: step 13's batch is in no checkpoint, so it
    # judges the fit, which runs on the last three batches the window has seen.
    assert [id(b) for b in fit] == [id(b) for b in data[9:12]]
    assert [id(b) for b in held_out] == [id(data[12])]
    state, model, _ = SUBMISSION.prepare_for_eval(
        workload, model, None, None, hp, None, state, [], 13, None
    )
    twa_loss = _mean_loss(workload, model, held_out)
    # Uniform LAWA over the same window (steps 6, 8, 10, 12), computed here.
    lawa = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in lawa.named_parameters():
            snaps = [live[s - 1][name].double() for s in (6, 8, 10, 12)]
            parameter.copy_(torch.stack(snaps).mean(0).float())
    lawa_loss = _mean_loss(workload, lawa, held_out)
    assert twa_loss <= lawa_loss * (1 + 1e-6)
    result = averager.last_twa_result
    assert result is not None and result.checkpoint_weights.shape == (1, 4)
    assert result.uniform_loss == pytest.approx(lawa_loss, rel=1e-5)
    # Training resumes from the live weights, not from the fit.
    averager.restore_live()
    assert all(torch.equal(p, live[-1][n]) for n, p in model.named_parameters())


def test_right_after_a_collection_twa_evaluates_the_uniform_average_without_a_fit() -> None:
    hp = hparams(**TWA, twa_steps=30, twa_lr=0.3)
    workload, model, state, live, _, _ = _train(hp, steps=14, evals=set())
    assert state["averager"].twa_batches()[1] == []
    state, model, _ = SUBMISSION.prepare_for_eval(
        workload, model, None, None, hp, None, state, [], 14, None
    )
    result = state["averager"].last_twa_result
    assert result is not None and result.chosen == "uniform" and result.uniform_loss is None
    for name, parameter in model.named_parameters():
        snaps = [live[s - 1][name].double() for s in (8, 10, 12, 14)]
        torch.testing.assert_close(parameter, torch.stack(snaps).mean(0).float())


def test_checkpoint_after_a_twa_eval_resumes_identically() -> None:
    hp = hparams(**TWA, twa_steps=5)
    workload = TorchLinearWorkload()
    data = batches(1, 18)

    def step(model, state, i):
        state, model, _ = SUBMISSION.update_params(
            workload, model, None, None, hp, data[i], None, state, [], i, None
        )
        return model, state

    def evaluate(model, state, i):
        state, model, _ = SUBMISSION.prepare_for_eval(
            workload, model, None, None, hp, None, state, [], i, None
        )
        return copy.deepcopy(model.state_dict())

    model, _ = workload.init_model_fn(0)
    state = SUBMISSION.init_optimizer_state(workload, model, None, hp, None)
    for i in range(8):
        model, state = step(model, state, i)
    evaluate(model, state, 8)
    # The module now holds TWA's weights and buffers; checkpoint as AlgoPerf does.
    saved_model = copy.deepcopy(model.state_dict())
    saved_state = {k: copy.deepcopy(v.state_dict()) for k, v in state.items()}
    assert saved_state["averager"]["buffer_stash"] is not None

    def finish(model, state):
        trajectory = []
        for i in range(8, 18):
            model, state = step(model, state, i)
            trajectory.append(copy.deepcopy(model.state_dict()))
        # Past twa_batches steps after the resume both runs keep the same batches.
        return trajectory, evaluate(model, state, 18)

    reference = finish(model, state)

    resumed_model, _ = workload.init_model_fn(5)
    resumed_model.load_state_dict(saved_model)
    resumed = SUBMISSION.init_optimizer_state(workload, resumed_model, None, hp, None)
    for key, value in saved_state.items():
        resumed[key].load_state_dict(value)
    again = finish(resumed_model, resumed)
    for a, b in zip(reference[0] + [reference[1]], again[0] + [again[1]]):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_twa_restores_the_live_buffers_after_the_eval() -> None:
    hp = hparams(**TWA, twa_steps=3)
    workload, model, state, *_ = _train(hp, steps=6, evals=set())
    with torch.no_grad():
        model.running_scale.fill_(7.0)  # any live value must come back unchanged
    expected = model.running_scale.clone()
    SUBMISSION.prepare_for_eval(workload, model, None, None, hp, None, state, [], 6, None)
    state["averager"].restore_live()
    assert torch.equal(model.running_scale, expected)


def test_jax_builder_rejects_twa() -> None:
    from polyak.algoperf.builder_jax import build_submission as build_jax

    submission = build_jax(make_jax_sgd, SGDConfig)
    workload = JaxLinearWorkload()
    params, model_state = workload.init_model_fn(0)
    with pytest.raises(AveragingError, match="PyTorch only"):
        submission.init_optimizer_state(workload, params, model_state, hparams(**TWA), None)


def test_export_accepts_twa_for_pytorch_only(tmp_path: Path) -> None:
    common = dict(
        optimizer="nadamw",
        averaging="twa",
        ruleset="external",
        name="x",
        authors="a",
        affiliations="b",
        out=tmp_path,
    )
    request = ExportRequest(framework="pytorch", **common)
    assert request.search_space_file.exists()
    with pytest.raises(ExportError, match="PyTorch only"):
        ExportRequest(framework="jax", **common)


def test_search_space_is_nadamw_plus_twa() -> None:
    spaces = REPO / "tuning_search_spaces"
    base = json.loads((spaces / "nadamw.json").read_text())
    twa = json.loads((spaces / "nadamw_twa.json").read_text())
    assert len(twa) == len(base)
    for plain, point in zip(base, twa):
        assert {k: point[k] for k in plain} == plain
        assert point["averaging"] == "twa"
        assert (point["averaging_every"], point["lawa_window"]) == (64, 20)
        AveragingConfig.from_hyperparameters(types.SimpleNamespace(**point), 1000)


def test_nadamw_with_twa_trains_digits_to_high_accuracy() -> None:
    from polyak.workloads.loop import LoopConfig, run_training
    from polyak.workloads.registry import make_workload

    path = REPO / "submissions" / "nadamw" / "pytorch" / "submission.py"
    spec = importlib.util.spec_from_file_location("nadamw_torch_submission", path)
    assert spec is not None and spec.loader is not None
    submission = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(submission)
    from polyak.optim.nadamw_config import NadamWConfig

    hp = types.SimpleNamespace(
        **NadamWConfig.DEFAULT_HYPERPARAMETERS,
        averaging="twa",
        averaging_every=2,
        lawa_window=5,
        twa_steps=10,
        twa_batches=4,
    )
    result = run_training(
        make_workload("digits", "pytorch"),
        submission,
        hp,
        framework="pytorch",
        config=LoopConfig(max_steps=600, checkpoint=False),
    )
    # digits' calibrated loss target is reached late by only about half of the
    # NadamW seeds within its step_hint, so this short run is held to the
    # accuracy bar the embedded suite used before calibration (at most 7 of 300 wrong).
    best_accuracy = max(e.metrics["validation/accuracy"] for e in result.evals)
    assert best_accuracy > 0.975, best_accuracy


def test_every_placement_gives_the_same_twa_weights() -> None:
    evaluated = {}
    for placement in ("device", "host", "sharded"):
        hp = hparams(**TWA, twa_steps=5, averaging_placement=placement)
        *_, evaluated[placement], _ = _train(hp, steps=12, evals={12})
    for placement in ("host", "sharded"):
        for key, value in evaluated["device"][12].items():
            assert torch.equal(evaluated[placement][12][key], value), (placement, key)


def test_a_fit_runs_whole_once_the_unspent_budget_pays_for_it() -> None:
    # A fit costs 4 steps + 2 passes over the one held-out batch = 6 passes;
    # the fits may spend half a pass per training step.
    hp = hparams(**{**TWA, "twa_steps": 4, "twa_budget": 0.5})
    workload, model, state = _init(hp)
    averager = state["averager"]
    fit_steps = {}
    for i, batch in enumerate(batches(0, 25)):
        state, model, _ = SUBMISSION.update_params(
            workload, model, None, None, hp, batch, None, state, [], i, None
        )
        if i + 1 in (5, 13, 17, 25):
            state, model, _ = SUBMISSION.prepare_for_eval(
                workload, model, None, None, hp, None, state, [], i + 1, None
            )
            result = averager.last_twa_result
            fit_steps[i + 1] = len(result.step_losses)
            if not result.step_losses:
                assert result.chosen == "uniform" and result.uniform_loss is None
            # Spent never exceeds the budget.
            assert averager.state_dict()["twa_passes_spent"] <= 0.5 * (i + 1)
    # Step 5: 6 > 2.5. Step 13: 6 <= 6.5. Step 17: 12 > 8.5. Step 25: 12 <= 12.5.
    assert fit_steps == {5: 0, 13: 4, 17: 0, 25: 4}
    assert averager.state_dict()["twa_passes_spent"] == 12


def test_the_spent_budget_survives_a_resume() -> None:
    hp = hparams(**{**TWA, "twa_steps": 4, "twa_budget": 0.5})
    state = _train(hp, steps=13, evals={13})[2]
    saved = state["averager"].state_dict()
    assert saved["twa_passes_spent"] == 6
    _, _, resumed = _init(hp)
    resumed["averager"].load_state_dict(saved)
    assert resumed["averager"].state_dict()["twa_passes_spent"] == 6


def test_a_budget_of_zero_is_refused() -> None:
    with pytest.raises(TWAError, match="twa_budget=0"):
        _init(hparams(**{**TWA, "twa_budget": 0}))
