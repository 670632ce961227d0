"""LAWA and EMA of a torch module's weights, swapped in for evaluation.

The averager keys its buffers off ``module.parameters()`` order (and, under
the ``"average"`` buffer policy, the module's floating-point buffers), so it
works the same on a plain, a DDP-wrapped or a ``torch.compile``-wrapped model.

Life cycle, as AlgoPerf drives it:

1. ``collect(step)`` after every optimizer step; it copies the weights only
   when the config's collection rule says so.
2. ``swap_in_average()`` in ``prepare_for_eval``: the live weights are stashed
   and the average is loaded into the module.
3. ``restore_live()`` at the start of the next ``update_params``, so training
   never sees the average.

``state_dict()`` holds everything, stash included: AlgoPerf checkpoints right
after an eval, when the module holds the average, and the live weights must
come back from the optimizer state on resume.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from polyak.averaging.config import AveragingConfig


def tracked_tensors(module: nn.Module, config: AveragingConfig) -> list[torch.Tensor]:
    """The tensors that are averaged: parameters, then float buffers if asked.

    Integer buffers (BatchNorm's ``num_batches_tracked``) are never averaged:
    the evaluated model keeps the live ones.
    """
    tensors = [p for p in module.parameters()]
    if config.buffers == "average":
        tensors += [b for b in module.buffers() if torch.is_floating_point(b)]
    return tensors


class TorchAverager:
    """Keeps a LAWA window or an EMA of a module's weights.

    LAWA costs O(1) per collection: a running fp32 sum gains the newest
    snapshot and loses the one leaving the window. The sum is recomputed from
    the window every ``window`` collections, which bounds its rounding drift.
    Snapshots are kept in the parameters' own dtype: they are the weights
    exactly as trained, and the sum subtracts exactly what it added.
    """

    def __init__(self, config: AveragingConfig, module: nn.Module) -> None:
        self.config = config
        self._module = module
        self._live = tracked_tensors(module, config)
        self.num_collected = 0
        self.num_skipped_nonfinite = 0
        self._swapped = False
        self._stash: list[torch.Tensor] | None = None
        self._window: list[list[torch.Tensor]] = []
        self._sum: list[torch.Tensor] = []
        self._ema: list[torch.Tensor] = []
        if config.mode == "lawa":
            self._window = [[torch.zeros_like(t) for t in self._live] for _ in range(config.window)]
            self._sum = [torch.zeros_like(t, dtype=torch.float32) for t in self._live]
        elif config.mode == "ema":
            self._ema = [torch.zeros_like(t, dtype=torch.float32) for t in self._live]

    # -- collection ---------------------------------------------------------

    @property
    def swapped(self) -> bool:
        return self._swapped

    @torch.no_grad()
    def collect(self, step: int) -> bool:
        """Folds the current weights in if ``step`` (counted from 1) is a collection step.

        Returns whether they were collected. Non-finite weights are skipped and
        counted, so one bad step cannot poison the average.
        """
        if not self.config.should_collect(step):
            return False
        if self._swapped:
            raise RuntimeError(
                "collect() while the average is swapped in: call restore_live() first"
            )
        if not _all_finite(self._live):
            self.num_skipped_nonfinite += 1
            return False
        if self.config.mode == "lawa":
            self._collect_lawa()
        else:
            self._collect_ema()
        self.num_collected += 1
        return True

    def _collect_lawa(self) -> None:
        slot = self.num_collected % self.config.window
        oldest = self._window[slot]
        if self.num_collected >= self.config.window:
            torch._foreach_sub_(self._sum, _as_float32(oldest))
        torch._foreach_copy_(oldest, self._live)
        torch._foreach_add_(self._sum, _as_float32(self._live))
        if slot == self.config.window - 1:
            self._recompute_sum()

    def _recompute_sum(self) -> None:
        # Called when the window is full: the sum restarts from the snapshots.
        torch._foreach_zero_(self._sum)
        for snap in self._window:
            torch._foreach_add_(self._sum, _as_float32(snap))

    def _collect_ema(self) -> None:
        live = _as_float32(self._live)
        if self.num_collected == 0:
            torch._foreach_copy_(self._ema, live)
        else:
            # ema ← β·ema + (1 − β)·w, as one fused pass.
            torch._foreach_lerp_(self._ema, live, 1.0 - self.config.beta)

    # -- the average ----------------------------------------------------------

    @torch.no_grad()
    def average(self) -> list[torch.Tensor]:
        """The averaged tensors in fp32 (the live ones before any collection)."""
        if self.num_collected == 0:
            return [t.detach().float().clone() for t in self._live]
        if self.config.mode == "lawa":
            count = min(self.num_collected, self.config.window)
            return torch._foreach_div(self._sum, float(count))
        return [e.clone() for e in self._ema]

    @torch.no_grad()
    def swap_in_average(self) -> None:
        """Stashes the live weights and loads the average into the module."""
        if self._swapped or self.num_collected == 0:
            return
        self._stash = [t.detach().clone() for t in self._live]
        if self.config.mode == "lawa":
            count = min(self.num_collected, self.config.window)
            torch._foreach_copy_(self._live, torch._foreach_div(self._sum, float(count)))
        else:
            torch._foreach_copy_(self._live, self._ema)
        self._swapped = True

    @torch.no_grad()
    def restore_live(self) -> None:
        """Puts the live weights back; a no-op unless the average is swapped in."""
        if not self._swapped:
            return
        assert self._stash is not None
        torch._foreach_copy_(self._live, self._stash)
        self._stash = None
        self._swapped = False

    # -- checkpointing ----------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "num_collected": self.num_collected,
            "num_skipped_nonfinite": self.num_skipped_nonfinite,
            "swapped": self._swapped,
            "stash": None if self._stash is None else [t.clone() for t in self._stash],
            "window": [[t.clone() for t in snap] for snap in self._window],
            "sum": [t.clone() for t in self._sum],
            "ema": [t.clone() for t in self._ema],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = AveragingConfig(**state["config"])
        if saved != self.config:
            raise ValueError(
                f"averaging state was saved with {saved}, but this run is configured with "
                f"{self.config}; resume with the same averaging hyperparameters"
            )
        if len(state["window"]) != len(self._window) or len(state["sum"]) != len(self._sum):
            raise ValueError("averaging state does not match this model's parameters")
        for snap, saved_snap in zip(self._window, state["window"]):
            _copy_into(snap, saved_snap)
        _copy_into(self._sum, state["sum"])
        _copy_into(self._ema, state["ema"])
        self.num_collected = int(state["num_collected"])
        self.num_skipped_nonfinite = int(state["num_skipped_nonfinite"])
        self._swapped = bool(state["swapped"])
        self._stash = None
        if state["stash"] is not None:
            self._stash = [t.detach().clone() for t in self._live]
            _copy_into(self._stash, state["stash"])


def _as_float32(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    if all(t.dtype == torch.float32 for t in tensors):
        return tensors
    return [t.float() for t in tensors]


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    # The max-norm cannot overflow on large finite weights, and it is NaN or
    # inf exactly when a tensor holds one. One host sync, on collection steps only.
    norms = torch._foreach_norm([t for t in tensors if torch.is_floating_point(t)], float("inf"))
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


def _copy_into(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    if len(targets) != len(sources):
        raise ValueError(f"expected {len(targets)} saved tensors, got {len(sources)}")
    for target, source in zip(targets, sources):
        if target.shape != source.shape:
            raise ValueError(
                f"saved tensor of shape {tuple(source.shape)} does not fit {tuple(target.shape)}"
            )
        target.copy_(source)
