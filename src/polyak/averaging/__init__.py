"""Weight averaging (LAWA, EMA) shared by the torch and jax backends.

The config is framework-free; the backends live in ``torch_backend`` and
``jax_backend`` and import only their own framework. ``memory`` checks at
init that the state fits where ``averaging_placement`` puts it, and
``monitoring`` times collection, swap and restore for the training log.
"""

from polyak.averaging.config import AveragingConfig, AveragingError
from polyak.averaging.memory import AveragingMemoryError

__all__ = ["AveragingConfig", "AveragingError", "AveragingMemoryError"]
