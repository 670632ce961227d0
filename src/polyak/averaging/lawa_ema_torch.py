"""LAWA and EMA of lists of torch tensors: the math every placement runs.

The twin of ``lawa_ema_jax``. Each placement (``placements_torch``) keeps its
window / sum / EMA on its own tensors and calls these functions on them, so
all placements give the same averages, bit for bit. Accumulators are fp32;
LAWA's snapshots keep the weights' dtype.
"""

from __future__ import annotations

import dataclasses

import torch

from polyak.averaging import metrics
from polyak.averaging.config import AveragingConfig

Tensors = list[torch.Tensor]


@dataclasses.dataclass
class Counters:
    num_collected: int = 0
    num_skipped_nonfinite: int = 0


def fold(
    config: AveragingConfig,
    counters: Counters,
    window: list[Tensors],
    total: Tensors,
    ema: Tensors,
    new: Tensors,
) -> None:
    if config.keeps_window:
        fold_lawa(window, total, counters.num_collected, new)
    else:
        fold_ema(ema, new, counters.num_collected, config.beta)
    counters.num_collected += 1


def fold_lawa(window: list[Tensors], total: Tensors, num_collected: int, new: Tensors) -> None:
    """O(1) LAWA: the fp32 sum gains the newest snapshot and loses the one leaving.

    Snapshots keep the weights' own dtype: they are the weights exactly as
    trained, and the sum subtracts exactly what it added.
    """
    slot = num_collected % len(window)
    oldest = window[slot]
    if num_collected >= len(window):
        torch._foreach_sub_(total, as_float32(oldest))
    torch._foreach_copy_(oldest, new)
    torch._foreach_add_(total, as_float32(new))
    if slot == len(window) - 1:
        # The window is full: the sum restarts from the snapshots, which
        # bounds its rounding drift at O(1) amortized cost.
        torch._foreach_zero_(total)
        for snapshot in window:
            torch._foreach_add_(total, as_float32(snapshot))


def fold_ema(ema: Tensors, new: Tensors, num_collected: int, beta: float) -> None:
    new32 = as_float32(new)
    if num_collected == 0:
        # No zero-init bias: the EMA starts from the first collected weights.
        torch._foreach_copy_(ema, new32)
    else:
        # ema ← β·ema + (1 − β)·w, as one fused pass.
        torch._foreach_lerp_(ema, new32, 1.0 - beta)


def lawa_count(config: AveragingConfig, counters: Counters) -> float:
    return float(min(counters.num_collected, config.window))


def mean(config: AveragingConfig, counters: Counters, total: Tensors, ema: Tensors) -> Tensors:
    """The average in fp32 (new tensors)."""
    if config.keeps_window:
        return list(torch._foreach_div(total, lawa_count(config, counters)))
    return [e.clone() for e in ema]


def mean_into(
    config: AveragingConfig, counters: Counters, total: Tensors, ema: Tensors, targets: Tensors
) -> None:
    """Writes the average into ``targets`` in their dtypes, rounding once from fp32."""
    if config.keeps_window:
        count = lawa_count(config, counters)
        for target, accumulated in zip(targets, total):
            torch.div(accumulated, count, out=target)
    else:
        torch._foreach_copy_(targets, ema)


def skip_nonfinite(counters: Counters) -> None:
    counters.num_skipped_nonfinite += 1
    metrics.warn_nonfinite(counters.num_skipped_nonfinite)


def as_float32(tensors: Tensors) -> Tensors:
    if all(t.dtype == torch.float32 for t in tensors):
        return tensors
    return [t.float() for t in tensors]


def all_finite(tensors: Tensors) -> bool:
    """Whether no tensor holds a NaN or an inf. One host sync, on collection steps only.

    The L2 norms are one fused pass and are finite for any sane weights; only
    if one is not (a NaN, an inf, or an overflow of huge but finite weights)
    does the max-norm, which cannot overflow but is slow on CPU, decide.
    """
    floating = [t for t in tensors if torch.is_floating_point(t)]
    if not floating:
        return True
    for order in (2.0, float("inf")):
        norms = torch._foreach_norm(floating, order)
        if bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
            return True
    return False
