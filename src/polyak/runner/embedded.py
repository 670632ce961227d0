"""The embedded suite: the small CPU workloads, trained through polyak's local loop.

It gives the runner something real to do on a machine without GPUs or
datasets. The grid is submissions x frameworks x averaging modes x workloads x
seeds x tuning trials:

- a submission (``nadamw``, ``shampoo`` or a path) is the module
  ``submissions/<name>/<framework>/submission.py``, loaded by file path;
- its hyperparameters are the k-th point of ``tuning_search_spaces/<name>.json``
  (or ``--tuning_search_space``), with the averaging mode merged in as an
  override: ``{"averaging": "none" | "lawa" | "ema" | "twa"}`` (twa: PyTorch only);
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
``eval_period_steps``). Finished runs are skipped on resume. The
suite ends by printing the time-to-target table and writing the report into
``<experiment_dir>/<experiment_name>/report/``.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import math
import os
import shutil
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from polyak.files import atomic_write_json
from polyak.runner.commands import (
    default_search_space,
    find_repo_root,
    resolve_submission,
    submission_label,
)
from polyak.runner.completion import EVAL_CSV, is_finished, mark_finished
from polyak.runner.errors import LaunchConfigError, RunnerError
from polyak.runner.report import ReportFiles, build_report, format_number, format_seconds
from polyak.runner.results import TrialResult, WorkloadResult, aggregate, load_results
from polyak.runner.search_space import load_search_space
from polyak.runner.submission_loader import load_submission_module
from polyak.runner.workload_table import (
    FRAMEWORKS,
    metric_direction,
    probe_direction,
    select_workloads,
)

AVERAGING_MODES: tuple[str, ...] = ("none", "lawa", "ema", "twa")
# TWA is implemented for PyTorch only; a grid asking for it skips the JAX cells.
TORCH_ONLY_MODES: tuple[str, ...] = ("twa",)
Emit = Callable[[str], None]


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

    def __post_init__(self) -> None:
        for name, allowed in (("frameworks", FRAMEWORKS), ("averaging", AVERAGING_MODES)):
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


def _import_embedded(module: str) -> Any:
    try:
        return importlib.import_module(f"polyak.workloads.{module}")
    except ImportError as exc:
        raise RunnerError(
            f"the embedded workloads are not available ({exc}); they live in "
            "polyak.workloads.registry and polyak.workloads.loop"
        ) from exc


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


def _hyperparameter_tuple(point: dict[str, Any]) -> Any:
    return collections.namedtuple("Hyperparameters", list(point))(**point)


def _make_config(config_class: Any, **wanted: Any) -> Any:
    """Builds LoopConfig from the fields it actually has (the loop is someone else's)."""
    fields = getattr(config_class, "__dataclass_fields__", None)
    if fields is not None:
        wanted = {k: v for k, v in wanted.items() if k in fields}
    return config_class(**wanted)


def _workload_attr(workload: Any, name: str, default: Any = None) -> Any:
    try:
        return getattr(workload, name)
    except Exception:
        return default


def _progress_printer(run: EmbeddedRun, metric: str, out: Emit) -> Callable[..., None]:
    column = f"validation/{metric}"

    def on_progress(*args: Any, **kwargs: Any) -> None:
        record = args[0] if args else kwargs
        as_dict = record if isinstance(record, dict) else getattr(record, "__dict__", {})
        step = as_dict.get("global_step", as_dict.get("step"))
        metrics = as_dict.get("metrics") or as_dict.get("eval_result") or as_dict
        value = metrics.get(column) if isinstance(metrics, dict) else None
        seconds = as_dict.get("accumulated_submission_time", as_dict.get("submission_time"))
        if isinstance(metrics, dict) and seconds is None:
            seconds = metrics.get("accumulated_submission_time")
        if step is None and value is None:
            out(f"    {run.describe()}: {record}")
            return
        text = f"    {run.describe()} step {step}"
        if isinstance(value, (int, float)):
            text += f" {column}={value:.5g}"
        if isinstance(seconds, (int, float)):
            text += f" t={seconds:.1f}s"
        out(text)

    return on_progress


def _target_details(workload: Any) -> dict[str, Any]:
    """What the report needs to score this run, recorded in its finished-marker."""
    metric = str(_workload_attr(workload, "target_metric_name"))
    target = float(_workload_attr(workload, "validation_target_value"))
    direction = _workload_attr(workload, "target_direction")
    if direction not in ("min", "max"):
        direction = probe_direction(workload, metric, target) or metric_direction(metric)
    budget = _workload_attr(workload, "max_allowed_runtime_sec", math.inf)
    return {
        "target_metric": metric,
        "validation_target": target,
        "direction": direction,
        "max_runtime_sec": float(budget),
    }


def _complete_metadata(
    trial_path: Path, run: EmbeddedRun, workload: Any, details: dict[str, Any]
) -> None:
    """AlgoPerf's hparams.json and meta_data_0.json, when the loop did not write them."""
    if not (trial_path / "hparams.json").exists():
        atomic_write_json(trial_path / "hparams.json", run.hyperparameters)
    if not list(trial_path.glob("meta_data_*.json")):
        meta = {
            f"workload.{name}": _workload_attr(workload, name)
            for name in (
                "target_metric_name",
                "validation_target_value",
                "test_target_value",
                "max_allowed_runtime_sec",
                "step_hint",
                "eval_period_time_sec",
            )
        }
        meta["workload.target_direction"] = details["direction"]
        meta["rng_seed"] = run.seed
        atomic_write_json(trial_path / "meta_data_0.json", meta)


def run_one(
    run: EmbeddedRun,
    root: Path,
    repo_root: Path,
    registry: Any,
    loop: Any,
    settings: EmbeddedSettings,
    out: Emit,
) -> None:
    """Trains one cell and marks it finished; raises on failure."""
    workload = registry.make_workload(run.workload, run.framework)
    module = load_submission_module(repo_root / run.submission_path)
    step_hint = int(_workload_attr(workload, "step_hint", 1000))
    max_steps = settings.max_global_steps or step_hint
    config = _make_config(
        loop.LoopConfig,
        max_steps=max_steps,
        eval_every_steps=settings.eval_every_steps
        or _workload_attr(workload, "eval_period_steps")
        or max(1, max_steps // 20),
        max_runtime_sec=float(_workload_attr(workload, "max_allowed_runtime_sec", math.inf)),
        rng_seed=run.seed,
        stop_at_target=True,
        checkpoint=True,
    )
    trial_path = run.trial_dir(root)
    resuming = trial_path.exists()
    trial_path.mkdir(parents=True, exist_ok=True)
    details = _target_details(workload)
    kwargs: dict[str, Any] = {
        "framework": run.framework,
        "config": config,
        "output_dir": trial_path,
        "progress": _progress_printer(run, details["target_metric"], out),
    }
    if resuming:
        kwargs["resume"] = True
    loop.run_training(workload, module, _hyperparameter_tuple(run.hyperparameters), **kwargs)
    if not (trial_path / EVAL_CSV).is_file():
        raise RunnerError(f"the local loop wrote no {EVAL_CSV} into {trial_path}")
    _complete_metadata(trial_path, run, workload, details)
    mark_finished(
        trial_path,
        "run_training returned",
        label=run.label,
        submission=run.submission,
        averaging=run.averaging,
        seed=run.seed,
        **details,
    )


def run_embedded_suite(
    settings: EmbeddedSettings,
    *,
    repo_root: str | Path | None = None,
    dry_run: bool = False,
    resume: bool = True,
    report: bool = True,
    out: Emit = print,
    registry: Any = None,
    loop: Any = None,
) -> EmbeddedOutcome:
    """Runs the grid (skipping finished cells), prints the table, writes the report."""
    registry = registry or _import_embedded("registry")
    if loop is None and not dry_run:
        loop = _import_embedded("loop")
    root_repo = find_repo_root(repo_root)
    names = select_workloads(settings.workloads, tuple(registry.EMBEDDED_WORKLOADS))
    runs = plan_runs(settings, root_repo, names)
    root = settings.root
    statuses: list[str] = []
    out(f"embedded suite: {len(runs)} run(s) into {root}")
    for index, run in enumerate(runs, start=1):
        prefix = f"[{index}/{len(runs)}] {run.describe()}"
        trial_path = run.trial_dir(root)
        if resume and is_finished(trial_path):
            statuses.append("skipped")
            out(f"{prefix}: finished earlier, skipping")
            continue
        if dry_run:
            statuses.append("planned")
            out(f"{prefix}: would run {run.submission_path} -> {trial_path}")
            continue
        if not resume and trial_path.exists():
            shutil.rmtree(trial_path)  # --overwrite: start this run over
        out(f"{prefix}: running")
        started = time.monotonic()
        try:
            run_one(run, root, root_repo, registry, loop, settings, out)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            statuses.append("failed")
            out(f"{prefix}: FAILED: {type(exc).__name__}: {exc}")
            for line in traceback.format_exc().rstrip().splitlines()[-6:]:
                out(f"    | {line}")
            continue
        statuses.append("finished")
        out(f"{prefix}: done in {time.monotonic() - started:.1f}s")
    if dry_run or not root.is_dir():
        return EmbeddedOutcome(tuple(runs), tuple(statuses), (), (), None)
    trials = load_results(root)
    results = aggregate(trials)
    out("")
    out(embedded_table(results, runs))
    files = None
    if report and trials:
        baseline = next((r.label for r in runs if r.averaging == "none"), None)
        files = build_report(
            trials,
            root / "report",
            title=f"Embedded suite: {settings.experiment_name}",
            baseline=baseline,
        )
        out(f"\nreport: {files.markdown}")
    return EmbeddedOutcome(tuple(runs), tuple(statuses), tuple(trials), tuple(results), files)


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
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
