"""The ``diabetes`` workload in PyTorch: the diabetes data and targets with the torch twin."""

from __future__ import annotations

from polyak.workloads.diabetes import BaseDiabetesWorkload
from polyak.workloads.torch_common import TorchEmbeddedWorkload


class DiabetesWorkload(TorchEmbeddedWorkload, BaseDiabetesWorkload):
    """AlgoPerf Workload for ``diabetes`` on PyTorch (model in ``torch_common.MLP``)."""
