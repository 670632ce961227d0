"""Tuning search-space files: validation and the points they stand for.

AlgoPerf's ``submission_runner`` accepts two JSON formats for
``--tuning_search_space``:

- a list of points, each a dict of scalars with the same keys (trial k uses the
  k-th point; ``--num_tuning_trials`` is clipped to the list's length);
- a dict of ranges, ``{"name": {"min": a, "max": b, "scaling": "linear"|"log"}}``
  or ``{"name": {"feasible_points": [...]}}``, sampled quasi-randomly.

Both are checked here before any GPU time is spent, with errors that name the
file, the entry and what was expected. The embedded suite also draws its points
from here (for the range format with a seeded uniform / log-uniform draw, not
AlgoPerf's Halton sequence).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Any, Literal

from polyak.runner.errors import SearchSpaceError

Scalar = int | float | str | bool | None
_SCALARS = (int, float, str, bool, type(None))


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """A validated search space: either explicit points or ranges."""

    path: Path
    kind: Literal["points", "ranges"]
    points: tuple[dict[str, Scalar], ...] = ()
    ranges: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def num_trials(self, requested: int) -> int:
        """How many trials AlgoPerf will run for ``--num_tuning_trials=requested``."""
        if requested < 1:
            raise SearchSpaceError(f"num_tuning_trials={requested}; expected an integer >= 1")
        return min(requested, len(self.points)) if self.kind == "points" else requested

    def draw(self, num_trials: int, seed: int = 0) -> list[dict[str, Scalar]]:
        """The first ``num_trials`` points (list format) or a seeded draw (range format)."""
        count = self.num_trials(num_trials)
        if self.kind == "points":
            return [dict(point) for point in self.points[:count]]
        rng = random.Random(seed)
        drawn = []
        for _ in range(count):
            point: dict[str, Scalar] = {}
            for name, space in self.ranges.items():
                if "feasible_points" in space:
                    point[name] = rng.choice(space["feasible_points"])
                elif space["scaling"] == "log":
                    low, high = math.log(space["min"]), math.log(space["max"])
                    point[name] = math.exp(rng.uniform(low, high))
                else:
                    point[name] = rng.uniform(space["min"], space["max"])
            drawn.append(point)
        return drawn


def _fail(path: Path, what: str) -> SearchSpaceError:
    return SearchSpaceError(
        f"tuning search space {path}: {what}. Expected a JSON list of points "
        '(e.g. [{"learning_rate": 0.001, "beta2": 0.999}]) or AlgoPerf\'s dict of ranges '
        '(e.g. {"learning_rate": {"min": 1e-4, "max": 1e-2, "scaling": "log"}, '
        '"dropout_rate": {"feasible_points": [0.0, 0.1]}})'
    )


def _check_name(path: Path, name: Any) -> None:
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
        raise _fail(path, f"hyperparameter name {name!r} is not a valid Python identifier")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validate_points(path: Path, data: list[Any]) -> tuple[dict[str, Scalar], ...]:
    if not data:
        raise _fail(path, "the list of points is empty")
    keys: set[str] | None = None
    for index, point in enumerate(data):
        if not isinstance(point, dict) or not point:
            raise _fail(path, f"point #{index} is {point!r}, not a non-empty dict")
        for name, value in point.items():
            _check_name(path, name)
            if not isinstance(value, _SCALARS):
                raise _fail(path, f"point #{index} {name}={value!r} is not a scalar")
        if keys is None:
            keys = set(point)
        elif set(point) != keys:
            raise _fail(
                path,
                f"point #{index} has keys {sorted(point)} but point #0 has {sorted(keys)} "
                "(AlgoPerf builds one namedtuple type from the first point)",
            )
    return tuple(dict(point) for point in data)


def _validate_ranges(path: Path, data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    if not data:
        raise _fail(path, "the dict of ranges is empty")
    for name, space in data.items():
        _check_name(path, name)
        if not isinstance(space, dict):
            raise _fail(path, f"{name}: {space!r} is not a dict")
        if "feasible_points" in space:
            feasible = space["feasible_points"]
            if not isinstance(feasible, list) or not feasible:
                raise _fail(path, f"{name}.feasible_points must be a non-empty list")
            if not all(isinstance(v, _SCALARS) for v in feasible):
                raise _fail(path, f"{name}.feasible_points must hold scalars")
            continue
        missing = [key for key in ("min", "max", "scaling") if key not in space]
        if missing:
            raise _fail(path, f"{name}: missing {', '.join(missing)} (or feasible_points)")
        low, high, scaling = space["min"], space["max"], space["scaling"]
        if not (_is_number(low) and _is_number(high)) or low > high:
            raise _fail(path, f"{name}: min={low!r}, max={high!r} must be numbers with min <= max")
        if scaling not in ("linear", "log"):
            raise _fail(path, f"{name}: scaling={scaling!r} must be 'linear' or 'log'")
        if scaling == "log" and low <= 0:
            raise _fail(path, f"{name}: log scaling needs min > 0, got {low!r}")
    return {name: dict(space) for name, space in data.items()}


def load_search_space(path: str | Path) -> SearchSpace:
    """Reads and validates a search-space file; raises :class:`SearchSpaceError`."""
    path = Path(path)
    if not path.is_file():
        raise SearchSpaceError(f"tuning search space {path} does not exist (or is not a file)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _fail(path, f"not valid JSON ({exc})") from exc
    if isinstance(data, list):
        return SearchSpace(path=path, kind="points", points=_validate_points(path, data))
    if isinstance(data, dict):
        return SearchSpace(path=path, kind="ranges", ranges=_validate_ranges(path, data))
    raise _fail(path, f"top level is {type(data).__name__}")
