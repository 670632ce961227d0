"""LAWA, EMA and TWA of a torch module's weights, swapped in for evaluation.

The averager keys its buffers off ``module.parameters()`` order (and, under
the ``"average"`` buffer policy, the module's floating-point buffers), so it
works the same on a plain, a DDP-wrapped or a ``torch.compile``-wrapped model.

Life cycle, as AlgoPerf drives it:

1. ``collect(step, finite=...)`` once per step; it folds the weights only
   when the config's collection rule says so, at most once per step number.
   ``finite`` is the caller's verdict on those weights (the AlgoPerf builder
   collects the weights of step t after the forward pass of step t + 1 and
   passes whether that loss was finite), so the guard reads no weights;
   without a verdict the averager checks the weights itself.
2. ``swap_in_average()`` in ``prepare_for_eval``: the parameters' storage is
   exchanged with tensors holding the average (``param.data`` is reassigned,
   so the parameter objects, their gradients, DDP's buckets and the
   optimizer's state keyed by them stay as they are). EMA lends its own
   accumulator when it has the weights' dtype and layout: no copy at all.
   Otherwise (LAWA, a bf16 model's fp32 EMA, host and sharded placements)
   the average is written once into a spare buffer beside the weights,
   which then takes their place.
3. ``restore_live()`` at the start of the next ``update_params`` exchanges
   the storage back, so training never sees the average. No copy either.

The placement (``averaging_placement``) decides where the state lives:
``"device"``, ``"host"`` (folded on a background thread; under CUDA call
``before_optimizer_step()`` before anything writes the weights again) or
``"sharded"`` over the DDP ranks. The stores are in ``placements_torch``; all
give the same averages, bit for bit. The JAX twin is ``averager_jax``.

TWA (``averaging="twa"``) keeps the LAWA window and the recent training
batches (``remember_batch``, references only, with the step that trained on
each). ``swap_in_average`` then fits the averaging coefficients over the
window's snapshots (:func:`polyak.averaging.twa_torch.fit_twa`) with the loss
and forward closures of a :class:`TWAFitContext`, and recomputes BatchNorm
statistics; the live buffers are stashed beside the live weights and come back
with them. The fit runs on the last ``twa_batches`` batches that the window's
checkpoints have trained on, and is kept only if it beats the uniform average
on the batches trained since the last collection, which no checkpoint has
seen. When there are none (an eval right after a collection) nothing could
judge the fit, so none is run: the eval gets the uniform average, at LAWA's
cost. The batches are not checkpointed (they can be large): after a resume
the fit uses the batches seen since.

With ``averaging_select="best"`` the same recent batches score the average
against the live weights (:meth:`TorchAverager.score`); the builder decides.

``state_dict()`` holds everything, the live weights included while the
average is swapped in, in one format for all placements: AlgoPerf
checkpoints right after an eval, when the module holds the average, and the
live weights must come back from the optimizer state.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from polyak.averaging import metrics, placements_torch, twa_torch
from polyak.averaging.config import AveragingConfig, TWAError
from polyak.averaging.lawa_ema_torch import Counters, Tensors
from polyak.distributed_torch import rank_and_world


def tracked_tensors(module: nn.Module, config: AveragingConfig) -> list[torch.Tensor]:
    """The tensors that are averaged: parameters, then float buffers if asked.

    Integer buffers (BatchNorm's ``num_batches_tracked``) are never averaged:
    the evaluated model keeps the live ones.
    """
    tensors = [p for p in module.parameters()]
    if config.buffers == "average":
        tensors += [b for b in module.buffers() if torch.is_floating_point(b)]
    return tensors


def exchange_storage(first: Tensors, second: Tensors) -> None:
    """Swaps the storage of each pair in place; the tensor objects stay the same.

    A parameter keeps its identity (and with it its ``.grad``, the autograd
    hooks DDP's reducer registered, and the optimizer's state keyed by it);
    only the memory it points at changes. Shapes, dtypes, devices and strides
    must match, or a parameter would change its layout under the optimizer.
    """
    for a, b in zip(first, second, strict=True):
        if (a.shape, a.dtype, a.device, a.stride()) != (b.shape, b.dtype, b.device, b.stride()):
            raise ValueError(
                f"cannot exchange the storage of a {a.dtype} tensor of shape {tuple(a.shape)} "
                f"on {a.device} with a {b.dtype} one of shape {tuple(b.shape)} on {b.device}"
            )
        a.data, b.data = b.data, a.data


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
    # Judges the fit on the held-out batches (None: ``loss_fn``).
    validation_loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None


class TorchAverager:
    """Keeps a LAWA window or an EMA of a module's weights, where the config places it.

    ``averaging_placement="auto"`` is resolved here, from the footprint and the
    free memory (:func:`polyak.averaging.placements_torch.resolve_placement`);
    ``config.placement`` is then the placement chosen.
    """

    def __init__(self, config: AveragingConfig, module: nn.Module) -> None:
        self._module = module
        self._live = tracked_tensors(module, config)
        if config.enabled and self._live:
            config = placements_torch.resolve_placement(config, self._live)
        self.config = config
        self.timings = metrics.Timings()
        self._counters = Counters()
        self._last_step = 0
        self._swapped = False
        # While swapped: the tensors that hold the live weights (a spare
        # buffer, or the EMA lent to the module).
        self._holding_live: Tensors | None = None
        self._spare: Tensors | None = None
        self._store: placements_torch.Store | None = None
        # TWA: the recent training batches, and the live buffers while swapped.
        self._recent_batches: collections.deque[tuple[int, Any]] = collections.deque(
            maxlen=max(1, config.num_recent_batches)
        )
        # Which weights the last eval got under averaging_select="best" (1: the average).
        self.last_selection: dict[str, float] = {}
        # Passes over a batch that TWA's fits have cost so far (see TWAConfig.budget).
        self._twa_passes_spent = 0
        self._buffer_stash: Tensors | None = None
        self.last_twa_result: twa_torch.TWAResult | None = None
        if not config.enabled or not self._live:
            return
        placements_torch.check_fits(config, self._live)
        parameter_ids = {id(p) for p in module.parameters()}
        written_in_forward = [id(t) not in parameter_ids for t in self._live]
        self._store = placements_torch.store_for(
            config, self._live, self._counters, self.timings, written_in_forward
        )

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

    @property
    def placement(self) -> placements_torch.Store | None:
        """Where the state lives (None when averaging is off or nothing is tracked)."""
        return self._store

    def metrics(self) -> dict[str, float]:
        """Counters and mean timings for the training log; never waits."""
        return {
            "averaging/num_collected": self._counters.num_collected,
            "averaging/num_skipped_nonfinite": self._counters.num_skipped_nonfinite,
            **self.last_selection,
            **self.timings.drain_ms(),
        }

    def _join(self) -> None:
        if self._store is not None:
            self._store.join()

    # -- collection -----------------------------------------------------------------

    @torch.no_grad()
    def collect(self, step: int, finite: bool | torch.Tensor | None = None) -> bool:
        """Takes the current weights as those after step ``step`` (counted from 1),
        if that is a collection step not collected yet.

        Returns whether they were taken. Non-finite weights are skipped and
        counted, so one bad step cannot poison the average. ``finite`` is the
        caller's verdict on these weights, from what its step computed anyway
        (a scalar, or a 0-dim tensor: read once); then no pass over the weights
        checks them. Without it (None) the weights are checked here, or under
        ``"host"`` placement on the background thread, so a snapshot taken
        here may still be skipped there (see ``num_skipped_nonfinite``).
        """
        if step <= self._last_step or not self.config.should_collect(step):
            return False
        if self._store is None:
            return False
        if self._swapped:
            raise RuntimeError(
                "collect() while the average is swapped in: call restore_live() first"
            )
        start = time.perf_counter()
        self._last_step = step
        verdict = None if finite is None else bool(finite)
        taken = self._store.collect(self._live, verdict)
        self.timings.record("collect", time.perf_counter() - start)
        return taken

    def remember_batch(self, batch: Any, step: int) -> None:
        """Keeps a reference to the batch that step ``step`` (counted from 1) trained
        on, for TWA's fit and for ``averaging_select="best"`` (else a no-op)."""
        if self.config.num_recent_batches:
            self._recent_batches.append((step, batch))

    @property
    def recent_batches(self) -> list[Any]:
        """The kept training batches, oldest first."""
        return [batch for _, batch in self._recent_batches]

    def twa_batches(self) -> tuple[list[Any], list[Any]]:
        """(fit, held out): the last ``twa_batches`` batches some checkpoint of the
        window has trained on, and those trained since the last collection."""
        if not self._recent_batches:
            return [], []
        newest_step = self._recent_batches[-1][0]
        held_out = [
            batch
            for step, batch in self._recent_batches
            if self.config.unseen_by_checkpoints(step, newest_step)
        ]
        seen = [
            batch
            for step, batch in self._recent_batches
            if not self.config.unseen_by_checkpoints(step, newest_step)
        ]
        return seen[-self.config.twa.batches :], held_out

    @torch.no_grad()
    def score(self, loss_fn: Callable[[nn.Module, Any], torch.Tensor]) -> float:
        """The mean of ``loss_fn(module, batch)`` over the kept batches, for the
        weights the module holds now (``inf`` if there are none or it is not finite)."""
        batches = self.recent_batches[-self.config.twa.batches :]
        if not batches:
            return float("inf")
        total = torch.stack([loss_fn(self._module, b).detach().double() for b in batches])
        value = float(total.mean())
        return value if math.isfinite(value) else float("inf")

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
        with self._live_in_place():
            if self._store is None or self._counters.num_collected == 0:
                return [t.detach().float().clone() for t in self._live]
            return self._store.mean()

    def swap_in_average(self, fit_context: TWAFitContext | None = None) -> None:
        """Exchanges the module's weights for the average (no copy of the live weights).

        For TWA, ``fit_context`` is required: the coefficients are fitted and
        BatchNorm statistics recomputed here (the live buffers are stashed).
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
            holder = None if self.config.mode == "twa" else self._store.lendable_average(self._live)
            if holder is None:
                holder = self._spare_buffers()
                if self.config.mode != "twa":
                    self._store.mean_into(holder)
            # TWA writes its weights into the module after this: the spare's
            # old contents are never seen.
            exchange_storage(self._live, holder)
            self._holding_live = holder
        self._swapped = True
        if self.config.mode == "twa":
            assert fit_context is not None
            self._swap_in_twa(fit_context)
        self.timings.record("swap", time.perf_counter() - start)

    def _swap_in_twa(self, context: TWAFitContext) -> None:
        buffers = list(self._module.buffers())
        with torch.no_grad():
            self._buffer_stash = [b.detach().clone() for b in buffers]
        batches, held_out = self.twa_batches()
        config = self.config.twa
        steps_trained = self._recent_batches[-1][0] if self._recent_batches else 0
        re_estimates = config.recompute_batch_norm and bool(
            twa_torch.batch_norm_layers(self._module)
        )
        fit_passes = config.fit_passes(len(held_out))
        if re_estimates:
            fit_passes += len(batches) + len(held_out)
        if not batches:
            # Nothing to fit on (never the case under AlgoPerf once a collection
            # was made): the uniform average with the live buffers.
            with torch.no_grad():
                self._store.mean_into(self._live)  # type: ignore[union-attr]
            self.last_twa_result = None
            return
        if (
            not held_out
            or config.steps == 0
            or not config.affords(fit_passes, steps_trained, self._twa_passes_spent)
        ):
            # No batch could tell a fit that only follows the newest checkpoint
            # from a better average (or the budget does not pay for a fit yet):
            # the uniform average, without building the subspace.
            # BatchNorm statistics are re-estimated for it only if the budget pays
            # for that too; otherwise it keeps the live ones, as LAWA does.
            recompute = re_estimates and config.affords(
                len(batches), steps_trained, self._twa_passes_spent
            )
            with torch.no_grad():
                self._store.mean_into(self._live)  # type: ignore[union-attr]
            self.last_twa_result = twa_torch.uniform_result(
                self._module,
                len(self._window_order()),
                dataclasses.replace(config, recompute_batch_norm=recompute),
                context.forward_fn or context.loss_fn,
                batches,
            )
            self._twa_passes_spent += self.last_twa_result.passes(len(batches), 0)
            return
        slots = self._window_order()
        shapes = [t.shape for t in self._live]
        store = self._store
        checkpoints: Sequence[Sequence[torch.Tensor]] | twa_torch.TWASubspace
        if isinstance(store, placements_torch.ShardedStore):
            shards = [store.window[slot][0] for slot in slots]
            checkpoints = twa_torch.subspace_from_shards(shards, shapes, config)
        else:
            assert isinstance(store, (placements_torch.DeviceStore, placements_torch.HostStore))
            checkpoints = [store.window[slot] for slot in slots]
        with torch.enable_grad():
            self.last_twa_result = twa_torch.fit_twa(
                self._module,
                checkpoints,
                config,
                context.loss_fn,
                batches,
                forward_fn=context.forward_fn,
                validation_batches=held_out or None,
                validation_loss_fn=context.validation_loss_fn,
            )
        self._twa_passes_spent += self.last_twa_result.passes(len(batches), len(held_out))

    def _window_order(self) -> list[int]:
        """The filled window slots, oldest snapshot first."""
        count = self._counters.num_collected
        size = self.config.window
        if count < size:
            return list(range(count))
        return [(count + i) % size for i in range(size)]

    @torch.no_grad()
    def restore_live(self) -> None:
        """Puts the live weights back (an exchange of storage); a no-op unless swapped."""
        if not self._swapped:
            return
        assert self._holding_live is not None
        start = time.perf_counter()
        exchange_storage(self._live, self._holding_live)
        self._holding_live = None
        if self._buffer_stash is not None:
            for buffer, saved in zip(self._module.buffers(), self._buffer_stash):
                buffer.copy_(saved)
            self._buffer_stash = None
        if self.config.placement == "sharded" and rank_and_world()[1] > 1:
            self._spare = None  # sharded placement is chosen to save device memory
        self._swapped = False
        self.timings.record("restore", time.perf_counter() - start)

    @contextlib.contextmanager
    def _live_in_place(self) -> Iterator[None]:
        """The live weights in the module, and the store's own tensors in the store,
        for the duration (two exchanges of storage while swapped, no copy)."""
        holder = self._holding_live if self._swapped else None
        if holder is not None:
            exchange_storage(self._live, holder)
        try:
            yield
        finally:
            if holder is not None:
                exchange_storage(self._live, holder)

    def _spare_buffers(self) -> Tensors:
        # Kept between evals: allocating (and page-faulting) a model's worth
        # of memory per eval would cost as much as the copy it saves.
        if self._spare is None:
            self._spare = [torch.empty_like(t) for t in self._live]
        return self._spare

    # -- checkpointing ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, in one format for every placement."""
        self._join()
        stored: dict[str, Any] = {"window": [], "sum": [], "ema": []}
        with self._live_in_place():
            if self._store is not None:
                stored = self._store.state()
            stash = [t.detach().clone() for t in self._live] if self._swapped else None
        return {
            "config": self.config.to_dict(),
            "num_collected": self._counters.num_collected,
            "num_skipped_nonfinite": self._counters.num_skipped_nonfinite,
            "last_step": self._last_step,
            "twa_passes_spent": self._twa_passes_spent,
            "swapped": self._swapped,
            # The live weights while the module holds the average.
            "stash": stash,
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
        saved = AveragingConfig.from_dict(state["config"])
        # Placement is where the state lives, not what it is: a checkpoint
        # moves between placements.
        # Nor is the eval's selection: it reads no state.
        saved = dataclasses.replace(saved, select=self.config.select)
        if dataclasses.replace(saved, placement=self.config.placement) != self.config:
            raise ValueError(
                f"averaging state was saved with {saved}, but this run is configured with "
                f"{self.config}; resume with the same averaging hyperparameters"
            )
        # The module's weights are the caller's to load; a swap in progress is
        # forgotten, not undone (its holder may be the store's lent EMA, which
        # is overwritten below).
        self._holding_live = None
        if self._store is not None:
            self._store.load_state(state)
        elif state["window"] or state["sum"] or state["ema"]:
            raise ValueError("averaging state does not match this model's parameters")
        self._counters.num_collected = int(state["num_collected"])
        self._counters.num_skipped_nonfinite = int(state["num_skipped_nonfinite"])
        # Checkpoints written before "last_step" existed: nothing is skipped.
        self._last_step = int(state.get("last_step", 0))
        # And before TWA's budget was counted: nothing was spent.
        self._twa_passes_spent = int(state.get("twa_passes_spent", 0))
        self._swapped = False
        if state["stash"] is not None:
            spare = self._spare_buffers()
            placements_torch.copy_into(spare, state["stash"])
            self._holding_live = spare
            self._swapped = True
        self._buffer_stash = None
        if self._swapped and state.get("buffer_stash") is not None:
            self._buffer_stash = [t.detach().clone() for t in state["buffer_stash"]]
            placements_torch.check_lengths(
                self._buffer_stash, list(self._module.buffers()), "buffers"
            )
