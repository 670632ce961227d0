"""Targets and step hints of the embedded workloads, calibrated the AlgoPerf way.

AlgoPerf sets a workload's target to the validation metric that its best
baseline reaches within the step budget, so the baseline hits the target
late, near the end of its schedule. ``scripts/calibrate_workloads.py`` does
the same for the embedded workloads: NadamW (the first point of
``tuning_search_spaces/nadamw.json``, no averaging) runs for ``step_hint``
steps on several seeds; each seed's best validation (and test) metric within
``step_hint`` is recorded, and the target is the median over seeds. It then
checks that the target is hit late (see :func:`summarize_seeds`).

The result lives beside this module as ``<workload>.json`` (package data),
with the seeds, every seed's curve summary, the date, the library versions
and the data fingerprint, so anyone can re-derive a target. Workloads read
their targets and step hint through :class:`CalibratedValue`; nothing here
imports torch or jax.

A seed *reaches* the target at the first eval whose metric is at least as
good as the target, so the median seed counts at its own best. The runtime
check (``EmbeddedWorkload._beats``) is strict, as AlgoPerf's is; the two
differ only on exact ties.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
from collections.abc import Sequence
from importlib import resources
from typing import Any

#: The target is hit late when the median seed reaches it within
#: [LATE_FRACTION, 1] of step_hint, so that (a fortiori) the median seed has
#: not reached it by EARLY_FRACTION of step_hint.
LATE_FRACTION = 0.75
EARLY_FRACTION = 0.5
MIN_SEEDS = 5
SCHEMA_VERSION = 1


class CalibrationError(ValueError):
    """A calibration record is missing, malformed or inconsistent."""


@dataclasses.dataclass(frozen=True)
class SeedCurve:
    """One calibration run: its evals (step and metrics) up to step_hint."""

    seed: int
    steps: tuple[int, ...]
    validation: tuple[float, ...]
    test: tuple[float, ...]

    def __post_init__(self) -> None:
        if not len(self.steps) == len(self.validation) == len(self.test) > 0:
            raise CalibrationError(
                f"seed {self.seed}: steps, validation and test must be non-empty and of equal "
                f"length; got {len(self.steps)}, {len(self.validation)}, {len(self.test)}"
            )
        if list(self.steps) != sorted(set(self.steps)):
            raise CalibrationError(f"seed {self.seed}: steps {self.steps} must increase")


def _check_direction(direction: str) -> None:
    if direction not in ("max", "min"):
        raise CalibrationError(f"direction={direction!r}; expected 'max' or 'min'")


def at_least_as_good(value: float, target: float, direction: str) -> bool:
    _check_direction(direction)
    return value >= target if direction == "max" else value <= target


def best_within(
    steps: Sequence[int], values: Sequence[float], step_hint: int, direction: str
) -> tuple[float, int]:
    """The best value at an eval step <= step_hint, and the first step it was seen."""
    _check_direction(direction)
    candidates = [(v, s) for s, v in zip(steps, values, strict=True) if s <= step_hint]
    if not candidates:
        raise CalibrationError(f"no eval at or before step_hint={step_hint}")
    pick = max if direction == "max" else min
    best = pick(v for v, _ in candidates)
    return best, next(s for v, s in candidates if v == best)


def first_step_reaching(
    steps: Sequence[int], values: Sequence[float], target: float, direction: str
) -> int | None:
    """The first eval step whose value is at least as good as ``target``."""
    for step, value in zip(steps, values, strict=True):
        if at_least_as_good(value, target, direction):
            return step
    return None


def median_steps(steps_to_target: Sequence[int | None]) -> float:
    """The median over seeds, a seed that never reaches the target counting as infinity."""
    return statistics.median(math.inf if s is None else float(s) for s in steps_to_target)


def summarize_seeds(curves: Sequence[SeedCurve], step_hint: int, direction: str) -> dict[str, Any]:
    """Targets from the per-seed bests and the late-hit check, for one step_hint.

    ``passes`` is true when the median over seeds of the steps to the
    validation target lies in ``[LATE_FRACTION, 1] * step_hint`` and fewer
    than half of the seeds reach it by ``EARLY_FRACTION * step_hint`` (one
    lucky seed may; the median run may not). The earliest seed and the count
    reaching it by then are recorded too.
    """
    if len(curves) < MIN_SEEDS:
        raise CalibrationError(f"{len(curves)} seeds; a calibration needs at least {MIN_SEEDS}")
    if step_hint < 1:
        raise CalibrationError(f"step_hint={step_hint!r} must be >= 1")
    seeds = []
    for curve in curves:
        best_validation, best_step = best_within(
            curve.steps, curve.validation, step_hint, direction
        )
        best_test, _ = best_within(curve.steps, curve.test, step_hint, direction)
        seeds.append(
            {
                "seed": curve.seed,
                "best_validation": best_validation,
                "best_validation_step": best_step,
                "best_test": best_test,
            }
        )
    validation_target = statistics.median(s["best_validation"] for s in seeds)
    test_target = statistics.median(s["best_test"] for s in seeds)
    for seed, curve in zip(seeds, curves, strict=True):
        within = [i for i, s in enumerate(curve.steps) if s <= step_hint]
        steps = [curve.steps[i] for i in within]
        seed["steps_to_validation_target"] = first_step_reaching(
            steps, [curve.validation[i] for i in within], validation_target, direction
        )
        seed["steps_to_test_target"] = first_step_reaching(
            steps, [curve.test[i] for i in within], test_target, direction
        )
    median = median_steps([s["steps_to_validation_target"] for s in seeds])
    reached = [s["steps_to_validation_target"] for s in seeds]
    earliest = min((s for s in reached if s is not None), default=None)
    by_half = sum(1 for s in reached if s is not None and s <= EARLY_FRACTION * step_hint)
    late = LATE_FRACTION * step_hint <= median <= step_hint
    not_early = 2 * by_half < len(seeds)
    return {
        "step_hint": step_hint,
        "direction": direction,
        "validation_target": validation_target,
        "test_target": test_target,
        "median_steps_to_validation_target": median,
        "median_fraction_of_step_hint": median / step_hint,
        "earliest_steps_to_validation_target": earliest,
        "seeds_reaching_by_half": by_half,
        "hit_late": late,
        "not_hit_by_half": not_early,
        "passes": late and not_early,
        "seeds": seeds,
    }


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What a workload reads from its calibration file."""

    workload: str
    target_metric: str
    direction: str
    step_hint: int
    validation_target: float
    test_target: float
    record: dict[str, Any]


def _validated(record: dict[str, Any], name: str) -> Calibration:
    """Checks the record against itself: the targets must be the medians it records."""
    try:
        chosen = record["chosen"]
        seeds = chosen["seeds"]
        direction = chosen["direction"]
        validation_target = float(chosen["validation_target"])
        test_target = float(chosen["test_target"])
        step_hint = int(chosen["step_hint"])
        metric = str(record["target_metric"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CalibrationError(f"calibration of {name!r} lacks or mistypes {exc}") from exc
    if record.get("workload") != name:
        raise CalibrationError(
            f"calibration file for {name!r} names workload {record.get('workload')!r}"
        )
    if len(seeds) < MIN_SEEDS:
        raise CalibrationError(f"calibration of {name!r} has {len(seeds)} seeds (< {MIN_SEEDS})")
    for key, value in (("validation", validation_target), ("test", test_target)):
        median = statistics.median(float(s[f"best_{key}"]) for s in seeds)
        if median != value:
            raise CalibrationError(
                f"calibration of {name!r}: {key}_target {value!r} is not the median "
                f"{median!r} of the recorded per-seed bests"
            )
    _check_direction(direction)
    return Calibration(
        workload=name,
        target_metric=metric,
        direction=direction,
        step_hint=step_hint,
        validation_target=validation_target,
        test_target=test_target,
        record=record,
    )


def calibration_path(name: str) -> Any:
    """Where ``name``'s calibration file lives (a package-data resource)."""
    return resources.files(__name__).joinpath(f"{name}.json")


@functools.cache
def load_calibration(name: str) -> Calibration:
    """The checked calibration of embedded workload ``name`` (read once per process)."""
    path = calibration_path(name)
    if not path.is_file():
        raise CalibrationError(
            f"no calibration for workload {name!r} at {path}; run "
            f"`python scripts/calibrate_workloads.py --workloads={name}`"
        )
    return _validated(json.loads(path.read_text(encoding="utf-8")), name)


class CalibratedValue:
    """A workload class attribute read from the calibration file on first use.

    A non-data descriptor: an instance may shadow it (the calibration script
    does, to try a step_hint before any record exists).
    """

    def __init__(self, field: str) -> None:
        if field not in ("step_hint", "validation_target", "test_target"):
            raise ValueError(f"field={field!r}; expected step_hint or a target")
        self._field = field

    def __get__(self, instance: Any, owner: type) -> Any:
        return getattr(load_calibration(owner.workload_name), self._field)
