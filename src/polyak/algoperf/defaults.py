"""Resolving a hyperparameter point against a submission's defaults.

External tuning passes a search-space point: names it lacks take the
optimizer's defaults, and a missing ``averaging`` means no averaging, so the
plain baseline search space runs the plain baseline. Self-tuning passes
``None``: then every name takes its documented default, and averaging is on
(LAWA with the paper's horizon, ν·L ≈ 1% of step_hint), kept in host
memory when an accelerator is present (see :func:`self_tuning_placement`).
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

from polyak.hyperparameters import as_dict

SELF_TUNING_AVERAGING: Mapping[str, Any] = {"averaging": "lawa"}


def self_tuning_placement(accelerator_present: bool) -> dict[str, Any]:
    """Where self-tuning keeps the averaging state.

    With an accelerator, in host memory: the window then costs no
    accelerator memory, and the copies and folds overlap training. Without
    one, host and device are the same memory, so the simpler placement wins.
    """
    return {"averaging_placement": "host"} if accelerator_present else {}


def resolve_hyperparameters(
    hyperparameters: Any,
    optimizer_defaults: Mapping[str, Any],
    self_tuning_extra: Mapping[str, Any] | None = None,
) -> types.SimpleNamespace:
    """One attribute-access view with every name the submission reads."""
    if hyperparameters is None:
        merged = {**optimizer_defaults, **SELF_TUNING_AVERAGING, **(self_tuning_extra or {})}
    else:
        given = {k: v for k, v in as_dict(hyperparameters).items() if v is not None}
        merged = {**optimizer_defaults, **given}
    return types.SimpleNamespace(**merged)
