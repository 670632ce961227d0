"""Reading trial results and AlgoPerf's time-to-target rule.

Input: ``eval_measurements.csv`` as AlgoPerf v0.6 writes it (one row per eval,
columns sorted by name: ``accumulated_eval_time``, ``accumulated_logging_time``,
``accumulated_submission_time``, ``global_step``, ``preemption_count``,
``score``, ``test/<m>``, ``total_duration``, ``train/<m>``, ``validation/<m>``,
...). The embedded suite's local loop writes the same layout.

Per trial:

- the target is hit at the first eval whose validation metric is ``<=`` the
  target (minimised metrics) or ``>=`` it (maximised), AlgoPerf's scoring rule;
- time to target is ``accumulated_submission_time`` (AlgoPerf's ``score``) at that
  eval; steps to target its ``global_step``;
- a hit after the workload's ``max_allowed_runtime_sec`` (1.5x for self-tuning)
  is a budget overrun and counts as a miss; a miss has time infinity.

Per workload, as the leaderboard's scoring code does it
(``scoring/performance_profile.py``): within each study the trial whose first
hit comes at the smallest eval *index* (``selection="leaderboard"``; ties go to
the faster, then the lower-numbered trial), or the fastest trial
(``selection="fastest"``); then the median over studies, infinities taking part.

Finished or not. A trial that did not reach the target is a *miss* only when it
provably ran to its end: polyak's finished marker, AlgoPerf's end-of-training row
in ``measurements.csv``, a last eval within one eval period (x1.25) of the time
budget, or ``--max_global_steps`` reached. Anything else (a crash, a kill, a run
still going) is *unfinished*. It is labelled so and never charged the full budget;
a workload that has no time because of it is *unfinished*, not a miss. The time
used in the median and the score is the one the leaderboard would use if the
unfinished trials ended without a hit (as a crash does), so a score resting on
unfinished trials is provisional, and the report says so.

Directory layout. A trial is ``.../<study>/<workload>_<framework>/trial_<k>/``.
Given a root directory:

- ``root/<workload>_<framework>/trial_k``: one study, named after ``root``, and the
  run label is ``root``'s name (an AlgoPerf ``<experiment_dir>/<experiment_name>``);
- ``root/<study>/<workload>_<framework>/trial_k``: AlgoPerf's scoring layout, label
  ``root``'s name, one study per sub-folder;
- ``root/<label...>/<study>/<workload>_<framework>/trial_k``: the embedded suite's
  layout, label = the folders between ``root`` and the study.

Targets come from the trial's ``meta_data_*.json`` (what the run itself used),
else from the workload table.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from polyak.runner.completion import EVAL_CSV, algoperf_training_ended, read_marker
from polyak.runner.errors import ResultsFormatError
from polyak.runner.workload_table import (
    Direction,
    get_workload,
    known_workloads,
    metric_direction,
    reached_target,
)

WORKLOAD_DIR_RE = re.compile(r"^(?P<workload>.+)_(?P<framework>jax|pytorch)$")
TRIAL_DIR_RE = re.compile(r"^trial_(?P<index>\d+)$")
SELF_TUNING_BUDGET_FACTOR = 1.5
INF = math.inf
SELECTION_RULES: tuple[str, ...] = ("leaderboard", "fastest")
# A last eval this many eval periods short of the time budget still means the budget
# ran out: AlgoPerf stops at the next eval check, at most one period later.
BUDGET_SLACK_EVAL_PERIODS = 1.25


@dataclasses.dataclass(frozen=True)
class MeasurementTable:
    """An eval_measurements.csv: column names and one float row per eval (NaN = empty)."""

    path: Path
    columns: tuple[str, ...]
    rows: tuple[dict[str, float], ...]

    def column(self, name: str) -> list[float]:
        return [row.get(name, math.nan) for row in self.rows]

    @property
    def time_column(self) -> str:
        return (
            "accumulated_submission_time"
            if "accumulated_submission_time" in self.columns
            else "score"
        )


def _to_float(text: str | None) -> float:
    if text is None or text.strip() == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        return math.nan


def read_eval_measurements(path: str | Path) -> MeasurementTable:
    """Parses one eval_measurements.csv; raises :class:`ResultsFormatError` when malformed."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = tuple(reader.fieldnames or ())
            rows = tuple({k: _to_float(v) for k, v in row.items() if k} for row in reader)
    except FileNotFoundError as exc:
        raise ResultsFormatError(f"{path} does not exist") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise ResultsFormatError(f"{path} is not a readable CSV file ({exc})") from exc
    missing = [c for c in ("global_step",) if c not in columns]
    if "accumulated_submission_time" not in columns and "score" not in columns:
        missing.append("accumulated_submission_time (or score)")
    if missing:
        raise ResultsFormatError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(columns) or 'none'}"
        )
    return MeasurementTable(path=path, columns=columns, rows=rows)


@dataclasses.dataclass(frozen=True)
class TargetHit:
    hit: bool
    time_to_target: float
    steps_to_target: int | None
    over_budget: bool
    eval_index: int | None = None


def find_time_to_target(
    steps: Sequence[float],
    times: Sequence[float],
    values: Sequence[float],
    target: float,
    direction: Direction,
    max_runtime_sec: float = INF,
) -> TargetHit:
    """The first eval reaching the target; a hit after the budget counts as a miss."""
    for index, (step, seconds, value) in enumerate(zip(steps, times, values)):
        if reached_target(value, target, direction):
            if seconds > max_runtime_sec:
                return TargetHit(False, INF, None, True)
            return TargetHit(True, float(seconds), int(step), False, index)
    return TargetHit(False, INF, None, False)


def best_value(values: Iterable[float], direction: Direction) -> float:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan
    return min(finite) if direction == "min" else max(finite)


@dataclasses.dataclass(frozen=True)
class TrialTarget:
    metric: str
    direction: Direction
    target: float
    max_runtime_sec: float
    eval_period_sec: float = math.nan
    max_global_steps: int | None = None
    ruleset: str = "external"


@dataclasses.dataclass(frozen=True)
class TrialResult:
    """One trial's curve and its time-to-target."""

    label: str
    study: str
    workload: str
    framework: str
    trial: int
    path: Path
    metric: str
    direction: Direction
    target: float
    max_runtime_sec: float
    steps: tuple[int, ...]
    times: tuple[float, ...]
    values: tuple[float, ...]
    hit: bool
    time_to_target: float
    steps_to_target: int | None
    over_budget: bool
    best_metric: float
    finished: bool
    first_hit_index: int | None = None
    ruleset: str = "external"

    @property
    def status(self) -> str:
        """``hit``, ``miss`` (ran to its end without reaching the target) or ``unfinished``."""
        if self.hit:
            return "hit"
        return "miss" if self.finished else "unfinished"

    @property
    def final_step(self) -> int | None:
        return self.steps[-1] if self.steps else None

    @property
    def final_time(self) -> float:
        return self.times[-1] if self.times else math.nan


def trial_result(
    table: MeasurementTable,
    target: TrialTarget,
    *,
    label: str,
    study: str,
    workload: str,
    framework: str,
    trial: int,
    finished: bool = False,
) -> TrialResult:
    column = f"validation/{target.metric}"
    values = table.column(column)
    steps = [int(s) if not math.isnan(s) else -1 for s in table.column("global_step")]
    times = table.column(table.time_column)
    hit = find_time_to_target(
        steps, times, values, target.target, target.direction, target.max_runtime_sec
    )
    finished = finished or hit.hit or ran_to_its_end(steps, times, target)
    return TrialResult(
        label=label,
        study=study,
        workload=workload,
        framework=framework,
        trial=trial,
        path=table.path.parent,
        metric=target.metric,
        direction=target.direction,
        target=target.target,
        max_runtime_sec=target.max_runtime_sec,
        steps=tuple(steps),
        times=tuple(times),
        values=tuple(values),
        hit=hit.hit,
        time_to_target=hit.time_to_target,
        steps_to_target=hit.steps_to_target,
        over_budget=hit.over_budget,
        best_metric=best_value(values, target.direction),
        finished=finished,
        first_hit_index=hit.eval_index,
        ruleset=target.ruleset,
    )


def ran_to_its_end(steps: Sequence[int], times: Sequence[float], target: TrialTarget) -> bool:
    """True when the last eval shows the time budget or the step limit was used up."""
    if not steps:
        return False
    if target.max_global_steps is not None and steps[-1] >= target.max_global_steps:
        return True
    last_time = times[-1]
    if math.isnan(last_time) or math.isinf(target.max_runtime_sec):
        return False
    slack = target.eval_period_sec * BUDGET_SLACK_EVAL_PERIODS
    return not math.isnan(slack) and last_time >= target.max_runtime_sec - slack


def median(values: Sequence[float]) -> float:
    """The median, with infinities taking part (as numpy's median does)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return float(ordered[middle])
    return (ordered[middle - 1] + ordered[middle]) / 2


@dataclasses.dataclass(frozen=True)
class WorkloadResult:
    """One (label, framework, workload): fastest trial per study, median over studies."""

    label: str
    framework: str
    workload: str
    metric: str
    direction: Direction
    target: float
    max_runtime_sec: float
    study_times: dict[str, float]
    study_best_trials: dict[str, int | None]
    study_steps: dict[str, float]
    time_to_target: float
    steps_to_target: float
    best_metric: float
    num_trials: int
    trials_per_study: dict[str, int] = dataclasses.field(default_factory=dict)
    unfinished_trials: int = 0
    ruleset: str = "external"

    @property
    def hit(self) -> bool:
        return math.isfinite(self.time_to_target)

    @property
    def unfinished(self) -> bool:
        """No hit, and some trial may still change that: not a miss yet."""
        return not self.hit and self.unfinished_trials > 0

    @property
    def provisional(self) -> bool:
        """Rests on unfinished trials: a faster hit may still come."""
        return self.unfinished_trials > 0

    @property
    def status(self) -> str:
        return "hit" if self.hit else ("unfinished" if self.unfinished else "miss")

    @property
    def charged_seconds(self) -> float:
        """Time to target, the whole budget on a miss, NaN while unfinished
        (for accelerator-hours)."""
        if self.unfinished:
            return math.nan
        return self.time_to_target if self.hit else self.max_runtime_sec


def _study_pick(members: Sequence[TrialResult], selection: str) -> TrialResult | None:
    """The trial that stands for its study: the leaderboard's smallest eval index of the
    first hit, or the fastest hit; None when no trial hit."""
    hits = [t for t in members if t.hit]
    if not hits:
        return None
    if selection == "fastest":
        return min(hits, key=lambda t: (t.time_to_target, t.trial))
    return min(hits, key=lambda t: (t.first_hit_index or 0, t.time_to_target, t.trial))


def aggregate(
    trials: Iterable[TrialResult], selection: str = "leaderboard"
) -> list[WorkloadResult]:
    """AlgoPerf's per-workload rule for every (label, framework, workload) present."""
    if selection not in SELECTION_RULES:
        raise ResultsFormatError(f"selection={selection!r}; expected one of {SELECTION_RULES}")
    groups: dict[tuple[str, str, str], list[TrialResult]] = {}
    for trial in trials:
        groups.setdefault((trial.label, trial.framework, trial.workload), []).append(trial)
    results = []
    for (label, framework, workload), members in sorted(groups.items()):
        by_study: dict[str, list[TrialResult]] = {}
        for trial in members:
            by_study.setdefault(trial.study, []).append(trial)
        study_times: dict[str, float] = {}
        study_trials: dict[str, int | None] = {}
        study_steps: dict[str, float] = {}
        for study, study_members in sorted(by_study.items()):
            picked = _study_pick(study_members, selection)
            if picked is not None:
                study_times[study] = picked.time_to_target
                study_trials[study] = picked.trial
                study_steps[study] = float(picked.steps_to_target or 0)
            else:
                study_times[study] = INF
                study_trials[study] = None
                study_steps[study] = INF
        first = members[0]
        results.append(
            WorkloadResult(
                label=label,
                framework=framework,
                workload=workload,
                metric=first.metric,
                direction=first.direction,
                target=first.target,
                max_runtime_sec=first.max_runtime_sec,
                study_times=study_times,
                study_best_trials=study_trials,
                study_steps=study_steps,
                time_to_target=median(list(study_times.values())),
                steps_to_target=median(list(study_steps.values())),
                best_metric=best_value([t.best_metric for t in members], first.direction),
                num_trials=len(members),
                trials_per_study={study: len(ms) for study, ms in sorted(by_study.items())},
                unfinished_trials=sum(t.status == "unfinished" for t in members),
                ruleset=first.ruleset,
            )
        )
    return results


def _latest_json(trial_path: Path, prefix: str) -> dict[str, Any]:
    """The ``<prefix>_<n>.json`` with the highest n (one per preemption), or {}."""
    candidates = []
    for path in trial_path.glob(f"{prefix}_*.json"):
        suffix = path.stem.removeprefix(f"{prefix}_")
        if suffix.isdigit():
            candidates.append((int(suffix), path))
    if not candidates:
        return {}
    path = max(candidates)[1]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultsFormatError(f"{path} is not valid JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


def resolve_target(trial_path: Path, workload: str, framework: str) -> TrialTarget:
    """The metric, direction, target and budget this trial ran against."""
    meta = _latest_json(trial_path, "meta_data")
    flags = _latest_json(trial_path, "flags")
    marker = read_marker(trial_path) or {}
    table_info = get_workload(workload, framework) if workload in known_workloads() else None
    metric = meta.get("workload.target_metric_name") or marker.get("target_metric")
    if not metric and table_info is not None:
        metric = table_info.target_metric
    target = meta.get("workload.validation_target_value", marker.get("validation_target"))
    if target is None and table_info is not None:
        target = table_info.validation_target
    budget = meta.get("workload.max_allowed_runtime_sec", marker.get("max_runtime_sec"))
    if budget is None:
        budget = table_info.max_runtime_sec if table_info is not None else INF
    if not metric or target is None:
        raise ResultsFormatError(
            f"{trial_path}: no target known for workload {workload!r} (no meta_data_*.json with "
            "workload.target_metric_name / workload.validation_target_value, and not one of "
            f"the AlgoPerf workloads {', '.join(known_workloads())})"
        )
    direction = marker.get("direction") or meta.get("workload.target_direction")
    if direction not in ("min", "max"):
        if table_info is not None and table_info.target_metric == metric:
            direction = table_info.direction
        else:
            direction = metric_direction(metric)
    ruleset = "self" if flags.get("tuning_ruleset") == "self" else "external"
    if ruleset == "self":
        budget = float(budget) * SELF_TUNING_BUDGET_FACTOR
    period = meta.get("workload.eval_period_time_sec")
    if period is None and table_info is not None:
        period = table_info.eval_period_sec
    max_steps = flags.get("max_global_steps", marker.get("max_global_steps"))
    return TrialTarget(
        str(metric),
        direction,
        float(target),
        float(budget),
        eval_period_sec=float(period) if period is not None else math.nan,
        max_global_steps=int(max_steps) if max_steps else None,
        ruleset=ruleset,
    )


@dataclasses.dataclass(frozen=True)
class TrialLocation:
    label: str
    study: str
    workload: str
    framework: str
    trial: int
    path: Path


def discover_trials(root: str | Path, label: str | None = None) -> list[TrialLocation]:
    """Every ``trial_<k>`` folder under ``root`` with an eval_measurements.csv."""
    given = root
    root = Path(root).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise ResultsFormatError(
            f"{given} is a file, not an experiment directory (give the folder that holds "
            "<workload>_<framework>/trial_<k>/ or study_<k>/ folders)"
        )
    if not root.is_dir():
        raise ResultsFormatError(f"experiment directory {given} does not exist")
    found = []
    for csv_path in sorted(root.rglob(EVAL_CSV)):
        trial_path = csv_path.parent
        trial_match = TRIAL_DIR_RE.match(trial_path.name)
        workload_match = WORKLOAD_DIR_RE.match(trial_path.parent.name)
        if not trial_match or not workload_match:
            continue
        study_path = trial_path.parent.parent
        if study_path == root:
            run_label, study = root.name, root.name
        elif study_path.parent == root:
            run_label, study = root.name, study_path.name
        else:
            run_label = study_path.parent.relative_to(root).as_posix()
            study = study_path.name
        found.append(
            TrialLocation(
                label=label or run_label,
                study=study,
                workload=workload_match.group("workload"),
                framework=workload_match.group("framework"),
                trial=int(trial_match.group("index")),
                path=trial_path,
            )
        )
    return found


def load_trial(location: TrialLocation) -> TrialResult:
    table = read_eval_measurements(location.path / EVAL_CSV)
    target = resolve_target(location.path, location.workload, location.framework)
    return trial_result(
        table,
        target,
        label=location.label,
        study=location.study,
        workload=location.workload,
        framework=location.framework,
        trial=location.trial,
        finished=read_marker(location.path) is not None or algoperf_training_ended(location.path),
    )


def load_results(root: str | Path, label: str | None = None) -> list[TrialResult]:
    """All trials under ``root`` (see the module docstring for the layouts)."""
    return [load_trial(location) for location in discover_trials(root, label)]
