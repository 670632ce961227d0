"""Performance profiles and the benchmark score against hand-computed values.

AlgoPerf's discretisation: tau on np.linspace(1, 4, 100), i.e. tau_i = 1 + 3 i / 99,
and the trapezoid rule. A ratio r that lies exactly halfway between two grid
points contributes (4 - r) / 3 after normalisation, the same as the continuous
integral: the step is at grid interval (i, i + 1) and the trapezoid there
counts half of it. The ratios 1.5, 2.5 and 3.5 are such midpoints
(1 + 3 (i + 0.5) / 99 for i = 16, 49, 82), which makes hand computation exact.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from polyak.runner.errors import RunnerError
from polyak.runner.scoring import benchmark_scores, performance_profiles, performance_ratios

INF = math.inf


def test_two_submissions_two_workloads():
    times = {"A": {"w1": 100.0, "w2": 250.0}, "B": {"w1": 150.0, "w2": 100.0}}
    profile = performance_profiles(times, ["w1", "w2"])
    # ratios: A w1 = 1, A w2 = 2.5; B w1 = 1.5, B w2 = 1
    assert profile.ratios == {"A": {"w1": 1.0, "w2": 2.5}, "B": {"w1": 1.5, "w2": 1.0}}
    assert np.array_equal(profile.taus, np.linspace(1.0, 4.0, 100))
    scores = benchmark_scores(profile)
    # A: (1/2) * [1 + (4 - 2.5)/3] = (1/2) * 1.5 = 0.75
    # B: (1/2) * [(4 - 1.5)/3 + 1] = (1/2) * (2.5/3 + 1) = 0.9166...
    assert scores["A"] == pytest.approx(0.75, abs=1e-12)
    assert scores["B"] == pytest.approx(0.5 * (2.5 / 3 + 1), abs=1e-12)
    # rho at tau = 1: A solved w1 fastest, B solved w2 fastest -> 1/2 each
    assert profile.rho["A"][0] == 0.5 and profile.rho["B"][0] == 0.5
    # rho at tau = 4: both within 4x everywhere -> 1
    assert profile.rho["A"][-1] == 1.0 and profile.rho["B"][-1] == 1.0


def test_denominator_is_the_benchmark_workload_count():
    # AlgoPerf divides by the 8 benchmark workloads even when fewer were run.
    times = {"A": {"w1": 100.0, "w2": 250.0}, "B": {"w1": 150.0, "w2": 100.0}}
    scores = benchmark_scores(performance_profiles(times, ["w1", "w2"], num_workloads=8))
    assert scores["A"] == pytest.approx(0.75 * 2 / 8, abs=1e-12)  # 1.5 / 8
    assert scores["B"] == pytest.approx((2.5 / 3 + 1) / 8, abs=1e-12)
    with pytest.raises(RunnerError, match="smaller"):
        performance_profiles(times, ["w1", "w2"], num_workloads=1)


def test_misses_and_the_four_times_cut():
    times = {
        "A": {"w1": 100.0, "w2": INF, "w3": 200.0},
        "B": {"w1": 350.0, "w2": 400.0, "w3": INF},
        "C": {"w1": 500.0, "w2": INF, "w3": INF},
    }
    ratios = performance_ratios(times, ["w1", "w2", "w3"])
    # w1: best 100 -> A 1, B 3.5, C 5 > 4 -> cut to inf
    # w2: best 400 (B) -> A inf, B 1, C inf ; w3: best 200 (A) -> A 1, B inf, C inf
    assert ratios["A"] == {"w1": 1.0, "w2": INF, "w3": 1.0}
    assert ratios["B"] == {"w1": 3.5, "w2": 1.0, "w3": INF}
    assert ratios["C"] == {"w1": INF, "w2": INF, "w3": INF}
    scores = benchmark_scores(performance_profiles(times, ["w1", "w2", "w3"]))
    # A: (1 + 0 + 1) / 3 = 2/3 ; B: ((4 - 3.5)/3 + 1 + 0) / 3 = (1/6 + 1)/3 = 7/18 ; C: 0
    assert scores["A"] == pytest.approx(2 / 3, abs=1e-12)
    assert scores["B"] == pytest.approx(7 / 18, abs=1e-12)
    assert scores["C"] == 0.0
    # The 4x cut holds even on a wider tau range: C's 5x never counts.
    wide = performance_profiles(times, ["w1", "w2", "w3"], max_tau=6.0, num_points=51)
    assert wide.rho["C"][-1] == 0.0
    assert wide.rho["B"][-1] == pytest.approx(2 / 3)


def test_unsolved_workload_and_missing_entries_count_nowhere():
    times = {"A": {"w1": 10.0, "w2": INF}, "B": {"w1": 20.0}}  # B never ran w2
    profile = performance_profiles(times, ["w1", "w2"])
    assert math.isnan(profile.ratios["A"]["w2"]) and math.isnan(profile.ratios["B"]["w2"])
    scores = benchmark_scores(profile)
    # A: (1 + 0) / 2 = 0.5 ; B: ratio 2 is a grid point -> not a midpoint; check bounds instead
    assert scores["A"] == pytest.approx(0.5, abs=1e-12)
    # continuous value (4 - 2)/3/2 = 1/3; the 100-point trapezoid is within one grid step
    assert scores["B"] == pytest.approx(1 / 3, abs=3 / 99 / 3 / 2)


def test_reference_submission_and_ties():
    times = {"A": {"w1": 100.0}, "B": {"w1": 100.0}, "C": {"w1": 250.0}}
    ratios = performance_ratios(times, ["w1"], reference="C")
    assert ratios == {"A": {"w1": 0.4}, "B": {"w1": 0.4}, "C": {"w1": 1.0}}
    scores = benchmark_scores(performance_profiles(times, ["w1"]))
    assert scores["A"] == scores["B"] == 1.0
    assert scores["C"] == pytest.approx(0.5, abs=1e-12)  # ratio 2.5 -> (4 - 2.5)/3
    with pytest.raises(RunnerError, match="reference"):
        performance_ratios(times, ["w1"], reference="D")
    with pytest.raises(RunnerError, match="no submissions"):
        performance_profiles({}, ["w1"])
