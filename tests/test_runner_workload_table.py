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


# A stand-in for a newer installed algoperf whose registry has the language-model
# workload (metric ppl, minimised). The numbers are the fake's own, not AlgoPerf's:
# the test checks that they are read from the registry and used everywhere.
FAKE_REGISTRY = """
WORKLOADS = {
    'ogbg': {'workload_path': 'ogbg/ogbg', 'workload_class_name': 'OgbgWorkload'},
    'finewebedu_lm': {'workload_path': 'lm/lm', 'workload_class_name': 'LmWorkload'},
}
BASE_WORKLOADS = ['ogbg', 'finewebedu_lm']
"""
FAKE_LM_WORKLOAD = """
class LmWorkload:
    def __init__(self):
        raise AssertionError('constructor must not run')

    target_metric_name = 'ppl'
    validation_target_value = 22.5
    test_target_value = 23.0
    max_allowed_runtime_sec = 30000
    step_hint = 72000
    eval_period_time_sec = 600

    def has_reached_validation_target(self, eval_result):
        return eval_result['validation/ppl'] <= self.validation_target_value
"""


@pytest.fixture
def fake_algoperf(tmp_path, monkeypatch):
    import sys

    from polyak.runner import workload_table

    root = tmp_path / "fake_site"
    package = root / "algoperf" / "workloads"
    (package / "lm" / "lm_jax").mkdir(parents=True)
    for folder in (root / "algoperf", package, package / "lm", package / "lm" / "lm_jax"):
        (folder / "__init__.py").write_text("")
    (package / "workloads.py").write_text(FAKE_REGISTRY)
    (package / "lm" / "lm_jax" / "workload.py").write_text(FAKE_LM_WORKLOAD)
    monkeypatch.syspath_prepend(str(root))
    for name in [m for m in sys.modules if m == "algoperf" or m.startswith("algoperf.")]:
        monkeypatch.delitem(sys.modules, name)
    workload_table._cached_algoperf.cache_clear()
    workload_table._algoperf_base_workloads.cache_clear()
    yield
    workload_table._cached_algoperf.cache_clear()
    workload_table._algoperf_base_workloads.cache_clear()
    for name in [m for m in sys.modules if m == "algoperf" or m.startswith("algoperf.")]:
        del sys.modules[name]


def test_finewebedu_lm_end_to_end_when_the_installed_algoperf_has_it(fake_algoperf, tmp_path):
    import json

    from polyak.algoperf.batch_sizes import get_batch_size
    from polyak.runner.commands import RunSettings
    from polyak.runner.report import compare
    from polyak.runner.results import aggregate, load_results
    from polyak.runner.workload_table import benchmark_workloads, known_workloads

    # The list and the values come from the installed registry.
    assert benchmark_workloads() == known_workloads() == ("ogbg", "finewebedu_lm")
    info = get_workload("finewebedu_lm", "jax")
    assert (info.target_metric, info.direction, info.validation_target) == ("ppl", "min", 22.5)
    assert (info.max_runtime_sec, info.step_hint) == (30000, 72000)
    assert metric_direction("validation/ppl") == "min"
    assert get_batch_size("finewebedu_lm") == 64
    # The runner plans it, reading <data_dir>/finewebedu.
    from polyak.runner.launch import run_algoperf_suite

    repo = tmp_path / "repo"
    (repo / "submissions" / "nadamw" / "jax").mkdir(parents=True)
    (repo / "submissions" / "nadamw" / "jax" / "submission.py").write_text("# stub\n")
    (repo / "tuning_search_spaces").mkdir()
    (repo / "tuning_search_spaces" / "nadamw.json").write_text(json.dumps([{"lr": 0.1}]))
    lines: list[str] = []
    settings = RunSettings(
        framework="jax", data_dir=str(tmp_path / "data"), experiment_dir=str(tmp_path / "e")
    )
    run_algoperf_suite("finewebedu_lm", settings, repo_root=repo, dry_run=True, out=lines.append)
    assert any(f"--data_dir={tmp_path / 'data' / 'finewebedu'}" in line for line in lines)
    # Scoring: ppl is minimised, and the benchmark counts the registry's two workloads.
    for label, ppl in (("a", 22.0), ("b", 25.0)):
        folder = tmp_path / label / "study_0" / "finewebedu_lm_jax" / "trial_1"
        folder.mkdir(parents=True)
        (folder / "eval_measurements.csv").write_text(
            f"global_step,accumulated_submission_time,validation/ppl\n10,29900,{ppl}\n"
        )
    results = aggregate(load_results(tmp_path / "a") + load_results(tmp_path / "b"))
    assert [r.status for r in results] == ["hit", "miss"]
    (pooled,) = compare(results)
    assert pooled.profile is not None and pooled.profile.num_workloads == 2
    assert pooled.scores["a"] == pytest.approx(0.5)  # fastest on 1 of the 2 workloads
    assert any("ogbg" in w and "no results for 1 of the 2" in w for w in pooled.warnings)
