"""The ``digits`` workload in JAX: the digits data and targets with the flax twin."""

from __future__ import annotations

from polyak.workloads.common_jax import JaxEmbeddedWorkload
from polyak.workloads.digits import BaseDigitsWorkload


class DigitsWorkload(JaxEmbeddedWorkload, BaseDigitsWorkload):
    """AlgoPerf Workload for ``digits`` on JAX (model in ``common_jax.MLP``)."""
