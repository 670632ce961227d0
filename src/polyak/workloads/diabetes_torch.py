"""The ``diabetes`` workload in PyTorch: the diabetes data and targets with the torch twin."""

from __future__ import annotations

from polyak.workloads.common_torch import TorchEmbeddedWorkload
from polyak.workloads.diabetes import BaseDiabetesWorkload


class DiabetesWorkload(TorchEmbeddedWorkload, BaseDiabetesWorkload):
    """AlgoPerf Workload for ``diabetes`` on PyTorch (model in ``common_torch.MLP``)."""
