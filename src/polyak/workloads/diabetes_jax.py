"""The ``diabetes`` workload in JAX: the diabetes data and targets with the flax twin."""

from __future__ import annotations

from polyak.workloads.common_jax import JaxEmbeddedWorkload
from polyak.workloads.diabetes import BaseDiabetesWorkload


class DiabetesWorkload(JaxEmbeddedWorkload, BaseDiabetesWorkload):
    """AlgoPerf Workload for ``diabetes`` on JAX (model in ``common_jax.MLP``)."""
