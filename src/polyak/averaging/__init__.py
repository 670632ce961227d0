"""Weight averaging (LAWA, EMA, and TWA in PyTorch) for torch and JAX.

The config (``config``) and the memory estimate (``footprint``) are
framework-free. Each framework has the same four modules: ``averager_*`` (the
averager: collect, swap in the average, restore the live weights, state,
metrics), ``placements_*`` (where the state lives), ``lawa_ema_*`` (the math)
and, for torch, ``twa_torch`` with ``flat_layout_torch``. A framework's modules
import only that framework. ``metrics`` times collection, swap and restore for
the training log.
"""

from polyak.averaging.config import AveragingConfig, AveragingError
from polyak.averaging.footprint import AveragingMemoryError

__all__ = ["AveragingConfig", "AveragingError", "AveragingMemoryError"]
