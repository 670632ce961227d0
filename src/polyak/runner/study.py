"""The averaging study: Ajroldi, Orvieto & Geiping's questions, asked of the embedded workloads.

"When, Where and Why to Average Weights?" (ICML 2025) answers three questions
with thousands of GPU-hours of AlgoPerf runs. This module asks the same ones
of the small CPU workloads, so that anyone can check them in minutes:

1. *Does averaging reach the target sooner?* Every submission x framework x
   workload with no averaging, LAWA and EMA (and TWA for PyTorch once
   ``polyak.averaging.config.MODES`` accepts ``"twa"``), over several seeds:
   steps and submission time to the validation target, median and min-max.
2. *How sensitive is it to ν (``averaging_every``), L (``lawa_window``) and β
   (``ema_beta``)?* A grid for one submission and framework: ν x L for LAWA,
   ν x β for EMA, plus EMA with ν = 1 and β = 0.9 (the setting the paper calls
   poor).
3. *Does it replace learning-rate decay?* Cosine decay without averaging
   against a constant learning rate with LAWA or EMA (and cosine with LAWA):
   the best validation metric so far against steps and time.

For every averaged run the raw weights' curve is the run without averaging
with the same seed and hyperparameters: averaging never changes the training
trajectory in polyak, so that run *is* the raw trajectory (the study checks
this on the logged training losses and reports the largest difference).

How runs are made. Each run is one cell of :mod:`polyak.runner.embedded`
(:func:`~polyak.runner.embedded.run_one`), in its layout
``<root>/<label>/seed_<s>/<workload>_<framework>/trial_1/`` with its
finished-markers, so an interrupted study resumes where it stopped and the
folder reads like any embedded-suite folder. Two things differ, both injected
through ``run_one``'s registry and loop arguments rather than new flags:

- runs never stop at the target: they train to ``step_hint`` (or the time
  budget) so that curves, best metrics and raw-vs-averaged gaps cover the
  whole run. Time to target is still AlgoPerf's: the submission time at the
  first eval that reaches the validation target.
- a constant learning rate uses the optimizer's own switch when it has one
  (``lr_schedule="constant"`` or ``use_cosine_decay=False``); otherwise the
  workload's ``step_hint`` is stretched (x100 by default) so that the cosine
  stays flat, with ``warmup_factor`` scaled down to keep the same warmup steps
  and ``--max_global_steps`` at the real ``step_hint``. Which one was used is
  written into the results.

PyTorch compiles NadamW's fused kernel once per process; an unrecorded
warm-up run of a few steps precedes the first recorded PyTorch run of each
submission and workload, so that the one-time cost is not charged to
whichever run happens to come first. JAX compiles its step programs afresh in
every run, and that time counts, as in AlgoPerf.

The results page (:func:`write_results`) is Markdown with CSV tables and PNG
plots, and every comparative sentence in it is computed from the numbers.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import datetime
import importlib
import json
import math
import os
import platform
import shutil
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from polyak.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from polyak.runner.commands import (
    default_search_space,
    find_repo_root,
    resolve_submission,
    submission_label,
)
from polyak.runner.completion import EVAL_CSV, MEASUREMENTS_CSV, is_finished
from polyak.runner.embedded import EmbeddedRun, EmbeddedSettings, run_one
from polyak.runner.errors import LaunchConfigError
from polyak.runner.results import (
    TrialLocation,
    TrialResult,
    best_value,
    load_trial,
    median,
)
from polyak.runner.search_space import load_search_space
from polyak.runner.submission_loader import load_submission_module
from polyak.runner.tables import format_number, md_table, png_bytes, write_csv
from polyak.runner.workload_table import FRAMEWORKS

Emit = Callable[[str], None]

AVERAGING_CHOICES: tuple[str, ...] = ("none", "lawa", "ema", "twa")
SCHEDULES: tuple[str, ...] = ("cosine", "constant")
TIMING_FILE = "study_timing.json"
SESSIONS_FILE = "study_sessions.json"
RESULTS_FOLDER = "results"
RESULTS_MARKDOWN = "results.md"

# The paper's numbers the text compares against (Ajroldi, Orvieto & Geiping 2025).
PAPER_STEP_RATIO = 0.82
PAPER_HORIZON_FRACTION = 0.01
# Differences smaller than this fraction of the metric's value are called "the same".
NEGLIGIBLE_FRACTION = 0.001

# Constant-LR switches an optimizer factory may read, in order of preference.
LR_SCHEDULE_SWITCH = "lr_schedule"
COSINE_SWITCH = "use_cosine_decay"
STRETCHED = "stretched_step_hint"

_COLORS = {"none": "black", "lawa": "tab:blue", "ema": "tab:orange", "twa": "tab:green"}


class StudyConfigError(LaunchConfigError):
    """A study setting that cannot be run (names the value and what was expected)."""


# ---- what is run ------------------------------------------------------------------------


def _number_text(value: float) -> str:
    return f"{value:g}"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One averaging configuration under one learning-rate schedule."""

    averaging: str = "none"
    every: int | None = None
    window: int | None = None
    beta: float | None = None
    schedule: str = "cosine"

    def __post_init__(self) -> None:
        if self.averaging not in AVERAGING_CHOICES:
            raise StudyConfigError(
                f"averaging={self.averaging!r}; expected one of {', '.join(AVERAGING_CHOICES)}"
            )
        if self.schedule not in SCHEDULES:
            raise StudyConfigError(
                f"schedule={self.schedule!r}; expected one of {', '.join(SCHEDULES)}"
            )
        needs = {"none": (), "lawa": ("every", "window"), "twa": ("every", "window")}
        for name in needs.get(self.averaging, ("every", "beta")):
            if getattr(self, name) is None:
                raise StudyConfigError(f"{self.averaging} needs {name} (got None)")
        for name in ("every", "window"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                raise StudyConfigError(f"{name}={value!r}; expected an integer >= 1")
        if self.beta is not None and not 0.0 < self.beta < 1.0:
            raise StudyConfigError(f"beta={self.beta!r}; expected a number in (0, 1)")

    @property
    def averaged(self) -> bool:
        return self.averaging != "none"

    def raw(self) -> Setting:
        """The run whose weights this setting averages: no averaging, same schedule."""
        return Setting("none", schedule=self.schedule)

    def label(self, submission: str) -> str:
        parts = [submission_label(submission)]
        if self.schedule == "constant":
            parts.append("constlr")
        if self.averaging in ("lawa", "twa"):
            parts.append(f"{self.averaging}_nu{self.every}_L{self.window}")
        elif self.averaging == "ema":
            parts.append(f"ema_nu{self.every}_b{_number_text(self.beta)}")
        return "_".join(parts)

    def hyperparameters(self) -> dict[str, Any]:
        point: dict[str, Any] = {"averaging": self.averaging}
        if self.every is not None:
            point["averaging_every"] = int(self.every)
        if self.window is not None:
            point["lawa_window"] = int(self.window)
        if self.beta is not None:
            point["ema_beta"] = float(self.beta)
        return point

    def describe(self) -> str:
        schedule = "constant LR" if self.schedule == "constant" else "cosine"
        if self.averaging == "none":
            return f"{schedule}, no averaging"
        if self.averaging == "ema":
            return f"{schedule}, EMA ν={self.every} β={_number_text(self.beta)}"
        return f"{schedule}, {self.averaging.upper()} ν={self.every} L={self.window}"

    def short(self) -> str:
        """The averaging part only (tables that hold the schedule fixed)."""
        return self.describe().split(", ", 1)[1]

    def horizon(self) -> float | None:
        """Steps the average looks back: ν·L for LAWA/TWA, ν/(1−β) for EMA."""
        if self.averaging in ("lawa", "twa"):
            return float(self.every * self.window)
        if self.averaging == "ema":
            return self.every / (1.0 - self.beta)
        return None


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """What the study runs. The defaults are the full study (see ``quick_settings``)."""

    # Question 1: time to target.
    workloads: tuple[str, ...] = ("digits", "diabetes")
    submissions: tuple[str, ...] = ("nadamw", "shampoo")
    frameworks: tuple[str, ...] = ("pytorch", "jax")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    # Chosen before any run: the grid's shortest horizons, the closest it has to the
    # paper's ν·L ≈ 1% of the budget, and the paper's β.
    lawa: Setting = Setting("lawa", every=8, window=5)
    ema: Setting = Setting("ema", every=8, beta=0.9)
    include_twa: bool | None = None  # None: whenever MODES accepts "twa" (PyTorch only)
    # Question 2: sensitivity (one submission and framework).
    grid_submission: str = "nadamw"
    grid_framework: str = "pytorch"
    grid_workloads: tuple[str, ...] = ("digits", "diabetes")
    grid_seeds: tuple[int, ...] = (0, 1, 2)
    grid_every: tuple[int, ...] = (8, 32, 128)
    grid_windows: tuple[int, ...] = (5, 10, 20)
    grid_betas: tuple[float, ...] = (0.6, 0.9, 0.99)
    poor_ema: Setting | None = Setting("ema", every=1, beta=0.9)
    # Question 3: averaging against LR decay (grid submission and framework).
    decay_workloads: tuple[str, ...] = ("digits", "diabetes")
    decay_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    constant_lr_stretch: int = 100
    # Loop and folders.
    max_global_steps: int | None = None
    eval_every_steps: int | None = None
    experiment_dir: str = "~/experiment_runs"
    experiment_name: str = "averaging_study"

    def __post_init__(self) -> None:
        for name in ("workloads", "submissions", "frameworks", "seeds"):
            if not getattr(self, name):
                raise StudyConfigError(f"{name} is empty; the time-to-target part needs one")
        for name in ("seeds", "grid_seeds", "decay_seeds"):
            bad = [s for s in getattr(self, name) if not isinstance(s, int) or s < 0]
            if bad:
                raise StudyConfigError(f"{name}: {bad}; expected integers >= 0")
        bad_frameworks = [f for f in (*self.frameworks, self.grid_framework) if f not in FRAMEWORKS]
        if bad_frameworks:
            raise StudyConfigError(
                f"framework(s) {bad_frameworks}; expected from {', '.join(FRAMEWORKS)}"
            )
        if self.lawa.averaging != "lawa" or self.ema.averaging != "ema":
            raise StudyConfigError(
                f"lawa={self.lawa} / ema={self.ema}: expected a LAWA and an EMA setting"
            )
        if self.poor_ema is not None and self.poor_ema.averaging != "ema":
            raise StudyConfigError(f"poor_ema={self.poor_ema}; expected an EMA setting")
        if not isinstance(self.constant_lr_stretch, int) or self.constant_lr_stretch < 2:
            raise StudyConfigError(
                f"constant_lr_stretch={self.constant_lr_stretch!r}; expected an integer >= 2"
            )
        for name in ("max_global_steps", "eval_every_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise StudyConfigError(f"{name}={value!r}; expected None or an integer >= 1")

    @property
    def root(self) -> Path:
        return Path(os.path.abspath(os.path.expanduser(self.experiment_dir))) / self.experiment_name

    def twa_enabled(self) -> bool:
        if self.include_twa is not None:
            return self.include_twa
        from polyak.averaging.config import MODES

        return "twa" in MODES

    def time_to_target_settings(self, framework: str) -> list[Setting]:
        settings = [Setting(), self.lawa, self.ema]
        if framework == "pytorch" and self.twa_enabled():
            settings.append(Setting("twa", every=self.lawa.every, window=self.lawa.window))
        return settings

    def lawa_grid(self) -> list[Setting]:
        return [
            Setting("lawa", every=nu, window=window)
            for nu in self.grid_every
            for window in self.grid_windows
        ]

    def ema_grid(self) -> list[Setting]:
        grid = [
            Setting("ema", every=nu, beta=beta)
            for nu in self.grid_every
            for beta in self.grid_betas
        ]
        if self.poor_ema is not None and self.poor_ema not in grid:
            grid.append(self.poor_ema)
        return grid

    def decay_settings(self) -> list[Setting]:
        constant = [
            dataclasses.replace(s, schedule="constant") for s in (Setting(), self.lawa, self.ema)
        ]
        return [Setting(), self.lawa, self.ema, *constant]


def quick_settings(**overrides: Any) -> StudySettings:
    """``--quick``: one workload, one seed, a reduced grid (minutes on 2 cores)."""
    values: dict[str, Any] = {
        "workloads": ("diabetes",),
        "seeds": (0,),
        "grid_workloads": ("diabetes",),
        "grid_seeds": (0,),
        "grid_every": (8, 32),
        "grid_windows": (5, 20),
        "grid_betas": (0.9, 0.99),
        "decay_workloads": ("diabetes",),
        "decay_seeds": (0,),
        "experiment_name": "averaging_study_quick",
    }
    values.update(overrides)
    return StudySettings(**values)


@dataclasses.dataclass(frozen=True)
class StudyRun(EmbeddedRun):
    """One run of the study: an embedded-suite cell with a study label and setting."""

    name: str = ""
    setting: Setting = Setting()
    constant_lr_method: str = ""  # "", LR_SCHEDULE_SWITCH, COSINE_SWITCH or STRETCHED

    @property
    def label(self) -> str:
        return self.name

    @property
    def key(self) -> tuple[str, int, str, str]:
        return (self.name, self.seed, self.workload, self.framework)

    def describe(self) -> str:
        return f"{self.name} {self.framework} {self.workload} seed {self.seed}"

    def raw_key(self) -> tuple[str, int, str, str]:
        return (self.setting.raw().label(self.submission), self.seed, self.workload, self.framework)


def constant_lr_method(defaults: Mapping[str, Any], point: Mapping[str, Any]) -> str:
    """How a constant LR is obtained from a submission with these hyperparameter names."""
    names = set(defaults) | set(point)
    if LR_SCHEDULE_SWITCH in names:
        return LR_SCHEDULE_SWITCH
    if COSINE_SWITCH in names:
        return COSINE_SWITCH
    return STRETCHED


def _constant_lr_overrides(
    method: str, point: Mapping[str, Any], stretch: int, step_hint: int
) -> dict[str, Any]:
    if method == LR_SCHEDULE_SWITCH:
        return {LR_SCHEDULE_SWITCH: "constant"}
    if method == COSINE_SWITCH:
        return {COSINE_SWITCH: False}
    # Keep the warmup's length in steps: int(factor' · stretch · hint) == int(factor · hint).
    warmup_factor = float(point.get("warmup_factor", 0.0))
    warmup_steps = int(warmup_factor * step_hint)
    return {"warmup_factor": (warmup_steps + 0.5) / (stretch * step_hint) if warmup_steps else 0.0}


def _import(module: str) -> Any:
    return importlib.import_module(f"polyak.workloads.{module}")


def plan_study(settings: StudySettings, repo_root: Path, registry: Any = None) -> list[StudyRun]:
    """Every run of the three parts, once each (parts share runs), in a fixed order."""
    registry = registry or _import("registry")
    known = tuple(registry.EMBEDDED_WORKLOADS)
    for name in {*settings.workloads, *settings.grid_workloads, *settings.decay_workloads}:
        if name not in known:
            raise StudyConfigError(
                f"unknown embedded workload {name!r}; choices: {', '.join(known)}"
            )
    points: dict[str, dict[str, Any]] = {}
    step_hints: dict[str, int] = {}

    def base_point(submission: str) -> dict[str, Any]:
        if submission not in points:
            space = load_search_space(repo_root / default_search_space(submission))
            points[submission] = dict(space.draw(1)[0])
        return points[submission]

    def step_hint(workload: str) -> int:
        if workload not in step_hints:
            step_hints[workload] = int(registry.make_workload(workload, "pytorch").step_hint)
        return step_hints[workload]

    # Seed-major: the settings of one seed run back to back, so that a drift in the
    # machine's load hits an averaged run and its raw partner alike.
    wanted: list[tuple[str, str, str, int, Setting]] = []
    for workload in settings.workloads:
        for submission in settings.submissions:
            for framework in settings.frameworks:
                for seed in settings.seeds:
                    wanted += [
                        (submission, framework, workload, seed, setting)
                        for setting in settings.time_to_target_settings(framework)
                    ]
    grid = [Setting(), *settings.lawa_grid(), *settings.ema_grid()]
    for workload in settings.grid_workloads:
        for seed in settings.grid_seeds:
            wanted += [
                (settings.grid_submission, settings.grid_framework, workload, seed, setting)
                for setting in grid
            ]
    for workload in settings.decay_workloads:
        for seed in settings.decay_seeds:
            wanted += [
                (settings.grid_submission, settings.grid_framework, workload, seed, setting)
                for setting in settings.decay_settings()
            ]

    runs: dict[tuple[str, int, str, str], StudyRun] = {}
    for submission, framework, workload, seed, setting in wanted:
        name = setting.label(submission)
        if (name, seed, workload, framework) in runs:
            continue
        point = {**base_point(submission), **setting.hyperparameters()}
        method = ""
        path = resolve_submission(submission, framework, repo_root)
        if setting.schedule == "constant":
            module = load_submission_module(repo_root / path)
            defaults = getattr(module, "DEFAULT_HYPERPARAMETERS", {}) or {}
            method = constant_lr_method(defaults, point)
            point.update(
                _constant_lr_overrides(
                    method, point, settings.constant_lr_stretch, step_hint(workload)
                )
            )
        runs[(name, seed, workload, framework)] = StudyRun(
            submission=submission,
            submission_path=path,
            framework=framework,
            averaging=setting.averaging,
            workload=workload,
            seed=seed,
            trial=1,
            hyperparameters=point,
            name=name,
            setting=setting,
            constant_lr_method=method,
        )
    return list(runs.values())


# ---- running ----------------------------------------------------------------------------


def stretch_step_hint(workload: Any, factor: int) -> Any:
    """The same workload object, now reporting ``factor`` times its ``step_hint``."""
    base = type(workload)
    hint = int(workload.step_hint) * factor
    stretched = type(
        f"{base.__name__}StepHintTimes{factor}",
        (base,),
        {"step_hint": property(lambda self: hint), "__module__": base.__module__},
    )
    workload.__class__ = stretched
    return workload


class _StudyRegistry:
    """The embedded registry, with the step_hint stretched for emulated constant-LR runs."""

    def __init__(self, registry: Any, stretch: int) -> None:
        self._registry = registry
        self._stretch = stretch
        self.EMBEDDED_WORKLOADS = registry.EMBEDDED_WORKLOADS

    def make_workload(self, name: str, framework: str) -> Any:
        workload = self._registry.make_workload(name, framework)
        return stretch_step_hint(workload, self._stretch) if self._stretch > 1 else workload


class _FullLengthLoop:
    """The local loop as ``run_one`` drives it, except that runs never stop at the target."""

    def __init__(self, loop: Any) -> None:
        self.base = loop

    def LoopConfig(self, **fields: Any) -> Any:
        return self.base.LoopConfig(**{**fields, "stop_at_target": False})

    def run_training(self, *args: Any, **kwargs: Any) -> Any:
        return self.base.run_training(*args, **kwargs)


def _hyperparameter_tuple(point: Mapping[str, Any]) -> Any:
    return collections.namedtuple("Hyperparameters", list(point))(**point)


def _warm_up(run: StudyRun, repo_root: Path, registry: Any, loop: Any) -> None:
    """A few unrecorded steps (with averaging, so its paths run too) to absorb one-time
    compilation before the first recorded run of this submission and workload."""
    workload = registry.make_workload(run.workload, run.framework)
    module = load_submission_module(repo_root / run.submission_path)
    point = {
        **run.hyperparameters,
        "averaging": "lawa",
        "averaging_every": 2,
        "lawa_window": 2,
    }
    config = loop.LoopConfig(
        max_steps=6, eval_every_steps=3, rng_seed=run.seed, stop_at_target=False, checkpoint=False
    )
    loop.run_training(
        workload, module, _hyperparameter_tuple(point), framework=run.framework, config=config
    )


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


@dataclasses.dataclass(frozen=True)
class StudyOutcome:
    runs: tuple[StudyRun, ...]
    statuses: tuple[str, ...]
    analysis: StudyAnalysis | None
    markdown: Path | None
    files: tuple[Path, ...]


def run_study(
    settings: StudySettings,
    *,
    repo_root: str | Path | None = None,
    output_dir: str | Path | None = None,
    command: str | None = None,
    run: bool = True,
    out: Emit = print,
    verbose: bool = False,
    registry: Any = None,
    loop: Any = None,
) -> StudyOutcome:
    """Runs what is not finished yet (with progress), then writes the results page.

    ``output_dir`` receives ``results.md`` and ``results/`` (nothing is written when it
    is None); ``run=False`` only rebuilds the page from the runs already on disk.
    """
    registry = registry or _import("registry")
    repo = find_repo_root(repo_root)
    runs = plan_study(settings, repo, registry)
    root = settings.root
    statuses: list[str] = []
    if run:
        loop = _FullLengthLoop(loop or _import("loop"))
        session = {
            "command": command,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average_start": _load_average(),
            "interrupted": True,
        }
        started = time.monotonic()
        try:
            statuses = _execute(runs, settings, root, repo, registry, loop, out, verbose)
            session["interrupted"] = False
        finally:
            session.update(
                elapsed_seconds=round(time.monotonic() - started, 1),
                runs_finished=statuses.count("finished"),
                runs_failed=statuses.count("failed"),
                load_average_end=_load_average(),
            )
            _append_session(root, session)
    analysis = analyze_study(settings, runs, root)
    markdown, files = None, ()
    if output_dir is not None:
        markdown, files = write_results(
            analysis, Path(output_dir), command=command, rebuilt_only=not run
        )
        out(f"results: {markdown}")
    return StudyOutcome(tuple(runs), tuple(statuses), analysis, markdown, tuple(files))


def _execute(
    runs: Sequence[StudyRun],
    settings: StudySettings,
    root: Path,
    repo: Path,
    registry: Any,
    loop: Any,
    out: Emit,
    verbose: bool,
) -> list[str]:
    statuses: list[str] = []
    pending = [r for r in runs if not is_finished(r.trial_dir(root))]
    out(
        f"averaging study: {len(runs)} run(s) into {root}; {len(runs) - len(pending)} finished "
        f"earlier, {len(pending)} to run"
    )
    warmed: set[tuple[str, str, str]] = set()
    spent: dict[tuple[str, str, str], list[float]] = {}  # seconds per run, by kind of run
    started_all = time.monotonic()
    quiet: Emit = out if verbose else (lambda line: None)
    processed = 0
    for index, study_run in enumerate(runs, start=1):
        prefix = f"[{index}/{len(runs)}] {study_run.describe()}"
        trial_path = study_run.trial_dir(root)
        if is_finished(trial_path):
            statuses.append("skipped")
            if verbose:
                out(f"{prefix}: finished earlier, skipping")
            continue
        kind = (study_run.submission, study_run.framework, study_run.workload)
        started = time.monotonic()
        processed += 1
        try:
            if study_run.framework == "pytorch" and kind not in warmed:
                warm_started = time.monotonic()
                _warm_up(study_run, repo, registry, loop.base)
                warmed.add(kind)
                started += time.monotonic() - warm_started  # one-off, not a run's cost
            stretch = (
                settings.constant_lr_stretch if study_run.constant_lr_method == STRETCHED else 1
            )
            step_hint = int(registry.make_workload(study_run.workload, "pytorch").step_hint)
            cell = EmbeddedSettings(
                max_global_steps=settings.max_global_steps or step_hint,
                eval_every_steps=settings.eval_every_steps,
            )
            run_started = time.monotonic()
            run_one(study_run, root, repo, _StudyRegistry(registry, stretch), loop, cell, quiet)
            atomic_write_json(
                trial_path / TIMING_FILE,
                {"wall_seconds": time.monotonic() - run_started, "setting": study_run.name},
            )
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            statuses.append("failed")
            out(f"{prefix}: FAILED: {type(exc).__name__}: {exc}")
            for line in traceback.format_exc().rstrip().splitlines()[-6:]:
                out(f"    | {line}")
            continue
        statuses.append("finished")
        spent.setdefault(kind, []).append(time.monotonic() - started)
        out(
            f"{prefix}: done in {spent[kind][-1]:.1f}s ({processed}/{len(pending)}, elapsed "
            f"{_duration(time.monotonic() - started_all)}, about "
            f"{_duration(_remaining_seconds(pending[processed:], spent))} left)"
        )
    return statuses


def _remaining_seconds(
    remaining: Sequence[StudyRun], spent: Mapping[tuple[str, str, str], Sequence[float]]
) -> float:
    """Runs still to go, each at the mean time of finished runs of its kind (else of all)."""
    every = [seconds for values in spent.values() for seconds in values]
    overall = sum(every) / len(every) if every else 0.0
    total = 0.0
    for run in remaining:
        values = spent.get((run.submission, run.framework, run.workload))
        total += sum(values) / len(values) if values else overall
    return total


def read_sessions(root: Path) -> list[dict[str, Any]]:
    """Every invocation that ran (part of) this study: command, start, elapsed, load."""
    try:
        sessions = json.loads((root / SESSIONS_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return []
    return [s for s in sessions if isinstance(s, dict)] if isinstance(sessions, list) else []


def _append_session(root: Path, session: dict[str, Any]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / SESSIONS_FILE, [*read_sessions(root), session])


def _load_average() -> tuple[float, float, float] | None:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]
    except OSError:
        return None


# ---- analysis ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunStats:
    """One finished run, with its curve and its comparison against the raw weights."""

    run: StudyRun
    trial: TrialResult
    step_hint: int
    dataset: dict[str, Any] | None
    wall_seconds: float | None
    train_losses: dict[int, float]
    gains: tuple[tuple[int, float], ...] = ()  # (step, averaged − raw), + = better
    mean_gain: float = math.nan  # the mean of ``gains`` over the run's evals
    final_gain: float = math.nan
    max_train_loss_diff: float = math.nan  # |Δ training loss| against the raw run

    @property
    def direction(self) -> str:
        return self.trial.direction

    @property
    def steps_to_target(self) -> float:
        steps = self.trial.steps_to_target
        return float(steps) if steps is not None else math.inf

    @property
    def best_metric(self) -> float:
        return self.trial.best_metric

    @property
    def final_metric(self) -> float:
        return self.trial.values[-1] if self.trial.values else math.nan

    @property
    def ms_per_step(self) -> float:
        """Submission milliseconds per step from the 2nd eval on: steady state, without the
        one-time compilation of the first step, the first collection and the first swap."""
        steps, times = self.trial.steps, self.trial.times
        if len(steps) < 3 or steps[-1] <= steps[1]:
            return math.nan
        return 1000.0 * (times[-1] - times[1]) / (steps[-1] - steps[1])


def _sign(direction: str) -> float:
    return 1.0 if direction == "max" else -1.0


def _gains(averaged: TrialResult, raw: TrialResult) -> list[tuple[int, float]]:
    raw_by_step = dict(zip(raw.steps, raw.values))
    sign = _sign(averaged.direction)
    return [
        (step, sign * (value - raw_by_step[step]))
        for step, value in zip(averaged.steps, averaged.values)
        if step in raw_by_step and not math.isnan(value) and not math.isnan(raw_by_step[step])
    ]


def _read_train_losses(trial_path: Path) -> dict[int, float]:
    """Training loss per logged step (the raw weights' forward pass) from measurements.csv."""
    path = trial_path / MEASUREMENTS_CSV
    losses: dict[int, float] = {}
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                loss, step = row.get("loss"), row.get("global_step")
                if loss and step and not row.get("accumulated_submission_time"):
                    losses[int(float(step))] = float(loss)
    except FileNotFoundError:
        pass
    return losses


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _constant_lr_method_used(study_run: StudyRun, hparams: Mapping[str, Any]) -> str:
    if study_run.setting.schedule != "constant":
        return ""
    if hparams.get(LR_SCHEDULE_SWITCH) == "constant":
        return LR_SCHEDULE_SWITCH
    if hparams.get(COSINE_SWITCH) is False:
        return COSINE_SWITCH
    return STRETCHED


def _load_run(study_run: StudyRun, root: Path) -> RunStats | None:
    path = study_run.trial_dir(root)
    if not is_finished(path) or not (path / EVAL_CSV).is_file():
        return None
    trial = load_trial(
        TrialLocation(
            label=study_run.name,
            study=f"seed_{study_run.seed}",
            workload=study_run.workload,
            framework=study_run.framework,
            trial=study_run.trial,
            path=path,
        )
    )
    meta = _read_json(path / "meta_data_0.json")
    timing = _read_json(path / TIMING_FILE)
    # What the run itself used (the plan may have changed since, e.g. a new switch).
    method = _constant_lr_method_used(study_run, _read_json(path / "hparams.json"))
    hint = meta.get("workload.step_hint")
    if method == STRETCHED and hint is not None:
        hint = None  # the stretched value; the real one is the run's step count
    step_hint = int(hint) if hint is not None else int(trial.final_step or 1)
    return RunStats(
        run=dataclasses.replace(study_run, constant_lr_method=method),
        trial=trial,
        step_hint=step_hint,
        dataset=meta.get("dataset"),
        wall_seconds=timing.get("wall_seconds"),
        train_losses=_read_train_losses(path),
    )


def _with_raw(stats: RunStats, raw: RunStats | None) -> RunStats:
    if raw is None or not stats.run.setting.averaged:
        return stats
    gains = _gains(stats.trial, raw.trial)
    shared = [s for s in stats.train_losses if s in raw.train_losses]
    diff = max((abs(stats.train_losses[s] - raw.train_losses[s]) for s in shared), default=math.nan)
    return dataclasses.replace(
        stats,
        gains=tuple(gains),
        mean_gain=float(np.mean([g for _, g in gains])) if gains else math.nan,
        final_gain=gains[-1][1] if gains else math.nan,
        max_train_loss_diff=diff,
    )


@dataclasses.dataclass(frozen=True)
class Summary:
    """One setting on one (workload, submission, framework), over seeds."""

    workload: str
    submission: str
    framework: str
    setting: Setting
    members: tuple[RunStats, ...]
    step_ratios: tuple[float, ...]  # averaged / raw steps to target, per seed (see _ratio)
    time_ratios: tuple[float, ...]

    @property
    def direction(self) -> str:
        return self.members[0].direction

    @property
    def hits(self) -> int:
        return sum(1 for m in self.members if m.trial.hit)

    def values(self, name: str) -> list[float]:
        if name == "steps":
            return [m.steps_to_target for m in self.members]
        if name == "seconds":
            return [m.trial.time_to_target for m in self.members]
        return [getattr(m, name) for m in self.members]

    def median(self, name: str) -> float:
        if name == "step_ratio":
            return median(list(self.step_ratios))
        if name == "time_ratio":
            return median(list(self.time_ratios))
        values = self.values(name)
        if name in ("mean_gain", "final_gain", "ms_per_step"):
            values = [v for v in values if not math.isnan(v)]
        return median(values)

    def spread(self, name: str) -> tuple[float, float]:
        values = self.values(name)
        values = [v for v in values if not math.isnan(v)]
        return (min(values), max(values)) if values else (math.nan, math.nan)

    @property
    def step_hint(self) -> int:
        return self.members[0].step_hint


def _ratio(averaged: float, raw: float) -> float:
    """averaged / raw to target; a miss of the averaged run is inf, of the raw run 0."""
    if math.isinf(averaged):
        return math.inf
    return 0.0 if math.isinf(raw) else averaged / raw


def _summaries(
    stats: Mapping[tuple[str, int, str, str], RunStats],
    runs: Iterable[StudyRun],
    *,
    workload: str,
    submission: str,
    framework: str,
    settings: Sequence[Setting],
    seeds: Sequence[int],
) -> list[Summary]:
    by_name = {r.key: r for r in runs}
    result = []
    for setting in settings:
        members, step_ratios, time_ratios = [], [], []
        for seed in seeds:
            key = (setting.label(submission), seed, workload, framework)
            if key not in stats:
                continue
            member = stats[key]
            members.append(member)
            raw = stats.get(by_name[key].raw_key()) if key in by_name else None
            if setting.averaged and raw is not None and (member.trial.hit or raw.trial.hit):
                step_ratios.append(_ratio(member.steps_to_target, raw.steps_to_target))
                time_ratios.append(_ratio(member.trial.time_to_target, raw.trial.time_to_target))
        if members:
            result.append(
                Summary(
                    workload,
                    submission,
                    framework,
                    setting,
                    tuple(members),
                    tuple(step_ratios),
                    tuple(time_ratios),
                )
            )
    return result


@dataclasses.dataclass(frozen=True)
class StudyAnalysis:
    settings: StudySettings
    runs: tuple[StudyRun, ...]
    stats: dict[tuple[str, int, str, str], RunStats]
    time_to_target: tuple[Summary, ...]
    sensitivity: dict[str, tuple[Summary, ...]]
    decay: dict[str, tuple[Summary, ...]]
    missing: tuple[StudyRun, ...]
    sessions: tuple[dict[str, Any], ...] = ()


def analyze_study(settings: StudySettings, runs: Sequence[StudyRun], root: Path) -> StudyAnalysis:
    """Reads every finished run and groups them by the three questions."""
    loaded = {r.key: _load_run(r, root) for r in runs}
    raw_stats = {k: v for k, v in loaded.items() if v is not None}
    stats = {
        key: _with_raw(value, raw_stats.get(value.run.raw_key()))
        for key, value in raw_stats.items()
    }
    missing = tuple(r for r in runs if loaded[r.key] is None)
    part1 = []
    for workload in settings.workloads:
        for submission in settings.submissions:
            for framework in settings.frameworks:
                part1 += _summaries(
                    stats,
                    runs,
                    workload=workload,
                    submission=submission,
                    framework=framework,
                    settings=settings.time_to_target_settings(framework),
                    seeds=settings.seeds,
                )
    grid = [Setting(), *settings.lawa_grid(), *settings.ema_grid()]
    part2 = {
        workload: tuple(
            _summaries(
                stats,
                runs,
                workload=workload,
                submission=settings.grid_submission,
                framework=settings.grid_framework,
                settings=grid,
                seeds=settings.grid_seeds,
            )
        )
        for workload in settings.grid_workloads
    }
    part3 = {
        workload: tuple(
            _summaries(
                stats,
                runs,
                workload=workload,
                submission=settings.grid_submission,
                framework=settings.grid_framework,
                settings=settings.decay_settings(),
                seeds=settings.decay_seeds,
            )
        )
        for workload in settings.decay_workloads
    }
    return StudyAnalysis(
        settings=settings,
        runs=tuple(runs),
        stats=stats,
        time_to_target=tuple(part1),
        sensitivity=part2,
        decay=part3,
        missing=missing,
        sessions=tuple(read_sessions(root)),
    )


# ---- numbers into words -----------------------------------------------------------------


def _fmt_steps(value: float) -> str:
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "miss"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _fmt_seconds(value: float) -> str:
    if math.isnan(value):
        return "-"
    return "miss" if math.isinf(value) else f"{value:.1f}"


def _fmt_metric(value: float) -> str:
    return format_number(value) if not (isinstance(value, float) and math.isnan(value)) else "-"


def _fmt_gain(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:+.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:+.2g}"


def _steps_phrase(value: float) -> str:
    if math.isinf(value):
        return "no hit (median over seeds a miss)"
    return f"{_fmt_steps(value)} steps"


def _negligible(difference: float, scale: float) -> bool:
    """Below NEGLIGIBLE_FRACTION of the metric's size: a difference no one would act on."""
    return abs(difference) <= NEGLIGIBLE_FRACTION * abs(scale)


def _versus(value: float, reference: float, direction: str) -> str:
    """ "better", "worse" or "the same (within 0.1%)" for value against reference."""
    if _negligible(value - reference, reference):
        return f"the same (within {_percent(NEGLIGIBLE_FRACTION)})"
    return "better" if _better(value, reference, direction) else "worse"


def _fmt_ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def _fmt_ratio(value: float) -> str:
    if math.isnan(value):
        return "-"
    return "miss" if math.isinf(value) else f"{value:.2f}"


def _with_spread(summary: Summary, name: str, fmt: Callable[[float], str]) -> str:
    mid = summary.median(name)
    low, high = summary.spread(name)
    if len(summary.members) == 1 or math.isnan(low):
        return fmt(mid)
    return f"{fmt(mid)} [{fmt(low)}–{fmt(high)}]"


def _percent(value: float) -> str:
    percent = 100 * value
    return f"{percent:.0f}%" if percent >= 100 else f"{percent:.3g}%"


def _average_ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation with average ranks for ties (NaN if undefined)."""
    pairs = [(a, b) for a, b in zip(x, y) if not (math.isnan(a) or math.isnan(b))]
    if len(pairs) < 3:
        return math.nan
    rx = np.array(_average_ranks([a for a, _ in pairs]))
    ry = np.array(_average_ranks([b for _, b in pairs]))
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def _rank_key(summary: Summary) -> tuple[float, float]:
    """Fewer steps to target first (median over seeds), then the larger gain over raw."""
    gain = summary.median("mean_gain")
    return (summary.median("steps"), -gain if not math.isnan(gain) else math.inf)


def findings_time_to_target(analysis: StudyAnalysis) -> list[str]:
    """Question 1, in sentences computed from the part-1 summaries."""
    lines = []
    summaries = analysis.time_to_target
    raw = {(s.workload, s.submission, s.framework): s for s in summaries if not s.setting.averaged}
    modes = list(dict.fromkeys(s.setting.averaging for s in summaries if s.setting.averaged))
    for mode in modes:
        members = [s for s in summaries if s.setting.averaging == mode]
        fewer = same = more = 0
        for s in members:
            base = raw.get((s.workload, s.submission, s.framework))
            if base is None:
                continue
            a, b = s.median("steps"), base.median("steps")
            if a < b:
                fewer += 1
            elif a > b:
                more += 1
            else:
                same += 1
        ratios = [r for s in members for r in s.step_ratios]
        time_ratios = [r for s in members for r in s.time_ratios]
        gains = [s.median("mean_gain") for s in members]
        positive = sum(1 for g in gains if g > 0)
        hits = sum(s.hits for s in members)
        runs = sum(len(s.members) for s in members)
        bases = [
            raw[key]
            for key in {(s.workload, s.submission, s.framework) for s in members}
            if key in raw
        ]
        raw_hits = sum(b.hits for b in bases)
        raw_runs = sum(len(b.members) for b in bases)
        step_ratio = median(ratios) if ratios else math.nan
        time_ratio = median(time_ratios) if time_ratios else math.nan
        if math.isnan(step_ratio):
            paper = (
                "no seed hit the target with or without averaging, so the paper's "
                f"≈{PAPER_STEP_RATIO:.2f} cannot be checked"
            )
        else:
            word = "fewer" if step_ratio < 1 else "more" if step_ratio > 1 else "as many"
            paper = (
                f"{word} steps than without averaging (the paper: ≈{PAPER_STEP_RATIO:.2f} on "
                "AlgoPerf)"
            )
        lines.append(
            f"**{members[0].setting.short()}** hit the target in {hits} of {runs} runs (no "
            f"averaging: {raw_hits} of {raw_runs}) and needed fewer steps than no averaging "
            f"(median over seeds) in {fewer} of {fewer + same + more} workload × optimizer × "
            f"framework cases, as many in {same} and more in {more}. Pooled over cases and "
            f"seeds, the median ratio averaged / raw (same seed) is {_fmt_ratio(step_ratio)} "
            f"in steps, {paper}, and {_fmt_ratio(time_ratio)} in submission time. The "
            f"averaged model scored better than the raw weights on average over the run in "
            f"{positive} of {len(gains)} cases."
        )
    spreads = [
        high / low
        for s in summaries
        for low, high in [s.spread("ms_per_step")]
        if len(s.members) > 1 and low > 0 and math.isfinite(high)
    ]
    if spreads:
        lines.append(
            "Submission times are less trustworthy than steps here: the same configuration's "
            f"steady-state ms per step varied across seeds by up to {max(spreads):.1f}x "
            f"(median {median(spreads):.2f}x) as the shared machine's load changed; step "
            "counts do not depend on the load."
        )
    return lines


def _grid_findings(
    workload: str, summaries: Sequence[Summary], settings: StudySettings
) -> list[str]:
    lines = []
    raw = next((s for s in summaries if not s.setting.averaged), None)
    lawa = [s for s in summaries if s.setting.averaging == "lawa"]
    ema = [s for s in summaries if s.setting.averaging == "ema"]
    hint = summaries[0].step_hint if summaries else 1
    raw_steps = raw.median("steps") if raw is not None else math.nan
    for name, group in (("LAWA", lawa), ("EMA", ema)):
        if not group:
            continue
        ranked = sorted(group, key=_rank_key)
        best, worst = ranked[0], ranked[-1]
        horizons = [s.setting.horizon() or math.nan for s in group]
        rho = spearman(horizons, [s.median("steps") for s in group])
        rho_gain = spearman(horizons, [s.median("mean_gain") for s in group])
        trend = (
            "rise with" if rho > 0.5 else "fall with" if rho < -0.5 else "show no clear trend in"
        )
        shortest = min(horizons)
        horizon_word = "ν·L" if name == "LAWA" else "ν/(1−β)"
        criterion = (
            "fewest median steps to target, ties broken by the larger mean gain over raw"
            if math.isfinite(best.median("steps"))
            else "no setting reached the target in the median, so: the larger mean gain over raw"
        )
        lines.append(
            f"{workload}, {name}: the best setting ({criterion}) is **{best.setting.short()}** "
            f"with {_steps_phrase(best.median('steps'))} (no averaging: "
            f"{_steps_phrase(raw_steps)}) and horizon {horizon_word} = "
            f"{best.setting.horizon():.0f} steps = {_percent(best.setting.horizon() / hint)} of "
            f"step_hint {hint}; the worst is {worst.setting.short()} with "
            f"{_steps_phrase(worst.median('steps'))} (horizon "
            f"{_percent(worst.setting.horizon() / hint)}). Median steps to target {trend} the "
            f"horizon (Spearman ρ = {rho:.2f}); the mean gain over raw has ρ = {rho_gain:.2f} "
            f"with the horizon."
        )
        if name == "LAWA":
            best_is_shortest = best.setting.horizon() == shortest
            lines.append(
                f"{workload}: the paper's best horizon is ν·L ≈ "
                f"{_percent(PAPER_HORIZON_FRACTION)} of the budget; this grid's shortest is "
                f"{_percent(shortest / hint)} of step_hint, and the winning horizon here is "
                f"{_percent(best.setting.horizon() / hint)}"
                + (
                    ", the shortest on offer: consistent with a short horizon winning, though "
                    "the grid cannot resolve 1%."
                    if best_is_shortest
                    else ", not the shortest on offer."
                )
            )
    poor = settings.poor_ema
    if poor is not None and ema:
        ranked = sorted(ema, key=_rank_key)
        position = next((i for i, s in enumerate(ranked) if s.setting == poor), None)
        if position is not None:
            entry = ranked[position]
            gains = [s.median("mean_gain") for s in ema]
            median_gain = median([g for g in gains if not math.isnan(g)])
            steps, gain = entry.median("steps"), entry.median("mean_gain")
            beats_raw = steps < raw_steps or (steps == raw_steps and gain > 0)
            better_half = position < len(ranked) / 2
            if beats_raw:
                verdict = "it beats no averaging here, so the paper's 'poor' does not reproduce"
            elif better_half:
                verdict = (
                    "it gives nothing over no averaging (poor in that sense, as the paper says), "
                    "yet the other EMA settings here do worse still"
                )
            else:
                verdict = "it is among the worse EMA settings, consistent with the paper"
            lines.append(
                f"{workload}: EMA with ν={poor.every}, β={_number_text(poor.beta)} ranks "
                f"{position + 1} of {len(ranked)} EMA settings with {_steps_phrase(steps)} "
                f"(no averaging: {_steps_phrase(raw_steps)}) and a mean gain over raw of "
                f"{_fmt_gain(gain)} (EMA grid median {_fmt_gain(median_gain)}): {verdict}."
            )
    return lines


def findings_sensitivity(analysis: StudyAnalysis) -> list[str]:
    lines = []
    for workload, summaries in analysis.sensitivity.items():
        if summaries:
            lines += _grid_findings(workload, summaries, analysis.settings)
    return lines


def _better(a: float, b: float, direction: str) -> bool:
    return a > b if direction == "max" else a < b


def findings_decay(analysis: StudyAnalysis) -> list[str]:
    """Question 3, in sentences computed from the part-3 summaries."""
    lines = []
    settings = analysis.settings
    for workload, summaries in analysis.decay.items():
        by_setting = {s.setting: s for s in summaries}
        cosine = by_setting.get(Setting())
        constant = by_setting.get(Setting(schedule="constant"))
        if cosine is None:
            continue
        metric = cosine.members[0].trial.metric
        direction = cosine.direction
        reference = cosine.median("best_metric")
        c_low, c_high = cosine.spread("best_metric")
        for averaged in (settings.lawa, settings.ema):
            entry = by_setting.get(dataclasses.replace(averaged, schedule="constant"))
            if entry is None:
                continue
            value = entry.median("best_metric")
            low, high = entry.spread("best_metric")
            verdict = _versus(value, reference, direction)
            if min(len(entry.members), len(cosine.members)) > 1:
                overlap = not (high < c_low or low > c_high)
                seeds = f"the seed ranges {'overlap' if overlap else 'do not overlap'}"
            else:
                seeds = "one seed each"
            spread = (
                f" (median; seeds {_fmt_metric(low)}–{_fmt_metric(high)})"
                if len(entry.members) > 1
                else ""
            )
            reference_spread = (
                f" ({_fmt_metric(c_low)}–{_fmt_metric(c_high)})" if len(cosine.members) > 1 else ""
            )
            text = (
                f"{workload}: constant LR with {averaged.short()} reaches a best validation "
                f"{metric} of {_fmt_metric(value)}{spread} against {_fmt_metric(reference)}"
                f"{reference_spread} with cosine decay and no averaging: {verdict} ({seeds})."
            )
            decay_matters = True
            if constant is not None:
                raw_best = constant.median("best_metric")
                decay_matters = _versus(raw_best, reference, direction) == "worse"
                text += (
                    " Against its own raw weights on the constant LR (best "
                    f"{_fmt_metric(raw_best)}) the averaged model's best is "
                    f"{_versus(value, raw_best, direction)}."
                )
            if not decay_matters:
                text += (
                    " But the constant LR without averaging is not worse than cosine decay "
                    "either, so LR decay makes no difference to the best metric on this "
                    "workload and it cannot tell whether averaging replaces decay."
                )
            elif verdict == "worse":
                text += " Averaging does not replace LR decay here, as the paper found."
            else:
                text += (
                    " LR decay matters here (constant LR alone is worse), and averaging on a "
                    "constant LR makes up for it, unlike the paper's finding."
                )
            lines.append(text)
        with_decay = by_setting.get(settings.lawa)
        if with_decay is not None:
            final_gain = with_decay.median("final_gain")
            mean_gain = with_decay.median("mean_gain")
            final_step = median([float(m.trial.final_step or 0) for m in with_decay.members])
            hint = with_decay.step_hint
            where = (
                f"at the last eval (step {final_step:.0f}, where the cosine has reached 0)"
                if final_step >= hint
                else f"at the last eval (step {final_step:.0f}, before the cosine reaches 0 at "
                f"{hint})"
            )
            if math.isnan(final_gain):
                end = "it cannot be compared"
            elif _negligible(final_gain, reference):
                end = (
                    f"within {_percent(NEGLIGIBLE_FRACTION)} of the metric, i.e. nothing, as the "
                    "paper found once the LR is annealed"
                )
            elif final_gain > 0:
                end = "a gain remains after annealing, unlike the paper's finding"
            else:
                end = "the averaged model is worse than the annealed raw weights"
            lines.append(
                f"{workload}: on top of cosine decay, {settings.lawa.short()}'s gain over the raw "
                f"weights is {_fmt_gain(mean_gain)} on average over the run and "
                f"{_fmt_gain(final_gain)} {where}: {end}."
            )
    return lines


# ---- curves and plots -------------------------------------------------------------------


def _median_curve(
    members: Sequence[RunStats], *, best_so_far: bool = False
) -> tuple[list[int], list[float], list[float], list[float], list[float]]:
    """Per eval step shared by all seeds: step, median time, median/min/max metric."""
    if not members:
        return [], [], [], [], []
    shared = set(members[0].trial.steps)
    for m in members[1:]:
        shared &= set(m.trial.steps)
    steps = sorted(shared)
    columns = []
    times = []
    for m in members:
        values = list(m.trial.values)
        if best_so_far:
            running, best = [], math.nan
            for v in values:
                if not math.isnan(v):
                    best = v if math.isnan(best) else best_value([best, v], m.direction)
                running.append(best)
            values = running
        by_step = dict(zip(m.trial.steps, values))
        columns.append([by_step[s] for s in steps])
        time_by_step = dict(zip(m.trial.steps, m.trial.times))
        times.append([time_by_step[s] for s in steps])
    data = np.array(columns, dtype=float)
    return (
        steps,
        list(np.median(np.array(times, dtype=float), axis=0)),
        list(np.median(data, axis=0)),
        list(np.min(data, axis=0)),
        list(np.max(data, axis=0)),
    )


def _zoom(axes: Any, values: Sequence[float], target: float, direction: str) -> None:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return
    best = max(finite) if direction == "max" else min(finite)
    reach = abs(best - target) or abs(target) * 0.05 or 0.05
    if direction == "max":
        low = max(min(finite), target - 3 * reach)
        axes.set_ylim(low, best + 0.3 * reach)
    else:
        high = min(max(finite), target + 3 * reach)
        axes.set_ylim(best - 0.3 * reach, high)


def _style(setting: Setting) -> dict[str, Any]:
    return {
        "color": _COLORS[setting.averaging],
        "linestyle": "--" if setting.schedule == "constant" else "-",
    }


@dataclasses.dataclass(frozen=True)
class Panel:
    """One axes: a median line (min–max band) per setting.

    ``x``: "time" (median submission time) or "step"; ``y``: "metric", "best" (best so
    far) or "gain" (averaged − raw, + = better).
    """

    title: str
    summaries: tuple[Summary, ...]
    x: str = "time"
    y: str = "metric"


def _draw_panel(axes: Any, panel: Panel) -> None:
    plotted: list[float] = []
    first = panel.summaries[0].members[0].trial
    for summary in panel.summaries:
        if panel.y == "gain":
            if not summary.setting.averaged:
                continue
            xs, values, lows, highs = _gain_curve(summary)
        else:
            steps, times, values, lows, highs = _median_curve(
                summary.members, best_so_far=(panel.y == "best")
            )
            xs = times if panel.x == "time" else steps
        if not xs:
            continue
        style = _style(summary.setting)
        label = summary.setting.describe()
        if panel.y != "gain" and not summary.setting.averaged:
            label += " (= raw weights)"
        axes.plot(xs, values, label=label, linewidth=1.6, **style)
        if len(summary.members) > 1:
            axes.fill_between(xs, lows, highs, color=style["color"], alpha=0.12)
        plotted += list(values)
    if panel.y == "gain":
        axes.axhline(0.0, color="black", linewidth=0.8)
        order = "averaged − raw" if first.direction == "max" else "raw − averaged"
        axes.set_ylabel(f"{order} validation/{first.metric} (+ = averaging better)")
    else:
        axes.axhline(first.target, color="gray", linestyle=":", label=f"target {first.target:g}")
        _zoom(axes, plotted, first.target, first.direction)
        better = "higher" if first.direction == "max" else "lower"
        prefix = "best-so-far " if panel.y == "best" else ""
        axes.set_ylabel(f"{prefix}validation/{first.metric} ({better} is better)")
    axes.set_xlabel("submission time (s), median over seeds" if panel.x == "time" else "step")
    axes.set_title(panel.title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="x-small")


def _plot_panels(panels: Sequence[Panel], path: Path, *, suptitle: str, columns: int = 2) -> Path:
    from matplotlib.figure import Figure

    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(6.2 * columns, 4.4 * rows), layout="constrained")
    axes_grid = figure.subplots(rows, columns, squeeze=False).ravel()
    for axes, panel in zip(axes_grid, panels):
        _draw_panel(axes, panel)
    for axes in axes_grid[len(panels) :]:
        axes.set_visible(False)
    figure.suptitle(suptitle)
    atomic_write_bytes(path, png_bytes(figure))
    return path


def _gain_curve(summary: Summary) -> tuple[list[int], list[float], list[float], list[float]]:
    """Averaged − raw (signed, + = better) per eval step: median, min, max over seeds."""
    curves = [dict(member.gains) for member in summary.members if member.gains]
    if not curves:
        return [], [], [], []
    shared = sorted(set.intersection(*(set(c) for c in curves)))
    data = np.array([[c[s] for s in shared] for c in curves], dtype=float)
    return (
        shared,
        list(np.median(data, axis=0)),
        list(np.min(data, axis=0)),
        list(np.max(data, axis=0)),
    )


def _plot_heatmaps(
    workload: str, summaries: Sequence[Summary], settings: StudySettings, path: Path
) -> Path:
    """ν x L (LAWA) and ν x β (EMA): median steps-to-target ratio and mean gain over raw."""
    from matplotlib.figure import Figure

    by_setting = {s.setting: s for s in summaries}
    raw = by_setting.get(Setting())
    raw_steps = raw.median("steps") if raw is not None else math.nan
    figure = Figure(figsize=(12, 8.4), layout="constrained")
    axes_grid = figure.subplots(2, 2)
    panels = (
        (
            "LAWA",
            "L",
            list(settings.grid_windows),
            lambda nu, v: Setting("lawa", every=nu, window=v),
        ),
        ("EMA", "β", list(settings.grid_betas), lambda nu, v: Setting("ema", every=nu, beta=v)),
    )
    for column, (name, second, values, make) in enumerate(panels):
        for row, (quantity, title) in enumerate(
            (("steps", "median steps to target"), ("mean_gain", "median mean gain over raw"))
        ):
            axes = axes_grid[row][column]
            grid = np.full((len(settings.grid_every), len(values)), np.nan)
            for i, nu in enumerate(settings.grid_every):
                for j, v in enumerate(values):
                    entry = by_setting.get(make(nu, v))
                    if entry is not None:
                        grid[i, j] = entry.median(quantity)
            shown = np.where(np.isfinite(grid), grid, np.nan)
            cmap = "viridis_r" if quantity == "steps" else "RdYlGn"
            if quantity == "mean_gain" and np.isfinite(shown).any():
                bound = float(np.nanmax(np.abs(shown))) or 1.0
                image = axes.imshow(shown, cmap=cmap, vmin=-bound, vmax=bound, aspect="auto")
            else:
                image = axes.imshow(shown, cmap=cmap, aspect="auto")
            figure.colorbar(image, ax=axes, shrink=0.8)
            for i in range(grid.shape[0]):
                for j in range(grid.shape[1]):
                    value = grid[i, j]
                    text = _fmt_steps(value) if quantity == "steps" else _fmt_gain(value)
                    axes.text(j, i, text, ha="center", va="center", fontsize=9, color="black")
            axes.set_xticks(range(len(values)), [_number_text(v) for v in values])
            axes.set_yticks(range(len(settings.grid_every)), [str(n) for n in settings.grid_every])
            axes.set_xlabel(second)
            axes.set_ylabel("ν (averaging_every)")
            extra = ""
            if quantity == "steps":
                extra = f" (no averaging: {_fmt_steps(raw_steps)})"
            if name == "EMA" and settings.poor_ema is not None:
                poor = by_setting.get(settings.poor_ema)
                if poor is not None:
                    value = poor.median(quantity)
                    extra += (
                        f"\nν={settings.poor_ema.every}, β={_number_text(settings.poor_ema.beta)}: "
                        + (_fmt_steps(value) if quantity == "steps" else _fmt_gain(value))
                    )
            axes.set_title(f"{name}: {title}{extra}", fontsize=10)
    figure.suptitle(
        f"Sensitivity on {workload} ({settings.grid_submission}, {settings.grid_framework})"
    )
    atomic_write_bytes(path, png_bytes(figure))
    return path


def _plot_steps_to_target(workload: str, summaries: Sequence[Summary], path: Path) -> Path:
    """Steps and seconds to target per seed (dots) and median (bar), per setting."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 0.45 * len(summaries) + 1.8), layout="constrained")
    axes_pair = figure.subplots(1, 2, sharey=True)
    labels = [f"{s.submission}/{s.framework}: {s.setting.short()}" for s in summaries]
    for axes, quantity, xlabel in (
        (axes_pair[0], "steps", "steps to target"),
        (axes_pair[1], "seconds", "submission seconds to target"),
    ):
        for i, summary in enumerate(summaries):
            color = _COLORS[summary.setting.averaging]
            values = [v for v in summary.values(quantity) if math.isfinite(v)]
            axes.scatter(values, [i] * len(values), color=color, s=14, alpha=0.7)
            mid = summary.median(quantity)
            if math.isfinite(mid):
                axes.plot([mid], [i], marker="|", color=color, markersize=16, markeredgewidth=2)
            misses = len(summary.members) - len(values)
            if misses:
                axes.annotate(
                    f"{misses} miss",
                    (1.0, i),
                    xycoords=("axes fraction", "data"),
                    ha="right",
                    fontsize=8,
                )
        axes.set_xlabel(xlabel)
        axes.grid(True, axis="x", alpha=0.3)
    axes_pair[0].set_yticks(range(len(labels)), labels, fontsize=8)
    axes_pair[0].invert_yaxis()
    figure.suptitle(f"Time to target on {workload} (dots: seeds; bar: median)")
    atomic_write_bytes(path, png_bytes(figure))
    return path


# ---- tables and the page ----------------------------------------------------------------


RUN_COLUMNS = (
    "part_label",
    "submission",
    "framework",
    "workload",
    "seed",
    "averaging",
    "averaging_every",
    "lawa_window",
    "ema_beta",
    "schedule",
    "constant_lr_method",
    "metric",
    "direction",
    "target",
    "hit",
    "steps_to_target",
    "time_to_target_sec",
    "best_metric",
    "final_metric",
    "final_step",
    "mean_gain_over_raw",
    "final_gain_over_raw",
    "max_train_loss_diff_vs_raw",
    "ms_per_step",
    "wall_seconds",
    "path",
)
SUMMARY_COLUMNS = (
    "workload",
    "submission",
    "framework",
    "setting",
    "label",
    "horizon_steps",
    "horizon_fraction_of_step_hint",
    "seeds",
    "hits",
    "steps_to_target_median",
    "steps_to_target_min",
    "steps_to_target_max",
    "time_to_target_median_sec",
    "time_to_target_min_sec",
    "time_to_target_max_sec",
    "step_ratio_vs_raw_median",
    "time_ratio_vs_raw_median",
    "best_metric_median",
    "best_metric_min",
    "best_metric_max",
    "final_metric_median",
    "ms_per_step_median",
    "mean_gain_over_raw_median",
    "final_gain_over_raw_median",
)


def _csv_number(value: float | None) -> Any:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    return value


def run_rows(analysis: StudyAnalysis, root: Path) -> list[dict[str, Any]]:
    rows = []
    for key in sorted(analysis.stats, key=lambda k: (k[2], k[3], k[0], k[1])):
        stats = analysis.stats[key]
        run = stats.run
        trial = stats.trial
        rows.append(
            {
                "part_label": run.name,
                "submission": run.submission,
                "framework": run.framework,
                "workload": run.workload,
                "seed": run.seed,
                "averaging": run.setting.averaging,
                "averaging_every": _csv_number(run.setting.every),
                "lawa_window": _csv_number(run.setting.window),
                "ema_beta": _csv_number(run.setting.beta),
                "schedule": run.setting.schedule,
                "constant_lr_method": run.constant_lr_method,
                "metric": trial.metric,
                "direction": trial.direction,
                "target": trial.target,
                "hit": trial.hit,
                "steps_to_target": trial.steps_to_target if trial.hit else "",
                "time_to_target_sec": trial.time_to_target if trial.hit else "",
                "best_metric": _csv_number(trial.best_metric),
                "final_metric": _csv_number(stats.final_metric),
                "final_step": trial.final_step,
                "mean_gain_over_raw": _csv_number(stats.mean_gain),
                "final_gain_over_raw": _csv_number(stats.final_gain),
                "max_train_loss_diff_vs_raw": _csv_number(stats.max_train_loss_diff),
                "ms_per_step": _csv_number(stats.ms_per_step),
                "wall_seconds": _csv_number(stats.wall_seconds),
                "path": run.trial_dir(root).relative_to(root).as_posix(),
            }
        )
    return rows


def summary_rows(summaries: Iterable[Summary]) -> list[dict[str, Any]]:
    rows = []
    for s in summaries:
        horizon = s.setting.horizon()
        steps_low, steps_high = s.spread("steps")
        time_low, time_high = s.spread("seconds")
        best_low, best_high = s.spread("best_metric")
        rows.append(
            {
                "workload": s.workload,
                "submission": s.submission,
                "framework": s.framework,
                "setting": s.setting.describe(),
                "label": s.setting.label(s.submission),
                "horizon_steps": _csv_number(horizon),
                "horizon_fraction_of_step_hint": _csv_number(
                    horizon / s.step_hint if horizon is not None else None
                ),
                "seeds": len(s.members),
                "hits": s.hits,
                "steps_to_target_median": s.median("steps"),
                "steps_to_target_min": steps_low,
                "steps_to_target_max": steps_high,
                "time_to_target_median_sec": s.median("seconds"),
                "time_to_target_min_sec": time_low,
                "time_to_target_max_sec": time_high,
                "step_ratio_vs_raw_median": _csv_number(s.median("step_ratio")),
                "time_ratio_vs_raw_median": _csv_number(s.median("time_ratio")),
                "best_metric_median": s.median("best_metric"),
                "best_metric_min": best_low,
                "best_metric_max": best_high,
                "final_metric_median": s.median("final_metric"),
                "ms_per_step_median": _csv_number(s.median("ms_per_step")),
                "mean_gain_over_raw_median": _csv_number(s.median("mean_gain")),
                "final_gain_over_raw_median": _csv_number(s.median("final_gain")),
            }
        )
    return rows


def _summary_table(
    summaries: Sequence[Summary],
    *,
    with_system: bool,
    horizon: bool,
    steady: bool = False,
    final: bool = False,
) -> str:
    header = []
    if with_system:
        header += ["optimizer", "framework"]
    header += ["setting"]
    if horizon:
        header += ["horizon (% of step_hint)"]
    header += [
        "hits",
        "steps to target",
        "steps ratio vs raw",
        "seconds to target",
        *(["ms per step"] if steady else []),
        "best metric",
        *(["final metric"] if final else []),
        "mean gain over raw",
        "gain at end",
    ]
    rows = []
    for s in summaries:
        row = [s.submission, s.framework] if with_system else []
        row.append(s.setting.describe() if not horizon else s.setting.short())
        if horizon:
            h = s.setting.horizon()
            row.append(f"{h:.0f} ({_percent(h / s.step_hint)})" if h is not None else "-")
        row += [
            f"{s.hits}/{len(s.members)}",
            _with_spread(s, "steps", _fmt_steps),
            _fmt_ratio(s.median("step_ratio")) if s.setting.averaged else "-",
            _with_spread(s, "seconds", _fmt_seconds),
            *([_fmt_ms(s.median("ms_per_step"))] if steady else []),
            _with_spread(s, "best_metric", _fmt_metric),
            *([_with_spread(s, "final_metric", _fmt_metric)] if final else []),
            _fmt_gain(s.median("mean_gain")) if s.setting.averaged else "-",
            _fmt_gain(s.median("final_gain")) if s.setting.averaged else "-",
        ]
        rows.append(row)
    return md_table(header, rows)


def _datasets(analysis: StudyAnalysis) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for stats in analysis.stats.values():
        if stats.dataset:
            entries = found.setdefault(stats.run.workload, [])
            if stats.dataset not in entries:
                entries.append(stats.dataset)
    return found


def _workload_facts(analysis: StudyAnalysis) -> dict[str, dict[str, Any]]:
    facts: dict[str, dict[str, Any]] = {}
    for stats in analysis.stats.values():
        workload = stats.run.workload
        if workload in facts or stats.run.setting.schedule == "constant":
            continue
        trial = stats.trial
        steps = trial.steps
        facts[workload] = {
            "metric": trial.metric,
            "direction": trial.direction,
            "target": trial.target,
            "step_hint": stats.step_hint,
            "eval_every": steps[2] - steps[1] if len(steps) > 2 else "-",
            "budget": trial.max_runtime_sec,
        }
    return facts


def _versions() -> str:
    import importlib.metadata

    parts = [f"python {platform.python_version()}"]
    for name in ("torch", "jax", "flax", "optax", "numpy"):
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(parts)


def _constant_lr_text(analysis: StudyAnalysis) -> str:
    methods = sorted(
        {
            (s.run.submission, s.run.framework, s.run.constant_lr_method)
            for s in analysis.stats.values()
            if s.run.setting.schedule == "constant"
        }
    )
    if not methods:
        return "No constant-LR runs were made."
    texts = []
    for submission, framework, method in methods:
        if method == LR_SCHEDULE_SWITCH:
            how = f'the hyperparameter `{LR_SCHEDULE_SWITCH}="constant"` (read by the optimizer)'
        elif method == COSINE_SWITCH:
            how = f"the optimizer's own hyperparameter `{COSINE_SWITCH}=False`"
        else:
            how = (
                f"an **emulation**: the optimizer has no constant-schedule hyperparameter, so the "
                f"workload reported a step_hint {analysis.settings.constant_lr_stretch}x larger "
                "(the cosine then falls by less than 0.03% over the run), `warmup_factor` was "
                "scaled down by the same factor so the warmup keeps its length in steps, the "
                "averaging ν and L/β were given explicitly (their defaults depend on step_hint), "
                "and the run stopped at the real step_hint"
            )
        texts.append(f"{submission}/{framework}: {how}")
    return "Constant LR: " + "; ".join(texts) + "."


def _trajectory_check(analysis: StudyAnalysis) -> str:
    worst: dict[str, float] = {}
    counted: dict[str, int] = {}
    for stats in analysis.stats.values():
        if math.isnan(stats.max_train_loss_diff):
            continue
        framework = stats.run.framework
        worst[framework] = max(worst.get(framework, 0.0), stats.max_train_loss_diff)
        counted[framework] = counted.get(framework, 0) + 1
    if not worst:
        return "No averaged run had a raw partner with logged training losses to compare."
    parts = [
        f"{framework}: largest |Δ training loss| {value:.3g} over {counted[framework]} averaged "
        "runs"
        for framework, value in sorted(worst.items())
    ]
    exact = all(v == 0.0 for v in worst.values())
    return (
        "Raw-trajectory check (training loss logged at steps 0–100 by each averaged run "
        "against its raw partner with the same seed): "
        + "; ".join(parts)
        + (
            ". The runs trained identical weights, so the partner's curve is exactly the raw "
            "weights' curve."
            if exact
            else ". Nonzero differences mean the averaged runs' raw trajectories drift from "
            "their partners' by that much (floating-point reassociation between compiled "
            "programs), so the raw curve is that of a numerically equivalent, not "
            "bit-identical, run."
        )
    )


def _compute_text(analysis: StudyAnalysis) -> str:
    walls = [s.wall_seconds for s in analysis.stats.values() if s.wall_seconds is not None]
    text = (
        f"{len(analysis.stats)} runs finished"
        + (f", {len(analysis.missing)} missing" if analysis.missing else "")
        + f"; their training loops took {_duration(sum(walls))} of wall time in total "
        "(summed over runs)."
    )
    sessions = analysis.sessions
    if sessions:
        elapsed = sum(float(s.get("elapsed_seconds") or 0.0) for s in sessions)
        loads = [
            "/".join(map(str, s[key]))
            for s in sessions
            for key in ("load_average_start", "load_average_end")
            if s.get(key)
        ]
        interrupted = sum(1 for s in sessions if s.get("interrupted"))
        text += (
            f" They were made in {len(sessions)} session(s) of the command taking "
            f"{_duration(elapsed)} in all"
            + (f" ({interrupted} of them interrupted and resumed)" if interrupted else "")
            + f"; load averages (1/5/15 min) at their starts and ends: {', '.join(loads)} on "
            f"{os.cpu_count()} cores. Submission times scale with the load, steps do not."
        )
    return text


def _bullets(lines: Sequence[str]) -> list[str]:
    return [f"- {line}" for line in lines] or ["- No finished runs to answer from yet."]


def write_results(
    analysis: StudyAnalysis,
    output_dir: Path,
    *,
    command: str | None = None,
    rebuilt_only: bool = False,
) -> tuple[Path, list[Path]]:
    """``results.md`` plus ``results/*.csv|png`` in ``output_dir``; returns the page and files."""
    output_dir = Path(output_dir)
    assets = output_dir / RESULTS_FOLDER
    assets.mkdir(parents=True, exist_ok=True)
    settings = analysis.settings
    root = settings.root
    files: list[Path] = []

    files.append(write_csv(assets / "runs.csv", run_rows(analysis, root), RUN_COLUMNS))
    files.append(
        write_csv(
            assets / "time_to_target.csv", summary_rows(analysis.time_to_target), SUMMARY_COLUMNS
        )
    )
    files.append(
        write_csv(
            assets / "sensitivity.csv",
            summary_rows(s for group in analysis.sensitivity.values() for s in group),
            SUMMARY_COLUMNS,
        )
    )
    files.append(
        write_csv(
            assets / "decay.csv",
            summary_rows(s for group in analysis.decay.values() for s in group),
            SUMMARY_COLUMNS,
        )
    )

    def link(path: Path) -> str:
        return f"![{path.stem}]({path.relative_to(output_dir).as_posix()})"

    facts = _workload_facts(analysis)
    datasets = _datasets(analysis)
    q1 = findings_time_to_target(analysis)
    q2 = findings_sensitivity(analysis)
    q3 = findings_decay(analysis)
    generated = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    parts = [
        "# When, where and why to average: reproduced on the embedded workloads",
        "",
        "Ajroldi, Orvieto & Geiping (ICML 2025) ask three questions of weight averaging on "
        "AlgoPerf at a cost of thousands of GPU-hours. This page asks them of polyak's two "
        "small CPU workloads. It is generated by `scripts/study.py`; do not edit it by hand. "
        "Every comparative sentence below is computed from the tables.",
        "",
        "```",
        command or "python scripts/study.py",
        "```",
        "",
        *(
            ["(This page was rebuilt from the finished runs with `--analyze_only`.)", ""]
            if rebuilt_only
            else []
        ),
        f"Generated {generated} on {platform.machine()} ({os.cpu_count()} cores; {_versions()}). "
        + _compute_text(analysis),
        "",
        "## Setup",
        "",
        md_table(
            [
                "workload",
                "target (validation)",
                "step_hint",
                "eval every",
                "time budget (s)",
                "data",
                "SHA-256 of the data",
            ],
            [
                [
                    workload,
                    f"{f['metric']} {'≥' if f['direction'] == 'max' else '≤'} {f['target']:g}",
                    f["step_hint"],
                    f"{f['eval_every']} steps",
                    f"{f['budget']:g}",
                    ", ".join(
                        f"{d.get('source')} ({d.get('n_examples')} examples)"
                        for d in datasets.get(workload, [])
                    )
                    or "-",
                    ", ".join(f"`{d.get('sha256')}`" for d in datasets.get(workload, [])) or "-",
                ]
                for workload, f in sorted(facts.items())
            ],
        ),
        "",
        "- Hyperparameters: the first point of `tuning_search_spaces/<optimizer>.json` "
        "(AlgoPerf's baseline point; warmup then cosine decay to 0 at step_hint), plus the "
        "averaging settings named in each row. Question 1 uses "
        f"{settings.lawa.short()} and {settings.ema.short()} for every optimizer, chosen "
        "before any run: the grid's shortest horizons (the nearest it has to the paper's "
        "ν·L ≈ 1% of the budget) and the paper's β.",
        f"- Seeds: question 1 {list(settings.seeds)}, question 2 {list(settings.grid_seeds)}, "
        f"question 3 {list(settings.decay_seeds)}. Spreads are min–max over seeds, shown as "
        "`median [min–max]`.",
        "- Runs do not stop at the target: each trains to step_hint (or its time budget), so "
        "that whole curves can be compared. Steps and time to target follow AlgoPerf's rule: "
        "the first eval whose validation metric reaches the target; time is accumulated "
        "submission time, including `prepare_for_eval` (the swap to the averaged weights).",
        "- The raw weights of an averaged run are the run without averaging with the same seed "
        "(averaging does not change training in polyak). *Gain over raw* is averaged − raw "
        "validation metric at the same eval step, signed so that + means the averaged model is "
        "better; *mean gain* averages it over all evals of the run, *gain at end* is the last "
        "eval's. *Steps ratio vs raw* is the median over seeds of averaged / raw steps to "
        "target (a miss of the averaged run counts as infinity, of the raw run as 0; seeds where "
        "both miss are left out).",
        "- PyTorch: one unrecorded warm-up run per optimizer and workload absorbs the "
        "process's one-time `torch.compile` of the fused NadamW kernel. JAX compiles its step "
        "programs in every run and that time counts (as in AlgoPerf); averaging adds programs "
        "(collect, swap), so at this scale JAX submission times carry a start-up cost that "
        "steps do not.",
        "- *ms per step*: submission milliseconds per step from the 2nd eval to the last "
        "(steady state: without the one-time compilation of the first step, collection and "
        "swap), median over seeds; it includes the averaging's collections and swaps.",
        *(
            [
                '- TWA (PyTorch only): `averaging="twa"` with the LAWA row\'s ν and L and the '
                "default `twa_*` fit settings; its fit runs in `prepare_for_eval` on recent "
                "training batches, so its cost is submission time."
            ]
            if any(s.run.setting.averaging == "twa" for s in analysis.stats.values())
            else []
        ),
        f"- {_constant_lr_text(analysis)}",
        f"- {_trajectory_check(analysis)}",
        "",
        "## Answers",
        "",
        "**1. Does averaging reach the target sooner?**",
        "",
        *_bullets(q1),
        "",
        "**2. How sensitive is it to ν, L and β?**",
        "",
        *_bullets(q2),
        "",
        "**3. Does averaging replace LR decay?**",
        "",
        *_bullets(q3),
        "",
    ]

    # Question 1.
    parts += ["## 1. Time to target, raw against averaged", ""]
    for workload in settings.workloads:
        members = [s for s in analysis.time_to_target if s.workload == workload]
        if not members:
            continue
        parts += [
            f"### {workload}",
            "",
            _summary_table(members, with_system=True, horizon=False, steady=True),
            "",
        ]
        groups = []
        for submission in settings.submissions:
            for framework in settings.frameworks:
                group = [
                    s for s in members if (s.submission, s.framework) == (submission, framework)
                ]
                if group:
                    groups.append((f"{submission} / {framework}", group))
        if groups:
            headline = _plot_panels(
                [Panel(title, tuple(group), x="time", y="metric") for title, group in groups],
                assets / f"headline_{workload}.png",
                suptitle=f"{workload}: validation metric against submission time, raw (no "
                "averaging) against averaged\nmedian over seeds, band = min–max",
            )
            gap = _plot_panels(
                [Panel(title, tuple(group), x="step", y="gain") for title, group in groups],
                assets / f"gap_{workload}.png",
                suptitle=f"{workload}: averaged against raw validation metric at each eval "
                "(+ = averaging better)\nmedian over seeds, band = min–max",
            )
            steps_plot = _plot_steps_to_target(
                workload, members, assets / f"time_to_target_{workload}.png"
            )
            files += [headline, gap, steps_plot]
            parts += [link(headline), "", link(gap), "", link(steps_plot), ""]

    # Question 2.
    parts += [
        "## 2. Sensitivity to ν, L and β",
        "",
        f"{settings.grid_submission} / {settings.grid_framework}; horizon = ν·L for LAWA and "
        "ν/(1−β) for EMA (the EMA's effective memory in steps).",
        "",
    ]
    for workload, summaries in analysis.sensitivity.items():
        if not summaries:
            continue
        parts += [
            f"### {workload}",
            "",
            _summary_table(summaries, with_system=False, horizon=True),
            "",
        ]
        heat = _plot_heatmaps(workload, summaries, settings, assets / f"sensitivity_{workload}.png")
        files.append(heat)
        parts += [link(heat), ""]

    # Question 3.
    parts += [
        "## 3. Averaging against LR decay",
        "",
        f"{settings.grid_submission} / {settings.grid_framework}. Solid lines: cosine decay; "
        "dashed: constant LR (after the same warmup).",
        "",
    ]
    for workload, summaries in analysis.decay.items():
        if not summaries:
            continue
        parts += [
            f"### {workload}",
            "",
            _summary_table(summaries, with_system=False, horizon=False, final=True),
            "",
        ]
        decay_plot = _plot_panels(
            [
                Panel("best so far against step", tuple(summaries), x="step", y="best"),
                Panel("best so far against submission time", tuple(summaries), y="best"),
                Panel("metric at each eval", tuple(summaries), x="step", y="metric"),
                Panel("averaged against raw, same schedule", tuple(summaries), "step", "gain"),
            ],
            assets / f"decay_{workload}.png",
            suptitle=f"{workload}: cosine decay (solid) against constant LR (dashed); "
            "median over seeds, band = min–max",
        )
        files.append(decay_plot)
        parts += [link(decay_plot), ""]

    if analysis.missing:
        parts += [
            "## Missing runs",
            "",
            "These runs have not finished (rerun the command to resume them):",
            "",
            *[f"- {r.describe()}" for r in analysis.missing],
            "",
        ]
    parts += [
        "## Files",
        "",
        "- `results/runs.csv`: every run (steps and time to target, best and final metric, "
        "gains over raw, path under the experiment folder).",
        "- `results/time_to_target.csv`, `results/sensitivity.csv`, `results/decay.csv`: the "
        "tables above, with medians and min/max.",
        f"- Raw logs: `{settings.experiment_dir}/{settings.experiment_name}/<label>/seed_<s>/"
        "<workload>_<framework>/trial_1/` (AlgoPerf's `eval_measurements.csv` layout).",
        "",
    ]
    markdown = output_dir / RESULTS_MARKDOWN
    atomic_write_text(markdown, "\n".join(parts))
    # Plots and tables of an earlier page that this one no longer has would mislead.
    for stale in [*assets.glob("*.png"), *assets.glob("*.csv")]:
        if stale not in files:
            stale.unlink()
    return markdown, files


def remove_study(settings: StudySettings) -> None:
    """``--overwrite``: deletes the study's experiment folder (all its runs)."""
    if settings.root.is_dir():
        shutil.rmtree(settings.root)
