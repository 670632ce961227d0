"""LAWA and EMA of a JAX params pytree, swapped in for evaluation.

The twin of ``averager_torch``, with the same life cycle and method names:
``collect`` after each optimizer step, ``swap_in_average`` before an eval,
``restore_live`` before the next step, ``metrics`` for the training log, and a
``placement`` that decides where the state lives (``placements_jax``).

JAX is functional, so the averager holds no arrays: it owns three entries of
the optimizer-state dict it is handed, which AlgoPerf checkpoints with the
rest of that pytree:

- ``"averaging"``: the :class:`~polyak.averaging.lawa_ema_jax.AveragingState`,
  on its placement's ``home``;
- ``"live"``: the slot for the live weights while the average is out for eval;
- ``"swapped"``: whether the average is out.

``swap_in_average`` moves the live weights into the slot and returns the
average, which AlgoPerf evaluates and then passes back to the next step.
``restore_live`` takes the live weights back from the slot and puts the tree it
was handed into the slot in exchange, so the pytree keeps its structure and
nothing is copied. The flag lives in the pytree (so it survives checkpoints);
its last value is remembered on the host, so ordinary steps never wait on the
device.

With ``"device"`` placement a collection is folded inside the caller's jitted
train step (:meth:`JaxAverager.after_update`): a step is one program, collecting
or not. Steps that do not collect never see the averaging state: the caller
holds it out (:meth:`JaxAverager.split_off`) and puts it back afterwards
(:meth:`JaxAverager.collect`), so they take exactly the arguments of a step
without averaging. (A ``lax.cond`` on the step inside one program would pass
the window and the live slot through every step; on small models their
per-array dispatch cost is most of the averaging overhead.) With ``"host"``
the collection is dispatched after the step, as a CPU program, and the
caller's accelerator programs never see the state.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Sharding

from polyak.averaging import lawa_ema_jax, metrics, placements_jax
from polyak.averaging.config import MODES, TORCH_ONLY_MODES, AveragingConfig, AveragingError

PyTree = Any
State = dict[str, Any]


class JaxAverager:
    """Keeps a LAWA window or an EMA of a params pytree, where the config places it."""

    def __init__(self, config: AveragingConfig, replicated: Sharding) -> None:
        if config.mode in TORCH_ONLY_MODES:
            supported = [mode for mode in MODES if mode not in TORCH_ONLY_MODES]
            raise AveragingError(
                f"averaging={config.mode!r} is implemented for PyTorch only; use the PyTorch "
                f"submission, or one of {supported} with JAX"
            )
        self.config = config
        self.placement = placements_jax.placement_for(config, replicated)
        self.timings = metrics.Timings()
        self._replicated = replicated
        self._last_flag: tuple[Any, bool] | None = None
        self._num_skipped_logged = 0
        # Which weights the last eval got under averaging_select="best" (1: the average).
        self.last_selection: dict[str, float] = {}
        swap_shardings = dict(
            out_shardings=(replicated, replicated, replicated), donate_argnums=(0, 1, 2)
        )
        self._swap = jax.jit(
            functools.partial(_swap_in_average, config),
            in_shardings=(replicated, replicated, replicated),
            **swap_shardings,
        )
        if self.placement.on_host:
            self._swap_with_summary = jax.jit(
                functools.partial(_swap_in_average, config),
                in_shardings=(replicated, replicated, replicated, replicated),
                **swap_shardings,
            )

    # -- the state ------------------------------------------------------------------

    def tracked(self, params: PyTree, model_state: PyTree) -> PyTree:
        """What is averaged: the params, and the float model state if asked."""
        return _tracked(self.config, params, model_state)

    def init_state(self, params: PyTree, model_state: PyTree) -> State:
        """The averager's entries of a fresh optimizer state; params give shapes only.

        Checks first that the state fits where it is placed.
        """
        tracked = self.tracked(params, model_state)
        home = self.placement.home
        placements_jax.check_fits(self.config, tracked, next(iter(home.device_set)))
        state = {
            # The slot for the live weights while the average is out for eval.
            "live": jax.tree.map(jnp.zeros_like, tracked) if self.config.enabled else ((), ()),
            "swapped": jnp.zeros([], jnp.bool_),
        }
        state = jax.device_put(state, self._replicated)
        state["averaging"] = jax.device_put(lawa_ema_jax.init(self.config, tracked), home)
        return state

    def is_swapped(self, state: State) -> bool:
        """Whether the average is out; reads the device only if this host did not set it."""
        flag = state["swapped"]
        if self._last_flag is not None and self._last_flag[0] is flag:
            return self._last_flag[1]
        value = bool(jax.device_get(flag))
        self._last_flag = (flag, value)
        return value

    # -- one training step --------------------------------------------------------------

    def restore_live(
        self, state: State, params: PyTree, model_state: PyTree
    ) -> tuple[State, PyTree, PyTree]:
        """The live weights back from the slot, if the average is out; the tree
        handed in takes their slot (no copy)."""
        if not self.config.enabled or not self.is_swapped(state):
            return state, params, model_state
        start = time.perf_counter()
        live_params, live_model_state = state["live"]
        if self.config.buffers == "average":
            state = {**state, "live": (params, model_state)}
            model_state = live_model_state
        else:
            state = {**state, "live": (params, ())}
        self.timings.record("restore", time.perf_counter() - start)
        return state, live_params, model_state

    def collects_in_step(self, step: int) -> bool:
        """Whether the train step after which ``step`` steps are done folds a collection
        (``"device"`` placement; ``"host"`` collects after it, in :meth:`collect`)."""
        return not self.placement.on_host and self.config.should_collect(step)

    def after_update(
        self, state: State, params: PyTree, model_state: PyTree, *, collect: bool
    ) -> State:
        """Inside the caller's jitted train step, after the update: the live weights
        are training, and, if ``collect``, they are folded into the average."""
        state = {**state, "swapped": jnp.zeros([], jnp.bool_)}
        if collect:
            state["averaging"] = lawa_ema_jax.collect(
                self.config, state["averaging"], self.tracked(params, model_state)
            )
        return state

    def split_off(self, state: State, step: int) -> tuple[State, State]:
        """(held, rest) for the train step after which ``step`` steps are done:
        ``rest`` is what that step's program takes. The live slot is never
        needed there, and the averaging state only when the step folds a
        collection (``"device"`` placement)."""
        keep = {"averaging"} if self.collects_in_step(step) else set()
        held = {k: v for k, v in state.items() if k in _STEP_OPTIONAL and k not in keep}
        return held, {k: v for k, v in state.items() if k not in held}

    def collect(
        self, held: State, state: State, params: PyTree, model_state: PyTree, step: int
    ) -> State:
        """After the train step: puts back what :meth:`split_off` held, folding the
        new weights into it first if ``step`` (counted from 1) is a collection step
        under ``"host"`` placement (dispatched; returns at once)."""
        if self.placement.on_host and self.config.should_collect(step):
            start = time.perf_counter()
            averaging_state = self.placement.collect(
                held["averaging"], self.tracked(params, model_state)
            )
            held = {**held, "averaging": averaging_state}
            self.timings.record("collect", time.perf_counter() - start)
        state = {**state, **held}
        self._last_flag = (state["swapped"], False)
        return state

    # -- the average ----------------------------------------------------------------------

    def swap_in_average(
        self, state: State, params: PyTree, model_state: PyTree
    ) -> tuple[State, PyTree, PyTree]:
        """The average to evaluate, with the live weights moved into the slot."""
        if not self.config.enabled or self.is_swapped(state):
            return state, params, model_state
        start = time.perf_counter()
        if self.placement.on_host:
            averaging_state = state["averaging"]
            state = {k: v for k, v in state.items() if k != "averaging"}
            summary = self.placement.upload_summary(averaging_state)
            state, params, model_state = self._swap_with_summary(
                state, params, model_state, summary
            )
            state = {**state, "averaging": averaging_state}
        else:
            state, params, model_state = self._swap(state, params, model_state)
        self.timings.record("swap", time.perf_counter() - start)
        self._last_flag = (state["swapped"], True)
        return state, params, model_state

    def put_back_live(
        self, state: State, params: PyTree, model_state: PyTree
    ) -> tuple[State, PyTree, PyTree]:
        """Undoes :meth:`swap_in_average` (``averaging_select="best"`` chose the
        live weights): the live weights back, and nothing is out any more."""
        if not self.config.enabled or not self.is_swapped(state):
            return state, params, model_state
        state, params, model_state = self.restore_live(state, params, model_state)
        flag = jax.device_put(jnp.zeros([], jnp.bool_), self._replicated)
        self._last_flag = (flag, False)
        return {**state, "swapped": flag}, params, model_state

    # -- the training log -------------------------------------------------------------------

    def metrics(self, state: State) -> dict[str, float]:
        """Counters and mean timings; never waits for a host fold in flight (the
        next call reports it)."""
        averaging_state = state["averaging"]
        out: dict[str, float] = {}
        counters = (averaging_state.num_collected, averaging_state.num_skipped_nonfinite)
        if all(getattr(c, "is_ready", lambda: True)() for c in counters):
            num_collected, num_skipped = (int(c) for c in counters)
            out["averaging/num_collected"] = num_collected
            out["averaging/num_skipped_nonfinite"] = num_skipped
            if num_skipped > self._num_skipped_logged:
                metrics.warn_nonfinite(num_skipped)
                self._num_skipped_logged = num_skipped
        out.update(self.last_selection)
        out.update(self.timings.drain_ms())
        return out


# The averager's entries a train step can do without (``"swapped"`` it resets).
_STEP_OPTIONAL = frozenset({"averaging", "live"})


def _tracked(config: AveragingConfig, params: PyTree, model_state: PyTree) -> PyTree:
    if config.buffers == "average":
        return (params, model_state)
    return (params, ())


def _swap_in_average(
    config: AveragingConfig,
    state: State,
    params: PyTree,
    model_state: PyTree,
    summary: lawa_ema_jax.Summary | None = None,
) -> tuple[State, PyTree, PyTree]:
    """Loads the average; ``summary`` is the state's, taken on the host (host placement)."""
    if summary is None:
        summary = lawa_ema_jax.summarize(config, state["averaging"])
    tracked = _tracked(config, params, model_state)
    averaged_params, averaged_model_state = lawa_ema_jax.average_of_summary(
        config, summary, tracked
    )
    if config.buffers != "average":
        # The live statistics are evaluated with the average (the paper's
        # choice); the returned tree must not alias the donated input.
        averaged_model_state = jax.tree.map(jnp.copy, model_state)
    new_state = {**state, "live": tracked, "swapped": jnp.ones([], jnp.bool_)}
    return new_state, averaged_params, averaged_model_state
