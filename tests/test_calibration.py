"""Calibrated targets: the median/late-hit logic on synthetic curves, and the shipped records."""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import pytest

from polyak.workloads import calibration
from polyak.workloads.calibration import CalibrationError, SeedCurve, summarize_seeds
from polyak.workloads.registry import EMBEDDED_WORKLOADS, make_workload

REPO = Path(__file__).resolve().parents[1]
STEP_HINT = 100


def _curve(seed: int, final: float, reach_at: int, start: float = 1.0) -> SeedCurve:
    """A loss falling linearly from ``start`` to ``final`` at ``reach_at``, flat after it."""
    steps = tuple(range(0, STEP_HINT + 1, 10))
    values = tuple(start + (final - start) * min(step, reach_at) / reach_at for step in steps)
    return SeedCurve(seed=seed, steps=steps, validation=values, test=values)


# ---- the logic, on synthetic curves ---------------------------------------------------


def test_target_is_the_median_best_and_each_seed_reaches_it_where_its_curve_crosses():
    finals = [0.30, 0.10, 0.20, 0.40, 0.25]
    curves = [_curve(seed, final, reach_at=90) for seed, final in enumerate(finals)]
    summary = summarize_seeds(curves, STEP_HINT, "min")
    assert summary["validation_target"] == statistics.median(finals) == 0.25
    assert [s["best_validation"] for s in summary["seeds"]] == pytest.approx(finals)
    reached = [s["steps_to_validation_target"] for s in summary["seeds"]]
    # Seeds whose best is worse than the median never reach it; the median seed
    # reaches it at its own best (step 90), the better ones earlier.
    assert reached[0] is None and reached[3] is None
    assert reached[4] == 90
    assert reached[1] < 90 and reached[1] <= reached[2] <= 90
    assert summary["median_steps_to_validation_target"] == 90
    assert summary["passes"] and summary["hit_late"] and summary["not_hit_by_half"]


def test_an_early_plateau_fails_the_late_hit_check():
    curves = [_curve(seed, 0.2 + 0.01 * seed, reach_at=30) for seed in range(5)]
    summary = summarize_seeds(curves, STEP_HINT, "min")
    assert summary["median_steps_to_validation_target"] == 30
    assert not summary["hit_late"] and not summary["passes"]
    assert summary["seeds_reaching_by_half"] == 3


def test_most_seeds_early_fails_even_if_the_median_is_late_enough():
    # Three seeds reach the median at step 40 or earlier: the median run is early.
    curves = [_curve(s, 0.2, reach_at=r) for s, r in enumerate((40, 40, 40, 90, 90))]
    summary = summarize_seeds(curves, STEP_HINT, "min")
    assert summary["seeds_reaching_by_half"] == 3 and not summary["passes"]


def test_only_evals_within_step_hint_count_and_higher_is_better_works():
    steps = (10, 50, 100, 150)
    curves = [
        SeedCurve(seed=s, steps=steps, validation=(0.1, 0.5, 0.8 + 0.01 * s, 0.99), test=steps)
        for s in range(5)
    ]
    summary = summarize_seeds(curves, STEP_HINT, "max")
    assert summary["validation_target"] == pytest.approx(0.82)  # the eval at 150 is past it
    assert summary["median_steps_to_validation_target"] == 100
    assert summary["passes"]


def test_seeds_that_never_reach_count_as_infinitely_late():
    assert calibration.median_steps([None, None, 10]) == float("inf")
    assert calibration.median_steps([5, None, 10]) == 10


def test_bad_inputs_are_refused_with_the_value():
    curves = [_curve(s, 0.2, 90) for s in range(4)]
    with pytest.raises(CalibrationError, match="4 seeds"):
        summarize_seeds(curves, STEP_HINT, "min")
    with pytest.raises(CalibrationError, match="direction='up'"):
        summarize_seeds([*curves, _curve(4, 0.2, 90)], STEP_HINT, "up")
    with pytest.raises(CalibrationError, match="equal length"):
        SeedCurve(seed=0, steps=(1, 2), validation=(0.1,), test=(0.1, 0.2))
    with pytest.raises(CalibrationError, match="must increase"):
        SeedCurve(seed=0, steps=(2, 1), validation=(0.1, 0.2), test=(0.1, 0.2))


# ---- the shipped records --------------------------------------------------------------


def _records() -> list[str]:
    return [n for n in EMBEDDED_WORKLOADS if calibration.calibration_path(n).is_file()]


def test_every_embedded_workload_ships_a_calibration():
    assert _records() == list(EMBEDDED_WORKLOADS)


@pytest.mark.parametrize("name", EMBEDDED_WORKLOADS)
def test_record_is_consistent_with_its_curves_and_its_workload(name):
    calibrated = calibration.load_calibration(name)
    record = calibrated.record
    assert len(record["seeds"]) >= calibration.MIN_SEEDS
    assert record["framework"] == "pytorch" and record["hyperparameters"]["averaging"] == "none"
    for key in ("date", "versions", "dataset", "search_space", "batch_size"):
        assert record[key], key

    # Re-derive every attempt from its recorded curves.
    for attempt in record["attempts"]:
        curves = [
            SeedCurve(c["seed"], tuple(c["steps"]), tuple(c["validation"]), tuple(c["test"]))
            for c in attempt["curves"]
        ]
        again = summarize_seeds(curves, attempt["step_hint"], attempt["direction"])
        again = json.loads(json.dumps(again))  # tuples and infinities as the file has them
        assert again == {k: v for k, v in attempt.items() if k != "curves"}
    passing = [a for a in record["attempts"] if a["passes"]]
    expected = passing[0] if passing else record["attempts"][-1]
    assert record["chosen"] == {k: v for k, v in expected.items() if k != "curves"}

    workload = make_workload(name, "pytorch")
    assert workload.step_hint == calibrated.step_hint == record["chosen"]["step_hint"]
    assert workload.validation_target_value == statistics.median(
        s["best_validation"] for s in record["chosen"]["seeds"]
    )
    assert workload.test_target_value == statistics.median(
        s["best_test"] for s in record["chosen"]["seeds"]
    )
    assert workload.target_metric_name == record["target_metric"]
    assert workload.target_direction == record["chosen"]["direction"]
    assert workload.recommended_batch_size == record["batch_size"]
    assert workload.dataset_fingerprint.sha256 == record["dataset"]["sha256"]


def test_a_target_that_is_not_the_recorded_median_is_refused():
    record = copy.deepcopy(calibration.load_calibration("diabetes").record)
    record["chosen"]["validation_target"] += 1e-6
    with pytest.raises(CalibrationError, match="not the median"):
        calibration._validated(record, "diabetes")
    with pytest.raises(CalibrationError, match="names workload 'diabetes'"):
        calibration._validated(calibration.load_calibration("diabetes").record, "digits")


def test_an_instance_may_shadow_calibrated_values_and_a_missing_record_says_how_to_make_one():
    workload = make_workload("diabetes", "pytorch")
    workload._step_hint = 7
    assert workload.step_hint == 7
    assert make_workload("diabetes", "pytorch").step_hint != 7
    with pytest.raises(CalibrationError, match=r"calibrate_workloads\.py --workloads=nothing"):
        calibration.load_calibration("nothing")


def test_records_are_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_data = config["tool"]["setuptools"]["package-data"]
    assert "*.json" in package_data["polyak.workloads.calibration"]
