"""Shampoo's configuration, shared by the torch and jax twins.

A frozen dataclass that validates itself, so a bad setting fails when the
optimizer is built rather than hundreds of steps later inside an eigh.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Grafting = Literal["adam", "sgd", "none"]
GRAFTINGS: tuple[str, ...] = ("adam", "sgd", "none")


class ShampooConfigError(ValueError):
    """A Shampoo setting is out of range or unknown."""


@dataclasses.dataclass(frozen=True)
class ShampooConfig:
    # Blocks are at most this long along each dimension; adjacent small
    # dimensions are merged up to this size, so a factor never exceeds it².
    max_preconditioner_dim: int = 1024
    # Roots cost O(d³): recompute them only this often.
    precondition_frequency: int = 100
    # Before this step only the grafted method runs, while the factor
    # statistics warm up.
    start_preconditioning_step: int = 100
    # First moment of the search direction (NAdam-style when use_nesterov).
    # As in Distributed Shampoo, it filters the gradient *before* the
    # preconditioner and the grafted method are applied (both see the same
    # filtered gradient); the statistics always use the raw gradient.
    beta1: float = 0.9
    # EMA of the factor statistics; 1.0 sums them instead.
    beta2: float = 0.999
    # Added to the factors' eigenvalues before the inverse root.
    epsilon: float = 1e-12
    # Decoupled weight decay, scaled by the learning rate.
    weight_decay: float = 0.0
    use_nesterov: bool = True
    use_bias_correction: bool = True
    # The direction's per-block norm comes from this simpler method.
    grafting: Grafting = "adam"
    grafting_beta2: float = 0.999
    grafting_epsilon: float = 1e-8
    # 0 means the default exponent −1/(2·order); k > 0 forces −1/k.
    inv_root_override: int = 0
    # Parameters with any dimension at least this large (Criteo's embedding
    # table) are grafted only: their factors would not fit.
    preconditioning_dim_limit: int = 1_000_000
    # EMA momentum on the final direction (after preconditioning, grafting
    # and weight decay), Nesterov-style when use_nesterov; 0 turns it off.
    # Distributed Shampoo's `momentum` (AlgoPerf v0.5: 1 - one_minus_momentum
    # when use_momentum, else 0).
    momentum: float = 0.0

    def __post_init__(self) -> None:
        _positive_int("max_preconditioner_dim", self.max_preconditioner_dim)
        _positive_int("precondition_frequency", self.precondition_frequency)
        _positive_int("preconditioning_dim_limit", self.preconditioning_dim_limit)
        if (
            not isinstance(self.start_preconditioning_step, int)
            or self.start_preconditioning_step < 0
        ):
            raise ShampooConfigError(
                f"start_preconditioning_step={self.start_preconditioning_step!r} "
                "must be an integer >= 0"
            )
        if not isinstance(self.inv_root_override, int) or self.inv_root_override < 0:
            raise ShampooConfigError(
                f"inv_root_override={self.inv_root_override!r} "
                "must be 0 (default exponent) or a positive integer"
            )
        if not 0.0 <= self.beta1 < 1.0:
            raise ShampooConfigError(f"beta1={self.beta1!r} must lie in [0, 1)")
        if not 0.0 <= self.momentum < 1.0:
            raise ShampooConfigError(f"momentum={self.momentum!r} must lie in [0, 1)")
        if not 0.0 < self.beta2 <= 1.0:
            raise ShampooConfigError(
                f"beta2={self.beta2!r} must lie in (0, 1] (1 sums the statistics)"
            )
        if not 0.0 <= self.grafting_beta2 < 1.0:
            raise ShampooConfigError(f"grafting_beta2={self.grafting_beta2!r} must lie in [0, 1)")
        if not self.epsilon > 0.0:
            raise ShampooConfigError(f"epsilon={self.epsilon!r} must be > 0")
        if not self.grafting_epsilon > 0.0:
            raise ShampooConfigError(f"grafting_epsilon={self.grafting_epsilon!r} must be > 0")
        if not self.weight_decay >= 0.0:
            raise ShampooConfigError(f"weight_decay={self.weight_decay!r} must be >= 0")
        if self.grafting not in GRAFTINGS:
            raise ShampooConfigError(
                f"grafting={self.grafting!r} is unknown; expected one of {GRAFTINGS}"
            )


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ShampooConfigError(f"{name}={value!r} must be an integer >= 1")
