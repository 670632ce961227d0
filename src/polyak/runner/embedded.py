"""The embedded suite: the small CPU workloads, trained through polyak's local loop.

It gives the runner something real to do on a machine without GPUs or
datasets. The grid is submissions x frameworks x averaging modes x workloads x
seeds x tuning trials:

- a submission (``nadamw``, ``shampoo`` or a path) is the module
  ``submissions/<name>/<framework>/submission.py``, loaded by file path;
- its hyperparameters are the k-th point of ``tuning_search_spaces/<name>.json``
  (or ``--tuning_search_space``), with the averaging mode merged in as an
  override: ``{"averaging": mode}`` for a mode of ``polyak.averaging.config.MODES``
  (the ones in ``TORCH_ONLY_MODES`` only for PyTorch);
- the run's *label* is the submission's name plus the mode (``nadamw``,
  ``nadamw_lawa``, ``nadamw_ema``), and each seed is one study.

Layout (AlgoPerf's, with the label as a folder and each seed as an experiment):

    <experiment_dir>/<experiment_name>/<label>/seed_<s>/<workload>_<framework>/trial_<k>/
        eval_measurements.csv   (written by the local loop, AlgoPerf's columns)
        hparams.json, meta_data_0.json, polyak_trial_finished.json

so ``<experiment_dir>/<experiment_name>`` reads like AlgoPerf's scoring folder
(submission = label, study = seed). Each run stops at the validation target,
at the workload's time budget, or at ``--max_global_steps`` (default: the
workload's ``step_hint``, where the LR schedule has decayed to zero anyway);
evals come every ``--eval_every_steps`` (default: the workload's
``eval_period_steps``). Before the first timed run of each submission x
framework x workload, an untimed warm-up (:class:`WarmUp`) absorbs the process's
one-time compilation, so that the table's seconds compare like with like.
Finished runs are skipped on resume. The
suite ends by printing the time-to-target table and writing the report into
``<experiment_dir>/<experiment_name>/report/``.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import shutil
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from polyak.averaging.config import MODES
from polyak.runner.commands import (
    default_search_space,
    find_repo_root,
    resolve_submission,
    submission_label,
)
from polyak.runner.completion import is_finished, mark_finished
from polyak.runner.errors import LaunchConfigError
from polyak.runner.report import ReportFiles, build_report
from polyak.runner.results import TrialResult, WorkloadResult, aggregate, load_results
from polyak.runner.search_space import load_search_space
from polyak.runner.submission_loader import load_submission_module
from polyak.runner.tables import format_number, format_seconds, text_table
from polyak.runner.workload_table import FRAMEWORKS, select_workloads
from polyak.workloads import loop as local_loop
from polyak.workloads import registry as embedded_registry

# TWA's fit on training batches exists only in the PyTorch backend
# (polyak.averaging.twa); the runner's grids and the study read it from here.
TORCH_ONLY_MODES: tuple[str, ...] = ("twa",)
# Enough steps for every one-time cost of a kind of run: the first step, the first
# collection (averaging_every=2) and the first swap to the average (an eval at step 3).
WARM_UP_STEPS = 6
Emit = Callable[[str], None]
RunKind = tuple[str, str, str]  # (submission, framework, workload)


@dataclasses.dataclass(frozen=True)
class EmbeddedSettings:
    submissions: tuple[str, ...] = ("nadamw",)
    frameworks: tuple[str, ...] = FRAMEWORKS
    averaging: tuple[str, ...] = ("none", "lawa", "ema")
    workloads: str | tuple[str, ...] = "all"
    seeds: tuple[int, ...] = (0,)
    num_tuning_trials: int = 1
    tuning_search_space: str | None = None
    experiment_dir: str = "~/experiment_runs"
    experiment_name: str = "embedded"
    max_global_steps: int | None = None
    eval_every_steps: int | None = None
    # The study turns this off to compare whole curves; time to target is unchanged.
    stop_at_target: bool = True

    def __post_init__(self) -> None:
        for name, allowed in (("frameworks", FRAMEWORKS), ("averaging", MODES)):
            values = getattr(self, name)
            if not values:
                raise LaunchConfigError(f"{name} is empty; choose from {', '.join(allowed)}")
            bad = [v for v in values if v not in allowed]
            if bad:
                raise LaunchConfigError(
                    f"{name}: unknown {', '.join(map(repr, bad))}; choices: {', '.join(allowed)}"
                )
        if not self.submissions:
            raise LaunchConfigError("no submission given")
        if not self.seeds:
            raise LaunchConfigError("no seed given")
        for name in ("num_tuning_trials", "max_global_steps", "eval_every_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise LaunchConfigError(f"{name}={value!r}; expected an integer >= 1")

    @property
    def root(self) -> Path:
        return Path(os.path.abspath(os.path.expanduser(self.experiment_dir))) / self.experiment_name


@dataclasses.dataclass(frozen=True)
class EmbeddedRun:
    """One cell of the grid."""

    submission: str
    submission_path: str
    framework: str
    averaging: str
    workload: str
    seed: int
    trial: int
    hyperparameters: dict[str, Any]

    @property
    def label(self) -> str:
        name = submission_label(self.submission)
        return name if self.averaging == "none" else f"{name}_{self.averaging}"

    @property
    def kind(self) -> RunKind:
        """What a process compiles once: the optimizer's step for this workload."""
        return (self.submission, self.framework, self.workload)

    def trial_dir(self, root: Path) -> Path:
        return (
            root
            / self.label
            / f"seed_{self.seed}"
            / f"{self.workload}_{self.framework}"
            / f"trial_{self.trial}"
        )

    def describe(self) -> str:
        return f"{self.label} {self.framework} {self.workload} seed {self.seed} trial {self.trial}"


@dataclasses.dataclass(frozen=True)
class EmbeddedOutcome:
    runs: tuple[EmbeddedRun, ...]
    statuses: tuple[str, ...]
    trials: tuple[TrialResult, ...]
    results: tuple[WorkloadResult, ...]
    report: ReportFiles | None


def plan_runs(
    settings: EmbeddedSettings, repo_root: Path, workload_names: Sequence[str]
) -> list[EmbeddedRun]:
    """The grid, in a fixed order; validates submissions and search spaces up front."""
    runs = []
    for submission in settings.submissions:
        given = settings.tuning_search_space or default_search_space(submission)
        space_path = Path(os.path.expanduser(given))
        space = load_search_space(
            space_path if space_path.is_absolute() else repo_root / space_path
        )
        for framework in settings.frameworks:
            path = resolve_submission(submission, framework, repo_root)
            for averaging in settings.averaging:
                if averaging in TORCH_ONLY_MODES and framework != "pytorch":
                    continue
                for seed in settings.seeds:
                    points = space.draw(settings.num_tuning_trials, seed=seed)
                    for workload in workload_names:
                        for trial, point in enumerate(points, start=1):
                            runs.append(
                                EmbeddedRun(
                                    submission=submission,
                                    submission_path=path,
                                    framework=framework,
                                    averaging=averaging,
                                    workload=workload,
                                    seed=seed,
                                    trial=trial,
                                    hyperparameters={**point, "averaging": averaging},
                                )
                            )
    return runs


def hyperparameter_tuple(point: dict[str, Any]) -> Any:
    """A search-space point with attribute access, as AlgoPerf hands it to a submission."""
    return collections.namedtuple("Hyperparameters", list(point))(**point)


@dataclasses.dataclass
class WarmUp:
    """One untimed run per submission x framework x workload, before the first timed one.

    A process pays one-time costs the first time it runs a kind of step: PyTorch's
    ``torch.compile`` of the fused optimizer step, XLA's start-up. Without a warm-up
    they land in whichever timed run comes first (30 s against 0.5 s for the same
    steps). The warm-up trains a fresh workload instance for a few steps with LAWA
    on, so the averaging's paths run too; it writes nothing and its result is
    dropped. Each timed run then starts from its own seed and state, as before.
    """

    repo_root: Path
    registry: Any
    loop: Any
    warmed: set[RunKind] = dataclasses.field(default_factory=set)

    def before(self, run: EmbeddedRun) -> float:
        """Warms up ``run``'s kind if nothing of that kind ran yet; the seconds it took."""
        if run.kind in self.warmed:
            return 0.0
        started = time.monotonic()
        workload = self.registry.make_workload(run.workload, run.framework)
        module = load_submission_module(self.repo_root / run.submission_path)
        point = {**run.hyperparameters, "averaging": "lawa", "averaging_every": 2, "lawa_window": 2}
        config = self.loop.LoopConfig(
            max_steps=WARM_UP_STEPS,
            eval_every_steps=WARM_UP_STEPS // 2,
            rng_seed=run.seed,
            stop_at_target=False,
            checkpoint=False,
        )
        self.loop.run_training(
            workload, module, hyperparameter_tuple(point), framework=run.framework, config=config
        )
        self.warmed.add(run.kind)
        return time.monotonic() - started


def run_one(
    run: EmbeddedRun,
    root: Path,
    repo_root: Path,
    registry: Any,
    loop: Any,
    settings: EmbeddedSettings,
    out: Emit,
) -> None:
    """Trains one cell into its trial folder and marks it finished; raises on failure."""
    workload = registry.make_workload(run.workload, run.framework)
    module = load_submission_module(repo_root / run.submission_path)
    config = loop.LoopConfig(
        max_steps=settings.max_global_steps or int(workload.step_hint),
        eval_every_steps=settings.eval_every_steps,  # None: the workload's eval period
        rng_seed=run.seed,
        stop_at_target=settings.stop_at_target,
        checkpoint=True,
    )
    trial_path = run.trial_dir(root)
    resuming = trial_path.exists()
    trial_path.mkdir(parents=True, exist_ok=True)
    result = loop.run_training(
        workload,
        module,
        hyperparameter_tuple(run.hyperparameters),
        framework=run.framework,
        config=config,
        output_dir=trial_path,
        progress=lambda line: out(f"    {run.describe()}: {line}"),
        resume=resuming,
    )
    mark_finished(
        trial_path,
        f"run_training stopped: {result.stop_reason}",
        label=run.label,
        submission=run.submission,
        averaging=run.averaging,
        seed=run.seed,
        target_metric=result.target_metric_name,
        validation_target=result.validation_target,
        direction=result.direction,
        max_runtime_sec=float(workload.max_allowed_runtime_sec),
    )


def report_failure(prefix: str, exc: Exception, out: Emit) -> None:
    """The error and the last lines of its traceback, so a grid can go on to the next cell."""
    out(f"{prefix}: FAILED: {type(exc).__name__}: {exc}")
    for line in traceback.format_exc().rstrip().splitlines()[-6:]:
        out(f"    | {line}")


def run_embedded_suite(
    settings: EmbeddedSettings,
    *,
    repo_root: str | Path | None = None,
    dry_run: bool = False,
    resume: bool = True,
    report: bool = True,
    out: Emit = print,
    registry: Any = embedded_registry,
    loop: Any = local_loop,
) -> EmbeddedOutcome:
    """Runs the grid (skipping finished cells), prints the table, writes the report.

    ``registry`` and ``loop`` are the embedded registry and the local loop, or stand-ins
    with their ``make_workload`` / ``LoopConfig`` and ``run_training``.
    """
    repo = find_repo_root(repo_root)
    names = select_workloads(settings.workloads, tuple(registry.EMBEDDED_WORKLOADS))
    runs = plan_runs(settings, repo, names)
    root = settings.root
    out(f"embedded suite: {len(runs)} run(s) into {root}")
    grid = _Grid(settings, repo, registry, loop, WarmUp(repo, registry, loop), out)
    statuses = [
        grid.run_cell(f"[{index}/{len(runs)}] {run.describe()}", run, dry_run, resume)
        for index, run in enumerate(runs, start=1)
    ]
    if dry_run or not root.is_dir():
        return EmbeddedOutcome(tuple(runs), tuple(statuses), (), (), None)
    trials = load_results(root)
    results = aggregate(trials)
    out("")
    out(embedded_table(results, runs))
    files = _write_report(trials, runs, settings, out) if report and trials else None
    return EmbeddedOutcome(tuple(runs), tuple(statuses), tuple(trials), tuple(results), files)


@dataclasses.dataclass(frozen=True)
class _Grid:
    settings: EmbeddedSettings
    repo: Path
    registry: Any
    loop: Any
    warm_up: WarmUp
    out: Emit

    def run_cell(self, prefix: str, run: EmbeddedRun, dry_run: bool, resume: bool) -> str:
        """One cell: skipped, planned (dry run), finished or failed."""
        root = self.settings.root
        trial_path = run.trial_dir(root)
        if resume and is_finished(trial_path):
            self.out(f"{prefix}: finished earlier, skipping")
            return "skipped"
        if dry_run:
            self.out(f"{prefix}: would run {run.submission_path} -> {trial_path}")
            return "planned"
        if not resume and trial_path.exists():
            shutil.rmtree(trial_path)  # --overwrite: start this run over
        try:
            warm_seconds = self.warm_up.before(run)
            if warm_seconds:
                self.out(
                    f"{prefix}: warmed up {run.framework} {run.submission} on {run.workload} "
                    f"in {warm_seconds:.1f}s (untimed, discarded)"
                )
            self.out(f"{prefix}: running")
            started = time.monotonic()
            run_one(run, root, self.repo, self.registry, self.loop, self.settings, self.out)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            report_failure(prefix, exc, self.out)
            return "failed"
        self.out(f"{prefix}: done in {time.monotonic() - started:.1f}s")
        return "finished"


def _write_report(
    trials: Sequence[TrialResult],
    runs: Sequence[EmbeddedRun],
    settings: EmbeddedSettings,
    out: Emit,
) -> ReportFiles:
    baseline = next((r.label for r in runs if r.averaging == "none"), None)
    files = build_report(
        trials,
        settings.root / "report",
        title=f"Embedded suite: {settings.experiment_name}",
        baseline=baseline,
        # The demo compares averaging within each framework, as its table does.
        pool_frameworks=False,
    )
    out(f"\nreport: {files.markdown}")
    return files


def embedded_table(results: Sequence[WorkloadResult], runs: Sequence[EmbeddedRun]) -> str:
    """workload | framework | submission | averaging | steps | seconds | best metric."""
    split = {run.label: (submission_label(run.submission), run.averaging) for run in runs}
    header = (
        "workload",
        "framework",
        "submission",
        "averaging",
        "steps to target",
        "seconds to target",
        "best metric",
    )
    rows = []
    for r in sorted(results, key=lambda r: (r.workload, r.framework, r.label)):
        submission, averaging = split.get(r.label, (r.label, "?"))
        rows.append(
            (
                r.workload,
                r.framework,
                submission,
                averaging,
                format_number(r.steps_to_target),
                format_seconds(r.time_to_target),
                format_number(r.best_metric),
            )
        )
    return text_table(header, rows)
