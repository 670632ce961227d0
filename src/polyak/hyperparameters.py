"""Reading hyperparameters the way AlgoPerf hands them over.

AlgoPerf passes one point of the search space as an object with attribute
access (a namedtuple), or ``None`` in the self-tuning ruleset. Tests and our
own tools also pass plain dicts. Everything in polyak reads them through
:func:`lookup`, so all three forms behave the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def lookup(hyperparameters: Any, name: str, default: Any) -> Any:
    """Returns ``hyperparameters.name``, or ``default`` when it is absent or None."""
    if hyperparameters is None:
        return default
    if isinstance(hyperparameters, Mapping):
        value = hyperparameters.get(name, None)
    else:
        value = getattr(hyperparameters, name, None)
    return default if value is None else value


def as_dict(hyperparameters: Any) -> dict[str, Any]:
    """A plain dict view of any hyperparameter container (empty for None)."""
    if hyperparameters is None:
        return {}
    if isinstance(hyperparameters, Mapping):
        return dict(hyperparameters)
    if hasattr(hyperparameters, "_asdict"):
        return dict(hyperparameters._asdict())
    return {k: v for k, v in vars(hyperparameters).items() if not k.startswith("_")}
