"""The ``digits`` workload in PyTorch: the digits data and targets with the torch twin."""

from __future__ import annotations

from polyak.workloads.common_torch import TorchEmbeddedWorkload
from polyak.workloads.digits import BaseDigitsWorkload


class DigitsWorkload(TorchEmbeddedWorkload, BaseDigitsWorkload):
    """AlgoPerf Workload for ``digits`` on PyTorch (model in ``common_torch.MLP``)."""
