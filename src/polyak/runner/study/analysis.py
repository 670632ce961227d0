"""Reading the finished runs: each against its raw partner, then grouped per question."""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from polyak.runner.completion import EVAL_CSV, MEASUREMENTS_CSV, is_finished
from polyak.runner.results import TrialLocation, TrialResult, load_trial, median
from polyak.runner.study.plan import (
    COSINE_SWITCH,
    STRETCHED,
    RunKey,
    Setting,
    StudyRun,
    StudySettings,
)
from polyak.runner.study.records import TIMING_FILE, read_json, read_sessions


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


def _constant_lr_method_used(study_run: StudyRun, hparams: Mapping[str, Any]) -> str:
    if study_run.setting.schedule != "constant":
        return ""
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
    meta = read_json(path / "meta_data_0.json")
    timing = read_json(path / TIMING_FILE)
    # What the run itself used (the plan may have changed since, e.g. a new switch).
    method = _constant_lr_method_used(study_run, read_json(path / "hparams.json"))
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
    stats: Mapping[RunKey, RunStats],
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
    stats: dict[RunKey, RunStats]
    time_to_target: tuple[Summary, ...]
    sensitivity: dict[str, tuple[Summary, ...]]
    decay: dict[str, tuple[Summary, ...]]
    missing: tuple[StudyRun, ...]
    sessions: tuple[dict[str, Any], ...] = ()


def analyze_study(settings: StudySettings, runs: Sequence[StudyRun], root: Path) -> StudyAnalysis:
    """Reads every finished run and groups them by the three questions."""
    loaded = {r.key: _load_run(r, root) for r in runs}
    finished = {k: v for k, v in loaded.items() if v is not None}
    stats = {
        key: _with_raw(value, finished.get(value.run.raw_key())) for key, value in finished.items()
    }

    def summarise(
        workload: str, system: tuple[str, str], chosen: Sequence[Setting], seeds: Sequence[int]
    ) -> tuple[Summary, ...]:
        submission, framework = system
        return tuple(
            _summaries(
                stats,
                runs,
                workload=workload,
                submission=submission,
                framework=framework,
                settings=chosen,
                seeds=seeds,
            )
        )

    grid_system = (settings.grid_submission, settings.grid_framework)
    sensitivity = settings.sensitivity_settings()
    return StudyAnalysis(
        settings=settings,
        runs=tuple(runs),
        stats=stats,
        time_to_target=tuple(
            summary
            for workload in settings.workloads
            for submission in settings.submissions
            for framework in settings.frameworks
            for summary in summarise(
                workload,
                (submission, framework),
                settings.time_to_target_settings(framework),
                settings.seeds,
            )
        ),
        sensitivity={
            workload: summarise(workload, grid_system, sensitivity, settings.grid_seeds)
            for workload in settings.grid_workloads
        },
        decay={
            workload: summarise(
                workload, grid_system, settings.decay_settings(), settings.decay_seeds
            )
            for workload in settings.decay_workloads
        },
        missing=tuple(r for r in runs if loaded[r.key] is None),
        sessions=tuple(read_sessions(root)),
    )


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
