"""The ``digits`` workload in PyTorch: the digits data and targets with the torch twin."""

from __future__ import annotations

from polyak.workloads.digits import BaseDigitsWorkload
from polyak.workloads.torch_common import TorchEmbeddedWorkload


class DigitsWorkload(TorchEmbeddedWorkload, BaseDigitsWorkload):
    """AlgoPerf Workload for ``digits`` on PyTorch (model in ``torch_common.MLP``)."""
