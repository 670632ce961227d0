"""Where a JAX averaging state lives: beside the params, or in host memory.

The twin of ``placements_torch``. Both placements hold the same
:class:`~polyak.averaging.lawa_ema_jax.AveragingState` and run the same
``lawa_ema_jax`` functions, so they give the same averages, bit for bit.

- :class:`DevicePlacement` (``"device"``, and ``"sharded"``, which JAX treats
  as ``"device"``): the state is replicated beside the params, and a
  collection is folded inside the train step's jitted program.
- :class:`HostPlacement` (``"host"``): the state sits on the CPU device. After
  the train step the new params are copied there with an asynchronous
  ``device_put`` and folded by a jitted CPU program, so accelerator memory
  holds no window and the step path never waits. The accelerator programs
  never see the state; the swap uploads only the window's sum (or the EMA) and the count.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import Sharding, SingleDeviceSharding

from polyak.averaging import footprint, lawa_ema_jax
from polyak.averaging.config import AveragingConfig, AveragingError

PyTree = Any


class DevicePlacement:
    """The state replicated beside the params; collections fold inside the train step."""

    on_host = False

    def __init__(self, config: AveragingConfig, replicated: Sharding) -> None:
        self.config = config
        self.home = replicated
        if config.enabled and config.placement == "sharded":
            logging.info(
                "averaging_placement='sharded' is implemented for PyTorch DDP; "
                "JAX keeps the averaging state replicated, as 'device' does"
            )


class HostPlacement:
    """The state on the CPU device, folded there by its own jitted program."""

    on_host = True

    def __init__(self, config: AveragingConfig, replicated: Sharding) -> None:
        self.config = config
        self.replicated = replicated
        self.home = SingleDeviceSharding(_cpu_device())
        self._collect = jax.jit(
            functools.partial(lawa_ema_jax.collect, config),
            in_shardings=(self.home, self.home),
            out_shardings=self.home,
            donate_argnums=(0,),
        )
        self._summarize = jax.jit(
            functools.partial(lawa_ema_jax.summarize, config),
            in_shardings=(self.home,),
            out_shardings=self.home,
        )

    def to_home(self, averaging_state: lawa_ema_jax.AveragingState) -> Any:
        """The state on the CPU device; a restored checkpoint hands back arrays elsewhere."""
        leaf = averaging_state.num_collected
        if getattr(leaf, "sharding", None) != self.home:
            averaging_state = jax.device_put(averaging_state, self.home)
        return averaging_state

    def collect(self, averaging_state: Any, tracked: PyTree) -> Any:
        """Folds ``tracked`` into the host state; dispatches and returns at once."""
        snapshot = _copy_to(tracked, self.home)
        return self._collect(self.to_home(averaging_state), snapshot)

    def upload_summary(self, averaging_state: Any) -> lawa_ema_jax.Summary:
        """The window's sum (or the EMA) and the count, summed on the host and on
        their way to the accelerators. The swap divides there, in the same
        program as the device placement: XLA's division is not correctly
        rounded, and its result depends on how the program around it is compiled."""
        summary = self._summarize(self.to_home(averaging_state))
        return jax.device_put(summary, self.replicated)


Placement = DevicePlacement | HostPlacement


def placement_for(config: AveragingConfig, replicated: Sharding) -> Placement:
    """The placement ``config.placement`` asks for (none is needed when averaging is off)."""
    if config.enabled and config.placement == "host":
        return HostPlacement(config, replicated)
    return DevicePlacement(config, replicated)


def state_footprint(config: AveragingConfig, tracked: PyTree) -> footprint.Footprint:
    """The bytes ``lawa_ema_jax.init`` allocates, plus the snapshot and the average in
    flight. The fp32 accumulator counts for LAWA too: JAX keeps no running sum,
    but the swap materializes one."""
    leaves = jax.tree.leaves(tracked)
    num_elements = sum(math.prod(x.shape) for x in leaves)
    weight_bytes = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves)
    return footprint.estimate(
        config, num_elements, weight_bytes, staging=config.placement == "host", stash=True
    )


def check_fits(config: AveragingConfig, tracked: PyTree, device: jax.Device) -> None:
    """Raises :class:`~polyak.averaging.footprint.AveragingMemoryError` if the state
    would not fit on ``device``.

    Host placement is checked against the host's available memory; an
    accelerator against what its allocator reports free (when it reports).
    """
    if not config.enabled:
        return
    if device.platform == "cpu":
        available = footprint.available_host_bytes()
    else:
        stats = device.memory_stats() or {}
        limit, in_use = stats.get("bytes_limit"), stats.get("bytes_in_use", 0)
        available = None if limit is None else limit - in_use
    footprint.check_fits(
        config, state_footprint(config, tracked), available, f"{device.platform} device"
    )


def _cpu_device() -> jax.Device:
    try:
        return jax.devices("cpu")[0]
    except RuntimeError as error:
        raise AveragingError(
            "averaging_placement='host' needs JAX's CPU backend; include 'cpu' in "
            "JAX_PLATFORMS (for example JAX_PLATFORMS=cuda,cpu)"
        ) from error


def _copy_to(tree: PyTree, sharding: Sharding) -> PyTree:
    """An asynchronous copy that never aliases ``tree``, whose buffers get donated."""
    try:
        return jax.device_put(tree, sharding, may_alias=False)
    except TypeError:  # jax without may_alias: copy on the source first
        return jax.device_put(jax.tree.map(jnp.copy, tree), sharding)
