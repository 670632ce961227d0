"""The results page: CSV tables, Markdown tables, and ``results.md`` with its figures."""

from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from polyak.averaging.config import TWAConfig
from polyak.files import atomic_write_text
from polyak.runner.study.analysis import StudyAnalysis, Summary
from polyak.runner.study.plan import StudySettings
from polyak.runner.study.plots import Panel, plot_heatmaps, plot_panels, plot_steps_to_target
from polyak.runner.study.prose import (
    compute_text,
    constant_lr_text,
    findings_decay,
    findings_sensitivity,
    findings_time_to_target,
    fmt_gain,
    fmt_metric,
    fmt_ms,
    fmt_ratio,
    fmt_steps,
    percent,
    trajectory_check_text,
    with_spread,
)
from polyak.runner.tables import format_seconds, md_table, write_csv

RESULTS_FOLDER = "results"
RESULTS_MARKDOWN = "results.md"


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
    "averaging_select",
    "twa_budget",
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
                "averaging_select": run.setting.select,
                "twa_budget": _csv_number(run.setting.twa_budget),
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
            row.append(f"{h:.0f} ({percent(h / s.step_hint)})" if h is not None else "-")
        row += [
            f"{s.hits}/{len(s.members)}",
            with_spread(s, "steps", fmt_steps),
            fmt_ratio(s.median("step_ratio")) if s.setting.averaged else "-",
            with_spread(s, "seconds", format_seconds),
            *([fmt_ms(s.median("ms_per_step"))] if steady else []),
            with_spread(s, "best_metric", fmt_metric),
            *([with_spread(s, "final_metric", fmt_metric)] if final else []),
            fmt_gain(s.median("mean_gain")) if s.setting.averaged else "-",
            fmt_gain(s.median("final_gain")) if s.setting.averaged else "-",
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
    parts = [f"python {platform.python_version()}"]
    for name in ("torch", "jax", "flax", "optax", "numpy"):
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(parts)


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
    figures = _Figures(output_dir, output_dir / RESULTS_FOLDER)
    figures.assets.mkdir(parents=True, exist_ok=True)
    tables = _write_tables(analysis, figures.assets)
    parts = [
        *_introduction(analysis, command, rebuilt_only),
        *_setup(analysis),
        *_answers(analysis),
        *_time_to_target_section(analysis, figures),
        *_sensitivity_section(analysis, figures),
        *_decay_section(analysis, figures),
        *_missing_section(analysis),
        *_files_section(analysis.settings),
    ]
    markdown = output_dir / RESULTS_MARKDOWN
    atomic_write_text(markdown, "\n".join(parts))
    files = [*tables, *figures.written]
    # Plots and tables of an earlier page that this one no longer has would mislead.
    for stale in [*figures.assets.glob("*.png"), *figures.assets.glob("*.csv")]:
        if stale not in files:
            stale.unlink()
    return markdown, files


class _Figures:
    """The page's figures: where they go, and the Markdown that shows each one."""

    def __init__(self, output_dir: Path, assets: Path) -> None:
        self.output_dir = output_dir
        self.assets = assets
        self.written: list[Path] = []

    def show(self, path: Path) -> list[str]:
        self.written.append(path)
        return [f"![{path.stem}]({path.relative_to(self.output_dir).as_posix()})", ""]


def _write_tables(analysis: StudyAnalysis, assets: Path) -> list[Path]:
    groups = {
        "time_to_target.csv": analysis.time_to_target,
        "sensitivity.csv": [s for group in analysis.sensitivity.values() for s in group],
        "decay.csv": [s for group in analysis.decay.values() for s in group],
    }
    runs = write_csv(assets / "runs.csv", run_rows(analysis, analysis.settings.root), RUN_COLUMNS)
    return [runs] + [
        write_csv(assets / name, summary_rows(summaries), SUMMARY_COLUMNS)
        for name, summaries in groups.items()
    ]


def _studied_workloads(analysis: StudyAnalysis) -> list[str]:
    settings = analysis.settings
    return list(
        dict.fromkeys((*settings.workloads, *settings.grid_workloads, *settings.decay_workloads))
    )


def _introduction(analysis: StudyAnalysis, command: str | None, rebuilt_only: bool) -> list[str]:
    generated = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return [
        "# When, where and why to average: reproduced on the embedded workloads",
        "",
        "Ajroldi, Orvieto & Geiping (ICML 2025) ask three questions of weight averaging on "
        "AlgoPerf at a cost of thousands of GPU-hours. This page asks them of polyak's "
        f"small CPU workloads ({', '.join(_studied_workloads(analysis))}). It is generated by "
        "`scripts/study.py`; do not edit it by hand. "
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
        + compute_text(analysis),
        "",
    ]


def _workloads_table(analysis: StudyAnalysis) -> str:
    facts = _workload_facts(analysis)
    datasets = _datasets(analysis)
    header = [
        "workload",
        "target (validation)",
        "step_hint",
        "eval every",
        "time budget (s)",
        "data",
        "SHA-256 of the data",
    ]
    rows = []
    for workload, f in sorted(facts.items()):
        found = datasets.get(workload, [])
        rows.append(
            [
                workload,
                f"{f['metric']} {'≥' if f['direction'] == 'max' else '≤'} {f['target']:g}",
                f["step_hint"],
                f"{f['eval_every']} steps",
                f"{f['budget']:g}",
                ", ".join(f"{d.get('source')} ({d.get('n_examples')} examples)" for d in found)
                or "-",
                ", ".join(f"`{d.get('sha256')}`" for d in found) or "-",
            ]
        )
    return md_table(header, rows)


def _setup(analysis: StudyAnalysis) -> list[str]:
    settings = analysis.settings
    has_twa = any(s.run.setting.averaging == "twa" for s in analysis.stats.values())
    return [
        "## Setup",
        "",
        _workloads_table(analysis),
        "",
        "- Hyperparameters: the first point of `tuning_search_spaces/<optimizer>.json` "
        "(AlgoPerf's baseline point; warmup then cosine decay to 0 at step_hint), plus the "
        "averaging settings named in each row. Question 1 uses "
        f"{settings.lawa.short()} and {settings.ema.short()} for every optimizer, chosen "
        "before any run: the grid's shortest horizons (the nearest it has to the paper's "
        "ν·L ≈ 1% of the budget) and the paper's β.",
        *(
            [
                '- *Best of average and live* rows: `averaging_select="best"`; at each eval '
                "`prepare_for_eval` scores the average and the live weights on the last "
                "training batches and hands AlgoPerf the better one (the selection's forward "
                "passes are submission time)."
            ]
            if any(s.run.setting.select == "best" for s in analysis.stats.values())
            else []
        ),
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
        "- One unrecorded warm-up run per optimizer, framework and workload absorbs the "
        "process's one-time costs (imports, XLA's start-up) before the first recorded run. "
        "JAX still compiles its step programs in every run and that time counts (as in "
        "AlgoPerf); averaging adds programs (collect, swap), so at this scale JAX "
        "submission times carry a start-up cost that steps do not.",
        "- *ms per step*: submission milliseconds per step from the 2nd eval to the last "
        "(steady state: without the one-time compilation of the first step, collection and "
        "swap), median over seeds; it includes the averaging's collections and swaps.",
        *(
            [
                '- TWA (PyTorch only): `averaging="twa"` with the LAWA row\'s ν and L and the '
                "default `twa_*` fit settings but for the *budget* (`twa_budget`): its fits "
                "run in `prepare_for_eval` on recent training batches, so their cost is "
                "submission time, and together they may cost that fraction of the training "
                "steps so far (in passes over a batch). The default budget is "
                f"{TWAConfig().budget:g}; one far above 1 pays for a fit at every eval."
            ]
            if has_twa
            else []
        ),
        f"- {constant_lr_text(analysis)}",
        f"- {trajectory_check_text(analysis)}",
        "",
    ]


def _answers(analysis: StudyAnalysis) -> list[str]:
    return [
        "## Answers",
        "",
        "**1. Does averaging reach the target sooner?**",
        "",
        *_bullets(findings_time_to_target(analysis)),
        "",
        "**2. How sensitive is it to ν, L and β?**",
        "",
        *_bullets(findings_sensitivity(analysis)),
        "",
        "**3. Does averaging replace LR decay?**",
        "",
        *_bullets(findings_decay(analysis)),
        "",
    ]


def _time_to_target_section(analysis: StudyAnalysis, figures: _Figures) -> list[str]:
    settings = analysis.settings
    parts = ["## 1. Time to target, raw against averaged", ""]
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
                    groups.append((f"{submission} / {framework}", tuple(group)))
        if groups:
            parts += _time_to_target_figures(workload, members, groups, figures)
    return parts


def _time_to_target_figures(
    workload: str,
    members: Sequence[Summary],
    groups: Sequence[tuple[str, tuple[Summary, ...]]],
    figures: _Figures,
) -> list[str]:
    headline = plot_panels(
        [Panel(title, group, x="time", y="metric") for title, group in groups],
        figures.assets / f"headline_{workload}.png",
        suptitle=f"{workload}: validation metric against submission time, raw (no "
        "averaging) against averaged\nmedian over seeds, band = min–max",
    )
    gap = plot_panels(
        [Panel(title, group, x="step", y="gain") for title, group in groups],
        figures.assets / f"gap_{workload}.png",
        suptitle=f"{workload}: averaged against raw validation metric at each eval "
        "(+ = averaging better)\nmedian over seeds, band = min–max",
    )
    hits = plot_steps_to_target(
        workload, members, figures.assets / f"time_to_target_{workload}.png"
    )
    return [*figures.show(headline), *figures.show(gap), *figures.show(hits)]


def _sensitivity_section(analysis: StudyAnalysis, figures: _Figures) -> list[str]:
    settings = analysis.settings
    parts = [
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
        path = figures.assets / f"sensitivity_{workload}.png"
        parts += figures.show(plot_heatmaps(workload, summaries, settings, path))
    return parts


def _decay_section(analysis: StudyAnalysis, figures: _Figures) -> list[str]:
    settings = analysis.settings
    parts = [
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
        decay_plot = plot_panels(
            [
                Panel("best so far against step", summaries, x="step", y="best"),
                Panel("best so far against submission time", summaries, y="best"),
                Panel("metric at each eval", summaries, x="step", y="metric"),
                Panel("averaged against raw, same schedule", summaries, "step", "gain"),
            ],
            figures.assets / f"decay_{workload}.png",
            suptitle=f"{workload}: cosine decay (solid) against constant LR (dashed); "
            "median over seeds, band = min–max",
        )
        parts += figures.show(decay_plot)
    return parts


def _missing_section(analysis: StudyAnalysis) -> list[str]:
    if not analysis.missing:
        return []
    return [
        "## Missing runs",
        "",
        "These runs have not finished (rerun the command to resume them):",
        "",
        *[f"- {r.describe()}" for r in analysis.missing],
        "",
    ]


def _files_section(settings: StudySettings) -> list[str]:
    return [
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
