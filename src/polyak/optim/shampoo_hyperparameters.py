"""Shampoo's AlgoPerf hyperparameters, shared by the torch and jax twins.

The names and the five points come from the AlgoPerf v0.5 Distributed Shampoo
external-tuning submission. This module imports no framework, so both twins
read one mapping from hyperparameters to :class:`ShampooConfig`.
"""

from __future__ import annotations

from typing import Any

from polyak.hyperparameters import lookup
from polyak.optim.shampoo_config import ShampooConfig, ShampooConfigError

# The first point of the AlgoPerf v0.5 Distributed Shampoo external-tuning
# submission (mlcommons/submissions_algorithms, previous_leaderboards/
# algoperf_v05/submissions/external_tuning/shampoo_submission/
# tuning_search_space.json). Used whole in the self-tuning ruleset
# (hyperparameters=None) and per name when one is missing.
DEFAULT_HYPERPARAMETERS: dict[str, Any] = {
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


def shampoo_config_from_hyperparameters(hyperparameters: Any) -> ShampooConfig:
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
        return lookup(hyperparameters, name, DEFAULT_HYPERPARAMETERS.get(name))

    beta1 = 1.0 - _fraction("one_minus_beta1", get("one_minus_beta1"), upper_inclusive=True)
    beta2 = _beta2(hyperparameters, get)
    precondition_frequency = _integer("precondition_frequency", get("precondition_frequency"), 1)
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
        momentum = 1.0 - _fraction("one_minus_momentum", get("one_minus_momentum"), lower_open=True)
    _boolean("communicate_params", get("communicate_params"))
    values = {
        "epsilon": _positive("epsilon", get("epsilon")),
        "grafting_epsilon": _positive("grafting_epsilon", get("grafting_epsilon")),
        "exponent_multiplier": _positive("exponent_multiplier", get("exponent_multiplier")),
        "weight_decay": _number("weight_decay", get("weight_decay"), minimum=0.0),
    }
    return ShampooConfig(
        max_preconditioner_dim=_integer("max_preconditioner_dim", get("max_preconditioner_dim"), 1),
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
        use_normalized_grafting=_boolean("use_normalized_grafting", get("use_normalized_grafting")),
        inv_root_override=_integer("inv_root_override", get("inv_root_override"), 0),
        exponent_multiplier=values["exponent_multiplier"],
        preconditioning_dim_limit=_integer(
            "preconditioning_dim_limit",
            lookup(hyperparameters, "preconditioning_dim_limit", 1_000_000),
            1,
        ),
        momentum=momentum,
        use_nesterov=True,
        preconditioner_precision=lookup(hyperparameters, "preconditioner_precision", "float64"),
        max_root_condition=_number(
            "max_root_condition", lookup(hyperparameters, "max_root_condition", 100.0)
        ),
    )


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
