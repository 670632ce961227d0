"""Shampoo's configuration, shared by the torch and jax twins.

A frozen dataclass that validates itself, so a bad setting fails when the
optimizer is built rather than hundreds of steps later inside an eigh.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Grafting = Literal["adam", "rmsprop", "adagrad", "sgd", "none"]
GRAFTINGS: tuple[str, ...] = ("adam", "rmsprop", "adagrad", "sgd", "none")
RootPrecision = Literal["float64", "float32"]
ROOT_PRECISIONS: tuple[str, ...] = ("float64", "float32")


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
    # statistics warm up. Roots are computed at this step and then at every
    # multiple of precondition_frequency after it (Distributed Shampoo's rule).
    start_preconditioning_step: int = 100
    # First moment, filtering the gradient *before* the preconditioner and
    # the grafted method (both see the same filtered gradient); the
    # statistics always use the raw gradient. As in Distributed Shampoo.
    beta1: float = 0.9
    # NAdam look-ahead of that first moment: (β1·m + (1−β1)·g) instead of m.
    use_nadam: bool = True
    # EMA of the factor statistics; 1.0 sums them instead.
    beta2: float = 0.999
    # Added to the factors' eigenvalues before the inverse root.
    epsilon: float = 1e-12
    # Decoupled weight decay, scaled by the learning rate.
    weight_decay: float = 0.0
    use_bias_correction: bool = True
    # The direction's per-block norm comes from this simpler method:
    # adam (EMA of g², bias-corrected), rmsprop (EMA, no correction),
    # adagrad (sum of g²), sgd (the filtered gradient) or none.
    grafting: Grafting = "adam"
    # EMA of the grafted method's second moment (adam, rmsprop); 1.0 sums.
    grafting_beta2: float = 0.999
    grafting_epsilon: float = 1e-8
    # The grafted method sees each block's gradient divided by its norm.
    use_normalized_grafting: bool = False
    # 0 means the default exponent −1/(2·order); k > 0 forces −1/k.
    inv_root_override: int = 0
    # Multiplies the exponent: −exponent_multiplier/(2·order).
    exponent_multiplier: float = 1.0
    # Parameters with any dimension at least this large (Criteo's embedding
    # table) are grafted only, always with Adam grafting (as the v0.5
    # submission's row-wise optimizer did): their factors would not fit.
    preconditioning_dim_limit: int = 1_000_000
    # EMA momentum on the final direction (after preconditioning, grafting
    # and weight decay); 0 turns it off. Distributed Shampoo's `momentum`.
    momentum: float = 0.0
    # Nesterov look-ahead of that momentum (the v0.5 submission always used it).
    use_nesterov: bool = True
    # Precision of the eigendecomposition behind each inverse root. float64
    # keeps the root's round-off (~1e-16·λmax) below epsilon; float32
    # round-off (~1e-7·λmax) exceeds epsilon = 1e-8 on every factor with
    # λmax > 0.1 that is rank-deficient, as every factor wider than the
    # number of updates so far is, and then round-off decides the step.
    root_precision: RootPrecision = "float64"

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
        if not 0.0 < self.grafting_beta2 <= 1.0:
            raise ShampooConfigError(
                f"grafting_beta2={self.grafting_beta2!r} must lie in (0, 1] (1 sums g²)"
            )
        if not (isinstance(self.exponent_multiplier, float | int) and self.exponent_multiplier > 0):
            raise ShampooConfigError(
                f"exponent_multiplier={self.exponent_multiplier!r} must be a number > 0"
            )
        if self.root_precision not in ROOT_PRECISIONS:
            raise ShampooConfigError(
                f"root_precision={self.root_precision!r} is unknown; expected one of "
                f"{ROOT_PRECISIONS}"
            )
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
