"""Reading hyperparameters the way AlgoPerf hands them over.

AlgoPerf passes one point of the search space as an object with attribute
access (a namedtuple), or ``None`` in the self-tuning ruleset. Tests and our
own tools also pass plain dicts. Everything in polyak reads them through
:func:`lookup`, so all three forms behave the same.

Unknown names. :func:`check_names` reports the names of a point that no
config reads, such as a misspelled ``averagin="lawa"``, which would otherwise
run silently without averaging. It warns by default rather than raising,
because one AlgoPerf search space may serve several submissions and carry
names that only the others read. Set the environment variable
``POLYAK_STRICT_HYPERPARAMETERS=1`` to raise instead.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

STRICT_ENV_VAR = "POLYAK_STRICT_HYPERPARAMETERS"


class UnknownHyperparameterWarning(UserWarning):
    """A hyperparameter point carries names that nothing reads."""


class UnknownHyperparameterError(ValueError):
    """A hyperparameter point carries names that nothing reads (strict mode)."""


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


def check_names(hyperparameters: Any, known: Iterable[str]) -> None:
    """Warns (or, in strict mode, raises) naming every unknown name of the point."""
    known = frozenset(known)
    unknown = sorted(set(as_dict(hyperparameters)) - known)
    if not unknown:
        return
    message = (
        f"hyperparameters {unknown} are not read by this submission and have no effect; "
        f"it reads {sorted(known)} (set {STRICT_ENV_VAR}=1 to make this an error)"
    )
    if os.environ.get(STRICT_ENV_VAR, "").strip().lower() in ("1", "true", "yes"):
        raise UnknownHyperparameterError(message)
    warnings.warn(message, UnknownHyperparameterWarning, stacklevel=3)
