"""Performance profiles and the benchmark score against hand-computed values.

AlgoPerf's discretisation: tau on np.linspace(1, 4, 100), i.e. tau_i = 1 + 3 i / 99,
and the trapezoid rule. A ratio r that lies exactly halfway between two grid
points contributes (4 - r) / 3 after normalisation, the same as the continuous
integral: the step is at grid interval (i, i + 1) and the trapezoid there
counts half of it. The ratios 1.5, 2.5 and 3.5 are such midpoints
(1 + 3 (i + 0.5) / 99 for i = 16, 49, 82), which makes hand computation exact.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from polyak.runner.errors import RunnerError
from polyak.runner.report import compare
from polyak.runner.results import aggregate, load_results
from polyak.runner.scoring import benchmark_scores, performance_profiles, performance_ratios
from polyak.runner.workload_table import metric_direction

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


# --- the leaderboard's pooled score, from a slice of the real v0.6 logs -------------------

V06_SLICE = Path(__file__).parent / "fixtures" / "algoperf" / "v06_external_tuning_slice.json"
# The v0.6 external-tuning leaderboard (mlcommons/submissions_algorithms README).
OFFICIAL_V06_SCORES = {"baseline": 0.4590, "shampoo": 0.6244}


def _miss_value(target: float, direction: str) -> float:
    return target + 1.0 if direction == "min" else target - 1.0


def _rebuild_v06_logs(root: Path) -> None:
    """eval_measurements.csv and meta_data_0.json files carrying the slice's numbers:
    every eval before the recorded first hit misses the target, the hit lands at its
    recorded eval index and submission time, and the last eval is the recorded one."""
    data = json.loads(V06_SLICE.read_text())
    for name, submission in data["submissions"].items():
        framework = submission["framework"]
        for workload, studies in submission["trials"].items():
            info = data["workloads"][workload]
            metric, target = info["metric"], info["target"]
            direction = metric_direction(metric)
            for study, trials in studies.items():
                for trial, entry in trials.items():
                    evals, last_step, last_time = entry[:3]
                    hit_index, hit_time = (entry[3], entry[4]) if len(entry) > 3 else (None, None)
                    folder = root / name / study / f"{workload}_{framework}" / f"trial_{trial}"
                    folder.mkdir(parents=True)
                    rows = ["global_step,accumulated_submission_time,score,validation/" + metric]
                    for i in range(evals):
                        if hit_index is not None and i <= hit_index:
                            seconds = hit_time * (i + 1) / (hit_index + 1)
                        else:
                            start = hit_time if hit_index is not None else 0.0
                            first = (hit_index + 1) if hit_index is not None else 0
                            seconds = start + (last_time - start) * (i - first + 1) / (
                                evals - first
                            )
                        hit = hit_index is not None and i >= hit_index
                        value = target if hit else _miss_value(target, direction)
                        step = max(1, round(last_step * (i + 1) / evals))
                        rows.append(f"{step},{seconds!r},{seconds!r},{value!r}")
                    (folder / "eval_measurements.csv").write_text("\n".join(rows) + "\n")
                    meta = {
                        "workload.target_metric_name": metric,
                        "workload.validation_target_value": target,
                        "workload.max_allowed_runtime_sec": info["budget"],
                        "workload.eval_period_time_sec": info["eval_period"],
                    }
                    (folder / "meta_data_0.json").write_text(json.dumps(meta))


def test_pooled_scores_reproduce_the_official_v06_leaderboard(tmp_path: Path) -> None:
    _rebuild_v06_logs(tmp_path)
    trials = load_results(tmp_path / "baseline") + load_results(tmp_path / "shampoo")
    (pooled,) = compare(aggregate(trials))
    # One profile for a JAX and a PyTorch submission, as the leaderboard ranks them.
    assert pooled.framework == "jax+pytorch" and set(pooled.labels) == {"baseline", "shampoo"}
    assert {k: round(v, 4) for k, v in pooled.scores.items()} == OFFICIAL_V06_SCORES
    # Scoring each framework on its own (each alone is "fastest everywhere it hits")
    # gives other numbers: the pooling is what makes the scores right.
    alone = {
        label: benchmark_scores(
            performance_profiles(
                {label: {w: r.time_to_target for w, r in pooled.results[label].items()}},
                pooled.workloads,
                num_workloads=8,
            )
        )[label]
        for label in pooled.labels
    }
    assert round(alone["baseline"], 4) != OFFICIAL_V06_SCORES["baseline"]
    # The logs have crashed trials (one eval at step 1): labelled unfinished, not misses,
    # and the report says the score rests on them.
    shampoo = pooled.results["shampoo"]
    assert shampoo["criteo1tb"].hit and shampoo["criteo1tb"].provisional
    assert shampoo["imagenet_resnet"].status == "unfinished"
    assert any("unfinished" in w and w.startswith("shampoo") for w in pooled.warnings)
    assert any("4/5 trial(s) per study" in w for w in pooled.warnings)


def test_selection_rule_is_the_earliest_eval_not_the_fastest_trial(tmp_path: Path) -> None:
    # Trial 1 hits at its 2nd eval (200 s), trial 2 at its 3rd eval but sooner (150 s):
    # the leaderboard takes trial 1 (smaller eval index), "fastest" takes trial 2.
    for trial, rows in (
        (1, [(1, 100.0, 0.1), (2, 200.0, 0.9)]),
        (2, [(1, 50, 0.1), (2, 100, 0.2), (3, 150, 0.9)]),
    ):
        folder = tmp_path / "run" / "study_0" / "ogbg_jax" / f"trial_{trial}"
        folder.mkdir(parents=True)
        lines = ["global_step,accumulated_submission_time,validation/mean_average_precision"]
        lines += [f"{s},{t},{v}" for s, t, v in rows]
        (folder / "eval_measurements.csv").write_text("\n".join(lines) + "\n")
    trials = load_results(tmp_path / "run")
    (leaderboard,) = aggregate(trials)
    (fastest,) = aggregate(trials, "fastest")
    assert leaderboard.study_best_trials == {"study_0": 1} and leaderboard.time_to_target == 200
    assert fastest.study_best_trials == {"study_0": 2} and fastest.time_to_target == 150


def test_unknown_times_never_count_as_the_best() -> None:
    times = {"A": {"w": math.nan}, "B": {"w": 100.0}, "C": {"w": 300.0}}
    ratios = performance_ratios(times, ["w"])
    assert math.isnan(ratios["A"]["w"]) and ratios["B"]["w"] == 1.0 and ratios["C"]["w"] == 3.0
