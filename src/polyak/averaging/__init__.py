"""Weight averaging (LAWA, EMA) shared by the torch and jax backends.

The config is framework-free; the backends live in ``torch_backend`` and
``jax_backend`` and import only their own framework.
"""

from polyak.averaging.config import AveragingConfig, AveragingError

__all__ = ["AveragingConfig", "AveragingError"]
