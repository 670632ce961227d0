"""NadamW's settings, shared by the torch and jax twins.

A frozen dataclass that validates itself, so a bad hyperparameter fails when
the trial starts, with the name and the value, in both frameworks alike.
:meth:`NadamWConfig.from_hyperparameters` is the one place where AlgoPerf's
hyperparameter names become these fields; the factories ``make_nadamw`` in
``nadamw_torch`` and ``nadamw_jax`` take the config, never the names.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

from polyak.hyperparameters import lookup

# AlgoPerf's baselines fix epsilon rather than tuning it.
EPSILON = 1e-8


class NadamWConfigError(ValueError):
    """A NadamW hyperparameter is missing its type or lies outside its range."""


@dataclasses.dataclass(frozen=True)
class NadamWConfig:
    """NadamW with AlgoPerf's warmup + cosine schedule (defaults: the baseline's first point)."""

    # The peak rate, reached after the warmup. Finite and > 0: an infinite rate
    # turns the weights non-finite at the first step.
    learning_rate: float = 0.001308209823469072
    # Searched as 1 − β1 (on a log scale, as AlgoPerf's baseline does).
    one_minus_beta1: float = 0.02686663061
    beta2: float = 0.9981232922116359
    # Decoupled, scaled by the scheduled rate.
    weight_decay: float = 0.16375311233774334
    # The warmup's share of step_hint.
    warmup_factor: float = 0.1
    # Added to √v̂; fixed, not a hyperparameter.
    epsilon: float = EPSILON

    # The first point of AlgoPerf's NAdamW baseline search space, whole:
    # self-tuning (hyperparameters=None) uses it, and a point missing a name
    # takes that name from here. label_smoothing and dropout_rate belong to
    # the training step, not to the optimizer, but to the same point.
    DEFAULT_HYPERPARAMETERS: ClassVar[Mapping[str, Any]] = MappingProxyType(
        {
            "learning_rate": 0.001308209823469072,
            "one_minus_beta1": 0.02686663061,
            "beta2": 0.9981232922116359,
            "weight_decay": 0.16375311233774334,
            "warmup_factor": 0.1,
            "label_smoothing": 0.1,
            "dropout_rate": 0.0,
        }
    )
    # Every name :meth:`from_hyperparameters` reads.
    HYPERPARAMETER_NAMES: ClassVar[frozenset[str]] = frozenset(
        {"learning_rate", "one_minus_beta1", "beta2", "weight_decay", "warmup_factor"}
    )

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise NadamWConfigError(f"{field.name}={value!r} must be a number")
            object.__setattr__(self, field.name, float(value))
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0.0):
            raise NadamWConfigError(
                f"learning_rate={self.learning_rate!r} must be a finite number > 0"
            )
        if not 0.0 < self.one_minus_beta1 <= 1.0:
            raise NadamWConfigError(
                f"one_minus_beta1={self.one_minus_beta1!r} must lie in (0, 1] (beta1 in [0, 1))"
            )
        if not 0.0 <= self.beta2 < 1.0:
            raise NadamWConfigError(f"beta2={self.beta2!r} must lie in [0, 1)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0.0):
            raise NadamWConfigError(
                f"weight_decay={self.weight_decay!r} must be a finite number >= 0"
            )
        if not 0.0 <= self.warmup_factor < 1.0:
            raise NadamWConfigError(f"warmup_factor={self.warmup_factor!r} must lie in [0, 1)")
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0.0):
            raise NadamWConfigError(f"epsilon={self.epsilon!r} must be a finite number >= 0")

    @property
    def beta1(self) -> float:
        return 1.0 - self.one_minus_beta1

    @classmethod
    def from_hyperparameters(cls, hyperparameters: Any) -> NadamWConfig:
        """Reads one search-space point (namedtuple, namespace, dict) or None.

        Each missing (or None) name takes its value from
        :attr:`DEFAULT_HYPERPARAMETERS`.
        """
        values = {
            name: lookup(hyperparameters, name, cls.DEFAULT_HYPERPARAMETERS[name])
            for name in sorted(cls.HYPERPARAMETER_NAMES)
        }
        return cls(**values)
