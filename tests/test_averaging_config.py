"""The averaging config: validation, defaults and the collection rule."""

from __future__ import annotations

import types

import pytest
from hypothesis import given
from hypothesis import strategies as st

from polyak.algoperf.trial_config import TrainingConfig, TrainingConfigError
from polyak.averaging.config import AveragingConfig, AveragingError, TWAConfig, default_every
from polyak.hyperparameters import (
    STRICT_ENV_VAR,
    UnknownHyperparameterError,
    UnknownHyperparameterWarning,
    check_names,
)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("averaging", "swa", "averaging='swa' is unknown"),
        ("ema_beta", 1.0, "ema_beta=1.0 must lie in the open interval (0, 1)"),
        ("ema_beta", 0.0, "ema_beta=0.0"),
        ("ema_beta", -0.5, "ema_beta=-0.5"),
        ("lawa_window", 0, "lawa_window=0 must be an integer >= 1"),
        ("lawa_window", 2.5, "lawa_window=2.5"),
        ("averaging_every", 0, "averaging_every=0 must be an integer >= 1"),
        ("averaging_every", True, "averaging_every=True"),
        ("averaging_start_frac", 1.0, "averaging_start_frac=1.0 must lie in [0, 1)"),
        ("averaging_start_frac", -0.1, "averaging_start_frac=-0.1"),
        ("averaging_placement", "gpu", "averaging_placement='gpu' is unknown"),
        ("averaging_buffers", "mean", "averaging_buffers='mean' is unknown"),
    ],
)
def test_bad_hyperparameters_name_the_value(name: str, value: object, message: str) -> None:
    hp = {"averaging": "lawa", name: value}
    with pytest.raises(AveragingError) as error:
        AveragingConfig.from_hyperparameters(hp, step_hint=1000)
    assert message in str(error.value)


def test_missing_averaging_means_none_and_none_hyperparameters_work() -> None:
    assert AveragingConfig.from_hyperparameters({"learning_rate": 1.0}, 100).mode == "none"
    assert AveragingConfig.from_hyperparameters(None, 100).mode == "none"


def test_attribute_access_and_json_floats() -> None:
    hp = types.SimpleNamespace(averaging="LAWA", averaging_every=64.0, lawa_window=20.0)
    config = AveragingConfig.from_hyperparameters(hp, step_hint=10_000)
    assert (config.mode, config.every, config.window) == ("lawa", 64, 20)
    assert isinstance(config.every, int) and isinstance(config.window, int)


@given(step_hint=st.integers(1, 10_000_000), window=st.integers(1, 200))
def test_default_horizon_is_about_one_percent(step_hint: int, window: int) -> None:
    every = default_every(step_hint, window)
    assert every >= 1
    if step_hint * 0.01 / window >= 1:
        # ν·L within half a ν of 1% of the budget.
        assert abs(every * window - 0.01 * step_hint) <= window / 2 + 1e-9


@given(
    every=st.integers(1, 50),
    start_frac=st.floats(0.0, 0.99),
    step_hint=st.integers(1, 5000),
    step=st.integers(1, 10_000),
)
def test_collection_rule(every: int, start_frac: float, step_hint: int, step: int) -> None:
    config = AveragingConfig(mode="ema", every=every, start_frac=start_frac, step_hint=step_hint)
    expected = step >= start_frac * step_hint and step % every == 0
    assert config.should_collect(step) == expected
    assert not AveragingConfig(mode="none").should_collect(step)


# A value other than the default for every name of the tables, and the field it
# must land in (read back through the nested TWA config).
NON_DEFAULT_POINT = {
    "averaging": "twa",
    "averaging_every": 7,
    "lawa_window": 5,
    "ema_beta": 0.5,
    "averaging_start_frac": 0.25,
    "averaging_buffers": "live",
    "averaging_placement": "host",
    "averaging_select": "best",
    "twa_steps": 3,
    "twa_batches": 2,
    "twa_lr": 0.3,
    "twa_layerwise": 2,
    "twa_recompute_bn": False,
    "twa_budget": 0.5,
}


def test_every_name_is_read_into_its_field() -> None:
    config = AveragingConfig.from_hyperparameters(NON_DEFAULT_POINT, step_hint=1000)
    assert set(NON_DEFAULT_POINT) == AveragingConfig.HYPERPARAMETER_NAMES
    tables = {**AveragingConfig.HYPERPARAMETERS, **TWAConfig.HYPERPARAMETERS}
    for name, value in NON_DEFAULT_POINT.items():
        holder = config.twa if name in TWAConfig.HYPERPARAMETERS else config
        assert getattr(holder, tables[name]) == value, name
    assert AveragingConfig.from_dict(config.to_dict()) == config


def test_missing_twa_names_take_the_field_defaults() -> None:
    config = AveragingConfig.from_hyperparameters({"averaging": "twa"}, step_hint=1000)
    assert config.twa == TWAConfig()


def test_training_config_reads_the_optimizer_defaults_and_validates() -> None:
    defaults = {"label_smoothing": 0.1, "dropout_rate": 0.2}
    config = TrainingConfig.from_hyperparameters({"dropout_rate": 0.3}, defaults)
    assert (config.label_smoothing, config.dropout_rate, config.grad_clip) == (0.1, 0.3, None)
    with pytest.raises(TrainingConfigError, match=r"grad_clip=-1\.0"):
        TrainingConfig.from_hyperparameters({"grad_clip": -1.0}, defaults)
    with pytest.raises(TrainingConfigError, match=r"dropout_rate=1\.5"):
        TrainingConfig.from_hyperparameters({"dropout_rate": 1.5}, defaults)


def test_check_names_names_the_unknown_and_the_known(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STRICT_ENV_VAR, raising=False)
    with pytest.warns(UnknownHyperparameterWarning, match=r"\['lawa_windw'\].*'lawa_window'"):
        check_names({"lawa_windw": 4, "lawa_window": 4}, ["lawa_window"])
    check_names(None, ["lawa_window"])  # self-tuning: nothing to check
    monkeypatch.setenv(STRICT_ENV_VAR, "1")
    with pytest.raises(UnknownHyperparameterError, match="lawa_windw"):
        check_names(types.SimpleNamespace(lawa_windw=4), ["lawa_window"])
