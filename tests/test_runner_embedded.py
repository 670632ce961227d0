"""The embedded suite end to end, with a tiny fake workload registry, loop and submission.

The fake loop writes eval_measurements.csv in AlgoPerf's layout with a known
curve, so every time to target below is computed by hand.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from polyak.runner import completion
from polyak.runner.embedded import EmbeddedSettings, run_embedded_suite
from polyak.runner.errors import LaunchConfigError, SearchSpaceError, UnknownWorkloadError
from polyak.workloads.loop import LoopConfig, RunResult

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
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


# Evals at steps 10, 20, 30, 40; submission time 2 s per 10 steps. Averaging reaches
# the target one eval earlier than none, and ema earlier still (a made-up effect).
ACCURACY = {
    "none": [0.5, 0.7, 0.85, 0.9],
    "lawa": [0.6, 0.82, 0.9, 0.9],
    "ema": [0.81, 0.9, 0.9, 0.9],
}
LOSS = {"none": [0.9, 0.5, 0.35, 0.31], "lawa": [0.8, 0.4, 0.25, 0.2], "ema": [0.7, 0.3, 0.2, 0.1]}
EVAL_STEPS = (10, 20, 30, 40)


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

    def __init__(self, fail_on: str | None = None):
        self.calls: list[Call] = []
        self.fail_on = fail_on

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
        curve = (ACCURACY if workload.name == "tiny_up" else LOSS)[hyperparameters.averaging]
        column = f"validation/{workload.target_metric_name}"
        lines = [f"accumulated_submission_time,global_step,preemption_count,score,{column}"]
        for step, seconds, value in zip(EVAL_STEPS, times, curve):
            lines.append(f"{seconds},{step},0,{seconds},{value}")
            if progress is not None:
                progress(f"[{workload.name}/{framework}] step {step}: {column}={value:.4f}")
        Path(output_dir, "eval_measurements.csv").write_text("\n".join(lines) + "\n")
        Path(output_dir, "hparams.json").write_text(json.dumps(hyperparameters._asdict()))
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


def test_embedded_suite_end_to_end(repo, tmp_path):
    settings = EmbeddedSettings(
        submissions=("nadamw",),
        frameworks=("pytorch", "jax"),
        averaging=("none", "lawa", "ema"),
        seeds=(0, 1),
        num_tuning_trials=1,
        experiment_dir=str(tmp_path / "exp"),
        experiment_name="demo",
        max_global_steps=40,
    )
    loop, lines = FakeLoop(), []
    outcome = run_embedded_suite(
        settings, repo_root=repo, registry=REGISTRY, loop=loop, out=lines.append
    )
    # 1 submission x 2 frameworks x 3 modes x 2 seeds x 2 workloads x 1 trial
    assert len(outcome.runs) == 24 and outcome.statuses == ("finished",) * 24
    assert len(loop.timed_calls()) == 24
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

    # Hand-computed: tiny_up needs accuracy >= 0.8: none at step 30 (6 s), lawa at
    # step 20 (4 s), ema at step 10 (2 s); tiny_down loss <= 0.3: none never (miss),
    # lawa at step 30 (6 s), ema at step 20 (4 s). Same for both seeds -> medians equal.
    expected = {
        ("nadamw", "tiny_up"): 6.0,
        ("nadamw_lawa", "tiny_up"): 4.0,
        ("nadamw_ema", "tiny_up"): 2.0,
        ("nadamw", "tiny_down"): math.inf,
        ("nadamw_lawa", "tiny_down"): 6.0,
        ("nadamw_ema", "tiny_down"): 4.0,
    }
    got = {(r.label, r.workload): r.time_to_target for r in outcome.results if r.framework == "jax"}
    assert got == expected
    steps = {
        (r.label, r.workload): r.steps_to_target
        for r in outcome.results
        if r.framework == "pytorch"
    }
    assert steps[("nadamw_ema", "tiny_down")] == 20 and steps[("nadamw", "tiny_down")] == math.inf

    # The printed time-to-target table
    printed = "\n".join(lines).splitlines()
    table_lines = [line for line in printed if line.startswith("tiny_")]
    assert len(table_lines) == 12
    row = next(
        line.split()
        for line in table_lines
        if "lawa" in line and "tiny_up" in line and "jax" in line
    )
    assert row == ["tiny_up", "jax", "nadamw", "lawa", "20", "4.0", "0.9"]
    assert any("tiny_down/jax] step 20: validation/loss=0.3000" in line for line in lines)

    # Report: Markdown, CSVs, one PNG per workload x framework, performance profiles.
    report = outcome.report
    assert report is not None and report.markdown.is_file()
    text = report.markdown.read_text()
    assert "## Side by side (jax), baseline `nadamw`" in text
    assert "4.0 (0.67x)" in text  # lawa on tiny_up: 4 s / 6 s
    pngs = {p.name for p in report.plots}
    assert pngs == {
        "tiny_up_jax.png",
        "tiny_up_pytorch.png",
        "tiny_down_jax.png",
        "tiny_down_pytorch.png",
        "performance_profile_jax.png",
        "performance_profile_pytorch.png",
    }
    for path in report.plots:
        assert path.read_bytes().startswith(PNG_SIGNATURE)
    scores = (root / "report" / "scores.csv").read_text().splitlines()
    # Scores among the three runs over the 2 workloads (n = 2):
    # tiny_up best 2 s: ratios none 3, lawa 2, ema 1; tiny_down best 4 s: none inf, lawa 1.5, ema 1
    # ema: 1.0. lawa: (ratio 2 + ratio 1.5) -> ((4-2)/3 + (4-1.5)/3)/2, ratio 2 is a grid point.
    ema_row = next(r for r in scores if r.startswith("jax,nadamw_ema,"))
    assert float(ema_row.split(",")[2]) == pytest.approx(1.0)
    # accelerator-hours (1 CPU): ema (2 + 4) / 3600; none (6 + 100 budget) / 3600
    none_row = next(r for r in scores if r.startswith("jax,nadamw,"))
    assert float(none_row.split(",")[3]) == pytest.approx(106 / 3600)
    assert float(ema_row.split(",")[3]) == pytest.approx(6 / 3600)

    # Resume: everything is finished, nothing runs again.
    loop2 = FakeLoop()
    again = run_embedded_suite(
        settings, repo_root=repo, registry=REGISTRY, loop=loop2, report=False, out=lambda line: None
    )
    assert loop2.calls == [] and set(again.statuses) == {"skipped"}
    assert len(again.results) == 12


def test_a_failing_run_is_reported_and_resumed(repo, tmp_path):
    settings = EmbeddedSettings(
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
        frameworks=("jax",), averaging=("ema",), experiment_dir=str(tmp_path / "exp")
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
            EmbeddedSettings(workloads="tiny_side"),
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
    script = Path(__file__).resolve().parents[1] / "scripts" / "run_workloads.py"
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            f"--repo_root={repo}",
            "--submission=nadamw,shampoo",
            "--framework=pytorch",
            "--averaging=none,ema",
            f"--experiment_dir={tmp_path / 'exp'}",
            "--seeds=0,1",
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
    assert any("shampoo_ema pytorch" in line and "seed 1" in line for line in planned)
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
        frameworks=("pytorch", "jax"),
        averaging=("none",),
        workloads="tiny_up",
        seeds=(0, 1, 2),
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
        assert sorted(seconds) == ["seed_0", "seed_1", "seed_2"]
        # none reaches 0.8 at step 30: 30 steps x 0.5 s, whichever run came first.
        assert seconds["seed_0"] == pytest.approx(seconds["seed_1"], abs=1e-9)
        assert seconds["seed_0"] == pytest.approx(seconds["seed_2"], abs=1e-9)
        assert seconds["seed_0"] == pytest.approx(15.0)
    # The compilation did happen, once per submission module: inside the warm-ups.
    warm_ups = [c for c in loop.calls if c.output_dir is None]
    assert [c.framework for c in warm_ups] == ["pytorch", "jax"]
    assert loop.calls[0].output_dir is None
