"""The torch builder: AlgoPerf's flow with averaging swapped in and out."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fakes import SGD_DEFAULTS, SGDConfig, TorchLinearWorkload, batches, hparams, make_torch_sgd
from polyak.algoperf.builder_torch import build_submission
from polyak.averaging.config import AveragingError
from polyak.hyperparameters import (
    STRICT_ENV_VAR,
    UnknownHyperparameterError,
    UnknownHyperparameterWarning,
)
from polyak.optim.nadamw_config import NadamWConfig
from polyak.optim.nadamw_torch import make_nadamw
from polyak.optim.shampoo_config import ShampooConfig
from polyak.optim.shampoo_torch import make_shampoo

SUBMISSION = build_submission(make_torch_sgd, SGDConfig)
EVAL_STEPS = {1, 6, 12, 18}


def _run(hp, steps: int = 20, with_evals: bool = True):
    workload = TorchLinearWorkload()
    model, model_state = workload.init_model_fn(0)
    state = SUBMISSION.init_optimizer_state(workload, model, model_state, hp, None)
    live_trajectory, evaluated = [], {}
    for global_step, batch in enumerate(batches(0, steps)):
        state, model, model_state = SUBMISSION.update_params(
            workload, model, None, model_state, hp, batch, None, state, [], global_step, None
        )
        live_trajectory.append(copy.deepcopy(model.state_dict()))
        if with_evals and global_step + 1 in EVAL_STEPS:
            state, model, model_state = SUBMISSION.prepare_for_eval(
                workload, model, None, model_state, hp, None, state, [], global_step + 1, None
            )
            evaluated[global_step + 1] = copy.deepcopy(model.state_dict())
    return live_trajectory, evaluated, state


@pytest.mark.parametrize("mode", ["lawa", "ema"])
def test_averaging_never_changes_the_training_trajectory(mode: str) -> None:
    plain, _, _ = _run(hparams(), with_evals=False)
    averaged, evaluated, _ = _run(
        hparams(averaging=mode, averaging_every=2, lawa_window=3, ema_beta=0.8)
    )
    for a, b in zip(plain, averaged):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    # And the evaluated model is the average of the collected live weights.
    for step, state_dict in evaluated.items():
        collected = [plain[s - 1] for s in range(1, step + 1) if s % 2 == 0]
        if not collected:
            assert all(torch.equal(state_dict[k], plain[step - 1][k]) for k in state_dict)
            continue
        for key in ("0.weight", "0.bias"):
            snaps = [c[key].double().numpy() for c in collected]
            if mode == "lawa":
                expected = np.mean(snaps[-3:], axis=0)
            else:
                expected = snaps[0]
                for w in snaps[1:]:
                    expected = 0.8 * expected + 0.2 * w
            np.testing.assert_allclose(
                state_dict[key].double().numpy(), expected, rtol=1e-5, atol=1e-6
            )
        # Live BatchNorm-like statistics by default.
        assert torch.equal(state_dict["running_scale"], plain[step - 1]["running_scale"])


def test_checkpoint_after_eval_resumes_identically() -> None:
    hp = hparams(averaging="lawa", averaging_every=1, lawa_window=4)
    workload = TorchLinearWorkload()
    data = batches(1, 16)

    def step(model, state, i):
        state, model, _ = SUBMISSION.update_params(
            workload, model, None, None, hp, data[i], None, state, [], i, None
        )
        return model, state

    model, _ = workload.init_model_fn(0)
    state = SUBMISSION.init_optimizer_state(workload, model, None, hp, None)
    for i in range(8):
        model, state = step(model, state, i)
    state, model, _ = SUBMISSION.prepare_for_eval(
        workload, model, None, None, hp, None, state, [], 8, None
    )
    # AlgoPerf's torch checkpoint: the module (now holding the average) and
    # state_dict() of every optimizer_state value.
    saved_model = copy.deepcopy(model.state_dict())
    saved_state = {k: copy.deepcopy(v.state_dict()) for k, v in state.items()}
    for i in range(8, 16):
        model, state = step(model, state, i)

    resumed, _ = workload.init_model_fn(1)
    resumed_state = SUBMISSION.init_optimizer_state(workload, resumed, None, hp, None)
    resumed.load_state_dict(saved_model)
    for key, value in resumed_state.items():
        value.load_state_dict(saved_state[key])
    for i in range(8, 16):
        resumed, resumed_state = step(resumed, resumed_state, i)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_self_tuning_uses_defaults_with_averaging() -> None:
    workload = TorchLinearWorkload()
    model, _ = workload.init_model_fn(0)
    state = SUBMISSION.init_optimizer_state(workload, model, None, None, None)
    assert state["averager"].config.mode == "lawa"
    assert state["averager"].config.selects_best  # the study's never-worse choice
    assert state["optimizer"].param_groups[0]["lr"] == pytest.approx(SGD_DEFAULTS["learning_rate"])


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"averaging": "polyak"}, "averaging='polyak' is unknown"),
        ({"averaging": "ema", "ema_beta": 1.5}, "ema_beta=1.5"),
        ({"averaging": "lawa", "lawa_window": 0}, "lawa_window=0"),
        ({"averaging": "lawa", "averaging_every": -2}, "averaging_every=-2"),
    ],
)
def test_bad_averaging_fails_at_init(bad: dict, message: str) -> None:
    workload = TorchLinearWorkload()
    model, _ = workload.init_model_fn(0)
    with pytest.raises(AveragingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SUBMISSION.init_optimizer_state(workload, model, None, hparams(**bad), None)


def test_get_batch_size_knows_all_algoperf_workloads() -> None:
    for name in (
        "criteo1tb",
        "fastmri",
        "imagenet_resnet",
        "imagenet_vit",
        "librispeech_conformer",
        "librispeech_deepspeech",
        "ogbg",
        "wmt",
    ):
        assert SUBMISSION.get_batch_size(name) > 0
    with pytest.raises(ValueError, match="unsupported workload 'cifar'"):
        SUBMISSION.get_batch_size("cifar")


# -- hyperparameters are resolved once, at init ---------------------------------


def test_unknown_hyperparameter_names_warn_naming_them(monkeypatch) -> None:
    workload = TorchLinearWorkload()
    model, model_state = workload.init_model_fn(0)
    monkeypatch.delenv(STRICT_ENV_VAR, raising=False)
    with pytest.warns(UnknownHyperparameterWarning, match=r"\['averagin'\].*'averaging'"):
        state = SUBMISSION.init_optimizer_state(
            workload, model, model_state, hparams(averagin="lawa"), None
        )
    assert not state["averager"].config.enabled  # the misspelled name had no effect
    monkeypatch.setenv(STRICT_ENV_VAR, "1")
    with pytest.raises(UnknownHyperparameterError, match="averagin"):
        SUBMISSION.init_optimizer_state(
            workload, model, model_state, hparams(averagin="lawa"), None
        )


def test_known_names_do_not_warn(recwarn) -> None:
    workload = TorchLinearWorkload()
    model, model_state = workload.init_model_fn(0)
    SUBMISSION.init_optimizer_state(
        workload, model, model_state, hparams(averaging="ema", grad_clip=1.0), None
    )
    assert not [w for w in recwarn if issubclass(w.category, UnknownHyperparameterWarning)]


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
    workload = TorchLinearWorkload()
    model, model_state = workload.init_model_fn(0)
    with pytest.raises(ValueError, match=f"learning_rate={learning_rate!r}"):
        submission.init_optimizer_state(
            workload, model, model_state, {"learning_rate": learning_rate}, None
        )


def test_update_params_never_reads_the_hyperparameters() -> None:
    """The step uses what init resolved: a different point later changes nothing."""
    hp = hparams(averaging="lawa", averaging_every=2, lawa_window=3)
    _, evaluated, _ = _run(hp)
    workload = TorchLinearWorkload()
    model, model_state = workload.init_model_fn(0)
    state = SUBMISSION.init_optimizer_state(workload, model, model_state, hp, None)
    for global_step, batch in enumerate(batches(0, 20)):
        state, model, model_state = SUBMISSION.update_params(
            workload, model, None, model_state, None, batch, None, state, [], global_step, None
        )
        if global_step + 1 in EVAL_STEPS:
            state, model, model_state = SUBMISSION.prepare_for_eval(
                workload, model, None, model_state, None, None, state, [], global_step + 1, None
            )
            for key, value in evaluated[global_step + 1].items():
                assert torch.equal(model.state_dict()[key], value)
