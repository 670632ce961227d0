"""Launching: resume skips finished trials, crashes are reported and the rest goes on,
markers are atomic, progress lines come from AlgoPerf's log format, clear errors.

A fake process runner stands in for AlgoPerf's submission_runner: it writes what
AlgoPerf writes (trial folders, eval_measurements.csv, the end-of-training row of
measurements.csv) and prints AlgoPerf-style log lines.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from polyak import files
from polyak.runner import completion, launch
from polyak.runner.commands import RunSettings, study_seed
from polyak.runner.errors import (
    AlgoPerfMissingError,
    DataDirError,
    LaunchConfigError,
    RunnerError,
    SearchSpaceError,
)
from polyak.runner.launch import run_algoperf_suite
from polyak.runner.progress import ProgressTracker, parse_metrics
from polyak.runner.workload_table import FALLBACK_TABLE

POINTS = [{"learning_rate": 0.001 * (k + 1)} for k in range(3)]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for framework in ("pytorch", "jax"):
        folder = root / "submissions" / "nadamw" / framework
        folder.mkdir(parents=True)
        (folder / "submission.py").write_text("# stub\n")
    (root / "tuning_search_spaces").mkdir()
    (root / "tuning_search_spaces" / "nadamw.json").write_text(json.dumps(POINTS))
    return root


@pytest.fixture
def settings(tmp_path: Path) -> RunSettings:
    data = tmp_path / "data"
    for dataset in ("ogbg", "wmt"):
        (data / dataset).mkdir(parents=True)
    return RunSettings(
        framework="jax",
        data_dir=str(data),
        experiment_dir=str(tmp_path / "exp"),
        experiment_name="exp_a",
        num_tuning_trials=3,
        num_studies=1,
    )


@pytest.fixture(autouse=True)
def algoperf_present(monkeypatch):
    monkeypatch.setattr(launch, "check_algoperf_installed", lambda: None)


def flag_value(argv, name):
    for arg in argv:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


class FakeAlgoPerf:
    """Emulates submission_runner for each plan; ``crash_in`` = {workload: trial}."""

    def __init__(self, crash_in=None):
        self.crash_in = crash_in or {}
        self.calls = []

    def __call__(self, plan, on_line):
        self.calls.append(list(plan.argv))
        if "--overwrite" in plan.argv and plan.workload_dir.exists():
            shutil.rmtree(plan.workload_dir)  # what AlgoPerf's --overwrite does
        start = int(flag_value(plan.argv, "hparam_start_index") or 0)
        total = int(flag_value(plan.argv, "num_tuning_trials"))
        metric = FALLBACK_TABLE[plan.workload].validation_column
        space = json.loads((plan.cwd / flag_value(plan.argv, "tuning_search_space")).read_text())
        for index in range(start, total):
            trial = index + 1
            folder = plan.workload_dir / f"trial_{trial}"
            folder.mkdir(parents=True, exist_ok=True)
            # AlgoPerf keeps an existing hparams.json (it reuses it on resume).
            if not (folder / "hparams.json").exists():
                (folder / "hparams.json").write_text(json.dumps(space[index]))
            on_line(f"I0101 logging.py:1] --- Tuning run {trial}/{total} ---")
            (folder / "eval_measurements.csv").write_text(
                f"accumulated_submission_time,global_step,score,{metric}\n1.5,1,1.5,0.01\n"
            )
            on_line(
                f"I0101 submission_runner.py:2] Time since start: 3.00s, \tStep: 1, "
                f"\t{{'{metric}': np.float64(0.01), 'accumulated_submission_time': 1.5}}"
            )
            if self.crash_in.get(plan.workload) == trial:
                on_line("Traceback (most recent call last):")
                on_line("RuntimeError: CUDA out of memory")
                return 1
            (folder / "measurements.csv").write_text(
                "global_step,loss,score,accumulated_submission_time\n"
                "1,2.3,1.5,1.5\n"
                "5,,2.0,\n"  # AlgoPerf's end-of-training row
            )
        return 0


def test_run_resume_and_skip(repo, settings, tmp_path):
    lines: list[str] = []
    fake = FakeAlgoPerf(crash_in={"ogbg": 3})
    outcomes = run_algoperf_suite(
        "ogbg,wmt", settings, repo_root=repo, runner=fake, out=lines.append
    )
    # ogbg crashed in trial 3 and was reported; wmt ran anyway.
    assert [(o.workload, o.status, o.exit_code) for o in outcomes] == [
        ("ogbg", "failed", 1),
        ("wmt", "finished", 0),
    ]
    ogbg_dir = tmp_path / "exp" / "exp_a" / "study_0" / "ogbg_jax"
    # Trials 1 and 2 ended (AlgoPerf's end row) -> finished; trial 3 crashed -> not finished.
    assert completion.finished_trials(ogbg_dir, 3) == [1, 2]
    assert outcomes[0].trials_marked == (1, 2)
    assert any("FAILED with exit status 1" in line for line in lines)
    assert any("CUDA out of memory" in line for line in lines)
    assert any("study_0/ogbg_jax trial 2/3 step 1:" in line for line in lines)
    assert any("the leaderboard scores 3 x 5 (external tuning)" in line for line in lines)
    # First launch of each workload starts fresh; logs go one file per study and workload.
    assert fake.calls[0][-1] == "--overwrite"
    log = tmp_path / "exp" / "exp_a" / "logs" / "study_0_ogbg_jax.log"
    assert "CUDA out of memory" in log.read_text()
    assert (tmp_path / "exp" / "exp_a" / "logs" / "study_0_wmt_jax.log").is_file()
    # The marker records what ran: this point, no step limit, the study's seed.
    seed = json.loads((tmp_path / "exp" / "exp_a" / launch.EXPERIMENT_RECORD).read_text())
    marker = completion.read_marker(ogbg_dir / "trial_2")
    assert marker["identity"]["hyperparameters"] == POINTS[1]
    assert marker["identity"]["rng_seed"] == study_seed(seed["rng_seed"], 0, "ogbg")
    assert flag_value(fake.calls[0], "rng_seed") == str(marker["identity"]["rng_seed"])

    # Resume: wmt is skipped; ogbg resumes at trial 3 only.
    fake2 = FakeAlgoPerf()
    outcomes = run_algoperf_suite(
        "ogbg,wmt", settings, repo_root=repo, runner=fake2, out=lines.append
    )
    assert [(o.workload, o.status) for o in outcomes] == [("ogbg", "finished"), ("wmt", "skipped")]
    (argv,) = fake2.calls
    assert flag_value(argv, "workload") == "ogbg"
    assert flag_value(argv, "hparam_start_index") == "2"
    assert argv[-1] == "--resume_last_run"
    assert completion.finished_trials(ogbg_dir, 3) == [1, 2, 3]

    # Everything finished: nothing is launched.
    fake3 = FakeAlgoPerf()
    outcomes = run_algoperf_suite(
        "ogbg,wmt", settings, repo_root=repo, runner=fake3, out=lines.append
    )
    assert fake3.calls == [] and {o.status for o in outcomes} == {"skipped"}

    # --overwrite starts over from trial 1 with AlgoPerf's --overwrite.
    fake4 = FakeAlgoPerf()
    run_algoperf_suite(
        "wmt", settings, repo_root=repo, runner=fake4, overwrite=True, out=lines.append
    )
    assert fake4.calls[0][-1] == "--overwrite"
    assert flag_value(fake4.calls[0], "hparam_start_index") is None


def test_crash_without_end_row_marks_nothing(repo, settings, tmp_path):
    def crash(plan, on_line):
        folder = plan.workload_dir / "trial_1"
        folder.mkdir(parents=True)
        (folder / "measurements.csv").write_text("global_step,loss,score\n1,2.0,\n")
        return 137

    outcomes = run_algoperf_suite(
        "wmt", settings, repo_root=repo, runner=crash, out=lambda line: None
    )
    assert outcomes[0].status == "failed"
    wmt_dir = tmp_path / "exp" / "exp_a" / "study_0" / "wmt_jax"
    assert completion.finished_trials(wmt_dir, 3) == []


def test_missing_launcher_executable_is_reported(repo, settings):
    def vanished(plan, on_line):
        raise FileNotFoundError(2, "No such file or directory", plan.argv[0])

    lines: list[str] = []
    outcomes = run_algoperf_suite(
        "wmt", settings, repo_root=repo, runner=vanished, out=lines.append
    )
    assert outcomes[0].exit_code == 127 and "could not start" in outcomes[0].detail


def test_algoperf_missing_prints_install_command(repo, settings, monkeypatch):
    monkeypatch.undo()  # use the real check
    monkeypatch.setattr(launch.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AlgoPerfMissingError) as info:
        run_algoperf_suite("wmt", settings, repo_root=repo, runner=FakeAlgoPerf())
    message = str(info.value)
    assert (
        "pip install 'algoperf @ git+https://github.com/mlcommons/algorithmic-efficiency.git"
        "@2c90454fc05d5bdf3598b0c7651e611f132a7060'" in message
    )
    assert "pip install -e '.[algoperf]'" in message


def test_missing_data_directory(repo, settings, tmp_path):
    fake = FakeAlgoPerf()
    with pytest.raises(DataDirError, match="criteo1tb"):
        run_algoperf_suite("criteo1tb,ogbg", settings, repo_root=repo, runner=fake)
    gone = RunSettings(
        framework="jax", data_dir=str(tmp_path / "nowhere"), experiment_dir=str(tmp_path / "exp")
    )
    with pytest.raises(DataDirError, match="nowhere"):
        run_algoperf_suite("ogbg", gone, repo_root=repo, runner=fake)
    assert fake.calls == []


def test_interrupted_marker_write_leaves_no_file(tmp_path, monkeypatch):
    trial = tmp_path / "trial_1"
    trial.mkdir()

    def explode(payload, handle, **kwargs):
        handle.write('{"finished": tr')  # half a file, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(files.json, "dump", explode)
    with pytest.raises(KeyboardInterrupt):
        completion.mark_finished(trial, "process exited 0")
    assert os.listdir(trial) == []  # neither the marker nor a temporary file
    assert not completion.is_finished(trial)
    monkeypatch.undo()

    completion.mark_finished(trial, "process exited 0", exit_code=0)
    before = (trial / completion.MARKER_NAME).read_text()
    monkeypatch.setattr(files.json, "dump", explode)
    with pytest.raises(KeyboardInterrupt):
        completion.mark_finished(trial, "again")
    # The old marker survives intact.
    assert (trial / completion.MARKER_NAME).read_text() == before
    assert os.listdir(trial) == [completion.MARKER_NAME]


def test_junk_marker_is_not_finished(tmp_path):
    (tmp_path / completion.MARKER_NAME).write_text("{not json")
    assert not completion.is_finished(tmp_path)


def test_progress_lines_from_algoperf_log():
    lines: list[str] = []
    now = [1000.0]
    tracker = ProgressTracker(
        "ogbg_jax", FALLBACK_TABLE["ogbg"], lines.append, num_trials=5, clock=lambda: now[0]
    )
    now[0] += 600  # trial 1 took 10 minutes
    tracker.feed("I0905 submission_runner.py:600] --- Tuning run 2/5 ---")
    now[0] += 1200  # 20 minutes into trial 2
    eval_line = (
        "I0905 submission_runner.py:512] Time since start: 812.34s, \tStep: 4000, \t"
        "{'validation/mean_average_precision': np.float64(0.2815), 'validation/loss': "
        "0.051, 'score': 790.5, 'accumulated_submission_time': 790.5}"
    )
    tracker.feed(eval_line)
    tracker.feed(eval_line)  # another rank logs the same eval
    tracker.feed("I0905 submission_runner.py:720] Final ogbg score: 790.5")
    # Budgets: 790.5 s of 12011 s is 6.6%; step 4000 of the 52000-step hint is 7.7%.
    # 20 minutes for 6.58% of the time budget: the trial needs 20 / 0.06582 = 303.88 min,
    # 283.88 min (4 h 43.9 min) to go, and 3 more trials of 303.88 min: 1195.5 min in all.
    assert lines == [
        "  ogbg_jax: trial 2/5 started",
        "  ogbg_jax trial 2/5 step 4000: validation/mean_average_precision=0.2815 "
        "(target >= 0.28098) TARGET REACHED submission time 790.5s | elapsed 30m00s, "
        "8% of step hint, 7% of time budget, ETA trial 4h43m, all trials 19h55m "
        "(if none stops early)",
        "  ogbg_jax: final score (submission time) 790.5",
    ]
    assert parse_metrics("{'validation/wer': 0.1, 'test/wer': nan, 'x': 'y'}") == {
        "validation/wer": 0.1,
        "test/wer": pytest.approx(float("nan"), nan_ok=True),
    }


def test_rerun_with_other_settings_is_refused_then_rerun_on_request(repo, settings, tmp_path):
    run_algoperf_suite("wmt", settings, repo_root=repo, runner=FakeAlgoPerf(), out=print)
    wmt_dir = tmp_path / "exp" / "exp_a" / "study_0" / "wmt_jax"
    assert completion.finished_trials(wmt_dir, 3) == [1, 2, 3]
    # Another step limit: the old trials would be reported as this run's. Refused.
    limited = RunSettings(**{**settings.__dict__, "max_global_steps": 100})
    fake = FakeAlgoPerf()
    with pytest.raises(RunnerError, match="max_global_steps: ran with None, now 100") as info:
        run_algoperf_suite("wmt", limited, repo_root=repo, runner=fake, out=print)
    assert "--overwrite" in str(info.value) and fake.calls == []
    # Another search space under the same experiment name: refused too.
    (repo / "tuning_search_spaces" / "nadamw.json").write_text(
        json.dumps([{"learning_rate": 0.5 * (k + 1)} for k in range(3)])
    )
    with pytest.raises(RunnerError, match=r"hyperparameters: learning_rate: 0\.001 -> 0\.5"):
        run_algoperf_suite("wmt", settings, repo_root=repo, runner=fake, out=print)
    # On request, everything reruns from scratch with the new settings.
    run_algoperf_suite(
        "wmt", limited, repo_root=repo, runner=fake, overwrite=True, out=lambda line: None
    )
    assert fake.calls[0][-1] == "--overwrite"
    marker = completion.read_marker(wmt_dir / "trial_1")
    assert marker["identity"]["max_global_steps"] == 100


def test_started_trial_with_other_hyperparameters_is_refused(repo, settings, tmp_path):
    folder = tmp_path / "exp" / "exp_a" / "study_0" / "wmt_jax" / "trial_1"
    folder.mkdir(parents=True)
    (folder / "hparams.json").write_text(json.dumps({"learning_rate": 0.9}))
    with pytest.raises(RunnerError, match=r"its hparams\.json .* learning_rate: 0\.9 -> 0\.001"):
        run_algoperf_suite("wmt", settings, repo_root=repo, runner=FakeAlgoPerf(), out=print)


def test_studies_seeds_and_layout(repo, settings, tmp_path):
    three = RunSettings(**{**settings.__dict__, "num_studies": 3, "rng_seed": 11})
    fake = FakeAlgoPerf()
    run_algoperf_suite("ogbg", three, repo_root=repo, runner=fake, out=lambda line: None)
    names = [flag_value(argv, "experiment_name") for argv in fake.calls]
    assert names == ["exp_a/study_0", "exp_a/study_1", "exp_a/study_2"]
    seeds = [int(flag_value(argv, "rng_seed")) for argv in fake.calls]
    assert seeds == [study_seed(11, k, "ogbg") for k in range(3)] and len(set(seeds)) == 3
    for k in range(3):
        folder = tmp_path / "exp" / "exp_a" / f"study_{k}" / "ogbg_jax"
        assert completion.finished_trials(folder, 3) == [1, 2, 3]


def test_averaging_picks_the_search_space_and_names_the_experiment(repo, settings, tmp_path):
    spaces = repo / "tuning_search_spaces"
    (spaces / "nadamw_lawa.json").write_text(
        json.dumps([{**p, "averaging": "lawa"} for p in POINTS])
    )
    lawa = RunSettings(**{**settings.__dict__, "averaging": "lawa", "experiment_name": None})
    lines: list[str] = []
    run_algoperf_suite("wmt", lawa, repo_root=repo, dry_run=True, out=lines.append)
    command = next(line for line in lines if line.startswith("  $ "))
    assert "--tuning_search_space=tuning_search_spaces/nadamw_lawa.json" in command
    assert "--experiment_name=nadamw_nadamw_lawa/study_0" in command
    plain = RunSettings(**{**settings.__dict__, "experiment_name": None})
    lines = []
    run_algoperf_suite("wmt", plain, repo_root=repo, dry_run=True, out=lines.append)
    assert any("--experiment_name=nadamw_nadamw/study_0" in line for line in lines)
    # A mode without a search space, or one the given space does not use: refused.
    with pytest.raises(SearchSpaceError, match=r"--averaging=ema: .*nadamw_ema\.json does not"):
        run_algoperf_suite(
            "wmt",
            RunSettings(**{**lawa.__dict__, "averaging": "ema"}),
            repo_root=repo,
            dry_run=True,
        )
    with pytest.raises(SearchSpaceError, match="asks for averaging none"):
        run_algoperf_suite(
            "wmt",
            RunSettings(
                **{**lawa.__dict__, "tuning_search_space": "tuning_search_spaces/nadamw.json"}
            ),
            repo_root=repo,
            dry_run=True,
        )
    # TWA exists for PyTorch only: with JAX it would run nothing.
    with pytest.raises(LaunchConfigError, match="PyTorch only"):
        RunSettings(framework="jax", averaging="twa")
    with pytest.raises(LaunchConfigError, match="self-tuning"):
        RunSettings(framework="jax", averaging="lawa", tuning_ruleset="self")


def test_experiment_dir_that_is_a_file_fails_once_up_front(repo, settings, tmp_path):
    a_file = tmp_path / "results.txt"
    a_file.write_text("x")
    for given in (a_file, a_file / "sub"):
        bad = RunSettings(**{**settings.__dict__, "experiment_dir": str(given)})
        fake = FakeAlgoPerf()
        with pytest.raises(LaunchConfigError, match=r"--experiment_dir=.*(is a file|lies under)"):
            run_algoperf_suite("ogbg,wmt", bad, repo_root=repo, runner=fake)
        assert fake.calls == []
