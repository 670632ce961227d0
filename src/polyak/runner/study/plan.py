"""What the study runs: averaging settings, the study's settings and the planned runs."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from polyak.algoperf.submission_api import FRAMEWORKS, SUBMISSIONS
from polyak.averaging.config import MODES, SELECTIONS, WINDOW_MODES, Selection
from polyak.runner.commands import default_search_space, resolve_submission, submission_label
from polyak.runner.embedded import TORCH_ONLY_MODES, EmbeddedRun
from polyak.runner.errors import LaunchConfigError
from polyak.runner.search_space import load_search_space
from polyak.runner.submission_loader import load_submission_module
from polyak.workloads import registry as embedded_registry

SCHEDULES: tuple[str, ...] = ("cosine", "constant")
# How a constant learning rate is obtained: the optimizer's own switch (Shampoo
# reads it), or else a stretched step_hint that keeps the cosine flat.
COSINE_SWITCH = "use_cosine_decay"
STRETCHED = "stretched_step_hint"
RunKey = tuple[str, int, str, str]  # (label, seed, workload, framework)
Cell = tuple[str, str, str, int, "Setting"]  # (submission, framework, workload, seed, setting)


class StudyConfigError(LaunchConfigError):
    """A study setting that cannot be run (names the value and what was expected)."""


def number_text(value: float) -> str:
    return f"{value:g}"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One averaging configuration under one learning-rate schedule."""

    averaging: str = "none"
    every: int | None = None
    window: int | None = None
    beta: float | None = None
    schedule: str = "cosine"
    # "best": prepare_for_eval hands AlgoPerf the better of the average and the live weights.
    select: Selection = "average"
    twa_budget: float | None = None

    def __post_init__(self) -> None:
        if self.averaging not in MODES:
            raise StudyConfigError(
                f"averaging={self.averaging!r}; expected one of {', '.join(MODES)}"
            )
        if self.schedule not in SCHEDULES:
            raise StudyConfigError(
                f"schedule={self.schedule!r}; expected one of {', '.join(SCHEDULES)}"
            )
        for name in self._needs():
            if getattr(self, name) is None:
                raise StudyConfigError(f"{self.averaging} needs {name} (got None)")
        for name in ("every", "window"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                raise StudyConfigError(f"{name}={value!r}; expected an integer >= 1")
        if self.beta is not None and not 0.0 < self.beta < 1.0:
            raise StudyConfigError(f"beta={self.beta!r}; expected a number in (0, 1)")
        if self.select not in SELECTIONS:
            raise StudyConfigError(
                f"select={self.select!r}; expected one of {', '.join(SELECTIONS)}"
            )
        if self.select != "average" and not self.averaged:
            raise StudyConfigError(f"select={self.select!r} needs averaging (got 'none')")
        if self.twa_budget is not None and (self.averaging != "twa" or not self.twa_budget > 0):
            raise StudyConfigError(
                f"twa_budget={self.twa_budget!r} with averaging={self.averaging!r}; "
                "expected a number > 0 with averaging 'twa'"
            )

    def _needs(self) -> tuple[str, ...]:
        if not self.averaged:
            return ()
        return ("every", "window") if self.averaging in WINDOW_MODES else ("every", "beta")

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
        if self.averaging in WINDOW_MODES:
            parts.append(f"{self.averaging}_nu{self.every}_L{self.window}")
        elif self.averaging == "ema":
            parts.append(f"ema_nu{self.every}_b{number_text(self.beta)}")
        if self.twa_budget is not None:
            parts.append(f"budget{number_text(self.twa_budget)}")
        if self.select != "average":
            parts.append(self.select)
        return "_".join(parts)

    def hyperparameters(self) -> dict[str, Any]:
        point: dict[str, Any] = {"averaging": self.averaging}
        if self.every is not None:
            point["averaging_every"] = int(self.every)
        if self.window is not None:
            point["lawa_window"] = int(self.window)
        if self.beta is not None:
            point["ema_beta"] = float(self.beta)
        if self.select != "average":
            point["averaging_select"] = self.select
        if self.twa_budget is not None:
            point["twa_budget"] = float(self.twa_budget)
        return point

    def describe(self) -> str:
        schedule = "constant LR" if self.schedule == "constant" else "cosine"
        if self.averaging == "none":
            return f"{schedule}, no averaging"
        if self.averaging == "ema":
            text = f"{schedule}, EMA ν={self.every} β={number_text(self.beta)}"
        else:
            text = f"{schedule}, {self.averaging.upper()} ν={self.every} L={self.window}"
        if self.twa_budget is not None:
            text += f" budget {number_text(self.twa_budget)}"
        if self.select == "best":
            text += ", best of average and live"
        return text

    def short(self) -> str:
        """The averaging part only (tables that hold the schedule fixed)."""
        return self.describe().split(", ", 1)[1]

    def horizon(self) -> float | None:
        """Steps the average looks back: ν·L for LAWA/TWA, ν/(1−β) for EMA."""
        if self.averaging in WINDOW_MODES:
            return float(self.every * self.window)
        if self.averaging == "ema":
            return self.every / (1.0 - self.beta)
        return None


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """What the study runs. The defaults are the full study (see ``quick_settings``)."""

    # Question 1: time to target.
    workloads: tuple[str, ...] = embedded_registry.EMBEDDED_WORKLOADS
    submissions: tuple[str, ...] = SUBMISSIONS
    frameworks: tuple[str, ...] = FRAMEWORKS
    # Two seeds: a textlm run takes about a CPU-minute, and question 1 alone is 48 of them.
    seeds: tuple[int, ...] = (0, 1)
    # Chosen before any run: the grid's shortest horizons, the closest it has to the
    # paper's ν·L ≈ 1% of the budget, and the paper's β.
    lawa: Setting = Setting("lawa", every=8, window=5)
    ema: Setting = Setting("ema", every=8, beta=0.9)
    include_twa: bool = True  # with the LAWA setting's ν and L
    # Rows added to the above: LAWA and EMA with averaging_select="best".
    include_best: bool = True
    # One TWA row per budget (twa_budget, written into the point so that a change of the
    # default cannot relabel finished runs): the default, and one that fits at every eval.
    twa_budgets: tuple[float, ...] = (0.1, 1e6)
    # Question 2: sensitivity (one submission and framework).
    grid_submission: str = "nadamw"
    grid_framework: str = "pytorch"
    # Not textlm: its 19 grid settings x 2 seeds would double the study's time.
    grid_workloads: tuple[str, ...] = ("digits", "diabetes")
    grid_seeds: tuple[int, ...] = (0, 1)
    grid_every: tuple[int, ...] = (8, 32, 128)
    grid_windows: tuple[int, ...] = (5, 10, 20)
    grid_betas: tuple[float, ...] = (0.6, 0.9, 0.99)
    poor_ema: Setting | None = Setting("ema", every=1, beta=0.9)
    # Question 3: averaging against LR decay (grid submission and framework).
    decay_workloads: tuple[str, ...] = embedded_registry.EMBEDDED_WORKLOADS
    decay_seeds: tuple[int, ...] = (0, 1)
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

    def time_to_target_settings(self, framework: str) -> list[Setting]:
        settings = [Setting(), self.lawa, self.ema]
        if self.include_best:
            settings += [dataclasses.replace(s, select="best") for s in (self.lawa, self.ema)]
        if self.include_twa and (framework == "pytorch" or "twa" not in TORCH_ONLY_MODES):
            settings += [
                Setting("twa", every=self.lawa.every, window=self.lawa.window, twa_budget=budget)
                for budget in self.twa_budgets
            ]
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

    def sensitivity_settings(self) -> list[Setting]:
        """Question 2: no averaging, then the LAWA and the EMA grid."""
        return [Setting(), *self.lawa_grid(), *self.ema_grid()]

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
    constant_lr_method: str = ""  # "", COSINE_SWITCH or STRETCHED

    @property
    def label(self) -> str:
        return self.name

    @property
    def key(self) -> RunKey:
        return (self.name, self.seed, self.workload, self.framework)

    def describe(self) -> str:
        return f"{self.name} {self.framework} {self.workload} seed {self.seed}"

    def raw_key(self) -> RunKey:
        return (self.setting.raw().label(self.submission), self.seed, self.workload, self.framework)


def constant_lr_method(defaults: Mapping[str, Any], point: Mapping[str, Any]) -> str:
    """How a constant LR is obtained from a submission with these hyperparameter names."""
    if COSINE_SWITCH in {*defaults, *point}:
        return COSINE_SWITCH
    return STRETCHED


def constant_lr_overrides(
    method: str, point: Mapping[str, Any], stretch: int, step_hint: int
) -> dict[str, Any]:
    if method == COSINE_SWITCH:
        return {COSINE_SWITCH: False}
    # Keep the warmup's length in steps: int(factor' · stretch · hint) == int(factor · hint).
    warmup_factor = float(point.get("warmup_factor", 0.0))
    warmup_steps = int(warmup_factor * step_hint)
    return {"warmup_factor": (warmup_steps + 0.5) / (stretch * step_hint) if warmup_steps else 0.0}


def plan_study(
    settings: StudySettings, repo_root: Path, registry: Any = embedded_registry
) -> list[StudyRun]:
    """Every run of the three parts, once each (parts share runs), in a fixed order."""
    _check_workloads(settings, tuple(registry.EMBEDDED_WORKLOADS))
    planner = _Planner(settings, repo_root, registry)
    runs: dict[RunKey, StudyRun] = {}
    for cell in _cells(settings):
        submission, framework, workload, seed, setting = cell
        key = (setting.label(submission), seed, workload, framework)
        if key not in runs:  # the parts share runs (the raw ones, the chosen LAWA and EMA)
            runs[key] = planner.run(cell)
    return list(runs.values())


def _check_workloads(settings: StudySettings, known: tuple[str, ...]) -> None:
    for name in {*settings.workloads, *settings.grid_workloads, *settings.decay_workloads}:
        if name not in known:
            raise StudyConfigError(
                f"unknown embedded workload {name!r}; choices: {', '.join(known)}"
            )


def _cells(settings: StudySettings) -> list[Cell]:
    """Seed-major: the settings of one seed run back to back, so that a drift in the
    machine's load hits an averaged run and its raw partner alike."""
    cells: list[Cell] = []
    for workload in settings.workloads:
        for submission in settings.submissions:
            for framework in settings.frameworks:
                for seed in settings.seeds:
                    cells += [
                        (submission, framework, workload, seed, setting)
                        for setting in settings.time_to_target_settings(framework)
                    ]
    grid_system = (settings.grid_submission, settings.grid_framework)
    for workload in settings.grid_workloads:
        for seed in settings.grid_seeds:
            cells += [(*grid_system, workload, seed, s) for s in settings.sensitivity_settings()]
    for workload in settings.decay_workloads:
        for seed in settings.decay_seeds:
            cells += [(*grid_system, workload, seed, s) for s in settings.decay_settings()]
    return cells


class _Planner:
    """Turns cells into runs; reads each search space and step_hint once."""

    def __init__(self, settings: StudySettings, repo_root: Path, registry: Any) -> None:
        self.settings = settings
        self.repo_root = repo_root
        self.registry = registry
        self._points: dict[str, dict[str, Any]] = {}
        self._step_hints: dict[str, int] = {}

    def base_point(self, submission: str) -> dict[str, Any]:
        if submission not in self._points:
            space = load_search_space(self.repo_root / default_search_space(submission))
            self._points[submission] = dict(space.draw(1)[0])
        return self._points[submission]

    def step_hint(self, workload: str) -> int:
        if workload not in self._step_hints:
            instance = self.registry.make_workload(workload, "pytorch")
            self._step_hints[workload] = int(instance.step_hint)
        return self._step_hints[workload]

    def run(self, cell: Cell) -> StudyRun:
        submission, framework, workload, seed, setting = cell
        point = {**self.base_point(submission), **setting.hyperparameters()}
        path = resolve_submission(submission, framework, self.repo_root)
        method = ""
        if setting.schedule == "constant":
            module = load_submission_module(self.repo_root / path)
            method = constant_lr_method(getattr(module, "DEFAULT_HYPERPARAMETERS", {}), point)
            stretch = self.settings.constant_lr_stretch
            point.update(constant_lr_overrides(method, point, stretch, self.step_hint(workload)))
        return StudyRun(
            submission=submission,
            submission_path=path,
            framework=framework,
            averaging=setting.averaging,
            workload=workload,
            seed=seed,
            trial=1,
            hyperparameters=point,
            name=setting.label(submission),
            setting=setting,
            constant_lr_method=method,
        )
