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

_GRAFTING_TYPES = {"ADAM": "adam", "SGD": "sgd", "NONE": "none"}


def shampoo_config_from_hyperparameters(hyperparameters: Any) -> ShampooConfig:
    """A ShampooConfig from AlgoPerf v0.5 Distributed Shampoo hyperparameter names.

    ``one_minus_beta2`` (or ``beta2``) sets both the factor and the Adam
    grafting EMA, as in the v0.5 submission; ``start_preconditioning_step``
    −1 means ``precondition_frequency``; ``use_nadam`` sets ``use_nesterov``
    (kept True when β1 = 0, where it only affects the momentum, which the
    submission always ran Nesterov-style). ``communication_dtype`` and
    ``communicate_params`` are accepted and ignored (directions are exchanged
    in float32).
    """

    def get(name: str) -> Any:
        return lookup(hyperparameters, name, DEFAULT_HYPERPARAMETERS.get(name))

    if lookup(hyperparameters, "one_minus_beta2", None) is None and (
        lookup(hyperparameters, "beta2", None) is not None
    ):
        beta2 = float(lookup(hyperparameters, "beta2", None))
    else:
        beta2 = 1.0 - float(get("one_minus_beta2"))
    grafting_type = str(get("grafting_type")).upper()
    if grafting_type not in _GRAFTING_TYPES:
        raise ShampooConfigError(
            f"grafting_type={grafting_type!r} is not supported; expected one of "
            f"{sorted(_GRAFTING_TYPES)}"
        )
    if float(get("exponent_multiplier")) != 1.0:
        raise ShampooConfigError(
            f"exponent_multiplier={get('exponent_multiplier')!r} is not supported; expected 1.0 "
            "(use inv_root_override to change the root)"
        )
    if bool(get("use_normalized_grafting")):
        raise ShampooConfigError("use_normalized_grafting=True is not supported; expected False")
    precondition_frequency = int(get("precondition_frequency"))
    start = int(get("start_preconditioning_step"))
    if start == -1:
        start = precondition_frequency
    momentum = 1.0 - float(get("one_minus_momentum")) if bool(get("use_momentum")) else 0.0
    beta1 = 1.0 - float(get("one_minus_beta1"))
    # One flag serves both look-aheads. The v0.5 submission always used
    # Nesterov momentum and toggled NAdam with use_nadam; use_nadam only
    # matters when β1 > 0, so β1 = 0 (its SGD point) keeps Nesterov momentum.
    use_nesterov = bool(get("use_nadam")) if beta1 > 0.0 else True
    return ShampooConfig(
        max_preconditioner_dim=int(get("max_preconditioner_dim")),
        precondition_frequency=precondition_frequency,
        start_preconditioning_step=start,
        beta1=beta1,
        beta2=beta2,
        epsilon=float(get("epsilon")),
        weight_decay=float(get("weight_decay")),
        use_nesterov=use_nesterov,
        use_bias_correction=True,
        grafting=_GRAFTING_TYPES[grafting_type],  # type: ignore[arg-type]
        grafting_beta2=beta2,
        grafting_epsilon=float(get("grafting_epsilon")),
        inv_root_override=int(get("inv_root_override")),
        preconditioning_dim_limit=int(
            lookup(hyperparameters, "preconditioning_dim_limit", 1_000_000)
        ),
        momentum=momentum,
    )
