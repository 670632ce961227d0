"""The report: tables, side-by-side ratios, accelerator-hours, plots, and the CLI."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from polyak.runner.report import build_report
from polyak.runner.results import load_results

FIXTURES = Path(__file__).parent / "fixtures" / "algoperf" / "algoperf_v06_run" / "fake_e2e"


def write_trial(root, workload, rows, metric, target, budget, trial=1, framework="pytorch"):
    folder = root / f"{workload}_{framework}" / f"trial_{trial}"
    folder.mkdir(parents=True)
    with (folder / "eval_measurements.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["accumulated_submission_time", "global_step", "score", f"validation/{metric}"]
        )
        for step, seconds, value in rows:
            writer.writerow([seconds, step, seconds, value])
    (folder / "meta_data_0.json").write_text(
        json.dumps(
            {
                "workload.target_metric_name": metric,
                "workload.validation_target_value": target,
                "workload.max_allowed_runtime_sec": budget,
            }
        )
    )


def test_side_by_side_hours_and_scores(tmp_path):
    base, lawa = tmp_path / "nadamw", tmp_path / "nadamw_lawa"
    # ogbg (>= 0.28098, budget 12011 s): nadamw hits at 7200 s, lawa at 3600 s
    write_trial(base, "ogbg", [(1000, 7200.0, 0.29)], "mean_average_precision", 0.28098, 12011)
    write_trial(lawa, "ogbg", [(500, 3600.0, 0.30)], "mean_average_precision", 0.28098, 12011)
    # wmt (>= 30.8491, budget 43336 s, eval period 840 s): nadamw misses (its last eval
    # is within an eval period of the budget, so it ran to its end), lawa hits at 36000 s
    write_trial(base, "wmt", [(1000, 42900.0, 29.0)], "bleu", 30.8491, 43336)
    write_trial(lawa, "wmt", [(1000, 36000.0, 31.0)], "bleu", 30.8491, 43336)
    trials = load_results(base) + load_results(lawa)
    files = build_report(trials, tmp_path / "report", num_accelerators=8, title="T")
    text = files.markdown.read_text()
    # hours = seconds x 8 / 3600, a miss charged at the budget:
    # nadamw (7200 + 43336) x 8 / 3600 = 112.3022...; lawa (3600 + 36000) x 8 / 3600 = 88
    scores = {row["run"]: row for row in csv.DictReader(files.tables["scores"].open())}
    assert float(scores["nadamw"]["accelerator_hours"]) == pytest.approx(50536 * 8 / 3600)
    assert float(scores["nadamw_lawa"]["accelerator_hours"]) == pytest.approx(88.0)
    assert "88 (0.78x)" in text  # 88 / 112.302 = 0.7836
    assert "3600.0 (0.50x)" in text  # ogbg: 3600 / 7200
    # AlgoPerf score over the 8 benchmark workloads (6 of them not run, so misses):
    # lawa is fastest on both -> 2/8; nadamw: ogbg ratio 2 (about 2/3 credit), wmt miss.
    assert float(scores["nadamw_lawa"]["benchmark_score"]) == pytest.approx(2 / 8)
    assert float(scores["nadamw"]["benchmark_score"]) == pytest.approx((4 - 2) / 3 / 8, abs=0.001)
    comparison = list(csv.DictReader(files.tables["comparison"].open()))
    ogbg_lawa = next(r for r in comparison if r["run"] == "nadamw_lawa" and r["workload"] == "ogbg")
    assert float(ogbg_lawa["ratio_to_baseline"]) == pytest.approx(0.5)
    assert {p.name for p in files.plots} == {
        "ogbg_pytorch.png",
        "wmt_pytorch.png",
        "performance_profile.png",
    }
    assert "![ogbg_pytorch](plots/ogbg_pytorch.png)" in text
    assert not list((tmp_path / "report").glob(".*.tmp"))  # no temporary files left


def test_report_cli_compares_folders(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    shutil.copytree(FIXTURES, first)
    shutil.copytree(FIXTURES, second)
    script = Path(__file__).resolve().parents[1] / "scripts" / "report.py"
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            f"--experiments={first},{second}",
            "--labels=base,other",
            f"--output_dir={tmp_path / 'out'}",
            "--noplots",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "base" in done.stdout and "other" in done.stdout
    text = (tmp_path / "out" / "report.md").read_text()
    # Both folders hold a jax and a pytorch run: one pooled profile of four submissions.
    assert "## Side by side (pooled: jax+pytorch), baseline `base (jax)`" in text
    assert "| workload | base (jax) | base (pytorch) | other (jax) | other (pytorch) |" in text
    assert not (tmp_path / "out" / "plots").exists()
    bad = subprocess.run(
        [sys.executable, str(script), f"--experiments={tmp_path / 'missing'}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    a_file = tmp_path / "a_file.csv"
    a_file.write_text("x\n")
    bad = subprocess.run(
        [sys.executable, str(script), f"--experiments={a_file}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2 and f"{a_file} is a file, not an experiment directory" in bad.stderr


def test_unfinished_trials_are_not_misses_and_the_report_warns(tmp_path):
    run = tmp_path / "nadamw"
    # A crash after 100 s of a 12011 s budget: no hit, no sign that it ran to its end.
    write_trial(run, "ogbg", [(10, 100.0, 0.1)], "mean_average_precision", 0.28098, 12011)
    files = build_report(load_results(run), tmp_path / "report", plots=False)
    text = files.markdown.read_text()
    assert "## WARNING: not a leaderboard-grade score" in text
    assert "1 trial(s) unfinished" in text and "1 studies where the leaderboard scores 3" in text
    assert "1 trial(s) per study where the external ruleset asks for 5" in text
    assert "7 of the 8 scored workloads" in text
    (row,) = csv.DictReader(files.tables["workloads"].open())
    assert row["status"] == "unfinished" and row["unfinished_trials"] == "1"
    (score,) = csv.DictReader(files.tables["scores"].open())
    assert float(score["accelerator_hours"]) == 0.0  # not charged the budget
    assert "| ogbg | " in text and "| unfinished |" in text
