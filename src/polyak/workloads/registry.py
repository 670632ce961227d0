"""Names of the embedded workloads and a factory for either framework.

Importing this module loads neither torch nor jax (nor algoperf's ``spec``,
which imports both): :func:`make_workload` imports the one twin it is asked
for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # algoperf's spec imports both frameworks
    from polyak.algoperf import spec

EMBEDDED_WORKLOADS: tuple[str, ...] = ("digits", "diabetes", "textlm")
FRAMEWORKS: tuple[str, ...] = ("pytorch", "jax")

_MODULE_SUFFIX = {"pytorch": "torch", "jax": "jax"}
_CLASS_NAMES = {
    "digits": "DigitsWorkload",
    "diabetes": "DiabetesWorkload",
    "textlm": "TextLMWorkload",
}


class UnknownWorkloadError(ValueError):
    """A workload or framework name that the embedded registry does not have."""


def make_workload(name: str, framework: str) -> spec.Workload:
    """A new instance of embedded workload ``name`` for ``framework`` ("pytorch" | "jax")."""
    if name not in EMBEDDED_WORKLOADS:
        raise UnknownWorkloadError(
            f"unknown embedded workload {name!r}; choices: {', '.join(EMBEDDED_WORKLOADS)}"
        )
    if framework not in FRAMEWORKS:
        raise UnknownWorkloadError(
            f"unknown framework {framework!r}; choices: {', '.join(FRAMEWORKS)}"
        )
    module = importlib.import_module(f"polyak.workloads.{name}_{_MODULE_SUFFIX[framework]}")
    return getattr(module, _CLASS_NAMES[name])()
