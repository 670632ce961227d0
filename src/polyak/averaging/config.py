"""The averaging configuration, read from AlgoPerf hyperparameters.

Hyperparameter names (the public interface, shared by both frameworks):

- ``averaging``: one of :data:`MODES` (missing means ``"none"``). ``"twa"``
  (trainable weight averaging, TWA-t; in :data:`TORCH_ONLY_MODES`)
  collects exactly like LAWA: the window's snapshots are the checkpoints whose
  averaging coefficients are fitted on recent training batches at each eval.
- ``averaging_every`` (ν): steps between two collections.
- ``lawa_window`` (L): how many collections LAWA averages.
- ``ema_beta`` (β): EMA decay per collection.
- ``averaging_start_frac``: fraction of ``step_hint`` before the first collection.
- ``averaging_buffers``: ``"live"`` keeps the live BatchNorm statistics in the
  averaged model (the paper's behaviour), ``"average"`` averages float buffers.
- ``averaging_placement``: where the state lives. ``"auto"`` (the default)
  picks one of the others from the state's footprint and the free memory
  (PyTorch; JAX treats it as ``"device"``); ``"device"`` beside the
  weights (fastest swap); ``"host"`` in CPU memory, copied and folded off the
  step path; ``"sharded"`` split over the DDP ranks (PyTorch; JAX treats it as
  ``"device"``). All give the same averages.
- ``twa_steps``, ``twa_batches``, ``twa_lr``, ``twa_layerwise``,
  ``twa_recompute_bn``: the TWA fit (see :class:`TWAConfig`), held as
  ``AveragingConfig.twa``. Type-checked whatever the mode; they only matter
  when ``averaging="twa"``.
- ``averaging_select``: ``"average"`` (default) evaluates the average;
  ``"best"`` scores the average and the live weights on the recent training
  batches at each eval (their mean loss, as the eval computes it) and
  evaluates the better one. Training always continues from the live weights.

Each config reads its names through one table (``HYPERPARAMETERS``: name →
field); a field's default is the dataclass default, except ``every``, whose
default depends on ``step_hint`` and the window.

Collection rule. Steps are counted from 1: ``step = global_step + 1`` after the
optimizer step of AlgoPerf's ``update_params(global_step=...)``. A collection
happens when ``step >= start_step`` and ``step % every == 0``.

Defaults follow Ajroldi, Orvieto & Geiping (2025): the averaging horizon ν·L
is about 1% of ``step_hint``, with L = 20 for LAWA and β = 0.9 for EMA.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Literal

from polyak.hyperparameters import lookup

Mode = Literal["none", "lawa", "ema", "twa"]
Placement = Literal["auto", "device", "host", "sharded"]
BufferPolicy = Literal["live", "average"]
Selection = Literal["average", "best"]

MODES: tuple[str, ...] = ("none", "lawa", "ema", "twa")
# Trainable weight averaging exists only in the PyTorch averager.
TORCH_ONLY_MODES: tuple[str, ...] = ("twa",)
# Modes that keep a LAWA window of snapshots (TWA fits over them).
WINDOW_MODES: tuple[str, ...] = ("lawa", "twa")
PLACEMENTS: tuple[str, ...] = ("auto", "device", "host", "sharded")
BUFFER_POLICIES: tuple[str, ...] = ("live", "average")
SELECTIONS: tuple[str, ...] = ("average", "best")

DEFAULT_WINDOW = 20
DEFAULT_BETA = 0.9
# The paper's best horizon: ν·L ≈ 1% of the step budget.
HORIZON_FRACTION = 0.01


def _read(config_type: Any, hyperparameters: Any) -> dict[str, Any]:
    """Field values from the point through the type's table; missing: field defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(config_type)}
    return {
        field: lookup(hyperparameters, name, defaults[field])
        for name, field in config_type.HYPERPARAMETERS.items()
    }


def _is_int(value: Any) -> bool:
    # JSON search spaces give floats such as 64.0; bools are not counts.
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _safe(window: Any) -> int:
    # The default ν is derived from L before L is validated; a bad L is
    # reported by __post_init__, not by this arithmetic.
    return window if _is_int(window) and window >= 1 else DEFAULT_WINDOW


class AveragingError(ValueError):
    """An averaging hyperparameter is out of range or unknown."""


class TWAError(AveragingError):
    """A TWA hyperparameter or input is out of range or does not fit."""


@dataclasses.dataclass(frozen=True)
class TWAConfig:
    """Validated TWA settings. Build it with :meth:`from_hyperparameters`.

    - ``steps`` (``twa_steps``): optimizer steps on the coefficients; 0 gives
      uniform LAWA.
    - ``batches`` (``twa_batches``): how many recent training batches the fit
      cycles through (kept by the averager; ``fit_twa`` uses those it is given).
    - ``lr`` (``twa_lr``): Adam's peak learning rate, in units of the
      checkpoints' spread, decayed to 0 by a cosine.
    - ``layerwise`` (``twa_layerwise``): ``False``/``0`` learns one coefficient
      vector for the whole model; ``True``/``1`` one per parameter tensor; an
      integer n > 1 one per group of n consecutive tensors (2 = a layer's
      weight and bias).
    - ``recompute_batch_norm`` (``twa_recompute_bn``): re-estimate BatchNorm
      statistics for the result over the fit's (and held-out) batches. Off by
      default: the result keeps the live statistics, as LAWA does. A dozen
      recent batches give noisy statistics: on ``digits`` (a BatchNorm MLP;
      NadamW, ν = 10, L = 10, an eval every 25 steps), TWA fitting at every
      eval reached the target at 926/626/576/601 steps (seeds 0, 1, 2, 4)
      with them, and at 401/351/276/251 without (LAWA: 326/326/276/251).
    - ``budget`` (``twa_budget``): what the fits may cost, as a fraction of the
      training steps so far. A fit costs its steps plus two passes per held-out
      batch that judge it (and a forward pass per batch where BatchNorm
      statistics are re-estimated); the costs of all fits add up to at most
      ``budget`` times the steps trained. A fit always runs whole (``steps``
      steps): the budget decides how often one runs, not how long. An eval the
      unspent budget does not pay for evaluates the uniform average (LAWA), at
      the cost of the mean. At the defaults (0.1, 50 steps, 8 held-out batches:
      66 passes) a fit runs at most once every 660 training steps;
      ``twa_budget=1e6`` fits at every eval that has held-out batches.
      ``None`` (from Python only; a missing or None hyperparameter takes the
      default): no cap.
    """

    steps: int = 50
    batches: int = 8
    lr: float = 0.1
    layerwise: bool | int = False
    recompute_batch_norm: bool = False
    budget: float | None = 0.1

    # Hyperparameter name → field.
    HYPERPARAMETERS: ClassVar[Mapping[str, str]] = MappingProxyType(
        {
            "twa_steps": "steps",
            "twa_batches": "batches",
            "twa_lr": "lr",
            "twa_layerwise": "layerwise",
            "twa_recompute_bn": "recompute_batch_norm",
            "twa_budget": "budget",
        }
    )

    def __post_init__(self) -> None:
        if not _is_int(self.steps) or self.steps < 0:
            raise TWAError(
                f"twa_steps={self.steps!r} must be an integer >= 0 "
                "(optimizer steps on the averaging coefficients)"
            )
        if not _is_int(self.batches) or self.batches < 1:
            raise TWAError(
                f"twa_batches={self.batches!r} must be an integer >= 1 "
                "(training batches the coefficients are fitted on)"
            )
        if (
            isinstance(self.lr, bool)
            or not isinstance(self.lr, (int, float))
            or not math.isfinite(self.lr)
            or self.lr <= 0
        ):
            raise TWAError(f"twa_lr={self.lr!r} must be a finite number > 0")
        layerwise = self.layerwise
        if not (isinstance(layerwise, bool) or (_is_int(layerwise) and layerwise >= 0)):
            raise TWAError(
                f"twa_layerwise={self.layerwise!r} must be a bool or an integer >= 0 "
                "(tensors per coefficient block; 0 or False: one block for the model)"
            )
        if not isinstance(self.recompute_batch_norm, bool):
            raise TWAError(f"twa_recompute_bn={self.recompute_batch_norm!r} must be a bool")
        budget = self.budget
        if budget is not None and (
            isinstance(budget, bool)
            or not isinstance(budget, (int, float))
            or not (math.isfinite(budget) and budget > 0)
        ):
            raise TWAError(
                f"twa_budget={budget!r} must be a finite number > 0 (the fits' passes "
                "per training step; 0.1 by default)"
            )
        if budget is not None:
            object.__setattr__(self, "budget", float(budget))
        object.__setattr__(self, "steps", int(self.steps))
        object.__setattr__(self, "batches", int(self.batches))
        object.__setattr__(self, "lr", float(self.lr))
        object.__setattr__(
            self, "layerwise", layerwise if isinstance(layerwise, bool) else int(layerwise)
        )

    @classmethod
    def from_hyperparameters(cls, hyperparameters: Any) -> TWAConfig:
        """Reads the ``twa_*`` names (missing or None: the field defaults)."""
        return cls(**_read(cls, hyperparameters))

    def fit_passes(self, num_held_out: int) -> int:
        """What a fit costs in passes over a batch: its steps, and the two
        passes per held-out batch that compare it with the uniform average."""
        return self.steps + 2 * num_held_out

    def affords(self, passes: int, steps_trained: int, passes_spent: int) -> bool:
        """Whether ``passes`` more fit in the budget after ``steps_trained`` training
        steps, ``passes_spent`` of it already spent on earlier fits."""
        if self.budget is None:
            return True
        return passes_spent + passes <= self.budget * steps_trained

    @property
    def tensors_per_block(self) -> int:
        """0 for one block over the whole model, else tensors per block."""
        return int(self.layerwise)


def default_every(step_hint: int, window: int = DEFAULT_WINDOW) -> int:
    """ν such that ν·L is about 1% of step_hint (at least 1)."""
    return max(1, round(HORIZON_FRACTION * step_hint / window))


@dataclasses.dataclass(frozen=True)
class AveragingConfig:
    """Validated averaging settings. Build it with :meth:`from_hyperparameters`."""

    mode: Mode = "none"
    every: int = 1
    window: int = DEFAULT_WINDOW
    beta: float = DEFAULT_BETA
    start_frac: float = 0.0
    step_hint: int = 1
    buffers: BufferPolicy = "live"
    placement: Placement = "auto"
    select: Selection = "average"
    twa: TWAConfig = TWAConfig()

    # Hyperparameter name → field (the twa_* names are TWAConfig's).
    HYPERPARAMETERS: ClassVar[Mapping[str, str]] = MappingProxyType(
        {
            "averaging": "mode",
            "averaging_every": "every",
            "lawa_window": "window",
            "ema_beta": "beta",
            "averaging_start_frac": "start_frac",
            "averaging_buffers": "buffers",
            "averaging_placement": "placement",
            "averaging_select": "select",
        }
    )
    # Every name :meth:`from_hyperparameters` reads.
    HYPERPARAMETER_NAMES: ClassVar[frozenset[str]] = frozenset(HYPERPARAMETERS) | frozenset(
        TWAConfig.HYPERPARAMETERS
    )

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise AveragingError(f"averaging={self.mode!r} is unknown; expected one of {MODES}")
        if not _is_int(self.every) or self.every < 1:
            raise AveragingError(
                f"averaging_every={self.every!r} must be an integer >= 1 "
                "(steps between collections)"
            )
        if not _is_int(self.window) or self.window < 1:
            raise AveragingError(f"lawa_window={self.window!r} must be an integer >= 1")
        if not isinstance(self.beta, (int, float)) or not 0.0 < self.beta < 1.0:
            raise AveragingError(f"ema_beta={self.beta!r} must lie in the open interval (0, 1)")
        if not isinstance(self.start_frac, (int, float)) or not 0.0 <= self.start_frac < 1.0:
            raise AveragingError(
                f"averaging_start_frac={self.start_frac!r} must lie in [0, 1) "
                "(a fraction of step_hint)"
            )
        if not _is_int(self.step_hint) or self.step_hint < 1:
            raise AveragingError(f"step_hint={self.step_hint!r} must be an integer >= 1")
        if self.buffers not in BUFFER_POLICIES:
            raise AveragingError(
                f"averaging_buffers={self.buffers!r} is unknown; expected one of {BUFFER_POLICIES}"
            )
        if self.placement not in PLACEMENTS:
            raise AveragingError(
                f"averaging_placement={self.placement!r} is unknown; expected one of {PLACEMENTS}"
            )
        if self.select not in SELECTIONS:
            raise AveragingError(
                f"averaging_select={self.select!r} is unknown; expected one of {SELECTIONS} "
                "('best': evaluate whichever of the average and the live weights scores "
                "better on recent training batches)"
            )
        if not isinstance(self.twa, TWAConfig):
            raise TWAError(f"twa={self.twa!r} must be a TWAConfig")
        if self.mode == "twa" and self.buffers == "average":
            raise TWAError(
                "averaging='twa' with averaging_buffers='average' is not supported: TWA "
                "recomputes the BatchNorm statistics for its weights; use averaging_buffers='live'"
            )
        # Normalise JSON floats (64.0) to the ints the buffers are sized by.
        object.__setattr__(self, "every", int(self.every))
        object.__setattr__(self, "window", int(self.window))
        object.__setattr__(self, "step_hint", int(self.step_hint))
        object.__setattr__(self, "beta", float(self.beta))
        object.__setattr__(self, "start_frac", float(self.start_frac))

    @classmethod
    def from_hyperparameters(cls, hyperparameters: Any, step_hint: int) -> AveragingConfig:
        """Reads the averaging names from an AlgoPerf hyperparameter point (or None)."""
        values = _read(cls, hyperparameters)
        if isinstance(values["mode"], str):
            values["mode"] = values["mode"].lower()
        if lookup(hyperparameters, "averaging_every", None) is None:
            values["every"] = default_every(step_hint, _safe(values["window"]))
        return cls(
            **values,
            step_hint=step_hint,
            twa=TWAConfig.from_hyperparameters(hyperparameters),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as :meth:`from_dict` reads them (for checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AveragingConfig:
        # Checkpoints from before averaging_select was a field lack it.
        return cls(**{**values, "twa": TWAConfig(**values["twa"])})

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def keeps_window(self) -> bool:
        """Whether a LAWA window of snapshots is kept (LAWA, and TWA's checkpoints)."""
        return self.mode in WINDOW_MODES

    @property
    def selects_best(self) -> bool:
        """Whether each eval picks the better of the average and the live weights."""
        return self.enabled and self.select == "best"

    @property
    def num_recent_batches(self) -> int:
        """How many recent training batches the averager keeps: TWA's fit
        batches plus held-out ones (see :meth:`unseen_by_checkpoints`), and
        the batches ``"best"`` scores on (``twa_batches`` of them)."""
        if self.mode == "twa":
            return self.twa.batches + self.twa_holdout
        return self.twa.batches if self.selects_best else 0

    @property
    def twa_holdout(self) -> int:
        """At most this many batches are held out of TWA's fit to validate it:
        those trained since the last collection (fewer than ν)."""
        return min(self.every - 1, self.twa.batches)

    def last_collection_step(self, step: int) -> int:
        """The last step <= ``step`` (counted from 1) that was collected; 0 if none."""
        last = step - step % self.every
        return last if self.enabled and last >= self.start_step else 0

    def unseen_by_checkpoints(self, batch_step: int, step: int) -> bool:
        """Whether the batch trained at ``batch_step`` is in none of the checkpoints
        collected up to ``step``: it came after the last collection."""
        return batch_step > self.last_collection_step(step)

    @property
    def start_step(self) -> int:
        """The first step (counted from 1) that may be collected."""
        return max(1, math.ceil(self.start_frac * self.step_hint))

    def should_collect(self, step: int) -> bool:
        """Whether the weights after step ``step`` (counted from 1) are collected."""
        return self.enabled and step >= self.start_step and step % self.every == 0
