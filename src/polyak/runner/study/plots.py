"""The study's figures: median curves with min–max bands, sensitivity heat maps, hits."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from polyak.files import atomic_write_bytes
from polyak.runner.results import best_value
from polyak.runner.study.analysis import RunStats, Summary
from polyak.runner.study.plan import Setting, StudySettings, number_text
from polyak.runner.study.prose import fmt_gain, fmt_steps
from polyak.runner.tables import png_bytes

COLORS = {"none": "black", "lawa": "tab:blue", "ema": "tab:orange", "twa": "tab:green"}


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
        "color": COLORS[setting.averaging],
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


def plot_panels(panels: Sequence[Panel], path: Path, *, suptitle: str, columns: int = 2) -> Path:
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


def plot_heatmaps(
    workload: str, summaries: Sequence[Summary], settings: StudySettings, path: Path
) -> Path:
    """ν x L (LAWA) and ν x β (EMA): median steps to target and mean gain over raw."""
    from matplotlib.figure import Figure

    by_setting = {s.setting: s for s in summaries}
    figure = Figure(figsize=(12, 8.4), layout="constrained")
    axes_grid = figure.subplots(2, 2)
    grids = (
        ("LAWA", "L", settings.grid_windows, lambda nu, v: Setting("lawa", every=nu, window=v)),
        ("EMA", "β", settings.grid_betas, lambda nu, v: Setting("ema", every=nu, beta=v)),
    )
    quantities = (("steps", "median steps to target"), ("mean_gain", "median mean gain over raw"))
    for column, (name, second, values, make) in enumerate(grids):
        for row, (quantity, title) in enumerate(quantities):
            axes = axes_grid[row][column]
            grid = np.full((len(settings.grid_every), len(values)), np.nan)
            for i, nu in enumerate(settings.grid_every):
                for j, v in enumerate(values):
                    entry = by_setting.get(make(nu, v))
                    if entry is not None:
                        grid[i, j] = entry.median(quantity)
            _draw_heatmap(figure, axes, grid, quantity)
            axes.set_xticks(range(len(values)), [number_text(v) for v in values])
            axes.set_yticks(range(len(settings.grid_every)), [str(n) for n in settings.grid_every])
            axes.set_xlabel(second)
            axes.set_ylabel("ν (averaging_every)")
            extra = _heatmap_note(name, quantity, by_setting, settings)
            axes.set_title(f"{name}: {title}{extra}", fontsize=10)
    figure.suptitle(
        f"Sensitivity on {workload} ({settings.grid_submission}, {settings.grid_framework})"
    )
    atomic_write_bytes(path, png_bytes(figure))
    return path


def _quantity_text(quantity: str, value: float) -> str:
    return fmt_steps(value) if quantity == "steps" else fmt_gain(value)


def _draw_heatmap(figure: Any, axes: Any, grid: np.ndarray, quantity: str) -> None:
    """The grid as colours (gains centred on 0), each cell labelled with its value."""
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
            text = _quantity_text(quantity, grid[i, j])
            axes.text(j, i, text, ha="center", va="center", fontsize=9, color="black")


def _heatmap_note(
    name: str, quantity: str, by_setting: dict[Setting, Summary], settings: StudySettings
) -> str:
    """What the grid leaves out: the run without averaging, and the 'poor' EMA."""
    extra = ""
    if quantity == "steps":
        raw = by_setting.get(Setting())
        raw_steps = raw.median("steps") if raw is not None else math.nan
        extra = f" (no averaging: {fmt_steps(raw_steps)})"
    poor = settings.poor_ema
    entry = by_setting.get(poor) if name == "EMA" and poor is not None else None
    if entry is not None:
        value = _quantity_text(quantity, entry.median(quantity))
        extra += f"\nν={poor.every}, β={number_text(poor.beta)}: {value}"
    return extra


def plot_steps_to_target(workload: str, summaries: Sequence[Summary], path: Path) -> Path:
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
            color = COLORS[summary.setting.averaging]
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
