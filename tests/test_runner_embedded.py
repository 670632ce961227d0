"""The embedded suite end to end, with a tiny fake workload registry, loop and submission.

The fake loop writes eval_measurements.csv in AlgoPerf's layout with a known
curve, so every time to target below is computed by hand.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from polyak.runner import completion
from polyak.runner.embedded import (
    DEFAULT_SEED_COUNT,
    EmbeddedRun,
    EmbeddedSettings,
    SuiteClock,
    run_embedded_suite,
    seed_range,
)
from polyak.runner.errors import LaunchConfigError, SearchSpaceError, UnknownWorkloadError
from polyak.workloads.loop import LoopConfig, RunResult

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "run_workloads.py"
SUBMISSION_SOURCE = """
def init_optimizer_state(workload, model_params, model_state, hyperparameters, rng):
    return {}
def update_params(*args, **kwargs):
    return kwargs.get("optimizer_state"), kwargs.get("current_param_container"), None
def prepare_for_eval(*args, **kwargs):
    return kwargs.get("optimizer_state"), kwargs.get("current_param_container"), None
def get_batch_size(workload_name):
    return 8
def data_selection(workload, input_queue, *args):
    return next(input_queue)
"""


class FakeWorkload:
    """A workload whose accuracy goes up (tiny_up) or loss goes down (tiny_down)."""

    def __init__(self, name: str):
        self.name = name
        self.target_metric_name = "accuracy" if name == "tiny_up" else "loss"
        self.validation_target_value = 0.8 if name == "tiny_up" else 0.3
        self.test_target_value = None
        self.max_allowed_runtime_sec = 100.0
        self.step_hint = 40
        self.eval_period_time_sec = 1

    @property
    def direction(self) -> str:
        return "max" if self.target_metric_name == "accuracy" else "min"

    def has_reached_validation_target(self, result):
        value = result[f"validation/{self.target_metric_name}"]
        if self.target_metric_name == "accuracy":
            return value > self.validation_target_value
        return value < self.validation_target_value


# Evals at steps 10, 20, 30, 40; submission time 2 s per 10 steps. The step of the
# first eval at the target, per workload, mode and seed (None: never); made-up effects.
FIRST_HIT: dict[str, dict[str, tuple[int | None, ...]]] = {
    "tiny_up": {
        "none": (30, 30, None),
        "lawa": (20, 30, 20),
        "ema": (10, 10, None),
        "twa": (20, 20, 20),
    },
    "tiny_down": {
        "none": (None, None, None),
        "lawa": (30, 30, 40),
        "ema": (20, None, None),
        "twa": (40, 40, 40),
    },
}
EVAL_STEPS = (10, 20, 30, 40)


def curve(workload: str, mode: str, seed: int) -> list[float]:
    """Accuracy 0.5 -> 0.9 (target 0.8) or loss 0.9 -> 0.2 (target 0.3) at the first hit."""
    first = FIRST_HIT[workload][mode][seed]
    before, after = (0.5, 0.9) if workload == "tiny_up" else (0.9, 0.2)
    return [after if first is not None and step >= first else before for step in EVAL_STEPS]


@dataclasses.dataclass(frozen=True)
class Call:
    workload: str
    framework: str
    hyperparameters: Any
    config: LoopConfig
    output_dir: Path | None
    resume: bool


class FakeLoop:
    """The local loop's interface (its own LoopConfig and RunResult) with made-up curves."""

    LoopConfig = LoopConfig

    def __init__(self, fail_on: str | None = None, crash_after_writing: tuple | None = None):
        self.calls: list[Call] = []
        self.fail_on = fail_on
        # (workload, mode, seed): that run writes its measurements, then crashes.
        self.crash_after_writing = crash_after_writing

    def timed_calls(self) -> list[Call]:
        return [call for call in self.calls if call.output_dir is not None]

    def run_training(
        self,
        workload,
        submission,
        hyperparameters,
        *,
        framework,
        config,
        output_dir=None,
        progress=None,
        resume=False,
    ):
        assert callable(submission.update_params)
        self.calls.append(
            Call(workload.name, framework, hyperparameters, config, output_dir, resume)
        )
        if workload.name == self.fail_on and output_dir is not None:
            raise RuntimeError("NaN loss")  # late in a run, long after the warm-up's steps
        times = self.submission_times(submission, config)
        if output_dir is None:  # the warm-up: nothing is written
            return None
        values = curve(workload.name, hyperparameters.averaging, config.rng_seed)
        column = f"validation/{workload.target_metric_name}"
        lines = [f"accumulated_submission_time,global_step,preemption_count,score,{column}"]
        for step, seconds, value in zip(EVAL_STEPS, times, values):
            lines.append(f"{seconds},{step},0,{seconds},{value}")
            if progress is not None:
                progress(f"[{workload.name}/{framework}] step {step}: {column}={value:.4f}")
        Path(output_dir, "eval_measurements.csv").write_text("\n".join(lines) + "\n")
        Path(output_dir, "hparams.json").write_text(json.dumps(hyperparameters._asdict()))
        run = (workload.name, hyperparameters.averaging, config.rng_seed)
        if run == self.crash_after_writing:
            raise RuntimeError("killed after its last eval")
        return self.result(workload, framework)

    def submission_times(self, submission, config) -> list[float]:
        """Submission time at each eval step: 2 s per 10 steps."""
        return [2.0 * (index + 1) for index in range(len(EVAL_STEPS))]

    @staticmethod
    def result(workload: FakeWorkload, framework: str) -> RunResult:
        return RunResult(
            workload=workload.name,
            framework=framework,
            target_metric_name=workload.target_metric_name,
            direction=workload.direction,
            validation_target=workload.validation_target_value,
            test_target=math.nan,
            evals=(),
            reached_target=False,
            reached_test_target=False,
            steps_to_target=None,
            time_to_target=None,
            best_metric=None,
            total_steps=EVAL_STEPS[-1],
            total_submission_time=0.0,
            dataset=None,
            stop_reason="max_steps",
            preemption_count=0,
        )


REGISTRY = types.SimpleNamespace(
    EMBEDDED_WORKLOADS=("tiny_up", "tiny_down"), make_workload=lambda name, fw: FakeWorkload(name)
)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for framework in ("pytorch", "jax"):
        folder = root / "submissions" / "nadamw" / framework
        folder.mkdir(parents=True)
        (folder / "submission.py").write_text(SUBMISSION_SOURCE)
    (root / "tuning_search_spaces").mkdir()
    points = [
        {"learning_rate": 0.01, "averaging": "none"},
        {"learning_rate": 0.02, "averaging": "none"},
    ]
    (root / "tuning_search_spaces" / "nadamw.json").write_text(json.dumps(points))
    return root


def split_columns(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def test_embedded_suite_end_to_end(repo, tmp_path):
    settings = EmbeddedSettings(
        submissions=("nadamw",),
        frameworks=("pytorch", "jax"),
        averaging=("none", "lawa", "ema", "twa"),
        seeds=(0, 1, 2),
        num_tuning_trials=1,
        experiment_dir=str(tmp_path / "exp"),
        experiment_name="demo",
        max_global_steps=40,
    )
    loop, lines = FakeLoop(), []
    outcome = run_embedded_suite(
        settings, repo_root=repo, registry=REGISTRY, loop=loop, out=lines.append
    )
    # 1 submission x (pytorch: 4 modes + jax: 3, no TWA) x 3 seeds x 2 workloads x 1 trial
    assert len(outcome.runs) == 42 and outcome.statuses == ("finished",) * 42
    assert len(loop.timed_calls()) == 42
    assert not [
        c
        for c in loop.timed_calls()
        if c.framework == "jax" and c.hyperparameters.averaging == "twa"
    ]
    # One untimed warm-up per framework x workload, each before the first timed run of its kind.
    warm_ups = [(i, c) for i, c in enumerate(loop.calls) if c.output_dir is None]
    assert sorted((c.framework, c.workload) for _, c in warm_ups) == sorted(
        (f, w) for f in ("pytorch", "jax") for w in ("tiny_up", "tiny_down")
    )
    for index, warm_up in warm_ups:
        later = [(c.framework, c.workload) for c in loop.calls[index + 1 :]]
        earlier = [(c.framework, c.workload) for c in loop.calls[:index]]
        assert (warm_up.framework, warm_up.workload) in later
        assert (warm_up.framework, warm_up.workload) not in earlier
        assert not warm_up.config.checkpoint and not warm_up.config.stop_at_target
    first = loop.timed_calls()[0]
    assert first.hyperparameters.averaging == "none"
    assert first.hyperparameters.learning_rate == 0.01
    config = first.config
    assert (config.max_steps, config.eval_every_steps, config.rng_seed) == (40, None, 0)
    assert config.stop_at_target and not first.resume

    root = tmp_path / "exp" / "demo"
    trial = root / "nadamw_lawa" / "seed_1" / "tiny_down_jax" / "trial_1"
    assert completion.is_finished(trial)
    assert json.loads((trial / "hparams.json").read_text())["averaging"] == "lawa"
    marker = completion.read_marker(trial)
    assert marker["direction"] == "min" and marker["label"] == "nadamw_lawa"
    assert marker["wall_seconds"] >= 0 and marker["cpu_seconds"] >= 0

    # Progress: one line per run with the elapsed time and the time left.
    done = [
        i for i, line in enumerate(lines) if re.match(r"\[\d+/42\] .*: (target|no target)", line)
    ]
    assert len(done) == 42
    assert "target at step 30" in lines[done[0]]  # tiny_up, none, seed 0
    for index in done:
        assert re.fullmatch(r"\s*elapsed \S+, left about \S+", lines[index + 1])
    assert not any("] step " in line for line in lines)  # per-eval lines only on request

    # The table, by hand from FIRST_HIT: medians over seeds 0-2, misses as infinity.
    assert outcome.table is not None
    expected = {
        ("tiny_up", "pytorch"): (
            "30 (2/3)",
            "20 (3/3)",
            "0.67x",
            "10 (2/3)",
            "0.33x",
            "20 (3/3)",
            "0.67x",
        ),
        ("tiny_up", "jax"): ("30 (2/3)", "20 (3/3)", "0.67x", "10 (2/3)", "0.33x", "–¹", "–"),
        ("tiny_down", "pytorch"): (
            "miss (0/3)",
            "30 (3/3)",
            "n/a",
            "miss (1/3)",
            "n/a",
            "40 (3/3)",
            "n/a",
        ),
        ("tiny_down", "jax"): ("miss (0/3)", "30 (3/3)", "n/a", "miss (1/3)", "n/a", "–¹", "–"),
    }
    header = outcome.table.header()
    assert header[3:] == (
        "none",
        "lawa",
        "lawa/none",
        "ema",
        "ema/none",
        "twa",
        "twa/none",
        "seconds",
    )
    printed = "\n".join(lines).splitlines()
    rows = [split_columns(line) for line in printed if line.startswith("tiny_")]
    main_rows = [r for r in rows if len(r) == len(header)]
    assert [(r[0], r[2]) for r in main_rows] == list(expected)
    for row in main_rows:
        assert row[1] == "nadamw"
        assert tuple(row[3:10]) == expected[(row[0], row[2])]
        assert row[10].endswith("s")
    per_seed = {(r[0], r[2]): r[3:] for r in rows if len(r) == 7}
    assert per_seed[("tiny_down", "pytorch")] == [
        "miss miss miss",
        "30 30 40",
        "20 miss miss",
        "40 40 40",
    ]
    assert per_seed[("tiny_up", "jax")] == ["30 30 miss", "20 30 20", "10 10 miss", "–"]
    text = "\n".join(lines)
    assert "Seeds: 0, 1, 2" in text and "¹ twa: pytorch only." in text
    assert "ratio of medians" in text

    # Written into the experiment dir: Markdown and CSV.
    markdown, csv_path = outcome.table_files
    assert markdown == root / "steps_to_target.md" and csv_path == root / "steps_to_target.csv"
    assert "| tiny_up | nadamw | jax | 30 (2/3) | 20 (3/3) | 0.67x |" in markdown.read_text()
    csv_rows = list(csv.DictReader(csv_path.open()))
    assert len(csv_rows) == 2 * (4 + 3)
    ema_down = next(
        r
        for r in csv_rows
        if (r["workload"], r["framework"], r["mode"]) == ("tiny_down", "pytorch", "ema")
    )
    assert ema_down["steps_per_seed"] == "20;miss;miss" and ema_down["median_steps"] == "miss"

    # The time-to-target report, from the planned runs.
    report = outcome.report
    assert report is not None and report.markdown.is_file()
    assert "## Side by side (jax), baseline `nadamw`" in report.markdown.read_text()
    pngs = {p.name for p in report.plots}
    assert {"tiny_up_jax.png", "tiny_down_pytorch.png"} <= pngs
    for path in report.plots:
        assert path.read_bytes().startswith(PNG_SIGNATURE)

    # Resume: everything is finished, nothing runs again, the same table.
    loop2 = FakeLoop()
    again = run_embedded_suite(
        settings, repo_root=repo, registry=REGISTRY, loop=loop2, report=False, out=lambda line: None
    )
    assert loop2.calls == [] and set(again.statuses) == {"skipped"}
    assert again.table is not None and again.table.body() == outcome.table.body()


def test_a_run_that_never_finished_is_a_miss_even_past_the_target(repo, tmp_path):
    settings = EmbeddedSettings(
        submissions=("nadamw",),
        frameworks=("pytorch",),
        averaging=("none", "lawa"),
        workloads="tiny_up",
        seeds=(0, 1, 2),
        experiment_dir=str(tmp_path / "exp"),
        experiment_name="crash",
    )
    lines: list[str] = []
    # lawa seed 1 reaches the target at step 30 in its measurements, then crashes.
    loop = FakeLoop(crash_after_writing=("tiny_up", "lawa", 1))
    outcome = run_embedded_suite(
        settings, repo_root=repo, registry=REGISTRY, loop=loop, report=False, out=lines.append
    )
    assert outcome.statuses.count("failed") == 1
    assert outcome.table is not None
    cell = outcome.table.rows[0].cells["lawa"]
    assert [o.text() for o in cell.outcomes] == ["20", "unfinished", "20"]
    assert cell.text() == "20 (2/3)"
    assert any("FAILED: RuntimeError: killed after its last eval" in line for line in lines)


def test_seeds_must_be_a_positive_count():
    assert seed_range(3) == (0, 1, 2) and seed_range(2, first=5) == (5, 6)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(
            LaunchConfigError, match=r"expected the number of seeds, an integer >= 1"
        ):
            seed_range(bad)
    with pytest.raises(LaunchConfigError, match=r"first seed \(rng_seed\) -2"):
        seed_range(3, first=-2)
    with pytest.raises(LaunchConfigError, match="seeds"):
        EmbeddedSettings(seeds=())
    with pytest.raises(LaunchConfigError, match=r"seeds \[-1\]"):
        EmbeddedSettings(seeds=(0, -1))
    with pytest.raises(LaunchConfigError, match="repeat"):
        EmbeddedSettings(seeds=(1, 1))
    assert len(EmbeddedSettings().seeds) == DEFAULT_SEED_COUNT


@pytest.mark.parametrize("value", ["0", "-2"])
def test_cli_refuses_a_seed_count_below_one(repo, tmp_path, value):
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            f"--repo_root={repo}",
            "--submission=nadamw",
            f"--experiment_dir={tmp_path / 'exp'}",
            f"--seeds={value}",
            "--dry_run",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert (
        f"error: seeds={int(value)}; expected the number of seeds, an integer >= 1" in done.stderr
    )
    assert not (tmp_path / "exp").exists()


def test_a_failing_run_is_reported_and_resumed(repo, tmp_path):
    settings = EmbeddedSettings(
        submissions=("nadamw",),
        frameworks=("pytorch",),
        averaging=("none",),
        seeds=(0,),
        num_tuning_trials=2,
        experiment_dir=str(tmp_path / "exp"),
        experiment_name="fail",
    )
    lines: list[str] = []
    outcome = run_embedded_suite(
        settings,
        repo_root=repo,
        registry=REGISTRY,
        report=False,
        loop=FakeLoop(fail_on="tiny_down"),
        out=lines.append,
    )
    assert outcome.statuses == ("finished", "finished", "failed", "failed")
    assert any("FAILED: RuntimeError: NaN loss" in line for line in lines)
    # Both tiny_down trials crashed before writing anything: a miss, shown as such.
    assert outcome.table is not None
    down = next(row for row in outcome.table.rows if row.workload == "tiny_down")
    assert [o.status for o in down.cells["none"].outcomes] == ["not run"]
    assert down.cells["none"].text() == "miss (0/1)"
    # Two trials from the list search space: learning rates 0.01 and 0.02.
    loop = FakeLoop()
    again = run_embedded_suite(
        settings, repo_root=repo, registry=REGISTRY, loop=loop, report=False, out=lambda line: None
    )
    assert again.statuses == ("skipped", "skipped", "finished", "finished")
    assert [
        (c.workload, c.hyperparameters.learning_rate, c.resume) for c in loop.timed_calls()
    ] == [
        ("tiny_down", 0.01, True),  # its folder exists from the failed attempt: resume
        ("tiny_down", 0.02, True),
    ]


def test_dry_run_and_bad_inputs(repo, tmp_path):
    settings = EmbeddedSettings(
        submissions=("nadamw",),
        frameworks=("jax",),
        averaging=("ema",),
        experiment_dir=str(tmp_path / "exp"),
    )
    loop, lines = FakeLoop(), []
    outcome = run_embedded_suite(
        settings, repo_root=repo, registry=REGISTRY, loop=loop, dry_run=True, out=lines.append
    )
    assert loop.calls == [] and set(outcome.statuses) == {"planned"}
    assert not (tmp_path / "exp").exists()
    with pytest.raises(LaunchConfigError, match="averaging"):
        EmbeddedSettings(averaging=("swa",))
    with pytest.raises(LaunchConfigError, match="frameworks"):
        EmbeddedSettings(frameworks=("mxnet",))
    for framework in ("pytorch", "jax"):  # a submission that exists, without a search space
        folder = repo / "submissions" / "shampoo" / framework
        folder.mkdir(parents=True)
        (folder / "submission.py").write_text(SUBMISSION_SOURCE)
    with pytest.raises(SearchSpaceError, match=r"shampoo\.json"):
        run_embedded_suite(
            EmbeddedSettings(submissions=("shampoo",)),
            repo_root=repo,
            registry=REGISTRY,
            loop=FakeLoop(),
            out=lambda line: None,
        )
    with pytest.raises(UnknownWorkloadError, match="tiny_side"):
        run_embedded_suite(
            EmbeddedSettings(submissions=("nadamw",), workloads="tiny_side"),
            repo_root=repo,
            registry=REGISTRY,
            loop=FakeLoop(),
            out=lambda line: None,
        )


def test_cli_dry_run_with_the_real_registry(repo, tmp_path):
    (repo / "tuning_search_spaces" / "shampoo.json").write_text(json.dumps([{"lr": 0.1}]))
    for framework in ("pytorch", "jax"):
        folder = repo / "submissions" / "shampoo" / framework
        folder.mkdir(parents=True)
        (folder / "submission.py").write_text(SUBMISSION_SOURCE)
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            f"--repo_root={repo}",
            "--submission=nadamw,shampoo",
            "--framework=pytorch",
            "--averaging=none,ema",
            f"--experiment_dir={tmp_path / 'exp'}",
            "--seeds=2",
            "--rng_seed=4",
            "--dry_run",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    planned = [line for line in done.stdout.splitlines() if ": would run " in line]
    # 2 submissions x 1 framework x 2 modes x 2 seeds x the registry's workloads x 1 trial
    from polyak.workloads.registry import EMBEDDED_WORKLOADS

    assert len(planned) == 2 * 2 * 2 * len(EMBEDDED_WORKLOADS)
    assert any("shampoo_ema pytorch" in line and "seed 5" in line for line in planned)
    assert not any("seed 0" in line or "seed 6" in line for line in planned)
    assert not (tmp_path / "exp").exists()


# A submission whose first step in a process costs 30 s more than the others (the
# one-time compilation), on a clock of its own so that no test depends on real time.
COMPILING_SUBMISSION_SOURCE = """
CLOCK = [0.0]
COMPILED = []


def init_optimizer_state(workload, model_params, model_state, hyperparameters, rng):
    return {}
def update_params(*args, **kwargs):
    if not COMPILED:
        COMPILED.append(True)
        CLOCK[0] += 30.0
    CLOCK[0] += 0.5
    return None, None, None
def get_batch_size(workload_name):
    return 8
def data_selection(workload, input_queue, *args):
    return next(input_queue)
"""


class ClockedLoop(FakeLoop):
    """Steps the submission and times each step on the submission's clock, as the loop
    times its steps on the wall clock."""

    def submission_times(self, submission, config) -> list[float]:
        elapsed, times = 0.0, []
        for step in range(1, config.max_steps + 1):
            before = submission.CLOCK[0]
            submission.update_params()
            elapsed += submission.CLOCK[0] - before
            if step in EVAL_STEPS:
                times.append(elapsed)
        return times


def test_the_first_run_of_a_kind_is_not_charged_for_compilation(repo, tmp_path):
    for framework in ("pytorch", "jax"):
        path = repo / "submissions" / "nadamw" / framework / "submission.py"
        path.write_text(COMPILING_SUBMISSION_SOURCE)
    settings = EmbeddedSettings(
        submissions=("nadamw",),
        frameworks=("pytorch", "jax"),
        averaging=("none",),
        workloads="tiny_up",
        seeds=(0, 1),
        experiment_dir=str(tmp_path / "exp"),
        experiment_name="fair",
        max_global_steps=40,
    )
    loop = ClockedLoop()
    outcome = run_embedded_suite(
        settings, repo_root=repo, registry=REGISTRY, loop=loop, report=False, out=lambda _: None
    )
    assert set(outcome.statuses) == {"finished"}
    for framework in ("pytorch", "jax"):
        seconds = {t.study: t.time_to_target for t in outcome.trials if t.framework == framework}
        assert sorted(seconds) == ["seed_0", "seed_1"]
        # none reaches 0.8 at step 30: 30 steps x 0.5 s, whichever run came first.
        assert seconds["seed_0"] == pytest.approx(seconds["seed_1"], abs=1e-9)
        assert seconds["seed_0"] == pytest.approx(15.0)
    # The compilation did happen, once per submission module: inside the warm-ups.
    warm_ups = [c for c in loop.calls if c.output_dir is None]
    assert [c.framework for c in warm_ups] == ["pytorch", "jax"]
    assert loop.calls[0].output_dir is None


def test_time_left_is_estimated_from_runs_of_the_same_kind_and_mode(tmp_path):
    def run(workload: str, averaging: str) -> EmbeddedRun:
        path = "submissions/nadamw/pytorch/submission.py"
        return EmbeddedRun("nadamw", path, "pytorch", averaging, workload, 0, 1, {})

    clock = SuiteClock(budgets={"a": 10.0, "b": 10.0, "c": 40.0})
    assert clock.seconds_left([run("a", "none")], set(), tmp_path, True) is None
    for averaging, seconds in (("none", 2.0), ("none", 4.0), ("lawa", 9.0)):
        clock.record_run(run("a", averaging), seconds)
    clock.record_run(run("b", "none"), 1.0)
    clock.record_warm_up(5.0)
    warmed = {run("a", "none").kind, run("b", "none").kind}
    pending = [run("a", "none"), run("a", "twa"), run("c", "ema")]
    # a/none: its own mean 3; a/twa: kind a's mean 5; c/ema: every run's mean per budget
    # second (2 + 4 + 9 + 1) / 4 / 10 times c's budget 40, plus a warm-up (5) because
    # kind c has not run yet.
    expected = 3 + 5 + (2 + 4 + 9 + 1) / 4 / 10 * 40 + 5
    assert clock.seconds_left(pending, warmed, tmp_path, True) == pytest.approx(expected)
    assert "left about" in clock.status(17.0) and "left unknown" in clock.status(None)
    shared = dataclasses.replace(clock, workers=2)
    assert shared.seconds_left(pending, warmed, tmp_path, True) == pytest.approx(expected / 2)


def test_the_real_suite_on_a_tiny_setting_prints_every_column(tmp_path):
    """Both frameworks, every mode, two seeds, four steps, two workers: real code throughout."""
    repo_root = Path(__file__).resolve().parents[1]
    settings = EmbeddedSettings(
        submissions=("nadamw",),
        frameworks=("pytorch", "jax"),
        averaging=("none", "lawa", "ema", "twa"),
        workloads="diabetes",
        seeds=(0, 1),
        experiment_dir=str(tmp_path / "exp"),
        experiment_name="tiny",
        max_global_steps=4,
        eval_every_steps=2,
    )
    lines: list[str] = []
    outcome = run_embedded_suite(
        settings,
        repo_root=repo_root,
        report=False,
        workers=2,
        jax_cache_dir=tmp_path / "jax_cache",
        out=lines.append,
    )
    assert set(outcome.statuses) == {"finished"} and len(outcome.runs) == 2 * (4 + 3)
    # Two worker processes, each kind warmed up once, a progress line after every run.
    assert sum("warmed up" in line for line in lines) == 2
    assert (
        sum(re.fullmatch(r"\s*elapsed \S+, left about \S+", line) is not None for line in lines)
        == 14
    )
    assert any(path.is_file() for path in (tmp_path / "jax_cache").rglob("*"))
    assert outcome.table is not None
    header = outcome.table.header()
    assert header == (
        "workload",
        "optimizer",
        "framework",
        "none",
        "lawa",
        "lawa/none",
        "ema",
        "ema/none",
        "twa",
        "twa/none",
        "seconds",
    )
    body = {row[2]: row for row in outcome.table.body()}
    cell = re.compile(r"(\d+(\.\d)?|miss) \([0-2]/2\)")
    for framework, row in body.items():
        assert row[:3] == ("diabetes", "nadamw", framework)
        modes = ("none", "lawa", "ema") + (("twa",) if framework == "pytorch" else ())
        for mode in modes:
            assert cell.fullmatch(row[header.index(mode)]), row
        assert re.fullmatch(r"\d+\.\ds", row[-1])
    assert body["jax"][header.index("twa")] == "–¹"
    # Four steps cannot reach a target calibrated near step_hint: every seed is a miss.
    for seed_row in outcome.table.per_seed_body():
        assert set(" ".join(seed_row[3:]).split()) <= {"miss", "–"}
    assert (settings.root / "steps_to_target.md").is_file()
    assert (settings.root / "steps_to_target.csv").is_file()


def test_workers_need_importable_modules_and_a_positive_count(repo, tmp_path):
    settings = EmbeddedSettings(submissions=("nadamw",), experiment_dir=str(tmp_path / "exp"))
    for bad in (0, -1):
        with pytest.raises(LaunchConfigError, match=f"workers={bad}; expected an integer >= 1"):
            run_embedded_suite(
                settings, repo_root=repo, workers=bad, registry=REGISTRY, loop=FakeLoop()
            )
    with pytest.raises(LaunchConfigError, match="importable modules"):
        run_embedded_suite(settings, repo_root=repo, workers=2, registry=REGISTRY, loop=FakeLoop())


def test_unknown_submissions_and_empty_grids_are_named(repo, tmp_path):
    from polyak.runner.errors import UnknownSubmissionError

    with pytest.raises(UnknownSubmissionError, match="'adamw' is neither a name"):
        run_embedded_suite(
            EmbeddedSettings(submissions=("adamw",), experiment_dir=str(tmp_path)),
            repo_root=repo,
            registry=REGISTRY,
            loop=FakeLoop(),
            out=lambda line: None,
        )
    with pytest.raises(LaunchConfigError, match="no run selected: averaging=twa"):
        run_embedded_suite(
            EmbeddedSettings(
                submissions=("nadamw",),
                frameworks=("jax",),
                averaging=("twa",),
                experiment_dir=str(tmp_path),
            ),
            repo_root=repo,
            registry=REGISTRY,
            loop=FakeLoop(),
            out=lambda line: None,
        )
