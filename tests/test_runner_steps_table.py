"""The steps-to-target table on synthetic outcomes: medians over seeds, misses, ratios, TWA."""

from __future__ import annotations

import csv
import math
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from polyak.runner.steps_table import (
    ModeCell,
    SeedOutcome,
    SeedRun,
    StepsTableError,
    TableLayout,
    best_of_trials,
    build_steps_table,
    write_steps_table,
)

SEEDS = (0, 1, 2)


def hit(seed: int, steps: int, seconds: float = 1.0) -> SeedOutcome:
    return SeedOutcome(seed, "hit", steps, seconds)


def miss(seed: int, status: str = "miss") -> SeedOutcome:
    return SeedOutcome(seed, status, seconds=1.0 if status == "miss" else math.nan)


def layout(**overrides) -> TableLayout:
    fields = {
        "workloads": ("digits",),
        "optimizers": ("nadamw",),
        "frameworks": ("pytorch", "jax"),
        "modes": ("none", "lawa", "ema", "twa"),
        "seeds": SEEDS,
        "only_on": {"twa": "pytorch"},
    }
    return TableLayout(**{**fields, **overrides})


def runs_for(framework: str, mode: str, outcomes: list[SeedOutcome]) -> list[SeedRun]:
    return [SeedRun("digits", "nadamw", framework, mode, outcome) for outcome in outcomes]


def test_median_over_seeds_counts_misses_as_infinitely_many_steps():
    two_of_three = ModeCell((hit(0, 181), miss(1), hit(2, 201)))
    assert two_of_three.hits == 2
    assert two_of_three.median_steps == 201  # 181, 201, inf
    assert two_of_three.text() == "201 (2/3)"
    assert two_of_three.per_seed_text() == "181 miss 201"

    one_of_three = ModeCell((hit(0, 181), miss(1), miss(2, "unfinished")))
    assert math.isinf(one_of_three.median_steps)
    assert one_of_three.text() == "miss (1/3)"  # never a number when most seeds miss

    even = ModeCell((hit(0, 100), hit(1, 201)))
    assert even.text() == "150.5 (2/2)"
    assert ModeCell((hit(0, 100), miss(1))).text() == "miss (1/2)"


@given(
    st.lists(
        st.one_of(st.none(), st.integers(min_value=1, max_value=10_000)), min_size=1, max_size=7
    )
)
def test_cell_median_and_hits_agree_with_the_definition(steps):
    outcomes = tuple(
        miss(seed) if value is None else hit(seed, value) for seed, value in enumerate(steps)
    )
    cell = ModeCell(outcomes)
    as_numbers = [math.inf if value is None else value for value in steps]
    expected = statistics.median(as_numbers)
    assert cell.hits == sum(value is not None for value in steps)
    assert cell.median_steps == expected or (math.isinf(expected) and math.isinf(cell.median_steps))
    shown = cell.text().split(" ")[0]
    assert (shown == "miss") == math.isinf(expected)
    if cell.hits * 2 < len(steps):  # most seeds missed: the median must not look like a hit
        assert shown == "miss"


def test_ratio_is_the_ratio_of_medians_and_only_between_hits():
    outcomes = {
        "none": [hit(0, 200), hit(1, 240), hit(2, 220)],
        "lawa": [hit(0, 150), hit(1, 190), miss(2)],
        "ema": [hit(0, 100), miss(1), miss(2)],
        "twa": [hit(0, 160), hit(1, 180), hit(2, 170)],
    }
    runs = [r for mode, found in outcomes.items() for r in runs_for("pytorch", mode, found)]
    table = build_steps_table(layout(frameworks=("pytorch",)), runs)
    (row,) = table.rows
    assert row.ratio("lawa") == pytest.approx(190 / 220)
    assert row.ratio("twa") == pytest.approx(170 / 220)
    assert row.ratio("ema") is None  # its median is a miss
    assert row.ratio("none") == pytest.approx(1.0)
    assert table.header() == (
        "workload",
        "optimizer",
        "framework",
        "none",
        "lawa",
        "lawa/none",
        "ema",
        "ema/none",
        "twa",
        "twa/none",
        "seconds",
    )
    (body,) = table.body()
    assert body[3:10] == (
        "220 (3/3)",
        "190 (2/3)",
        f"{190 / 220:.2f}x",
        "miss (1/3)",
        "n/a",
        "170 (3/3)",
        f"{170 / 220:.2f}x",
    )
    assert body[10] == "12.0s"  # twelve runs (hits and misses) of one second each
    assert "ratio of medians" in table.caption()


def test_no_baseline_means_no_ratio_and_a_missing_baseline_median_means_no_ratio():
    runs = runs_for("pytorch", "none", [miss(0), miss(1), hit(2, 40)])
    runs += runs_for("pytorch", "lawa", [hit(0, 20), hit(1, 20), hit(2, 20)])
    table = build_steps_table(layout(frameworks=("pytorch",), modes=("none", "lawa")), runs)
    assert table.rows[0].ratio("lawa") is None
    assert table.body()[0][3:6] == ("miss (1/3)", "20 (3/3)", "n/a")
    only_lawa = build_steps_table(
        layout(frameworks=("pytorch",), modes=("lawa",)),
        runs_for("pytorch", "lawa", [hit(0, 20)]),
    )
    assert "lawa/none" not in only_lawa.header()


def test_twa_column_only_for_pytorch():
    runs = runs_for("pytorch", "twa", [hit(0, 10), hit(1, 10), hit(2, 10)])
    runs += runs_for("jax", "none", [hit(0, 30), hit(1, 30), hit(2, 30)])
    table = build_steps_table(layout(), runs)
    rows = {row.framework: row for row in table.rows}
    assert rows["jax"].cells["twa"] is None and rows["pytorch"].cells["twa"] is not None
    bodies = {line[2]: line for line in table.body()}
    twa = table.header().index("twa")
    assert bodies["jax"][twa] == "–¹" and bodies["jax"][twa + 1] == "–"
    assert bodies["pytorch"][twa] == "10 (3/3)"
    assert "¹ twa: pytorch only." in table.footnotes()
    csv_modes = {(r["framework"], r["mode"]) for r in table.csv_rows()}
    assert ("pytorch", "twa") in csv_modes and ("jax", "twa") not in csv_modes
    with pytest.raises(StepsTableError, match="only on pytorch"):
        build_steps_table(layout(), runs_for("jax", "twa", [hit(0, 10)]))
    pytorch_only = build_steps_table(layout(frameworks=("pytorch",)), runs[:3])
    assert "¹" not in pytorch_only.footnotes()


def test_seeds_without_a_run_are_misses_and_are_listed():
    table = build_steps_table(
        layout(frameworks=("pytorch",), modes=("none",)),
        runs_for("pytorch", "none", [hit(0, 50), miss(2, "unfinished")]),
    )
    cell = table.rows[0].cells["none"]
    assert [o.status for o in cell.outcomes] == ["hit", "not run", "unfinished"]
    assert cell.text() == "miss (1/3)"
    assert "Seeds: 0, 1, 2" in table.footnotes()
    assert table.per_seed_body()[0][3] == "50 not run unfinished"
    text = table.text()
    assert "Seeds: 0, 1, 2" in text and "50 not run unfinished" in text


def test_best_trial_of_a_seed():
    assert best_of_trials([miss(0), hit(0, 300), hit(0, 200)]).steps == 200
    assert best_of_trials([miss(0, "not run"), miss(0), miss(0, "unfinished")]).status == "miss"
    assert best_of_trials([hit(0, 300, 2.0), hit(0, 200, 3.0)]).seconds == 5.0
    with pytest.raises(StepsTableError):
        best_of_trials([])


def test_bad_outcomes_and_layouts_are_refused():
    with pytest.raises(StepsTableError, match="a hit has steps"):
        SeedOutcome(0, "hit")
    with pytest.raises(StepsTableError, match="a hit has steps"):
        SeedOutcome(0, "miss", 10)
    with pytest.raises(StepsTableError, match="status 'crashed'"):
        SeedOutcome(0, "crashed")  # type: ignore[arg-type]
    with pytest.raises(StepsTableError, match="seeds"):
        layout(seeds=())
    with pytest.raises(StepsTableError, match="repeat"):
        layout(seeds=(1, 1))
    with pytest.raises(StepsTableError, match="seed 7"):
        build_steps_table(layout(), runs_for("pytorch", "none", [hit(7, 10)]))


def test_markdown_and_csv_written(tmp_path):
    runs = runs_for("pytorch", "none", [hit(0, 20), miss(1), hit(2, 40)])
    runs += runs_for("pytorch", "lawa", [hit(0, 10), hit(1, 30), hit(2, 20)])
    table = build_steps_table(layout(modes=("none", "lawa", "twa")), runs)
    markdown, csv_path = write_steps_table(table, tmp_path / "exp", "Embedded suite: demo")
    text = markdown.read_text()
    assert text.startswith("# Embedded suite: demo")
    assert "| digits | nadamw | pytorch | 40 (2/3) | 20 (3/3) | 0.50x |" in text
    assert "## Per seed" in text and "| 20 miss 40 |" in text
    rows = list(csv.DictReader(csv_path.open()))
    assert [(r["framework"], r["mode"]) for r in rows] == [
        ("pytorch", "none"),
        ("pytorch", "lawa"),
        ("pytorch", "twa"),
        ("jax", "none"),
        ("jax", "lawa"),
    ]
    assert rows[0]["steps_per_seed"] == "20;miss;40" and rows[0]["hits"] == "2"
    assert rows[1]["ratio_to_none"] == "0.5000" and rows[0]["seeds"] == "0;1;2"
    assert (
        rows[2]["median_steps"] == "miss"
        and rows[2]["steps_per_seed"] == "not run;" * 2 + "not run"
    )
    assert not [p for p in (tmp_path / "exp").iterdir() if p.name.startswith(".")]  # no temp left
