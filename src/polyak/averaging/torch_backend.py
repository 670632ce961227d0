"""LAWA, EMA and TWA of a torch module's weights, swapped in for evaluation.

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

Placements (``averaging_placement``) decide where the state lives. All three
run the same elementwise ops (``_fold_lawa``, ``_fold_ema``, ``_mean_into``)
on their own tensors, so they give the same averages, bit for bit:

- ``"device"``: beside the weights; folded in the caller's stream.
- ``"host"``: preallocated CPU memory (pinned under CUDA). The snapshot is
  copied on a side CUDA stream that waits for the compute stream, and folded
  into the window / EMA on a background thread, so the step path only
  enqueues a copy. On a CPU-only machine the copy is made before
  ``collect`` returns (the next optimizer step mutates the weights in
  place) and only the fold overlaps the next step. The fold is joined
  before a swap, a checkpoint and the next collection. Under CUDA, call
  ``before_optimizer_step()`` before anything writes the weights again.
- ``"sharded"``: under ``torch.distributed``, each rank keeps 1/world of the
  flattened state and the average is all-gathered in ``swap_in_average``.
  Because AlgoPerf checkpoints on rank 0 only, rank 0 also mirrors the full
  state in host memory (as ``"host"`` does), so its ``state_dict`` resumes
  every rank exactly. Averaged float buffers are rank 0's (broadcast at each
  collection): DDP evaluates rank 0's BatchNorm statistics. Without a
  process group it is ``"device"`` with one rank.

TWA (``averaging="twa"``) keeps the LAWA window and the last ``twa_batches``
training batches (``remember_batch``, references only). ``swap_in_average``
then fits the averaging coefficients over the window's snapshots on those
batches (:func:`polyak.averaging.twa.fit_twa`) with the loss and forward
closures of a :class:`TWAFitContext`, and recomputes BatchNorm statistics;
the live buffers are stashed beside the live weights and come back with them.
The batches are not checkpointed (they can be large): after a resume the fit
uses the batches seen since.

``state_dict()`` holds everything, stash included, in one format for all
placements: AlgoPerf checkpoints right after an eval, when the module holds
the average, and the live weights must come back from the optimizer state.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from polyak.averaging import memory, monitoring, twa
from polyak.averaging.config import AveragingConfig, TWAError
from polyak.distributed_torch import all_gather_flat, rank_and_world

Tensors = list[torch.Tensor]


def tracked_tensors(module: nn.Module, config: AveragingConfig) -> list[torch.Tensor]:
    """The tensors that are averaged: parameters, then float buffers if asked.

    Integer buffers (BatchNorm's ``num_batches_tracked``) are never averaged:
    the evaluated model keeps the live ones.
    """
    tensors = [p for p in module.parameters()]
    if config.buffers == "average":
        tensors += [b for b in module.buffers() if torch.is_floating_point(b)]
    return tensors


@dataclasses.dataclass
class _Counters:
    num_collected: int = 0
    num_skipped_nonfinite: int = 0


# -- the math, shared by every placement ---------------------------------------


def _fold(
    config: AveragingConfig,
    counters: _Counters,
    window: list[Tensors],
    total: Tensors,
    ema: Tensors,
    new: Tensors,
) -> None:
    if config.keeps_window:
        _fold_lawa(window, total, counters.num_collected, new)
    else:
        _fold_ema(ema, new, counters.num_collected, config.beta)
    counters.num_collected += 1


def _fold_lawa(window: list[Tensors], total: Tensors, num_collected: int, new: Tensors) -> None:
    """O(1) LAWA: the fp32 sum gains the newest snapshot and loses the one leaving.

    Snapshots keep the weights' own dtype: they are the weights exactly as
    trained, and the sum subtracts exactly what it added.
    """
    slot = num_collected % len(window)
    oldest = window[slot]
    if num_collected >= len(window):
        torch._foreach_sub_(total, _as_float32(oldest))
    torch._foreach_copy_(oldest, new)
    torch._foreach_add_(total, _as_float32(new))
    if slot == len(window) - 1:
        # The window is full: the sum restarts from the snapshots, which
        # bounds its rounding drift at O(1) amortized cost.
        torch._foreach_zero_(total)
        for snapshot in window:
            torch._foreach_add_(total, _as_float32(snapshot))


def _fold_ema(ema: Tensors, new: Tensors, num_collected: int, beta: float) -> None:
    new32 = _as_float32(new)
    if num_collected == 0:
        # No zero-init bias: the EMA starts from the first collected weights.
        torch._foreach_copy_(ema, new32)
    else:
        # ema ← β·ema + (1 − β)·w, as one fused pass.
        torch._foreach_lerp_(ema, new32, 1.0 - beta)


def _lawa_count(config: AveragingConfig, counters: _Counters) -> float:
    return float(min(counters.num_collected, config.window))


def _mean(config: AveragingConfig, counters: _Counters, total: Tensors, ema: Tensors) -> Tensors:
    """The average in fp32 (new tensors)."""
    if config.keeps_window:
        return list(torch._foreach_div(total, _lawa_count(config, counters)))
    return [e.clone() for e in ema]


def _mean_into(
    config: AveragingConfig, counters: _Counters, total: Tensors, ema: Tensors, targets: Tensors
) -> None:
    """Writes the average into ``targets`` in their dtypes, rounding once from fp32."""
    if config.keeps_window:
        count = _lawa_count(config, counters)
        for target, accumulated in zip(targets, total):
            torch.div(accumulated, count, out=target)
    else:
        torch._foreach_copy_(targets, ema)


def _skip_nonfinite(counters: _Counters) -> None:
    counters.num_skipped_nonfinite += 1
    monitoring.warn_nonfinite(counters.num_skipped_nonfinite)


# -- placements ----------------------------------------------------------------


class _Store(Protocol):
    """Where the window / sum / EMA live, and how they are folded and read."""

    counters: _Counters

    def collect(self, live: Tensors) -> bool: ...

    def before_optimizer_step(self) -> None: ...

    def join(self) -> None: ...

    def mean(self) -> Tensors: ...

    def mean_into(self, targets: Tensors) -> None: ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...


class _DeviceStore:
    """The state beside the live tensors, folded synchronously in the caller's stream."""

    def __init__(self, config: AveragingConfig, live: Tensors, counters: _Counters) -> None:
        self.config = config
        self.counters = counters
        self.window: list[Tensors] = []
        self.total: Tensors = []
        self.ema: Tensors = []
        if config.keeps_window:
            self.window = [[torch.zeros_like(t) for t in live] for _ in range(config.window)]
            self.total = [torch.zeros_like(t, dtype=torch.float32) for t in live]
        else:
            self.ema = [torch.zeros_like(t, dtype=torch.float32) for t in live]

    def collect(self, live: Tensors) -> bool:
        if not _all_finite(live):
            _skip_nonfinite(self.counters)
            return False
        _fold(self.config, self.counters, self.window, self.total, self.ema, live)
        return True

    def before_optimizer_step(self) -> None:
        pass

    def join(self) -> None:
        pass

    def mean(self) -> Tensors:
        return _mean(self.config, self.counters, self.total, self.ema)

    def mean_into(self, targets: Tensors) -> None:
        _mean_into(self.config, self.counters, self.total, self.ema, targets)

    def state(self) -> dict[str, Any]:
        return _canonical_state(self.window, self.total, self.ema)

    def load_state(self, state: dict[str, Any]) -> None:
        _load_canonical_state(state, self.window, self.total, self.ema)


class _HostStore:
    """The state in CPU memory, folded on a background thread.

    One staging buffer receives each snapshot; the fold reads it on the
    worker. The previous fold is joined before the staging buffer is reused,
    so at most one collection is in flight.
    """

    def __init__(
        self,
        config: AveragingConfig,
        live: Tensors,
        counters: _Counters,
        timings: monitoring.Timings,
        written_in_forward: list[bool],
    ) -> None:
        self.config = config
        self.counters = counters
        self._timings = timings
        self._written_in_forward = written_in_forward
        self.device = live[0].device if live else torch.device("cpu")
        self.cuda = (
            torch.cuda.is_available()
            and self.device.type == "cuda"
            and all(t.device == self.device for t in live)
        )
        pin = self.cuda

        def host(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
            return torch.zeros(t.shape, dtype=dtype or t.dtype, device="cpu", pin_memory=pin)

        self.window: list[Tensors] = []
        self.total: Tensors = []
        self.ema: Tensors = []
        if config.keeps_window:
            self.window = [[host(t) for t in live] for _ in range(config.window)]
            self.total = [host(t, torch.float32) for t in live]
        else:
            self.ema = [host(t, torch.float32) for t in live]
        self._staging = [host(t) for t in live]
        self._worker = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="polyak-averaging"
        )
        self._pending: concurrent.futures.Future[None] | None = None
        self._fence_pending = False
        if self.cuda:
            self._copy_stream = torch.cuda.Stream(self.device)
            self._copied = torch.cuda.Event()
            self._loaded = torch.cuda.Event()
            self._loaded_pending = False

    def collect(self, live: Tensors) -> bool:
        self.join()
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            # Buffers change in the next forward pass (BatchNorm, DDP's
            # broadcast); a device copy frees them at once. Parameters change
            # only at the next optimizer step, which waits for the copy.
            sources = [
                t.detach().clone() if written else t
                for t, written in zip(live, self._written_in_forward)
            ]
            self._copy_stream.wait_stream(compute)
            with torch.cuda.stream(self._copy_stream):
                for staged, source in zip(self._staging, sources):
                    staged.copy_(source, non_blocking=True)
                self._copied.record(self._copy_stream)
            for source, written in zip(sources, self._written_in_forward):
                if written:
                    source.record_stream(self._copy_stream)
            self._fence_pending = True
        else:
            # The next optimizer step mutates the weights in place: copy now.
            torch._foreach_copy_(self._staging, live)
        self._pending = self._worker.submit(self._fold_staged)
        return True

    def _fold_staged(self) -> None:
        if self.cuda:
            self._copied.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            if not _all_finite(self._staging):
                _skip_nonfinite(self.counters)
                return
            _fold(self.config, self.counters, self.window, self.total, self.ema, self._staging)
        self._timings.record("fold", time.perf_counter() - start)

    def before_optimizer_step(self) -> None:
        if self._fence_pending:
            torch.cuda.current_stream(self.device).wait_event(self._copied)
            self._fence_pending = False

    def join(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
        # The worker waited for the copy, so nothing reads the weights any more.
        self._fence_pending = False

    def mean(self) -> Tensors:
        return _mean(self.config, self.counters, self.total, self.ema)

    def mean_into(self, targets: Tensors) -> None:
        if not self.cuda:  # the targets are in host memory too
            _mean_into(self.config, self.counters, self.total, self.ema, targets)
            return
        if self._loaded_pending:
            self._loaded.synchronize()  # the last upload may still read the staging buffer
        # Rounded to the targets' dtypes on the host, then one pinned upload.
        _mean_into(self.config, self.counters, self.total, self.ema, self._staging)
        torch._foreach_copy_(targets, self._staging, non_blocking=True)
        self._loaded.record(torch.cuda.current_stream(self.device))
        self._loaded_pending = True

    def state(self) -> dict[str, Any]:
        return _canonical_state(self.window, self.total, self.ema)

    def load_state(self, state: dict[str, Any]) -> None:
        _load_canonical_state(state, self.window, self.total, self.ema)


class _ShardedStore:
    """1/world of the flattened state per rank; the average is all-gathered.

    The tracked tensors are read as one flat vector, padded to a multiple of
    the world size; this rank owns ``[rank·shard, (rank+1)·shard)``. Slices
    are kept in the tracked dtype if all tensors share one (else fp32, which
    holds every tracked value exactly), so the fold sees the same values as
    the device placement.
    """

    def __init__(
        self,
        config: AveragingConfig,
        live: Tensors,
        counters: _Counters,
        timings: monitoring.Timings,
        written_in_forward: list[bool],
    ) -> None:
        self.config = config
        self.counters = counters
        self.rank, self.world = rank_and_world()
        self._shapes = [t.shape for t in live]
        self._dtypes = [t.dtype for t in live]
        sizes = [t.numel() for t in live]
        self._offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.num_elements = sum(sizes)
        self.shard = max(1, -(-self.num_elements // self.world))
        begin = self.rank * self.shard
        end = min(begin + self.shard, self.num_elements)
        # (tensor index, first element, end element, offset in the shard)
        self._pieces: list[tuple[int, int, int, int]] = []
        for index, (offset, size) in enumerate(zip(self._offsets, sizes)):
            first, last = max(begin, offset), min(end, offset + size)
            if first < last:
                self._pieces.append((index, first - offset, last - offset, first - begin))
        dtypes = set(self._dtypes)
        self.dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        self.device = live[0].device if live else torch.device("cpu")

        def flat(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(self.shard, dtype=dtype, device=self.device)

        self.window: list[Tensors] = []
        self.total: Tensors = []
        self.ema: Tensors = []
        if config.keeps_window:
            self.window = [[flat(self.dtype)] for _ in range(config.window)]
            self.total = [flat(torch.float32)]
        else:
            self.ema = [flat(torch.float32)]
        self._staging = [flat(self.dtype)]
        self._written_in_forward = written_in_forward
        self.mirror: _HostStore | None = None
        if self.world > 1 and self.rank == 0:
            self.mirror = _HostStore(config, live, _Counters(), timings, written_in_forward)

    def _slice_into(self, shard: torch.Tensor, tensors: Tensors) -> None:
        """Copies this rank's slice of the flattened ``tensors`` into ``shard``."""
        for index, first, last, at in self._pieces:
            shard[at : at + last - first].copy_(tensors[index].detach().reshape(-1)[first:last])

    def _rank_zero_buffers(self, live: Tensors) -> Tensors:
        """``live`` with its buffers replaced by rank 0's.

        DDP keeps the parameters identical, but each rank updates its own
        BatchNorm statistics until the next forward pass broadcasts rank 0's,
        and those are the ones evaluated. One flat broadcast per collection.
        """
        buffers = [t for t, written in zip(live, self._written_in_forward) if written]
        if self.world == 1 or not buffers:
            return live
        flat = torch.cat([b.detach().reshape(-1).float() for b in buffers])
        dist.broadcast(flat, src=0)
        received = iter(torch.split(flat, [b.numel() for b in buffers]))
        return [
            next(received).view_as(t).to(t.dtype) if written else t
            for t, written in zip(live, self._written_in_forward)
        ]

    def collect(self, live: Tensors) -> bool:
        if self.mirror is not None:
            self.mirror.collect(live)  # rank 0's own buffers, as broadcast below
        live = self._rank_zero_buffers(live)
        # Every rank now sees the same values, so every rank reaches the same verdict.
        if not _all_finite(live):
            _skip_nonfinite(self.counters)
            return False
        self._slice_into(self._staging[0], live)
        _fold(self.config, self.counters, self.window, self.total, self.ema, self._staging)
        return True

    def before_optimizer_step(self) -> None:
        if self.mirror is not None:
            self.mirror.before_optimizer_step()

    def join(self) -> None:
        if self.mirror is not None:
            self.mirror.join()

    def _gathered_accumulator(self) -> Tensors:
        """The whole fp32 sum (LAWA) or EMA, as views shaped like the tracked tensors.

        Gathered before the division, which then runs on the same values as
        the device placement's; with one rank, these are views of the state.
        """
        (local,) = self.total or self.ema
        full = local
        if self.world > 1:
            full = torch.empty(self.shard * self.world, dtype=torch.float32, device=self.device)
            all_gather_flat(full, local)
        return [
            full[offset : offset + shape.numel()].view(shape)
            for offset, shape in zip(self._offsets, self._shapes)
        ]

    def mean(self) -> Tensors:
        accumulator = self._gathered_accumulator()
        total, ema = (accumulator, []) if self.total else ([], accumulator)
        return _mean(self.config, self.counters, total, ema)

    def mean_into(self, targets: Tensors) -> None:
        accumulator = self._gathered_accumulator()
        total, ema = (accumulator, []) if self.total else ([], accumulator)
        _mean_into(self.config, self.counters, total, ema, targets)

    def _unflatten(self, shard: torch.Tensor, keep_dtypes: bool) -> Tensors:
        # Only for world == 1, where the shard is the whole flat vector.
        return [
            shard[offset : offset + shape.numel()]
            .view(shape)
            .to(dtype if keep_dtypes else torch.float32, copy=True)
            for offset, shape, dtype in zip(self._offsets, self._shapes, self._dtypes)
        ]

    def state(self) -> dict[str, Any]:
        if self.mirror is not None:
            self.mirror.join()
            return self.mirror.state()
        if self.world == 1:
            return {
                "window": [self._unflatten(slot[0], keep_dtypes=True) for slot in self.window],
                "sum": [t for s in self.total for t in self._unflatten(s, keep_dtypes=False)],
                "ema": [t for s in self.ema for t in self._unflatten(s, keep_dtypes=False)],
            }
        # Another rank's slice; AlgoPerf never asks for it (it saves rank 0's).
        return {
            "window": [],
            "sum": [],
            "ema": [],
            "shard": {
                "rank": self.rank,
                "world": self.world,
                "window": [slot[0].clone() for slot in self.window],
                "sum": [t.clone() for t in self.total],
                "ema": [t.clone() for t in self.ema],
            },
        }

    def load_state(self, state: dict[str, Any]) -> None:
        shard = state.get("shard")
        if shard is not None:
            if (shard["rank"], shard["world"]) != (self.rank, self.world):
                raise ValueError(
                    f"averaging state holds the slice of rank {shard['rank']} of "
                    f"{shard['world']}, but this is rank {self.rank} of {self.world}; "
                    "resume from rank 0's full state"
                )
            _check_lengths(shard["window"], self.window, "window snapshots")
            for slot, saved in zip(self.window, shard["window"]):
                _copy_into(slot, [saved])
            _copy_into(self.total, shard["sum"])
            _copy_into(self.ema, shard["ema"])
            return
        _check_lengths(state["window"], self.window, "window snapshots")
        for slot, saved in zip(self.window, state["window"]):
            self._slice_into(slot[0], _checked_shapes(saved, self._shapes))
        if self.total:
            self._slice_into(self.total[0], _checked_shapes(state["sum"], self._shapes))
        if self.ema:
            self._slice_into(self.ema[0], _checked_shapes(state["ema"], self._shapes))
        if self.mirror is not None:
            self.mirror.load_state(state)
            self.mirror.counters.num_collected = int(state["num_collected"])
            self.mirror.counters.num_skipped_nonfinite = int(state["num_skipped_nonfinite"])


# -- the averager ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TWAFitContext:
    """What a TWA fit needs from the caller, who knows the workload.

    ``loss_fn(module, batch)`` is the differentiable training loss exactly as
    a training step computes it, but with no dropout and no BatchNorm update;
    ``forward_fn(module, batch)`` is a train-mode forward pass that updates
    BatchNorm statistics (for their recomputation; ``None``: ``loss_fn``).
    """

    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    forward_fn: Callable[[nn.Module, Any], Any] | None = None


class TorchAverager:
    """Keeps a LAWA window or an EMA of a module's weights, where the config places it."""

    def __init__(self, config: AveragingConfig, module: nn.Module) -> None:
        self.config = config
        self._module = module
        self._live = tracked_tensors(module, config)
        self.timings = monitoring.Timings()
        self._counters = _Counters()
        self._swapped = False
        self._stash: Tensors | None = None
        self._store: _Store | None = None
        # TWA: the recent training batches, and the live buffers while swapped.
        self._recent_batches: collections.deque[Any] = collections.deque(maxlen=config.twa_batches)
        self._buffer_stash: Tensors | None = None
        self.last_twa_result: twa.TWAResult | None = None
        if not config.enabled or not self._live:
            return
        _check_memory(config, self._live)
        parameter_ids = {id(p) for p in module.parameters()}
        written_in_forward = [id(t) not in parameter_ids for t in self._live]
        if config.placement == "host":
            self._store = _HostStore(
                config, self._live, self._counters, self.timings, written_in_forward
            )
        elif config.placement == "sharded":
            self._store = _ShardedStore(
                config, self._live, self._counters, self.timings, written_in_forward
            )
        else:
            self._store = _DeviceStore(config, self._live, self._counters)

    # -- counters -----------------------------------------------------------------

    @property
    def num_collected(self) -> int:
        """Collections folded in so far (waits for a background fold)."""
        self._join()
        return self._counters.num_collected

    @property
    def num_skipped_nonfinite(self) -> int:
        """Collections skipped because a weight was NaN or inf (waits for a background fold)."""
        self._join()
        return self._counters.num_skipped_nonfinite

    @property
    def swapped(self) -> bool:
        return self._swapped

    def metrics(self) -> dict[str, float]:
        """Counters and mean timings for the training log; never waits."""
        return {
            "averaging/num_collected": self._counters.num_collected,
            "averaging/num_skipped_nonfinite": self._counters.num_skipped_nonfinite,
            **self.timings.drain_ms(),
        }

    def _join(self) -> None:
        if self._store is not None:
            self._store.join()

    # -- collection -----------------------------------------------------------------

    @torch.no_grad()
    def collect(self, step: int) -> bool:
        """Takes the current weights if ``step`` (counted from 1) is a collection step.

        Returns whether they were taken. Non-finite weights are skipped and
        counted, so one bad step cannot poison the average; under ``"host"``
        placement that check runs on the background thread, so a snapshot
        taken here may still be skipped there (see ``num_skipped_nonfinite``).
        """
        if not self.config.should_collect(step) or self._store is None:
            return False
        if self._swapped:
            raise RuntimeError(
                "collect() while the average is swapped in: call restore_live() first"
            )
        start = time.perf_counter()
        taken = self._store.collect(self._live)
        self.timings.record("collect", time.perf_counter() - start)
        return taken

    def remember_batch(self, batch: Any) -> None:
        """Keeps a reference to a training batch for TWA's fit (a no-op for other modes)."""
        if self.config.mode == "twa":
            self._recent_batches.append(batch)

    @property
    def recent_batches(self) -> list[Any]:
        """The training batches a TWA fit would use, oldest first."""
        return list(self._recent_batches)

    def before_optimizer_step(self) -> None:
        """Call before the optimizer writes the weights: waits (on the device) for a
        pending snapshot copy. A no-op except for ``"host"`` placement under CUDA."""
        if self._store is not None:
            self._store.before_optimizer_step()

    # -- the average ------------------------------------------------------------------

    @torch.no_grad()
    def average(self) -> list[torch.Tensor]:
        """The averaged tensors in fp32 (the live ones before any collection).

        A collective under ``"sharded"`` placement: call it on every rank.
        """
        self._join()
        if self._store is None or self._counters.num_collected == 0:
            return [t.detach().float().clone() for t in self._live]
        return self._store.mean()

    def swap_in_average(self, fit_context: TWAFitContext | None = None) -> None:
        """Stashes the live weights and loads the average into the module.

        For TWA, ``fit_context`` is required: the coefficients are fitted and
        BatchNorm statistics recomputed here (the live buffers are stashed too).
        A collective under ``"sharded"`` placement (and for TWA under DDP):
        call it on every rank.
        """
        self._join()
        if self._swapped or self._store is None or self._counters.num_collected == 0:
            return
        if self.config.mode == "twa" and fit_context is None:
            raise TWAError(
                "averaging='twa' needs a TWAFitContext (the training loss) in swap_in_average"
            )
        start = time.perf_counter()
        with torch.no_grad():
            torch._foreach_copy_(self._stash_buffers(), self._live, non_blocking=self._pinned_stash)
            if self.config.mode != "twa":
                self._store.mean_into(self._live)
        if self.config.mode == "twa":
            assert fit_context is not None
            self._swap_in_twa(fit_context)
        self._swapped = True
        self.timings.record("swap", time.perf_counter() - start)

    def _swap_in_twa(self, context: TWAFitContext) -> None:
        buffers = list(self._module.buffers())
        with torch.no_grad():
            self._buffer_stash = [b.detach().clone() for b in buffers]
        batches = self.recent_batches
        if not batches:
            # Nothing to fit on (never the case under AlgoPerf, where a step
            # precedes every eval): the uniform average with the live buffers.
            with torch.no_grad():
                self._store.mean_into(self._live)  # type: ignore[union-attr]
            self.last_twa_result = None
            return
        config = self.config.twa
        slots = self._window_order()
        shapes = [t.shape for t in self._live]
        store = self._store
        checkpoints: Sequence[Sequence[torch.Tensor]] | twa.TWASubspace
        if isinstance(store, _ShardedStore):
            shards = [store.window[slot][0] for slot in slots]
            checkpoints = twa.subspace_from_shards(shards, shapes, config)
        else:
            assert isinstance(store, (_DeviceStore, _HostStore))
            checkpoints = [store.window[slot] for slot in slots]
        with torch.enable_grad():
            self.last_twa_result = twa.fit_twa(
                self._module,
                checkpoints,
                config,
                context.loss_fn,
                batches,
                forward_fn=context.forward_fn,
            )

    def _window_order(self) -> list[int]:
        """The filled window slots, oldest snapshot first."""
        count = self._counters.num_collected
        size = self.config.window
        if count < size:
            return list(range(count))
        return [(count + i) % size for i in range(size)]

    @torch.no_grad()
    def restore_live(self) -> None:
        """Puts the live weights back; a no-op unless the average is swapped in."""
        if not self._swapped:
            return
        assert self._stash is not None
        start = time.perf_counter()
        torch._foreach_copy_(self._live, self._stash, non_blocking=self._pinned_stash)
        if self._buffer_stash is not None:
            for buffer, saved in zip(self._module.buffers(), self._buffer_stash):
                buffer.copy_(saved)
            self._buffer_stash = None
        if self.config.placement == "sharded" and rank_and_world()[1] > 1:
            self._stash = None  # sharded placement is chosen to save device memory
        self._swapped = False
        self.timings.record("restore", time.perf_counter() - start)

    @property
    def _pinned_stash(self) -> bool:
        return isinstance(self._store, _HostStore) and self._store.cuda

    def _stash_buffers(self) -> Tensors:
        # Kept between evals: allocating (and page-faulting) a model's worth
        # of memory per eval would cost as much as the copy itself.
        if self._stash is None:
            on_host = self.config.placement == "host"
            self._stash = [
                torch.empty(
                    t.shape,
                    dtype=t.dtype,
                    device="cpu" if on_host else t.device,
                    pin_memory=on_host and self._pinned_stash,
                )
                for t in self._live
            ]
        return self._stash

    # -- checkpointing ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, in one format for every placement."""
        self._join()
        if self._pinned_stash and self._swapped:
            torch.cuda.current_stream(self._live[0].device).synchronize()
        stored: dict[str, Any] = {"window": [], "sum": [], "ema": []}
        if self._store is not None:
            stored = self._store.state()
        return {
            "config": dataclasses.asdict(self.config),
            "num_collected": self._counters.num_collected,
            "num_skipped_nonfinite": self._counters.num_skipped_nonfinite,
            "swapped": self._swapped,
            "stash": [t.clone() for t in self._stash] if self._swapped and self._stash else None,
            # TWA's live buffers while its recomputed BatchNorm statistics are out.
            "buffer_stash": (
                [t.clone() for t in self._buffer_stash]
                if self._swapped and self._buffer_stash is not None
                else None
            ),
            **stored,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._join()
        saved = AveragingConfig(**state["config"])
        # Placement is where the state lives, not what it is: a checkpoint
        # moves between placements.
        if dataclasses.replace(saved, placement=self.config.placement) != self.config:
            raise ValueError(
                f"averaging state was saved with {saved}, but this run is configured with "
                f"{self.config}; resume with the same averaging hyperparameters"
            )
        if self._store is not None:
            self._store.load_state(state)
        elif state["window"] or state["sum"] or state["ema"]:
            raise ValueError("averaging state does not match this model's parameters")
        self._counters.num_collected = int(state["num_collected"])
        self._counters.num_skipped_nonfinite = int(state["num_skipped_nonfinite"])
        self._swapped = False
        if state["stash"] is not None:
            _copy_into(self._stash_buffers(), state["stash"])
            self._swapped = True
        self._buffer_stash = None
        if self._swapped and state.get("buffer_stash") is not None:
            self._buffer_stash = [t.detach().clone() for t in state["buffer_stash"]]
            _check_lengths(self._buffer_stash, list(self._module.buffers()), "buffers")


# -- helpers ----------------------------------------------------------------------


def _check_memory(config: AveragingConfig, live: Tensors) -> None:
    num_elements = sum(t.numel() for t in live)
    weight_bytes = sum(t.numel() * t.element_size() for t in live)
    device = live[0].device
    if config.placement == "host":
        needed = memory.footprint(config, num_elements, weight_bytes, staging=True)
        memory.check_fits(config, needed, memory.available_host_bytes(), "host")
        return
    world = 1
    if config.placement == "sharded":
        rank, world = rank_and_world()
        if world > 1 and rank == 0:
            # Rank 0's host mirror, which its checkpoints are written from.
            mirror = memory.footprint(config, num_elements, weight_bytes, staging=True, stash=False)
            memory.check_fits(config, mirror, memory.available_host_bytes(), "host (rank 0)")
    needed = memory.footprint(
        config, num_elements, weight_bytes, staging=config.placement == "sharded", world=world
    )
    memory.check_fits(config, needed, _available_bytes(device), f"{device.type} device")


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        return memory.available_host_bytes()
    return None


def _as_float32(tensors: Tensors) -> Tensors:
    if all(t.dtype == torch.float32 for t in tensors):
        return tensors
    return [t.float() for t in tensors]


def _all_finite(tensors: Tensors) -> bool:
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


def _canonical_state(window: list[Tensors], total: Tensors, ema: Tensors) -> dict[str, Any]:
    return {
        "window": [[t.clone() for t in snapshot] for snapshot in window],
        "sum": [t.clone() for t in total],
        "ema": [t.clone() for t in ema],
    }


def _load_canonical_state(
    state: dict[str, Any], window: list[Tensors], total: Tensors, ema: Tensors
) -> None:
    _check_lengths(state["window"], window, "window snapshots")
    for snapshot, saved in zip(window, state["window"]):
        _copy_into(snapshot, saved)
    _copy_into(total, state["sum"])
    _copy_into(ema, state["ema"])


def _check_lengths(saved: list[Any], expected: list[Any], what: str) -> None:
    if len(saved) != len(expected):
        raise ValueError(
            f"averaging state holds {len(saved)} {what}, this model needs {len(expected)}; "
            "the state does not match this model's parameters"
        )


def _checked_shapes(saved: Tensors, shapes: list[torch.Size]) -> Tensors:
    _check_lengths(saved, shapes, "tensors")
    for tensor, shape in zip(saved, shapes):
        if tensor.shape != shape:
            raise ValueError(
                f"saved tensor of shape {tuple(tensor.shape)} does not fit {tuple(shape)}"
            )
    return saved


def _copy_into(targets: Tensors, sources: Tensors) -> None:
    if len(targets) != len(sources):
        raise ValueError(f"expected {len(targets)} saved tensors, got {len(sources)}")
    for target, source in zip(targets, sources):
        if target.shape != source.shape:
            raise ValueError(
                f"saved tensor of shape {tuple(source.shape)} does not fit {tuple(target.shape)}"
            )
        target.copy_(source)
