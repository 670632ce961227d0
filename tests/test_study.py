"""The averaging study end to end on a small real configuration, plus its building blocks.

The study runs NadamW (PyTorch) on the real ``diabetes`` workload for 200 steps:
no averaging, LAWA, EMA, both with the best-of selection, the "poor" EMA (ν = 1)
and the three constant-LR runs.
Every number in its tables is recomputed here from the per-run
``eval_measurements.csv`` files with plain csv/statistics code.
"""

from __future__ import annotations

import csv
import math
import shutil
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from polyak.runner import study
from polyak.runner.completion import MARKER_NAME
from polyak.runner.study import Setting, StudyConfigError, quick_settings, run_study

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_STEPS = 200


def _diabetes_target() -> float:
    from polyak.workloads.registry import make_workload

    return make_workload("diabetes", "pytorch").validation_target_value


TARGET = _diabetes_target()  # validation mse, lower is better (reached strictly below)


def _settings(root: Path) -> study.StudySettings:
    # The --quick configuration, narrowed to one optimizer/framework and one grid cell.
    return quick_settings(
        submissions=("nadamw",),
        frameworks=("pytorch",),
        grid_every=(8,),
        grid_windows=(5,),
        grid_betas=(0.9,),
        include_twa=False,
        max_global_steps=MAX_STEPS,
        eval_every_steps=20,
        experiment_dir=str(root),
        experiment_name="study",
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    base = tmp_path_factory.mktemp("study")
    settings = _settings(base / "runs")
    lines: list[str] = []
    outcome = run_study(
        settings,
        repo_root=REPO,
        output_dir=base / "docs",
        command="python scripts/study.py --test",
        out=lines.append,
    )
    return settings, outcome, base / "docs", lines


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _number(text: str) -> float:
    return math.inf if text == "" else float(text)


def test_every_planned_run_finished_and_progress_was_shown(finished):
    settings, outcome, _, lines = finished
    names = sorted({run.name for run in outcome.runs})
    assert names == sorted(
        [
            "nadamw",
            "nadamw_lawa_nu8_L5",
            "nadamw_ema_nu8_b0.9",
            "nadamw_lawa_nu8_L5_best",
            "nadamw_ema_nu8_b0.9_best",
            "nadamw_ema_nu1_b0.9",
            "nadamw_constlr",
            "nadamw_constlr_lawa_nu8_L5",
            "nadamw_constlr_ema_nu8_b0.9",
        ]
    )
    assert outcome.statuses == ("finished",) * len(outcome.runs)
    assert not outcome.analysis.missing
    assert any("about" in line and "left" in line for line in lines)
    for run in outcome.runs:
        assert (run.trial_dir(settings.root) / MARKER_NAME).is_file()


def test_files_exist_and_pngs_are_valid_images(finished):
    _, outcome, docs, _ = finished
    assets = docs / "results"
    assert outcome.markdown == docs / "results.md"
    for name in ("runs.csv", "time_to_target.csv", "sensitivity.csv", "decay.csv"):
        assert (assets / name).stat().st_size > 0
    pngs = sorted(assets.glob("*.png"))
    assert {p.name for p in pngs} >= {
        "headline_diabetes.png",
        "gap_diabetes.png",
        "time_to_target_diabetes.png",
        "sensitivity_diabetes.png",
        "decay_diabetes.png",
    }
    import matplotlib.image

    for path in pngs:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE), path
        width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
        assert width > 100 and height > 100, path
        assert matplotlib.image.imread(path).shape[:2] == (height, width)
    text = outcome.markdown.read_text(encoding="utf-8")
    for path in pngs:
        assert f"(results/{path.name})" in text


def test_tables_have_a_row_for_every_setting(finished):
    settings, outcome, docs, _ = finished
    text = outcome.markdown.read_text(encoding="utf-8")
    expected = {
        "time_to_target.csv": [
            Setting(),
            settings.lawa,
            settings.ema,
            Setting("lawa", every=8, window=5, select="best"),
            Setting("ema", every=8, beta=0.9, select="best"),
        ],
        "sensitivity.csv": [Setting(), *settings.lawa_grid(), *settings.ema_grid()],
        "decay.csv": settings.decay_settings(),
    }
    for name, wanted in expected.items():
        rows = _read_csv(docs / "results" / name)
        assert sorted(r["setting"] for r in rows) == sorted(s.describe() for s in wanted), name
        for setting in wanted:
            assert f"| {setting.describe()} |" in text or f"| {setting.short()} |" in text
    assert "EMA ν=1 β=0.9" in text
    assert "f19a7d92" not in text  # digits did not run; its hash must not be claimed
    assert "e9c1f7559552854a24dc45b41c446ce5f79f96e5da081bcce24b57492720b3f7" in text
    assert "python scripts/study.py --test" in text


def _first_hit(rows: list[dict[str, str]]) -> tuple[float, float]:
    for row in rows:
        if float(row["validation/mse"]) < TARGET:
            return float(row["global_step"]), float(row["accumulated_submission_time"])
    return math.inf, math.inf


def test_run_table_matches_the_per_run_csvs(finished):
    settings, _, docs, _ = finished
    rows = _read_csv(docs / "results" / "runs.csv")
    assert len(rows) == 9
    hits = 0
    for row in rows:
        evals = _read_csv(settings.root / row["path"] / "eval_measurements.csv")
        assert int(row["final_step"]) == int(evals[-1]["global_step"]) == MAX_STEPS
        steps, seconds = _first_hit(evals)
        assert _number(row["steps_to_target"]) == steps
        assert _number(row["time_to_target_sec"]) == pytest.approx(seconds)
        assert float(row["best_metric"]) == pytest.approx(
            min(float(e["validation/mse"]) for e in evals)
        )
        assert float(row["final_metric"]) == pytest.approx(float(evals[-1]["validation/mse"]))
        hits += math.isfinite(steps)
    assert 0 < hits < len(rows)  # some runs hit the target within 200 steps, some did not


def test_gains_over_raw_match_the_raw_runs_csv(finished):
    settings, _, docs, _ = finished
    rows = {r["part_label"]: r for r in _read_csv(docs / "results" / "runs.csv")}

    def curve(label: str) -> dict[int, float]:
        evals = _read_csv(settings.root / rows[label]["path"] / "eval_measurements.csv")
        return {int(e["global_step"]): float(e["validation/mse"]) for e in evals}

    for label, raw_label in (
        ("nadamw_lawa_nu8_L5", "nadamw"),
        ("nadamw_ema_nu1_b0.9", "nadamw"),
        ("nadamw_constlr_ema_nu8_b0.9", "nadamw_constlr"),
    ):
        averaged, raw = curve(label), curve(raw_label)
        gains = [raw[step] - averaged[step] for step in sorted(averaged)]  # mse: lower wins
        assert float(rows[label]["mean_gain_over_raw"]) == pytest.approx(statistics.mean(gains))
        assert float(rows[label]["final_gain_over_raw"]) == pytest.approx(gains[-1])
        # Averaging never changes training: the logged training losses are identical.
        assert float(rows[label]["max_train_loss_diff_vs_raw"]) == 0.0
    assert rows["nadamw"]["mean_gain_over_raw"] == ""


def test_summary_medians_match_the_run_table(finished):
    _, _, docs, _ = finished
    runs = _read_csv(docs / "results" / "runs.csv")
    for name in ("time_to_target.csv", "sensitivity.csv", "decay.csv"):
        for row in _read_csv(docs / "results" / name):
            members = [r for r in runs if r["part_label"] == row["label"]]
            assert len(members) == int(row["seeds"]) == 1
            steps = [_number(r["steps_to_target"]) for r in members]
            assert _number(row["steps_to_target_median"]) == statistics.median(steps)
            assert float(row["best_metric_median"]) == pytest.approx(
                statistics.median(float(r["best_metric"]) for r in members)
            )
            assert int(row["hits"]) == sum(r["hit"] == "True" for r in members)


def test_findings_quote_the_tables(finished):
    _, outcome, docs, _ = finished
    text = outcome.markdown.read_text(encoding="utf-8")
    runs = _read_csv(docs / "results" / "runs.csv")
    lawa = [r for r in runs if r["part_label"] == "nadamw_lawa_nu8_L5"]
    raw = [r for r in runs if r["part_label"] == "nadamw"]
    lawa_hits = sum(r["hit"] == "True" for r in lawa)
    raw_hits = sum(r["hit"] == "True" for r in raw)
    assert (
        f"**LAWA ν=8 L=5** hit the target in {lawa_hits} of 1 runs (no averaging: {raw_hits} of 1)"
        in text
    )
    # The constant-LR runs were emulated (NadamW has no schedule switch), and the page says so.
    decay = _read_csv(docs / "results" / "runs.csv")
    methods = {r["constant_lr_method"] for r in decay if r["schedule"] == "constant"}
    assert methods == {study.STRETCHED}
    assert "**emulation**" in text


def test_resume_skips_finished_runs_and_reruns_a_lost_one(finished):
    settings, outcome, _, _ = finished
    again = run_study(settings, repo_root=REPO, output_dir=None, out=lambda line: None)
    assert set(again.statuses) == {"skipped"}

    lost = next(r for r in outcome.runs if r.name == "nadamw_ema_nu1_b0.9")
    path = lost.trial_dir(settings.root)
    before = _read_csv(path / "eval_measurements.csv")
    shutil.rmtree(path)
    lines: list[str] = []
    resumed = run_study(settings, repo_root=REPO, output_dir=None, out=lines.append)
    statuses = dict(zip((r.name for r in resumed.runs), resumed.statuses))
    assert statuses.pop("nadamw_ema_nu1_b0.9") == "finished"
    assert set(statuses.values()) == {"skipped"}
    after = _read_csv(path / "eval_measurements.csv")
    assert [r["validation/mse"] for r in after] == [r["validation/mse"] for r in before]
    sessions = study.read_sessions(settings.root)
    assert [s["runs_finished"] for s in sessions] == [9, 0, 1]


def test_constant_lr_emulation_keeps_the_warmup_and_flattens_the_cosine():
    from polyak.optim.schedules import warmup_cosine_multiplier, warmup_steps_for
    from polyak.workloads.registry import make_workload

    stretch, hint = 100, 600
    overrides = study.constant_lr_overrides(study.STRETCHED, {"warmup_factor": 0.1}, stretch, hint)
    assert warmup_steps_for(overrides["warmup_factor"], stretch * hint) == 60  # 0.1 · 600
    workload = study.stretch_step_hint(make_workload("diabetes", "pytorch"), stretch)
    assert workload.step_hint == 60_000
    assert workload.workload_name == "diabetes"
    lowest = min(warmup_cosine_multiplier(n, 60, workload.step_hint) for n in range(60, 601))
    assert lowest > 0.999
    assert study.constant_lr_method({}, {"use_cosine_decay": True}) == study.COSINE_SWITCH
    # No optimizer reads "lr_schedule", so it is no switch: the schedule is emulated.
    assert study.constant_lr_method({"lr_schedule": "cosine"}, {}) == study.STRETCHED
    assert study.constant_lr_overrides(study.COSINE_SWITCH, {}, stretch, hint) == {
        "use_cosine_decay": False
    }


def test_bad_settings_fail_with_the_value_named():
    with pytest.raises(StudyConfigError, match="lawa needs every"):
        Setting("lawa", window=5)
    with pytest.raises(StudyConfigError, match=r"beta=1\.0"):
        Setting("ema", every=8, beta=1.0)
    with pytest.raises(StudyConfigError, match="averaging='swa'"):
        Setting("swa")
    with pytest.raises(StudyConfigError, match="schedule='linear'"):
        Setting(schedule="linear")
    with pytest.raises(StudyConfigError, match="seeds"):
        quick_settings(seeds=(-1,))
    with pytest.raises(StudyConfigError, match="tpu"):
        quick_settings(frameworks=("tpu",))
    with pytest.raises(StudyConfigError, match="select='max'"):
        Setting("lawa", every=8, window=5, select="max")
    with pytest.raises(StudyConfigError, match="select='best' needs averaging"):
        Setting(select="best")
    with pytest.raises(StudyConfigError, match=r"twa_budget=0\.5 with averaging='lawa'"):
        Setting("lawa", every=8, window=5, twa_budget=0.5)


def test_horizons_and_labels():
    assert Setting("lawa", every=8, window=20).horizon() == 160
    assert Setting("ema", every=8, beta=0.9).horizon() == pytest.approx(80)
    assert Setting("ema", every=1, beta=0.9, schedule="constant").label("nadamw") == (
        "nadamw_constlr_ema_nu1_b0.9"
    )
    assert Setting().raw() == Setting()
    best = Setting("lawa", every=8, window=5, select="best")
    assert best.label("nadamw") == "nadamw_lawa_nu8_L5_best"
    assert best.hyperparameters()["averaging_select"] == "best"
    assert best.raw() == Setting()
    capped = Setting("twa", every=8, window=5, twa_budget=0.5)
    assert capped.label("nadamw") == "nadamw_twa_nu8_L5_budget0.5"
    assert capped.hyperparameters()["twa_budget"] == 0.5
    assert "budget 0.5" in capped.short()
    assert Setting("lawa", 8, 5, schedule="constant").raw() == Setting(schedule="constant")


def test_spearman_matches_scipy_with_ties_and_misses():
    stats = pytest.importorskip("scipy.stats")
    x = [40, 80, 160, 160, 320, 640, 1280]
    y = [181, 191, 191, 251, math.inf, 401, math.inf]
    finite_y = [v if math.isfinite(v) else 10_000 for v in y]
    assert study.spearman(x, y) == pytest.approx(stats.spearmanr(x, finite_y).statistic)
    assert math.isnan(study.spearman([1, 2], [3, 4]))


def test_script_rebuilds_a_page_listing_missing_runs(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "study.py"),
            "--quick",
            "--analyze_only",
            "--submissions=nadamw",
            "--frameworks=pytorch",
            f"--experiment_dir={tmp_path / 'runs'}",
            f"--output_dir={tmp_path / 'docs'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = (tmp_path / "docs" / "results.md").read_text(encoding="utf-8")
    assert "## Missing runs" in text
    assert "--analyze_only" not in text.split("```")[1]  # the command that makes the runs
    assert "rebuilt from the finished runs" in text


def test_every_twa_row_writes_its_budget_into_the_point():
    # A row that left twa_budget to the default would be relabelled by a change of
    # the default, and finished runs would be read as the new setting.
    settings = study.StudySettings(twa_budgets=(0.1, 1e6))
    twa_rows = [s for s in settings.time_to_target_settings("pytorch") if s.averaging == "twa"]
    assert [s.hyperparameters()["twa_budget"] for s in twa_rows] == [0.1, 1e6]
    assert len({s.label("nadamw") for s in twa_rows}) == 2
    assert not [s for s in settings.time_to_target_settings("jax") if s.averaging == "twa"]
