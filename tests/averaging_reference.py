"""The definitions of LAWA and EMA, written plainly, for both averagers' tests."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from polyak.averaging.config import AveragingConfig


def reference_average(config: AveragingConfig, collected: list[np.ndarray]) -> np.ndarray:
    """LAWA: mean of the last L collected; EMA: the explicit recursion from the first."""
    if config.mode == "lawa":
        return np.mean(collected[-config.window :], axis=0)
    ema = collected[0]
    for w in collected[1:]:
        ema = config.beta * ema + (1 - config.beta) * w
    return ema


# Hypothesis strategies shared by the torch and jax property tests.
averaging_settings = {
    "mode": st.sampled_from(["lawa", "ema"]),
    "every": st.integers(1, 4),
    "window": st.integers(1, 5),
    "beta": st.floats(0.05, 0.99),
    "steps": st.integers(0, 25),
    "seed": st.integers(0, 100),
}
