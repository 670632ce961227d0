"""Where a torch averaging state lives: beside the weights, in host memory, or sharded.

The twin of ``placements_jax``. Every store runs the same ``lawa_ema_torch``
functions on its own tensors, so all give the same averages, bit for bit:

- :class:`DeviceStore` (``"device"``): beside the weights; folded in the
  caller's stream.
- :class:`HostStore` (``"host"``): preallocated CPU memory (pinned under
  CUDA). The snapshot is copied on a side CUDA stream that waits for the
  compute stream, and folded into the window / EMA on a background thread, so
  the step path only enqueues a copy. On a CPU-only machine the copy is made
  before ``collect`` returns (the next optimizer step mutates the weights in
  place) and only the fold overlaps the next step. The fold is joined before
  a swap, a checkpoint and the next collection. Under CUDA, call
  ``before_optimizer_step()`` before anything writes the weights again.
- :class:`ShardedStore` (``"sharded"``): under ``torch.distributed``, each
  rank keeps 1/world of the flattened state (``flat_layout_torch``) and the
  average is all-gathered. Because AlgoPerf checkpoints on rank 0 only, rank 0
  also mirrors the full state in host memory (a :class:`HostStore`), so its
  ``state`` resumes every rank exactly. Averaged float buffers are rank 0's
  (broadcast at each collection): DDP evaluates rank 0's BatchNorm
  statistics. Without a process group it is ``"device"`` with one rank.

``state()`` has one format for every store (``window``, ``sum``, ``ema`` as
lists of tensors shaped like the tracked ones), so a checkpoint moves between
placements.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any, Protocol

import torch
import torch.distributed as dist

from polyak.averaging import footprint, lawa_ema_torch, metrics
from polyak.averaging.config import AveragingConfig
from polyak.averaging.flat_layout_torch import FlatLayout
from polyak.averaging.lawa_ema_torch import Counters, Tensors
from polyak.distributed_torch import rank_and_world


class Store(Protocol):
    """Where the window / sum / EMA live, and how they are folded and read."""

    counters: Counters

    def collect(self, live: Tensors) -> bool: ...

    def before_optimizer_step(self) -> None: ...

    def join(self) -> None: ...

    def mean(self) -> Tensors: ...

    def mean_into(self, targets: Tensors) -> None: ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...


class DeviceStore:
    """The state beside the live tensors, folded synchronously in the caller's stream."""

    def __init__(self, config: AveragingConfig, live: Tensors, counters: Counters) -> None:
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
        if not lawa_ema_torch.all_finite(live):
            lawa_ema_torch.skip_nonfinite(self.counters)
            return False
        lawa_ema_torch.fold(self.config, self.counters, self.window, self.total, self.ema, live)
        return True

    def before_optimizer_step(self) -> None:
        pass

    def join(self) -> None:
        pass

    def mean(self) -> Tensors:
        return lawa_ema_torch.mean(self.config, self.counters, self.total, self.ema)

    def mean_into(self, targets: Tensors) -> None:
        lawa_ema_torch.mean_into(self.config, self.counters, self.total, self.ema, targets)

    def state(self) -> dict[str, Any]:
        return _canonical_state(self.window, self.total, self.ema)

    def load_state(self, state: dict[str, Any]) -> None:
        _load_canonical_state(state, self.window, self.total, self.ema)


class HostStore:
    """The state in CPU memory, folded on a background thread.

    One staging buffer receives each snapshot; the fold reads it on the
    worker. The previous fold is joined before the staging buffer is reused,
    so at most one collection is in flight.
    """

    def __init__(
        self,
        config: AveragingConfig,
        live: Tensors,
        counters: Counters,
        timings: metrics.Timings,
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
            if not lawa_ema_torch.all_finite(self._staging):
                lawa_ema_torch.skip_nonfinite(self.counters)
                return
            lawa_ema_torch.fold(
                self.config, self.counters, self.window, self.total, self.ema, self._staging
            )
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
        return lawa_ema_torch.mean(self.config, self.counters, self.total, self.ema)

    def mean_into(self, targets: Tensors) -> None:
        if not self.cuda:  # the targets are in host memory too
            lawa_ema_torch.mean_into(self.config, self.counters, self.total, self.ema, targets)
            return
        if self._loaded_pending:
            self._loaded.synchronize()  # the last upload may still read the staging buffer
        # Rounded to the targets' dtypes on the host, then one pinned upload.
        lawa_ema_torch.mean_into(self.config, self.counters, self.total, self.ema, self._staging)
        torch._foreach_copy_(targets, self._staging, non_blocking=True)
        self._loaded.record(torch.cuda.current_stream(self.device))
        self._loaded_pending = True

    def state(self) -> dict[str, Any]:
        return _canonical_state(self.window, self.total, self.ema)

    def load_state(self, state: dict[str, Any]) -> None:
        _load_canonical_state(state, self.window, self.total, self.ema)


class ShardedStore:
    """1/world of the flattened state per rank; the average is all-gathered.

    The tracked tensors are read as one flat vector, sliced by a
    :class:`~polyak.averaging.flat_layout_torch.FlatLayout`. Slices are kept
    in the tracked dtype if all tensors share one (else fp32, which holds
    every tracked value exactly), so the fold sees the same values as the
    device placement.
    """

    def __init__(
        self,
        config: AveragingConfig,
        live: Tensors,
        counters: Counters,
        timings: metrics.Timings,
        written_in_forward: list[bool],
    ) -> None:
        self.config = config
        self.counters = counters
        self.rank, self.world = rank_and_world()
        self.layout = FlatLayout([t.shape for t in live], self.rank, self.world)
        self._dtypes = [t.dtype for t in live]
        dtypes = set(self._dtypes)
        self.dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        self.device = live[0].device if live else torch.device("cpu")

        def flat(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(self.layout.shard, dtype=dtype, device=self.device)

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
        self.mirror: HostStore | None = None
        if self.world > 1 and self.rank == 0:
            self.mirror = HostStore(config, live, Counters(), timings, written_in_forward)

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
        if not lawa_ema_torch.all_finite(live):
            lawa_ema_torch.skip_nonfinite(self.counters)
            return False
        self.layout.slice_into(self._staging[0], live)
        lawa_ema_torch.fold(
            self.config, self.counters, self.window, self.total, self.ema, self._staging
        )
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
        return self.layout.views(self.layout.gather(local))

    def mean(self) -> Tensors:
        accumulator = self._gathered_accumulator()
        total, ema = (accumulator, []) if self.total else ([], accumulator)
        return lawa_ema_torch.mean(self.config, self.counters, total, ema)

    def mean_into(self, targets: Tensors) -> None:
        accumulator = self._gathered_accumulator()
        total, ema = (accumulator, []) if self.total else ([], accumulator)
        lawa_ema_torch.mean_into(self.config, self.counters, total, ema, targets)

    def _unflatten(self, shard: torch.Tensor, keep_dtypes: bool) -> Tensors:
        # Only for world == 1, where the shard is the whole flat vector.
        return [
            shard[offset : offset + shape.numel()]
            .view(shape)
            .to(dtype if keep_dtypes else torch.float32, copy=True)
            for offset, shape, dtype in zip(self.layout.offsets, self.layout.shapes, self._dtypes)
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
            check_lengths(shard["window"], self.window, "window snapshots")
            for slot, saved in zip(self.window, shard["window"]):
                copy_into(slot, [saved])
            copy_into(self.total, shard["sum"])
            copy_into(self.ema, shard["ema"])
            return
        check_lengths(state["window"], self.window, "window snapshots")
        for slot, saved in zip(self.window, state["window"]):
            self.layout.slice_into(slot[0], _checked_shapes(saved, self.layout.shapes))
        if self.total:
            self.layout.slice_into(self.total[0], _checked_shapes(state["sum"], self.layout.shapes))
        if self.ema:
            self.layout.slice_into(self.ema[0], _checked_shapes(state["ema"], self.layout.shapes))
        if self.mirror is not None:
            self.mirror.load_state(state)
            self.mirror.counters.num_collected = int(state["num_collected"])
            self.mirror.counters.num_skipped_nonfinite = int(state["num_skipped_nonfinite"])


def store_for(
    config: AveragingConfig,
    live: Tensors,
    counters: Counters,
    timings: metrics.Timings,
    written_in_forward: list[bool],
) -> Store:
    """The store ``config.placement`` asks for, sized for the ``live`` tensors."""
    if config.placement == "host":
        return HostStore(config, live, counters, timings, written_in_forward)
    if config.placement == "sharded":
        return ShardedStore(config, live, counters, timings, written_in_forward)
    return DeviceStore(config, live, counters)


def check_fits(config: AveragingConfig, live: Tensors) -> None:
    """Raises :class:`~polyak.averaging.footprint.AveragingMemoryError` if the state
    ``config`` places would not fit where it goes."""
    num_elements = sum(t.numel() for t in live)
    weight_bytes = sum(t.numel() * t.element_size() for t in live)
    device = live[0].device
    if config.placement == "host":
        needed = footprint.estimate(config, num_elements, weight_bytes, staging=True)
        footprint.check_fits(config, needed, footprint.available_host_bytes(), "host")
        return
    world = 1
    if config.placement == "sharded":
        rank, world = rank_and_world()
        if world > 1 and rank == 0:
            # Rank 0's host mirror, which its checkpoints are written from.
            mirror = footprint.estimate(
                config, num_elements, weight_bytes, staging=True, stash=False
            )
            footprint.check_fits(config, mirror, footprint.available_host_bytes(), "host (rank 0)")
    needed = footprint.estimate(
        config, num_elements, weight_bytes, staging=config.placement == "sharded", world=world
    )
    footprint.check_fits(config, needed, _available_bytes(device), f"{device.type} device")


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        return footprint.available_host_bytes()
    return None


def _canonical_state(window: list[Tensors], total: Tensors, ema: Tensors) -> dict[str, Any]:
    return {
        "window": [[t.clone() for t in snapshot] for snapshot in window],
        "sum": [t.clone() for t in total],
        "ema": [t.clone() for t in ema],
    }


def _load_canonical_state(
    state: dict[str, Any], window: list[Tensors], total: Tensors, ema: Tensors
) -> None:
    check_lengths(state["window"], window, "window snapshots")
    for snapshot, saved in zip(window, state["window"]):
        copy_into(snapshot, saved)
    copy_into(total, state["sum"])
    copy_into(ema, state["ema"])


def check_lengths(saved: list[Any], expected: list[Any], what: str) -> None:
    if len(saved) != len(expected):
        raise ValueError(
            f"averaging state holds {len(saved)} {what}, this model needs {len(expected)}; "
            "the state does not match this model's parameters"
        )


def _checked_shapes(saved: Tensors, shapes: list[torch.Size]) -> Tensors:
    check_lengths(saved, shapes, "tensors")
    for tensor, shape in zip(saved, shapes):
        if tensor.shape != shape:
            raise ValueError(
                f"saved tensor of shape {tuple(tensor.shape)} does not fit {tuple(shape)}"
            )
    return saved


def copy_into(targets: Tensors, sources: Tensors) -> None:
    if len(targets) != len(sources):
        raise ValueError(f"expected {len(targets)} saved tensors, got {len(sources)}")
    for target, source in zip(targets, sources):
        if target.shape != source.shape:
            raise ValueError(
                f"saved tensor of shape {tuple(source.shape)} does not fit {tuple(target.shape)}"
            )
        target.copy_(source)
