"""Shampoo's configuration, shared by the torch and jax twins.

A frozen dataclass that validates itself, so a bad setting fails when the
optimizer is built rather than hundreds of steps later inside an eigh.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Grafting = Literal["adam", "rmsprop", "adagrad", "sgd", "none"]
GRAFTINGS: tuple[str, ...] = ("adam", "rmsprop", "adagrad", "sgd", "none")
PreconditionerPrecision = Literal["float64", "float32"]
PRECONDITIONER_PRECISIONS: tuple[str, ...] = ("float64", "float32")


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
    # Precision of the factor statistics (their accumulation included) and of
    # the eigendecomposition behind each inverse root; the roots themselves
    # and the preconditioned directions stay in the parameter's precision.
    # A rank-deficient factor (every factor wider than the number of updates
    # so far) has eigenvalues that are exactly 0 in exact arithmetic; float32
    # accumulation and eigh turn them into round-off of ~1e-7·λmax, which
    # exceeds epsilon = 1e-8 as soon as λmax > 0.1, and then round-off rather
    # than the gradients decides the step. float64 keeps it at ~1e-16·λmax.
    # The v0.5 submission used float32 (its preconditioner_dtype).
    preconditioner_precision: PreconditionerPrecision = "float64"
    # Largest condition number of an inverse root: the eigenvalue floor is
    # max(epsilon, λmax·max_root_condition^(1/exponent)), so no direction is
    # amplified more than this many times the top eigendirection. On a
    # rank-deficient factor the root with epsilon alone amplifies the null
    # space by (λmax/ε)^(1/root), 1e4–1e5 for vectors, so the float32
    # round-off of the filtered gradient (~6e-8) outside the span of past
    # gradients would move the step by ~1e-3; capped at 100, by < 1e-5.
    # 0 disables the cap (Distributed Shampoo's behaviour).
    max_root_condition: float = 100.0

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
        if not (
            isinstance(self.max_root_condition, float | int)
            and (self.max_root_condition == 0 or self.max_root_condition > 1)
        ):
            raise ShampooConfigError(
                f"max_root_condition={self.max_root_condition!r} must be 0 (no cap) or > 1"
            )
        if self.preconditioner_precision not in PRECONDITIONER_PRECISIONS:
            raise ShampooConfigError(
                f"preconditioner_precision={self.preconditioner_precision!r} is unknown; "
                f"expected one of {PRECONDITIONER_PRECISIONS}"
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
