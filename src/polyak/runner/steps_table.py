"""The embedded suite's answer: steps to target per workload x optimizer x framework, over seeds.

Every row is one workload, optimizer (submission) and framework; every averaging
mode is a column. A cell gathers that mode's runs, one per seed:

- a seed *hits* when its run finished and an eval reached the validation target
  (AlgoPerf's rule, :mod:`polyak.runner.results`); its figure is the eval step
  of the first hit. With several tuning trials per seed, the seed's figure is
  its best trial, as AlgoPerf takes the best trial of a study;
- anything else is a miss, counted as infinitely many steps: a run that ended
  without reaching the target, a run that never finished (it crashed or was
  interrupted, however far it got), and a run that left no results at all;
- the cell shows the median over seeds and how many seeds hit, ``901 (2/3)``.
  A median that is a miss shows as ``miss (1/3)``, never as a number;
- ``<mode>/none`` is the ratio of the cell's median to the median of ``none`` in
  the same row (a ratio of medians, so it can be checked against the two cells
  beside it); it is ``n/a`` when either median is a miss.

A mode that exists for one framework only (TWA: PyTorch) shows ``–`` in the other
framework's rows, with a footnote. The seeds behind every figure are listed
under the table, and a second table gives each seed's steps.

Written as Markdown and CSV (one row per row x mode) with atomic writes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from polyak.files import atomic_write_text
from polyak.runner.results import median
from polyak.runner.tables import md_table, text_table, write_csv

SeedStatus = Literal["hit", "miss", "unfinished", "not run"]
SEED_STATUSES: tuple[SeedStatus, ...] = ("hit", "miss", "unfinished", "not run")
# When a seed has several trials and none hit, the most informative failure is shown.
_MISS_PRECEDENCE: tuple[SeedStatus, ...] = ("miss", "unfinished", "not run")
UNAVAILABLE = "–"
MARKDOWN_NAME = "steps_to_target.md"
CSV_NAME = "steps_to_target.csv"
CSV_COLUMNS = (
    "workload",
    "optimizer",
    "framework",
    "mode",
    "seeds",
    "hits",
    "median_steps",
    "ratio_to_none",
    "steps_per_seed",
    "seconds",
)


class StepsTableError(ValueError):
    """An outcome that does not fit the table's layout."""


@dataclasses.dataclass(frozen=True)
class SeedOutcome:
    """One seed's run of one cell: hit (with its steps) or one of the kinds of miss."""

    seed: int
    status: SeedStatus
    steps: int | None = None
    seconds: float = math.nan  # wall seconds of the run, warm-up excluded

    def __post_init__(self) -> None:
        if self.status not in SEED_STATUSES:
            raise StepsTableError(
                f"seed {self.seed}: status {self.status!r}; expected one of {SEED_STATUSES}"
            )
        if (self.status == "hit") != (self.steps is not None):
            raise StepsTableError(
                f"seed {self.seed}: status {self.status!r} with steps {self.steps!r}; "
                "a hit has steps to target and a miss has none"
            )

    @property
    def hit(self) -> bool:
        return self.status == "hit"

    @property
    def steps_or_inf(self) -> float:
        return float(self.steps) if self.steps is not None else math.inf

    def text(self) -> str:
        return str(self.steps) if self.steps is not None else self.status


def best_of_trials(trials: Sequence[SeedOutcome]) -> SeedOutcome:
    """A seed's figure from its tuning trials: the fastest hit, else its most telling miss."""
    if not trials:
        raise StepsTableError("best_of_trials needs at least one trial")
    hits = [t for t in trials if t.hit]
    if hits:
        best = min(hits, key=lambda t: t.steps_or_inf)
    else:
        best = min(trials, key=lambda t: _MISS_PRECEDENCE.index(t.status))
    return dataclasses.replace(best, seconds=_sum_known(t.seconds for t in trials))


@dataclasses.dataclass(frozen=True)
class ModeCell:
    """One mode's seeds in one row."""

    outcomes: tuple[SeedOutcome, ...]

    @property
    def hits(self) -> int:
        return sum(o.hit for o in self.outcomes)

    @property
    def median_steps(self) -> float:
        """Median over seeds, misses as infinity (so it is a miss when half or more miss)."""
        return median([o.steps_or_inf for o in self.outcomes])

    @property
    def seconds(self) -> float:
        return _sum_known(o.seconds for o in self.outcomes)

    def text(self) -> str:
        return f"{format_steps(self.median_steps)} ({self.hits}/{len(self.outcomes)})"

    def per_seed_text(self) -> str:
        return " ".join(o.text() for o in self.outcomes)


@dataclasses.dataclass(frozen=True)
class StepsRow:
    workload: str
    optimizer: str
    framework: str
    cells: Mapping[str, ModeCell | None]  # None: the mode does not exist for this framework

    def ratio(self, mode: str) -> float | None:
        """Median steps of ``mode`` over those of ``none``; None unless both are hits."""
        cell, baseline = self.cells.get(mode), self.cells.get("none")
        if cell is None or baseline is None:
            return None
        numerator, denominator = cell.median_steps, baseline.median_steps
        if not (math.isfinite(numerator) and math.isfinite(denominator)) or denominator <= 0:
            return None
        return numerator / denominator

    @property
    def seconds(self) -> float:
        return _sum_known(c.seconds for c in self.cells.values() if c is not None)


@dataclasses.dataclass(frozen=True)
class TableLayout:
    """What the table spans, in display order; ``only_on`` maps a mode to its one framework."""

    workloads: tuple[str, ...]
    optimizers: tuple[str, ...]
    frameworks: tuple[str, ...]
    modes: tuple[str, ...]
    seeds: tuple[int, ...]
    only_on: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("workloads", "optimizers", "frameworks", "modes", "seeds"):
            values = getattr(self, name)
            if not values:
                raise StepsTableError(f"the table needs at least one of {name}")
            if len(set(values)) != len(values):
                raise StepsTableError(f"{name} repeat: {values}")

    def available(self, framework: str, mode: str) -> bool:
        return self.only_on.get(mode, framework) == framework

    @property
    def ratio_modes(self) -> tuple[str, ...]:
        return tuple(m for m in self.modes if m != "none") if "none" in self.modes else ()


@dataclasses.dataclass(frozen=True)
class SeedRun:
    """One trial's outcome, placed in the grid."""

    workload: str
    optimizer: str
    framework: str
    mode: str
    outcome: SeedOutcome


@dataclasses.dataclass(frozen=True)
class StepsTable:
    layout: TableLayout
    rows: tuple[StepsRow, ...]

    def header(self) -> tuple[str, ...]:
        columns = ["workload", "optimizer", "framework"]
        for mode in self.layout.modes:
            columns.append(mode)
            if mode in self.layout.ratio_modes:
                columns.append(f"{mode}/none")
        return (*columns, "seconds")

    def body(self) -> list[tuple[str, ...]]:
        lines = []
        for row in self.rows:
            cells = [row.workload, row.optimizer, row.framework]
            for mode in self.layout.modes:
                cell = row.cells[mode]
                cells.append(cell.text() if cell is not None else f"{UNAVAILABLE}¹")
                if mode in self.layout.ratio_modes:
                    cells.append(format_ratio(row.ratio(mode)) if cell is not None else UNAVAILABLE)
            cells.append(format_duration(row.seconds))
            lines.append(tuple(cells))
        return lines

    def per_seed_header(self) -> tuple[str, ...]:
        return ("workload", "optimizer", "framework", *self.layout.modes)

    def per_seed_body(self) -> list[tuple[str, ...]]:
        return [
            (
                row.workload,
                row.optimizer,
                row.framework,
                *(
                    row.cells[m].per_seed_text() if row.cells[m] is not None else UNAVAILABLE
                    for m in self.layout.modes
                ),
            )
            for row in self.rows
        ]

    def caption(self) -> str:
        seeds = self.layout.seeds
        lines = [
            f"Steps to the validation target: median over {len(seeds)} seed(s), "
            "with (seeds that hit / seeds).",
            "A seed that ended without reaching the target, never finished, or left no result "
            "is a miss and counts as infinitely many steps; a median that is a miss reads 'miss'.",
        ]
        if self.layout.ratio_modes:
            lines.append(
                "<mode>/none: the ratio of medians, median steps of the mode / median steps of "
                "none in the same row; n/a when either median is a miss."
            )
        lines.append("seconds: wall time of the row's runs, warm-ups excluded.")
        return "\n".join(lines)

    def footnotes(self) -> str:
        lines = [
            f"¹ {mode}: {framework} only."
            for mode, framework in self.layout.only_on.items()
            if mode in self.layout.modes and any(f != framework for f in self.layout.frameworks)
        ]
        seeds = ", ".join(str(s) for s in self.layout.seeds)
        lines.append(f"Seeds: {seeds} (every cell runs each of them once).")
        return "\n".join(lines)

    def per_seed_caption(self) -> str:
        seeds = " ".join(str(s) for s in self.layout.seeds)
        return (
            f"Steps to target per seed (seeds {seeds}, in that order): the step of the first "
            "eval at the target, or why there is none (miss: the run ended without reaching "
            "it; unfinished: the run never finished; not run: no result)."
        )

    def text(self) -> str:
        """For the terminal."""
        return "\n\n".join(
            [
                self.caption(),
                text_table(self.header(), self.body()),
                self.footnotes(),
                self.per_seed_caption(),
                text_table(self.per_seed_header(), self.per_seed_body()),
            ]
        )

    def markdown(self, title: str) -> str:
        return (
            "\n\n".join(
                [
                    f"# {title}",
                    self.caption(),
                    md_table(self.header(), self.body()),
                    self.footnotes().replace("\n", "  \n"),
                    "## Per seed",
                    self.per_seed_caption(),
                    md_table(self.per_seed_header(), self.per_seed_body()),
                ]
            )
            + "\n"
        )

    def csv_rows(self) -> list[dict[str, str]]:
        """One row per table row x mode that exists for the row's framework."""
        rows = []
        for row in self.rows:
            for mode in self.layout.modes:
                cell = row.cells[mode]
                if cell is None:
                    continue
                ratio = row.ratio(mode) if mode in self.layout.ratio_modes else None
                rows.append(
                    {
                        "workload": row.workload,
                        "optimizer": row.optimizer,
                        "framework": row.framework,
                        "mode": mode,
                        "seeds": ";".join(str(o.seed) for o in cell.outcomes),
                        "hits": str(cell.hits),
                        "median_steps": format_steps(cell.median_steps),
                        "ratio_to_none": "" if ratio is None else f"{ratio:.4f}",
                        "steps_per_seed": ";".join(o.text() for o in cell.outcomes),
                        "seconds": "" if math.isnan(cell.seconds) else f"{cell.seconds:.2f}",
                    }
                )
        return rows


def build_steps_table(layout: TableLayout, runs: Iterable[SeedRun]) -> StepsTable:
    """The table over ``layout``; a seed with no run in ``runs`` is a miss ("not run")."""
    trials: dict[tuple[str, str, str, str, int], list[SeedOutcome]] = {}
    for run in runs:
        _check_placement(layout, run)
        key = (run.workload, run.optimizer, run.framework, run.mode, run.outcome.seed)
        trials.setdefault(key, []).append(run.outcome)
    rows = []
    for workload in layout.workloads:
        for optimizer in layout.optimizers:
            for framework in layout.frameworks:
                cells: dict[str, ModeCell | None] = {}
                for mode in layout.modes:
                    if not layout.available(framework, mode):
                        cells[mode] = None
                        continue
                    outcomes = []
                    for seed in layout.seeds:
                        found = trials.get((workload, optimizer, framework, mode, seed))
                        outcomes.append(
                            best_of_trials(found) if found else SeedOutcome(seed, "not run")
                        )
                    cells[mode] = ModeCell(tuple(outcomes))
                rows.append(StepsRow(workload, optimizer, framework, cells))
    return StepsTable(layout, tuple(rows))


def _check_placement(layout: TableLayout, run: SeedRun) -> None:
    for name, value, allowed in (
        ("workload", run.workload, layout.workloads),
        ("optimizer", run.optimizer, layout.optimizers),
        ("framework", run.framework, layout.frameworks),
        ("mode", run.mode, layout.modes),
        ("seed", run.outcome.seed, layout.seeds),
    ):
        if value not in allowed:
            raise StepsTableError(f"a run's {name} {value!r} is not in the table's {allowed}")
    if not layout.available(run.framework, run.mode):
        raise StepsTableError(
            f"mode {run.mode!r} exists only on {layout.only_on[run.mode]}, "
            f"but a run has framework {run.framework!r}"
        )


def write_steps_table(table: StepsTable, directory: Path, title: str) -> tuple[Path, Path]:
    """``steps_to_target.md`` and ``steps_to_target.csv`` in ``directory``, written atomically."""
    markdown = Path(directory) / MARKDOWN_NAME
    atomic_write_text(markdown, table.markdown(title))
    csv_path = write_csv(Path(directory) / CSV_NAME, table.csv_rows(), CSV_COLUMNS)
    return markdown, csv_path


def _sum_known(values: Iterable[float]) -> float:
    """The sum of the known (non-NaN) values; NaN when none is known."""
    known = [v for v in values if not math.isnan(v)]
    return sum(known) if known else math.nan


def format_steps(value: float) -> str:
    if math.isinf(value):
        return "miss"
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def format_ratio(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def format_duration(seconds: float) -> str:
    """``42.0s``, ``3m05s``; ``-`` when unknown."""
    if math.isnan(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s"
