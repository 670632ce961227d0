"""Everything a trial reads from its hyperparameters, resolved once.

``init_optimizer_state`` turns the hyperparameter point into a
:class:`TrialConfig`: the optimizer's typed config, the
:class:`~polyak.averaging.config.AveragingConfig` and a
:class:`TrainingConfig` for the training step. The builders keep it in the
optimizer state, so ``update_params`` and ``prepare_for_eval`` never read the
hyperparameters again.

External tuning passes a search-space point: each config takes the names the
point lacks from its own defaults (the optimizer's first baseline point), and a
missing ``averaging`` means no averaging, so the plain baseline search space
runs the plain baseline. Self-tuning passes ``None``: then every name takes
its documented default, and averaging is on (LAWA with the paper's horizon,
ν·L ≈ 1% of step_hint), kept in host memory when an accelerator is present
(see :func:`self_tuning_placement`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

from polyak.averaging.config import AveragingConfig
from polyak.hyperparameters import check_names, lookup

# LAWA, handed to AlgoPerf only when it beats the live weights on recent training batches:
# in docs/results.md the best-of rows never needed more steps than no averaging, where
# plain LAWA and EMA often did (the average lags the live weights early in training).
SELF_TUNING_AVERAGING: Mapping[str, Any] = {"averaging": "lawa", "averaging_select": "best"}


class OptimizerConfig(Protocol):
    """What a builder needs of an optimizer's config type (NadamWConfig, ShampooConfig)."""

    # The self-tuning point, whole, including the training step's names.
    DEFAULT_HYPERPARAMETERS: ClassVar[Mapping[str, Any]]
    HYPERPARAMETER_NAMES: ClassVar[frozenset[str]]

    @classmethod
    def from_hyperparameters(cls, hyperparameters: Any) -> Any: ...


class TrainingConfigError(ValueError):
    """A hyperparameter of the training step is out of range."""


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """What the training step reads besides the optimizer and the averaging."""

    label_smoothing: float = 0.0
    dropout_rate: float = 0.0
    # Clip the global gradient norm to this; None does not clip.
    grad_clip: float | None = None

    HYPERPARAMETER_NAMES: ClassVar[frozenset[str]] = frozenset(
        {"label_smoothing", "dropout_rate", "grad_clip"}
    )

    def __post_init__(self) -> None:
        for name in ("label_smoothing", "dropout_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TrainingConfigError(f"{name}={value!r} must be a number in [0, 1)")
            if not 0.0 <= value < 1.0:
                raise TrainingConfigError(f"{name}={value!r} must lie in [0, 1)")
            object.__setattr__(self, name, float(value))
        clip = self.grad_clip
        if clip is not None:
            if (
                isinstance(clip, bool)
                or not isinstance(clip, int | float)
                or not (math.isfinite(clip) and clip > 0.0)
            ):
                raise TrainingConfigError(
                    f"grad_clip={clip!r} must be a finite number > 0 (or absent: no clipping)"
                )
            object.__setattr__(self, "grad_clip", float(clip))

    @classmethod
    def from_hyperparameters(
        cls, hyperparameters: Any, defaults: Mapping[str, Any]
    ) -> TrainingConfig:
        """Reads the point; a missing name takes the optimizer's default, else 0 / no clip."""
        return cls(
            label_smoothing=lookup(
                hyperparameters, "label_smoothing", defaults.get("label_smoothing", 0.0)
            ),
            dropout_rate=lookup(hyperparameters, "dropout_rate", defaults.get("dropout_rate", 0.0)),
            grad_clip=lookup(hyperparameters, "grad_clip", defaults.get("grad_clip")),
        )


@dataclasses.dataclass(frozen=True)
class TrialConfig:
    """The resolved hyperparameters of one trial."""

    optimizer: Any
    averaging: AveragingConfig
    training: TrainingConfig

    # AlgoPerf's torch checkpointing calls these on every value of the
    # optimizer state. A resumed run resolves the config again from the same
    # hyperparameters, so there is nothing to save.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        del state


def self_tuning_placement(accelerator_present: bool) -> dict[str, Any]:
    """Where self-tuning keeps the averaging state.

    With an accelerator, in host memory: the window then costs no
    accelerator memory, and the copies and folds overlap training. Without
    one, host and device are the same memory, so the simpler placement wins.
    """
    return {"averaging_placement": "host"} if accelerator_present else {}


def resolve_trial_config(
    hyperparameters: Any,
    optimizer_config: type[OptimizerConfig],
    step_hint: int,
    *,
    accelerator_present: bool,
    self_tuning_extra: Mapping[str, Any] | None = None,
) -> TrialConfig:
    """Validates the point and reads every config from it, averaging first.

    Averaging is validated first so that a bad value fails before any
    optimizer memory is allocated. ``self_tuning_extra`` overrides names of
    the self-tuning point (an exported self-tuning submission fixes its mode).
    """
    if hyperparameters is None:
        point: Any = {
            **SELF_TUNING_AVERAGING,
            **self_tuning_placement(accelerator_present),
            **(self_tuning_extra or {}),
        }
    else:
        point = hyperparameters
    defaults = optimizer_config.DEFAULT_HYPERPARAMETERS
    check_names(
        point,
        optimizer_config.HYPERPARAMETER_NAMES
        | set(defaults)
        | TrainingConfig.HYPERPARAMETER_NAMES
        | AveragingConfig.HYPERPARAMETER_NAMES,
    )
    averaging = AveragingConfig.from_hyperparameters(point, step_hint)
    return TrialConfig(
        optimizer=optimizer_config.from_hyperparameters(point),
        averaging=averaging,
        training=TrainingConfig.from_hyperparameters(point, defaults),
    )
