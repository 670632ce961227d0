"""Shampoo's configuration, shared by the torch and jax twins.

A frozen dataclass that validates itself, so a bad setting fails when the
optimizer is built rather than hundreds of steps later inside an eigh.
:meth:`ShampooConfig.from_hyperparameters` is the one mapping from the AlgoPerf
v0.5 Distributed Shampoo external-tuning submission's hyperparameter names (and
its five points) to these fields; it imports no framework, so both twins share it.
Every name the submission's search space uses is honoured as its
``submission.py`` honours it, or refused with an error naming the field and
its value; none is read and then ignored.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Literal

from polyak.hyperparameters import lookup

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
    # The schedule, read by the factories ``make_shampoo`` (the optimizers take
    # their rate as an argument, which a scheduler changes): the peak rate, the
    # warmup's share of the horizon, cosine decay to 0 (else constant after
    # warmup), and the horizon as a multiple of step_hint.
    learning_rate: float = 1e-3
    warmup_factor: float = 0.0
    use_cosine_decay: bool = True
    step_hint_factor: float = 1.0

    # The first point of the AlgoPerf v0.5 Distributed Shampoo external-tuning
    # submission (mlcommons/submissions_algorithms, previous_leaderboards/
    # algoperf_v05/submissions/external_tuning/shampoo_submission/
    # tuning_search_space.json). Used whole in the self-tuning ruleset
    # (hyperparameters=None) and per name when one is missing.
    DEFAULT_HYPERPARAMETERS: ClassVar[Mapping[str, Any]] = MappingProxyType(
        {
            "learning_rate": 0.0017486387539278373,
            "one_minus_beta1": 0.06733926164,
            "one_minus_beta2": 0.00448403102,
            "epsilon": 1e-08,
            "one_minus_momentum": 0.0,
            "use_momentum": False,
            "weight_decay": 0.08121616522670176,
            "max_preconditioner_dim": 1024,
            "precondition_frequency": 100,
            "start_preconditioning_step": -1,
            "inv_root_override": 0,
            "exponent_multiplier": 1.0,
            "grafting_type": "ADAM",
            "grafting_epsilon": 1e-08,
            "use_normalized_grafting": False,
            "communication_dtype": "FP32",
            "communicate_params": True,
            "use_cosine_decay": True,
            "warmup_factor": 0.02,
            "label_smoothing": 0.0,
            "dropout_rate": 0.1,
            "use_nadam": True,
            "step_hint_factor": 1.0,
        }
    )
    # Every name :meth:`from_hyperparameters` reads (label_smoothing and
    # dropout_rate belong to the training step).
    HYPERPARAMETER_NAMES: ClassVar[frozenset[str]] = frozenset(
        (set(DEFAULT_HYPERPARAMETERS) - {"label_smoothing", "dropout_rate"})
        | {"beta2", "preconditioning_dim_limit", "preconditioner_precision", "max_root_condition"}
    )

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
        if (
            isinstance(self.learning_rate, bool)
            or not isinstance(self.learning_rate, int | float)
            or not (math.isfinite(self.learning_rate) and self.learning_rate > 0.0)
        ):
            raise ShampooConfigError(
                f"learning_rate={self.learning_rate!r} must be a finite number > 0"
            )
        if not 0.0 <= self.warmup_factor < 1.0:
            raise ShampooConfigError(f"warmup_factor={self.warmup_factor!r} must lie in [0, 1)")
        if not (math.isfinite(self.step_hint_factor) and self.step_hint_factor > 0.0):
            raise ShampooConfigError(
                f"step_hint_factor={self.step_hint_factor!r} must be a finite number > 0"
            )
        if self.grafting not in GRAFTINGS:
            raise ShampooConfigError(
                f"grafting={self.grafting!r} is unknown; expected one of {GRAFTINGS}"
            )

    @classmethod
    def from_hyperparameters(cls, hyperparameters: Any) -> ShampooConfig:
        """A ShampooConfig from AlgoPerf v0.5 Distributed Shampoo hyperparameter names.

        Every field is either honoured as the v0.5 submission's ``submission.py``
        honours it or refused with an error naming the field and its value:

        - ``one_minus_beta1``, ``one_minus_beta2``: β1 and β2; β2 serves both the
          factors and the Adam/RMSprop grafting, as in the submission. A plain
          ``beta2`` is read when ``one_minus_beta2`` is absent; both at once must agree.
        - ``use_momentum``/``one_minus_momentum``: the EMA momentum of the final
          direction, always with the Nesterov look-ahead (``use_nesterov=True``).
        - ``use_nadam``: the NAdam look-ahead of the β1 filter.
        - ``start_preconditioning_step`` −1 means ``precondition_frequency``; any
          other value must be at least ``precondition_frequency``.
        - ``grafting_type`` ADAM, RMSPROP, ADAGRAD, SGD or NONE;
          ``use_normalized_grafting``; ``exponent_multiplier``; ``inv_root_override``
          (an integer; the per-order list form is refused).
        - ``communication_dtype`` must be FP32; ``communicate_params`` may be either.
        - ours: ``preconditioner_precision`` (float64) and ``max_root_condition``
          (100; 0 for Distributed Shampoo's uncapped roots), see ShampooConfig.
        """

        def get(name: str) -> Any:
            return lookup(hyperparameters, name, cls.DEFAULT_HYPERPARAMETERS.get(name))

        beta1 = 1.0 - _fraction("one_minus_beta1", get("one_minus_beta1"), upper_inclusive=True)
        beta2 = _beta2(hyperparameters, get)
        precondition_frequency = _integer(
            "precondition_frequency", get("precondition_frequency"), 1
        )
        start = _integer("start_preconditioning_step", get("start_preconditioning_step"), -1)
        if start == -1:
            start = precondition_frequency
        elif start < precondition_frequency:
            raise ShampooConfigError(
                f"start_preconditioning_step={start!r} must be -1 or at least "
                f"precondition_frequency={precondition_frequency!r}"
            )
        grafting_type = get("grafting_type")
        if not isinstance(grafting_type, str) or grafting_type.upper() not in _GRAFTING_TYPES:
            raise ShampooConfigError(
                f"grafting_type={grafting_type!r} is not supported; expected one of "
                f"{sorted(_GRAFTING_TYPES)}"
            )
        communication_dtype = get("communication_dtype")
        if str(communication_dtype).upper() not in _COMMUNICATION_DTYPES:
            raise ShampooConfigError(
                f"communication_dtype={communication_dtype!r} is not supported; expected 'FP32' "
                "(directions are exchanged in float32)"
            )
        use_momentum = _boolean("use_momentum", get("use_momentum"))
        momentum = 0.0
        if use_momentum:
            momentum = 1.0 - _fraction(
                "one_minus_momentum", get("one_minus_momentum"), lower_open=True
            )
        _boolean("communicate_params", get("communicate_params"))
        values = {
            "epsilon": _positive("epsilon", get("epsilon")),
            "grafting_epsilon": _positive("grafting_epsilon", get("grafting_epsilon")),
            "exponent_multiplier": _positive("exponent_multiplier", get("exponent_multiplier")),
            "weight_decay": _number("weight_decay", get("weight_decay"), minimum=0.0),
        }
        return cls(
            max_preconditioner_dim=_integer(
                "max_preconditioner_dim", get("max_preconditioner_dim"), 1
            ),
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start,
            beta1=beta1,
            use_nadam=_boolean("use_nadam", get("use_nadam")),
            beta2=beta2,
            epsilon=values["epsilon"],
            weight_decay=values["weight_decay"],
            use_bias_correction=True,
            grafting=_GRAFTING_TYPES[grafting_type.upper()],  # type: ignore[arg-type]
            grafting_beta2=beta2,
            grafting_epsilon=values["grafting_epsilon"],
            use_normalized_grafting=_boolean(
                "use_normalized_grafting", get("use_normalized_grafting")
            ),
            inv_root_override=_integer("inv_root_override", get("inv_root_override"), 0),
            exponent_multiplier=values["exponent_multiplier"],
            preconditioning_dim_limit=_integer(
                "preconditioning_dim_limit",
                lookup(hyperparameters, "preconditioning_dim_limit", 1_000_000),
                1,
            ),
            momentum=momentum,
            use_nesterov=True,
            learning_rate=_positive("learning_rate", get("learning_rate")),
            warmup_factor=_number("warmup_factor", get("warmup_factor")),
            use_cosine_decay=_boolean("use_cosine_decay", get("use_cosine_decay")),
            step_hint_factor=_positive("step_hint_factor", get("step_hint_factor")),
            preconditioner_precision=lookup(hyperparameters, "preconditioner_precision", "float64"),
            max_root_condition=_number(
                "max_root_condition", lookup(hyperparameters, "max_root_condition", 100.0)
            ),
        )


_GRAFTING_TYPES = {
    "ADAM": "adam",
    "RMSPROP": "rmsprop",
    "ADAGRAD": "adagrad",
    "SGD": "sgd",
    "NONE": "none",
}
# Directions are exchanged in float32 under DDP. Whether the exchange carries
# directions or updated parameters (communicate_params) changes nothing else.
_COMMUNICATION_DTYPES = ("FP32",)


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ShampooConfigError(f"{name}={value!r} must be an integer >= 1")


def _beta2(hyperparameters: Any, get: Any) -> float:
    given_one_minus = lookup(hyperparameters, "one_minus_beta2", None)
    given_beta2 = lookup(hyperparameters, "beta2", None)
    if given_beta2 is not None:
        beta2 = _number("beta2", given_beta2)
        if not 0.0 < beta2 <= 1.0:
            raise ShampooConfigError(f"beta2={given_beta2!r} must lie in (0, 1] (1 sums)")
        if (
            given_one_minus is not None
            and abs(1.0 - _number("one_minus_beta2", given_one_minus) - beta2) > 1e-12
        ):
            raise ShampooConfigError(
                f"beta2={given_beta2!r} and one_minus_beta2={given_one_minus!r} disagree; "
                "give one of them"
            )
        return beta2
    return 1.0 - _fraction("one_minus_beta2", get("one_minus_beta2"))


def _number(name: str, value: Any, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ShampooConfigError(f"{name}={value!r} must be a number")
    if minimum is not None and value < minimum:
        raise ShampooConfigError(f"{name}={value!r} must be >= {minimum}")
    return float(value)


def _positive(name: str, value: Any) -> float:
    number = _number(name, value)
    if not number > 0.0:
        raise ShampooConfigError(f"{name}={value!r} must be > 0")
    return number


def _fraction(
    name: str, value: Any, *, upper_inclusive: bool = False, lower_open: bool = False
) -> float:
    """A ``one_minus_*`` value: in [0, 1) by default; (0, 1] or [0, 1] as asked."""
    number = _number(name, value)
    low_ok = number > 0.0 if lower_open else number >= 0.0
    high_ok = number <= 1.0 if (upper_inclusive or lower_open) else number < 1.0
    if not (low_ok and high_ok):
        low = "(0" if lower_open else "[0"
        high = "1]" if (upper_inclusive or lower_open) else "1)"
        raise ShampooConfigError(f"{name}={value!r} must lie in {low}, {high}")
    return number


def _integer(name: str, value: Any, minimum: int) -> int:
    """An integer (an integral float such as 1024.0 is accepted, 2.7 is not)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ShampooConfigError(f"{name}={value!r} must be an integer >= {minimum}")
    if isinstance(value, float) and not value.is_integer():
        raise ShampooConfigError(f"{name}={value!r} must be an integer >= {minimum}")
    if value < minimum:
        raise ShampooConfigError(f"{name}={value!r} must be an integer >= {minimum}")
    return int(value)


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool | int) or value not in (0, 1):
        raise ShampooConfigError(f"{name}={value!r} must be true or false")
    return bool(value)


# The optimizer's own counters in the training log, the same names in both twins.
METRICS_PREFIX = "shampoo/"
COUNTER_NAMES: tuple[str, ...] = (
    "skipped_steps",
    "root_failures",
    "direction_fallbacks",
    "skipped_statistics",
)
# Skipped steps are warned about at most this often, as the averager does for its skips.
SKIPPED_WARNING_SECONDS = 60


def counter_metrics(counters: Mapping[str, int]) -> dict[str, float]:
    """The counters as training-log metrics (``shampoo/<name>``)."""
    return {f"{METRICS_PREFIX}{name}": float(counters[name]) for name in COUNTER_NAMES}
