"""The AlgoPerf baseline learning-rate schedule, framework-free.

Linear warmup from 0 over ``int(warmup_factor * step_hint)`` steps, then a
cosine decay to 0 at ``step_hint``. Unlike torch's ``CosineAnnealingLR`` (which
AlgoPerf's torch baseline uses and which rises again past ``T_max``), the rate
holds at 0 past ``step_hint``, as optax's ``cosine_decay_schedule`` does.

``count`` is the number of optimizer steps already taken (0 for the first).
"""

from __future__ import annotations

import math


def warmup_steps_for(warmup_factor: float, step_hint: int) -> int:
    if not 0.0 <= warmup_factor < 1.0:
        raise ValueError(f"warmup_factor={warmup_factor!r} must lie in [0, 1)")
    if step_hint < 1:
        raise ValueError(f"step_hint={step_hint!r} must be >= 1")
    return int(warmup_factor * step_hint)


def warmup_cosine_multiplier(count: int, warmup_steps: int, step_hint: int) -> float:
    """The schedule as a multiplier of the peak learning rate, in [0, 1]."""
    if count < warmup_steps:
        return count / warmup_steps
    decay_steps = max(step_hint - warmup_steps, 1)
    progress = min(count - warmup_steps, decay_steps) / decay_steps
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def constant_multiplier(count: int, warmup_steps: int, step_hint: int) -> float:
    """Warmup, then a constant rate: torch Shampoo's schedule when ``use_cosine_decay`` is False.

    That switch comes from the AlgoPerf v0.5 Shampoo submission's search space; the
    averaging study also sets it to compare averaging with and without decay.
    """
    del step_hint
    if count < warmup_steps:
        return count / warmup_steps
    return 1.0
