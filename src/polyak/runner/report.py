"""The report: Markdown and CSV tables, PNG plots, side-by-side comparisons, scores.

Written into one folder (every file atomically):

- ``report.md``: warnings first (fewer studies or trials than the leaderboard's
  rules, missing workloads, unfinished trials), per-workload time to target, the
  side-by-side comparison of all runs pooled as the leaderboard pools them,
  whatever their framework (time-to-target ratios against a baseline run and
  total accelerator-hours to target, a miss charged at the full budget, as in
  Ajroldi et al.'s GPU-hours table; unfinished workloads are not charged), the
  AlgoPerf benchmark score of each run against the others, and every trial;
- ``workloads.csv``, ``trials.csv``, ``comparison.csv``, ``scores.csv``;
- ``plots/<workload>_<framework>.png``: the validation metric against submission
  time, one line per trial, the target as a horizontal line;
- ``plots/performance_profile.png`` when there is something to compare.

Accelerator-hours are ``seconds x num_accelerators / 3600``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from polyak.files import atomic_write_bytes, atomic_write_text
from polyak.runner.results import TrialResult, WorkloadResult, aggregate
from polyak.runner.scoring import (
    REQUIRED_STUDIES,
    REQUIRED_TRIALS,
    PerformanceProfile,
    benchmark_scores,
    performance_profiles,
)
from polyak.runner.tables import (
    format_number,
    format_seconds,
    md_table,
    png_bytes,
    text_table,
    write_csv,
)
from polyak.runner.workload_table import benchmark_workloads


@dataclasses.dataclass(frozen=True)
class Comparison:
    """All runs side by side, pooled into one performance profile."""

    framework: str  # the frameworks pooled, e.g. "jax+pytorch"
    labels: tuple[str, ...]
    baseline: str
    workloads: tuple[str, ...]
    results: dict[str, dict[str, WorkloadResult]]
    accelerator_hours: dict[str, float]
    num_accelerators: int
    scores: dict[str, float]
    profile: PerformanceProfile | None
    warnings: tuple[str, ...] = ()
    pooled: bool = True


@dataclasses.dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    tables: dict[str, Path]
    plots: tuple[Path, ...]


def status_seconds(seconds: float, status: str) -> str:
    """A time to target, or ``unfinished`` where a miss is not (yet) established."""
    return "unfinished" if status == "unfinished" else format_seconds(seconds)


def accelerator_hours(seconds: float, num_accelerators: int) -> float:
    return seconds * num_accelerators / 3600.0


def submission_keys(results: Sequence[WorkloadResult]) -> dict[tuple[str, str], str]:
    """(label, framework) -> the name in the pooled profile: the label, with the
    framework added only when one label ran in several frameworks."""
    frameworks: dict[str, set[str]] = {}
    for r in results:
        frameworks.setdefault(r.label, set()).add(r.framework)
    return {
        (r.label, r.framework): r.label
        if len(frameworks[r.label]) == 1
        else f"{r.label} ({r.framework})"
        for r in results
    }


def leaderboard_warnings(
    results: Sequence[WorkloadResult], keys: dict[tuple[str, str], str], scored: Sequence[str]
) -> list[str]:
    """Every way these results fall short of what the leaderboard's score rests on."""
    warnings = []
    by_submission: dict[str, list[WorkloadResult]] = {}
    for r in results:
        by_submission.setdefault(keys[(r.label, r.framework)], []).append(r)
    # The studies x trials rules are the benchmark's; other workloads (the embedded
    # CPU suite) are only checked for unfinished trials.
    benchmark = set(scored) <= set(benchmark_workloads())
    for name, members in by_submission.items():
        unfinished = sum(r.unfinished_trials for r in members)
        if unfinished:
            touched = sorted(r.workload for r in members if r.provisional)
            warnings.append(
                f"{name}: {unfinished} trial(s) unfinished (no target reached, and no sign "
                f"that they ran to their end) in {', '.join(touched)}; the score counts them "
                "as the leaderboard counts a crashed trial, as no hit, so it is provisional"
            )
        if not benchmark:
            continue
        present = {r.workload for r in members}
        missing = [w for w in scored if w not in present]
        if missing:
            warnings.append(
                f"{name}: no results for {len(missing)} of the {len(scored)} scored workloads "
                f"({', '.join(missing)}); each counts as a miss"
            )
        ruleset = members[0].ruleset
        few_studies = sorted(r.workload for r in members if len(r.study_times) < REQUIRED_STUDIES)
        if few_studies:
            counts = sorted({len(r.study_times) for r in members})
            warnings.append(
                f"{name}: {'/'.join(map(str, counts))} studies where the leaderboard scores "
                f"{REQUIRED_STUDIES} ({', '.join(few_studies)}); a median over fewer studies "
                "is not a leaderboard score"
            )
        required = REQUIRED_TRIALS.get(ruleset, 1)
        few_trials = sorted(
            r.workload for r in members if min(r.trials_per_study.values(), default=0) < required
        )
        if few_trials:
            counts = sorted({n for r in members for n in r.trials_per_study.values()})
            warnings.append(
                f"{name}: {'/'.join(map(str, counts))} trial(s) per study where the {ruleset} "
                f"ruleset asks for {required} ({', '.join(few_trials)})"
            )
    return warnings


def compare(
    results: Sequence[WorkloadResult],
    *,
    baseline: str | None = None,
    num_accelerators: int = 1,
    num_workloads: int | None = None,
    pool_frameworks: bool = True,
) -> list[Comparison]:
    """All runs pooled, as the leaderboard pools submissions whatever their framework:
    per-workload results, accelerator-hours, one performance profile and the scores.
    ``pool_frameworks=False`` compares each framework's runs on their own instead (one
    comparison per framework; not how the leaderboard scores)."""
    if not results:
        return []
    if not pool_frameworks:
        return [
            dataclasses.replace(comparison, pooled=False)
            for framework in sorted({r.framework for r in results})
            for comparison in compare(
                [r for r in results if r.framework == framework],
                baseline=baseline,
                num_accelerators=num_accelerators,
                num_workloads=num_workloads,
            )
        ]
    keys = submission_keys(results)
    labels = tuple(dict.fromkeys(keys[(r.label, r.framework)] for r in results))
    workloads = tuple(sorted({r.workload for r in results}))
    table: dict[str, dict[str, WorkloadResult]] = {label: {} for label in labels}
    for r in results:
        table[keys[(r.label, r.framework)]][r.workload] = r
    named = [label for label in labels if label == baseline or label.startswith(f"{baseline} (")]
    base = named[0] if named else labels[0]
    hours = {
        label: sum(
            accelerator_hours(r.charged_seconds, num_accelerators)
            for r in table[label].values()
            if not r.unfinished
        )
        for label in labels
    }
    benchmark = benchmark_workloads()
    scored = benchmark if set(workloads) <= set(benchmark) else workloads
    n = num_workloads if num_workloads is not None else len(scored)
    times = {label: {w: table[label][w].time_to_target for w in table[label]} for label in labels}
    profile = performance_profiles(times, workloads, num_workloads=max(n, len(workloads)))
    frameworks = "+".join(sorted({r.framework for r in results}))
    return [
        Comparison(
            framework=frameworks,
            labels=labels,
            baseline=base,
            workloads=workloads,
            results=table,
            accelerator_hours=hours,
            num_accelerators=num_accelerators,
            scores=benchmark_scores(profile),
            profile=profile,
            warnings=tuple(leaderboard_warnings(results, keys, scored)),
        )
    ]


def _ratio_text(value: float, base: float) -> str:
    if math.isinf(value) or math.isinf(base) or base <= 0:
        return ""
    return f" ({value / base:.2f}x)"


WORKLOAD_COLUMNS = (
    "run",
    "framework",
    "workload",
    "metric",
    "direction",
    "target",
    "hit",
    "time_to_target_sec",
    "steps_to_target",
    "best_metric",
    "max_runtime_sec",
    "studies",
    "trials",
    "unfinished_trials",
    "status",
    "study_times_sec",
)
TRIAL_COLUMNS = (
    "run",
    "framework",
    "study",
    "workload",
    "trial",
    "metric",
    "target",
    "hit",
    "time_to_target_sec",
    "steps_to_target",
    "best_metric",
    "over_budget",
    "final_step",
    "final_time_sec",
    "num_evals",
    "finished",
    "status",
    "path",
)


def workload_rows(results: Sequence[WorkloadResult]) -> list[dict[str, Any]]:
    return [
        {
            "run": r.label,
            "framework": r.framework,
            "workload": r.workload,
            "metric": r.metric,
            "direction": r.direction,
            "target": r.target,
            "hit": r.hit,
            "time_to_target_sec": r.time_to_target,
            "steps_to_target": r.steps_to_target,
            "best_metric": r.best_metric,
            "max_runtime_sec": r.max_runtime_sec,
            "studies": len(r.study_times),
            "trials": r.num_trials,
            "unfinished_trials": r.unfinished_trials,
            "status": r.status,
            "study_times_sec": ";".join(f"{k}={v}" for k, v in r.study_times.items()),
        }
        for r in results
    ]


def trial_rows(trials: Sequence[TrialResult]) -> list[dict[str, Any]]:
    return [
        {
            "run": t.label,
            "framework": t.framework,
            "study": t.study,
            "workload": t.workload,
            "trial": t.trial,
            "metric": t.metric,
            "target": t.target,
            "hit": t.hit,
            "time_to_target_sec": t.time_to_target,
            "steps_to_target": t.steps_to_target if t.steps_to_target is not None else "",
            "best_metric": t.best_metric,
            "over_budget": t.over_budget,
            "final_step": t.final_step if t.final_step is not None else "",
            "final_time_sec": t.final_time,
            "num_evals": len(t.steps),
            "finished": t.finished,
            "status": t.status,
            "path": str(t.path),
        }
        for t in sorted(trials, key=lambda t: (t.label, t.framework, t.workload, t.study, t.trial))
    ]


def comparison_rows(comparisons: Sequence[Comparison]) -> list[dict[str, Any]]:
    rows = []
    for c in comparisons:
        base = c.results[c.baseline]
        for label in c.labels:
            for w in c.workloads:
                r = c.results[label].get(w)
                base_time = base[w].time_to_target if w in base else math.inf
                t = r.time_to_target if r is not None else math.inf
                rows.append(
                    {
                        "framework": c.framework,
                        "run": label,
                        "baseline": c.baseline,
                        "workload": w,
                        "time_to_target_sec": t,
                        "ratio_to_baseline": (
                            t / base_time
                            if math.isfinite(t) and math.isfinite(base_time) and base_time > 0
                            else ""
                        ),
                        "accelerator_hours": (
                            accelerator_hours(r.charged_seconds, c.num_accelerators)
                            if r is not None
                            else ""
                        ),
                    }
                )
    return rows


def plot_curves(trials: Sequence[TrialResult], plot_dir: Path) -> list[Path]:
    """One PNG per (workload, framework): metric against submission time, target line."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot global state

    groups: dict[tuple[str, str], list[TrialResult]] = {}
    for trial in trials:
        groups.setdefault((trial.workload, trial.framework), []).append(trial)
    written = []
    for (workload, framework), members in sorted(groups.items()):
        figure = Figure(figsize=(8, 5), layout="constrained")
        axes = figure.subplots()
        labels = {t.label for t in members}
        studies = {t.study for t in members}
        for t in sorted(members, key=lambda t: (t.label, t.study, t.trial)):
            points = [(x, y) for x, y in zip(t.times, t.values) if not math.isnan(y)]
            if not points:
                continue
            name = " ".join(
                part
                for part in (
                    t.label if len(labels) > 1 else "",
                    t.study if len(studies) > 1 else "",
                    f"trial {t.trial}",
                )
                if part
            )
            (line,) = axes.plot([p[0] for p in points], [p[1] for p in points], label=name)
            if t.hit:
                axes.plot([t.time_to_target], [t.target], "o", color=line.get_color())
        first = members[0]
        arrow = "lower is better" if first.direction == "min" else "higher is better"
        axes.axhline(first.target, color="black", linestyle="--", label=f"target {first.target:g}")
        axes.set_xlabel("submission time (s)")
        axes.set_ylabel(f"validation/{first.metric} ({arrow})")
        axes.set_title(f"{workload} ({framework})")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
        path = plot_dir / f"{workload}_{framework}.png"
        atomic_write_bytes(path, png_bytes(figure))
        written.append(path)
    return written


def plot_profile(comparison: Comparison, plot_dir: Path) -> Path | None:
    if comparison.profile is None:
        return None
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    for label, rho in comparison.profile.rho.items():
        axes.step(comparison.profile.taus, rho, where="post", label=label)
    axes.set_xlabel("tau (time to target / best time to target)")
    axes.set_ylabel("fraction of workloads")
    axes.set_ylim(-0.02, 1.02)
    scope = f"pooled: {comparison.framework}" if comparison.pooled else comparison.framework
    axes.set_title(f"performance profile ({scope})")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    name = (
        "performance_profile"
        if comparison.pooled
        else f"performance_profile_{comparison.framework}"
    )
    path = plot_dir / f"{name}.png"
    atomic_write_bytes(path, png_bytes(figure))
    return path


def render_markdown(
    title: str,
    results: Sequence[WorkloadResult],
    trials: Sequence[TrialResult],
    comparisons: Sequence[Comparison],
    num_accelerators: int,
    plots: Sequence[Path],
    output_dir: Path,
    accelerator_type: str = "",
) -> str:
    """The report page: warnings first, then the rule, the tables and the plots."""
    parts = [f"# {title}", ""]
    parts += _warnings_section(comparisons)
    parts += _time_to_target_section(results)
    for comparison in comparisons:
        parts += _comparison_section(comparison, num_accelerators, accelerator_type)
    parts += _trials_section(trials)
    parts += _plots_section(plots, output_dir)
    return "\n".join(parts)


def _warnings_section(comparisons: Sequence[Comparison]) -> list[str]:
    warnings = [w for c in comparisons for w in c.warnings]
    if not warnings:
        return []
    return [
        "## WARNING: not a leaderboard-grade score",
        "",
        *(f"> **WARNING** {w}  " for w in warnings),
        "",
    ]


def _time_to_target_section(results: Sequence[WorkloadResult]) -> list[str]:
    return [
        "Time to target follows AlgoPerf's rule: the first eval whose validation metric "
        "reaches the target (`<=` for minimised metrics, `>=` for maximised ones), in "
        "accumulated submission time; a hit after the time budget is a miss. Per workload, "
        "as the leaderboard scores it: within each study the trial that reaches the target "
        "at the earliest eval, then the median over studies (misses count as infinity). A "
        "trial that neither reached the target nor ran to its end is *unfinished*, not a "
        "miss. All runs are pooled into one performance profile, whatever their framework.",
        "",
        "## Time to target",
        "",
        md_table(
            [
                "run",
                "framework",
                "workload",
                "target",
                "hit",
                "time to target (s)",
                "steps to target",
                "best metric",
                "studies",
                "trials",
            ],
            [
                [
                    r.label,
                    r.framework,
                    r.workload,
                    f"{r.metric} {'<=' if r.direction == 'min' else '>='} {r.target:g}",
                    {"hit": "yes", "miss": "no"}.get(r.status, r.status),
                    status_seconds(r.time_to_target, r.status),
                    format_number(r.steps_to_target) if not r.unfinished else "-",
                    format_number(r.best_metric),
                    len(r.study_times),
                    r.num_trials,
                ]
                for r in results
            ],
        ),
        "",
    ]


def _comparison_section(c: Comparison, num_accelerators: int, accelerator_type: str) -> list[str]:
    """One side-by-side table: time to target per workload, accelerator-hours, scores."""
    scope = f"pooled: {c.framework}" if c.pooled else c.framework
    header = ["workload", *c.labels]
    rows = []
    base = c.results[c.baseline]
    for w in c.workloads:
        base_time = base[w].time_to_target if w in base else math.inf
        row = [w]
        for label in c.labels:
            r = c.results[label].get(w)
            if r is None:
                row.append("-")
                continue
            row.append(
                status_seconds(r.time_to_target, r.status)
                + ("" if label == c.baseline else _ratio_text(r.time_to_target, base_time))
                + (" (provisional)" if r.provisional and r.hit else "")
            )
        rows.append(row)
    base_hours = c.accelerator_hours[c.baseline]
    rows.append(
        [
            f"accelerator-hours to target (x{num_accelerators}"
            f"{' ' + accelerator_type if accelerator_type else ''}, miss = budget, "
            "unfinished = not charged)"
        ]
        + [
            f"{c.accelerator_hours[label]:.4g}"
            + ("" if label == c.baseline else _ratio_text(c.accelerator_hours[label], base_hours))
            for label in c.labels
        ]
    )
    rows.append(
        ["AlgoPerf benchmark score (vs these runs, pooled)"]
        + [
            f"{c.scores[label]:.4f}"
            + (" (provisional)" if any(r.provisional for r in c.results[label].values()) else "")
            for label in c.labels
        ]
    )
    return [f"## Side by side ({scope}), baseline `{c.baseline}`", "", md_table(header, rows), ""]


def _trials_section(trials: Sequence[TrialResult]) -> list[str]:
    return [
        "## Trials",
        "",
        md_table(
            [
                "run",
                "framework",
                "study",
                "workload",
                "trial",
                "hit",
                "time to target (s)",
                "steps to target",
                "best metric",
                "over budget",
                "finished",
            ],
            [
                [
                    row["run"],
                    row["framework"],
                    row["study"],
                    row["workload"],
                    row["trial"],
                    {"hit": "yes", "miss": "no"}.get(row["status"], row["status"]),
                    status_seconds(row["time_to_target_sec"], row["status"]),
                    row["steps_to_target"] if row["steps_to_target"] != "" else "-",
                    format_number(row["best_metric"]),
                    "yes" if row["over_budget"] else "no",
                    "yes" if row["finished"] else "no",
                ]
                for row in trial_rows(trials)
            ],
        ),
        "",
    ]


def _plots_section(plots: Sequence[Path], output_dir: Path) -> list[str]:
    if not plots:
        return []
    return [
        "## Plots",
        "",
        *(f"![{p.stem}]({p.relative_to(output_dir).as_posix()})" for p in plots),
        "",
    ]


def build_report(
    trials: Sequence[TrialResult],
    output_dir: str | Path,
    *,
    title: str = "polyak results",
    num_accelerators: int = 1,
    baseline: str | None = None,
    num_workloads: int | None = None,
    plots: bool = True,
    selection: str = "leaderboard",
    pool_frameworks: bool = True,
    accelerator_type: str = "",
) -> ReportFiles:
    """Writes the tables, plots and Markdown for these trials into ``output_dir``."""
    output_dir = Path(output_dir)
    if num_accelerators < 1:
        raise ValueError(f"num_accelerators={num_accelerators}; expected an integer >= 1")
    results = aggregate(trials, selection)
    comparisons = compare(
        results,
        baseline=baseline,
        num_accelerators=num_accelerators,
        num_workloads=num_workloads,
        pool_frameworks=pool_frameworks,
    )
    tables = {
        "workloads": write_csv(
            output_dir / "workloads.csv", workload_rows(results), WORKLOAD_COLUMNS
        ),
        "trials": write_csv(output_dir / "trials.csv", trial_rows(trials), TRIAL_COLUMNS),
        "comparison": write_csv(
            output_dir / "comparison.csv",
            comparison_rows(comparisons),
            (
                "framework",
                "run",
                "baseline",
                "workload",
                "time_to_target_sec",
                "ratio_to_baseline",
                "accelerator_hours",
            ),
        ),
        "scores": write_csv(
            output_dir / "scores.csv",
            [
                {
                    "framework": c.framework,
                    "run": label,
                    "benchmark_score": c.scores[label],
                    "accelerator_hours": c.accelerator_hours[label],
                    "num_accelerators": num_accelerators,
                }
                for c in comparisons
                for label in c.labels
            ],
            ("framework", "run", "benchmark_score", "accelerator_hours", "num_accelerators"),
        ),
    }
    written: list[Path] = []
    if plots:
        plot_dir = output_dir / "plots"
        written += plot_curves(trials, plot_dir)
        for c in comparisons:
            path = plot_profile(c, plot_dir) if len(c.labels) > 1 else None
            if path is not None:
                written.append(path)
    markdown = output_dir / "report.md"
    atomic_write_text(
        markdown,
        render_markdown(
            title,
            results,
            trials,
            comparisons,
            num_accelerators,
            written,
            output_dir,
            accelerator_type,
        ),
    )
    return ReportFiles(markdown=markdown, tables=tables, plots=tuple(written))


def time_to_target_table(results: Sequence[WorkloadResult]) -> str:
    """A plain-text table for the terminal."""
    header = ("run", "framework", "workload", "hit", "steps", "seconds", "best metric")
    rows = [
        (
            r.label,
            r.framework,
            r.workload,
            {"hit": "yes", "miss": "no"}.get(r.status, r.status),
            format_number(r.steps_to_target) if not r.unfinished else "-",
            status_seconds(r.time_to_target, r.status),
            format_number(r.best_metric),
        )
        for r in results
    ]
    return text_table(header, rows)
