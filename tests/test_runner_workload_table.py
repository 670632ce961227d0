"""The workload table: fallback facts, algoperf agreement, selection errors."""

from __future__ import annotations

import abc
import math

import pytest

from polyak.runner.errors import RunnerError, UnknownWorkloadError
from polyak.runner.workload_table import (
    ALGOPERF_WORKLOADS,
    FALLBACK_TABLE,
    get_workload,
    metric_direction,
    probe_direction,
    read_from_algoperf,
    select_workloads,
    workload_table,
)

# DESIGN.md's table (validation target, max runtime, step hint) and, from algoperf v0.6's
# workload classes, the test targets and eval periods; typed here independently.
EXPECTED = {
    # name: (metric, direction, validation, test, runtime, step_hint, eval period)
    "criteo1tb": ("loss", "min", 0.123735, 0.126041, 7703, 10666, 120),
    "fastmri": ("ssim", "max", 0.723653, 0.740633, 4430, 18094, 80),
    "imagenet_resnet": ("accuracy", "max", 0.77431, 0.6560, 66159, 195999, 510),
    "imagenet_vit": ("accuracy", "max", 0.77309, 0.6519, 69768, 167999, 420),
    "librispeech_conformer": ("wer", "min", 0.085884, 0.052981, 58015, 76000, 1440),
    "librispeech_deepspeech": ("wer", "min", 0.119936, 0.074143, 44405, 38400, 1440),
    "ogbg": ("mean_average_precision", "max", 0.28098, 0.268729, 12011, 52000, 240),
    "wmt": ("bleu", "max", 30.8491, 30.7219, 43336, 120000, 840),
}


def as_tuple(info):
    return (
        info.target_metric,
        info.direction,
        info.validation_target,
        info.test_target,
        info.max_runtime_sec,
        info.step_hint,
        info.eval_period_sec,
    )


def assert_matches(info, expected):
    got = as_tuple(info)
    assert got[:2] == expected[:2]
    for a, b in zip(got[2:], expected[2:]):
        assert math.isclose(a, b, rel_tol=1e-9), (info.name, got, expected)


def test_fallback_table_holds_the_v06_facts():
    assert set(FALLBACK_TABLE) == set(EXPECTED) == set(ALGOPERF_WORKLOADS)
    for name, expected in EXPECTED.items():
        assert_matches(get_workload(name, source="fallback"), expected)


def test_auto_source_never_crashes_and_agrees():
    table = workload_table()
    assert list(table) == list(ALGOPERF_WORKLOADS)
    for name, info in table.items():
        assert info.source.startswith(("algoperf", "fallback"))
        assert_matches(info, EXPECTED[name])


def test_installed_algoperf_agrees_with_fallback():
    pytest.importorskip("algoperf")
    for framework in ("jax", "pytorch"):
        for name in ALGOPERF_WORKLOADS:
            try:
                info = read_from_algoperf(name, framework)
            except ImportError as exc:  # that framework's extras may be missing
                pytest.skip(f"{name} ({framework}) not importable: {exc}")
            assert info.source.startswith("algoperf")
            assert_matches(info, EXPECTED[name])


def test_reached_uses_direction_and_equality():
    ogbg, criteo = FALLBACK_TABLE["ogbg"], FALLBACK_TABLE["criteo1tb"]
    assert ogbg.reached(0.28098) and ogbg.reached(0.3) and not ogbg.reached(0.2)
    assert criteo.reached(0.123735) and criteo.reached(0.1) and not criteo.reached(0.13)
    assert not ogbg.reached(math.nan)
    assert ogbg.validation_column == "validation/mean_average_precision"


def test_direction_from_names_and_probe():
    assert metric_direction("validation/wer") == "min"
    assert metric_direction("best_accuracy") == "max"
    with pytest.raises(RunnerError, match="perplexity"):
        metric_direction("perplexity")

    class LowerIsBetter:
        validation_target_value = 2.0

        def has_reached_validation_target(self, result):
            return result["validation/perplexity"] < self.validation_target_value

    assert probe_direction(LowerIsBetter(), "perplexity", 2.0) == "min"
    assert probe_direction(object(), "perplexity", 2.0) is None


def test_properties_read_without_running_the_constructor():
    from polyak.runner.workload_table import _uninitialized_instance

    class Base(abc.ABC):
        def __init__(self):
            raise AssertionError("constructor must not run")

        @abc.abstractmethod
        def init_model_fn(self, rng): ...

        @property
        def step_hint(self):
            return 123

    assert _uninitialized_instance(Base).step_hint == 123


def test_select_workloads():
    assert select_workloads("all", ALGOPERF_WORKLOADS) == list(ALGOPERF_WORKLOADS)
    assert select_workloads("wmt, ogbg,wmt", ALGOPERF_WORKLOADS) == ["wmt", "ogbg"]
    with pytest.raises(UnknownWorkloadError) as info:
        select_workloads("ogbg,resnet", ALGOPERF_WORKLOADS)
    assert "'resnet'" in str(info.value) and "imagenet_resnet" in str(info.value)
    with pytest.raises(UnknownWorkloadError, match="no workload"):
        select_workloads(" , ", ALGOPERF_WORKLOADS)
    with pytest.raises(UnknownWorkloadError, match="choices"):
        get_workload("mnist")
