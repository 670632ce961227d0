"""Parsing AlgoPerf's eval_measurements.csv and the time-to-target rules.

The fixture files under tests/fixtures/algoperf/ were written by AlgoPerf v0.6's
own submission_runner (mnist, synthetic data). The small made-up tables use the
same column layout and are worked out by hand in the comments.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from polyak.runner.errors import ResultsFormatError
from polyak.runner.results import (
    aggregate,
    discover_trials,
    find_time_to_target,
    load_results,
    median,
    read_eval_measurements,
)

FIXTURES = Path(__file__).parent / "fixtures" / "algoperf" / "algoperf_v06_run" / "fake_e2e"
# The header AlgoPerf writes (pandas, columns sorted by name).
ALGOPERF_COLUMNS = [
    "accumulated_eval_time",
    "accumulated_logging_time",
    "accumulated_submission_time",
    "global_step",
    "preemption_count",
    "score",
    "test/accuracy",
    "test/loss",
    "test/num_examples",
    "total_duration",
    "train/accuracy",
    "train/loss",
    "validation/accuracy",
    "validation/loss",
    "validation/num_examples",
]


def test_fixture_columns_and_values_are_parsed_exactly():
    table = read_eval_measurements(FIXTURES / "mnist_pytorch" / "trial_1" / "eval_measurements.csv")
    assert list(table.columns) == ALGOPERF_COLUMNS
    assert table.column("global_step") == [1.0, 30.0]
    assert table.column("accumulated_submission_time") == [
        0.055933475494384766,
        1.1018650531768799,
    ]
    assert table.column("validation/accuracy") == [0.1034, 0.0956]
    assert table.column("validation/loss") == [2.3417296875, 2.342657421875]
    assert table.time_column == "accumulated_submission_time"


def test_fixture_experiment_loads_with_targets_from_meta_data():
    trials = load_results(FIXTURES)
    keys = sorted((t.workload, t.framework, t.trial) for t in trials)
    assert keys == [("mnist", "jax", 1), ("mnist", "pytorch", 1), ("mnist", "pytorch", 2)]
    for trial in trials:
        # meta_data_0.json: accuracy, target 0.97, budget 60 s; accuracy is maximised.
        assert (trial.metric, trial.direction, trial.target) == ("accuracy", "max", 0.97)
        assert trial.max_runtime_sec == 60
        assert trial.label == "fake_e2e" and trial.study == "fake_e2e"
        assert not trial.hit and math.isinf(trial.time_to_target)
        assert trial.steps == (1, 30)
    by_key = {(t.framework, t.trial): t for t in trials}
    assert by_key[("jax", 1)].best_metric == 0.1015  # max(0.1015, 0.1002)
    assert by_key[("pytorch", 1)].best_metric == 0.1034
    assert by_key[("pytorch", 2)].best_metric == 0.0996
    (jax_result, torch_result) = aggregate(trials)
    assert (jax_result.framework, torch_result.framework) == ("jax", "pytorch")
    assert torch_result.num_trials == 2 and not torch_result.hit


def write_trial(
    root: Path,
    study: str,
    workload: str,
    trial: int,
    rows: list[tuple[int, float, float]],
    metric: str = "accuracy",
    target: float = 0.5,
    budget: float = 100.0,
    framework: str = "jax",
) -> Path:
    """One trial folder in AlgoPerf's layout; rows are (step, submission seconds, value)."""
    folder = root / study / f"{workload}_{framework}" / f"trial_{trial}"
    folder.mkdir(parents=True)
    columns = ["accumulated_submission_time", "global_step", "score", f"validation/{metric}"]
    with (folder / "eval_measurements.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for step, seconds, value in rows:
            writer.writerow([seconds, step, seconds, value])
    meta = {
        "workload.target_metric_name": metric,
        "workload.validation_target_value": target,
        "workload.max_allowed_runtime_sec": budget,
    }
    (folder / "meta_data_0.json").write_text(json.dumps(meta))
    return folder


def test_time_to_target_first_eval_reaching_target():
    steps, times = [10, 20, 30, 40], [5.0, 10.0, 15.0, 20.0]
    # Minimised: 0.2 <= 0.25 first at index 2 -> 15 s, step 30.
    hit = find_time_to_target(steps, times, [0.5, 0.3, 0.2, 0.1], 0.25, "min")
    assert (hit.hit, hit.time_to_target, hit.steps_to_target) == (True, 15.0, 30)
    # Equality counts (AlgoPerf's scoring uses <= and >=): 0.3 == 0.3 at index 1.
    hit = find_time_to_target(steps, times, [0.5, 0.3, 0.2, 0.1], 0.3, "min")
    assert (hit.time_to_target, hit.steps_to_target) == (10.0, 20)
    # Maximised: 0.7 >= 0.6 first at index 3 -> 20 s; NaN never counts.
    hit = find_time_to_target(steps, times, [0.1, math.nan, 0.5, 0.7], 0.6, "max")
    assert (hit.time_to_target, hit.steps_to_target) == (20.0, 40)
    # Never reached -> miss, infinity.
    hit = find_time_to_target(steps, times, [0.1, 0.2, 0.3, 0.4], 0.6, "max")
    assert not hit.hit and math.isinf(hit.time_to_target) and hit.steps_to_target is None


def test_budget_overrun_counts_as_miss():
    # Reached at 120 s with a 100 s budget: a miss, flagged as over budget.
    hit = find_time_to_target([1, 2], [50.0, 120.0], [0.1, 0.9], 0.5, "max", max_runtime_sec=100)
    assert not hit.hit and hit.over_budget and math.isinf(hit.time_to_target)
    # Exactly at the budget is still inside it.
    hit = find_time_to_target([1, 2], [50.0, 100.0], [0.1, 0.9], 0.5, "max", max_runtime_sec=100)
    assert hit.hit and hit.time_to_target == 100.0


def test_median_with_infinities():
    assert median([80.0, math.inf, 150.0]) == 150.0  # sorted 80, 150, inf
    assert median([80.0, 150.0]) == 115.0  # (80 + 150) / 2
    assert median([80.0, math.inf]) == math.inf  # (80 + inf) / 2
    assert median([math.inf, math.inf, 3.0]) == math.inf
    assert math.isnan(median([]))


def test_best_trial_per_study_then_median_over_studies(tmp_path):
    root = tmp_path / "nadamw"
    # target accuracy >= 0.5, budget 100 s
    # study_1: trial 1 hits at 60 s (step 6); trial 2 hits at 40 s (step 4) -> 40 s, step 4
    write_trial(root, "study_1", "ogbg", 1, [(2, 20.0, 0.2), (6, 60.0, 0.55)])
    write_trial(root, "study_1", "ogbg", 2, [(2, 20.0, 0.3), (4, 40.0, 0.6)])
    # study_2: trial 1 misses; trial 2 hits at 120 s > budget (a miss) -> inf
    write_trial(root, "study_2", "ogbg", 1, [(2, 20.0, 0.1), (10, 100.0, 0.4)])
    write_trial(root, "study_2", "ogbg", 2, [(2, 20.0, 0.1), (12, 120.0, 0.7)])
    # study_3: trial 1 hits at 90 s (step 9) -> 90 s
    write_trial(root, "study_3", "ogbg", 1, [(3, 30.0, 0.2), (9, 90.0, 0.51)])
    trials = load_results(root)
    assert {t.label for t in trials} == {"nadamw"}
    (result,) = aggregate(trials)
    assert result.study_times == {"study_1": 40.0, "study_2": math.inf, "study_3": 90.0}
    assert result.study_best_trials == {"study_1": 2, "study_2": None, "study_3": 1}
    # median(40, inf, 90) = 90; steps median(4, inf, 9) = 9
    assert result.time_to_target == 90.0 and result.hit
    assert result.steps_to_target == 9.0
    # best metric over all trials: 0.7 (the over-budget eval still shows as best value)
    assert result.best_metric == 0.7
    assert result.charged_seconds == 90.0
    over = next(t for t in trials if t.study == "study_2" and t.trial == 2)
    assert over.over_budget and not over.hit


def test_all_studies_miss_is_charged_the_budget(tmp_path):
    root = tmp_path / "run"
    write_trial(root, "s1", "wmt", 1, [(1, 10.0, 20.0)], metric="bleu", target=30.8, budget=500)
    write_trial(root, "s2", "wmt", 1, [(1, 10.0, 25.0)], metric="bleu", target=30.8, budget=500)
    (result,) = aggregate(load_results(root))
    assert not result.hit and math.isinf(result.time_to_target)
    assert result.charged_seconds == 500


def test_minimised_metric_direction_from_name(tmp_path):
    root = tmp_path / "run"
    # wer: minimised; 0.08 <= 0.085884 at 30 s
    write_trial(
        root,
        "s1",
        "librispeech_conformer",
        1,
        [(1, 10.0, 0.5), (3, 30.0, 0.08)],
        metric="wer",
        target=0.085884,
        budget=58015,
    )
    (trial,) = load_results(root)
    assert trial.direction == "min" and trial.time_to_target == 30.0 and trial.best_metric == 0.08


def test_layouts_discovered(tmp_path):
    # <experiment_dir>/<experiment_name>/<workload>_<framework>/trial_k: one study
    single = tmp_path / "exp" / "nadamw_study_1"
    write_trial(single.parent, "nadamw_study_1", "ogbg", 1, [(1, 1.0, 0.1)])
    (loc,) = discover_trials(single)
    assert (loc.label, loc.study, loc.workload, loc.framework, loc.trial) == (
        "nadamw_study_1",
        "nadamw_study_1",
        "ogbg",
        "jax",
        1,
    )
    # embedded suite: <root>/<label>/seed_<s>/<workload>_<framework>/trial_k
    embedded = tmp_path / "embedded"
    write_trial(embedded / "nadamw_lawa", "seed_3", "tiny", 2, [(1, 1.0, 0.1)], framework="pytorch")
    (loc,) = discover_trials(embedded)
    assert (loc.label, loc.study, loc.workload, loc.framework, loc.trial) == (
        "nadamw_lawa",
        "seed_3",
        "tiny",
        "pytorch",
        2,
    )
    assert discover_trials(embedded, label="override")[0].label == "override"


def test_self_tuning_budget_is_one_and_a_half_times(tmp_path):
    root = tmp_path / "run"
    folder = write_trial(root, "s1", "ogbg", 1, [(1, 120.0, 0.9)], budget=100)
    (folder / "flags_0.json").write_text(json.dumps({"tuning_ruleset": "self"}))
    (trial,) = load_results(root)
    assert trial.max_runtime_sec == 150 and trial.hit  # 120 s <= 1.5 * 100 s


def test_malformed_inputs_give_clear_errors(tmp_path):
    bad = tmp_path / "eval_measurements.csv"
    bad.write_text("validation/accuracy,score\n0.1,2.0\n")
    with pytest.raises(ResultsFormatError, match="global_step"):
        read_eval_measurements(bad)
    with pytest.raises(ResultsFormatError, match="does not exist"):
        read_eval_measurements(tmp_path / "nope.csv")
    with pytest.raises(ResultsFormatError, match="does not exist"):
        load_results(tmp_path / "missing_dir")
    # Unknown workload with no meta_data: no target to measure against.
    folder = tmp_path / "run" / "s1" / "mystery_jax" / "trial_1"
    folder.mkdir(parents=True)
    (folder / "eval_measurements.csv").write_text("global_step,score\n1,1.0\n")
    with pytest.raises(ResultsFormatError, match="no target known"):
        load_results(tmp_path / "run")
