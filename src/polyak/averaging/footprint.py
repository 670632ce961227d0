"""Whether an averaging state fits, checked before any of it is allocated.

A LAWA (or TWA) window holds L copies of the weights: for Criteo's 2.1 GB embedding,
L = 20 replicated is about 43 GB per rank. Running out of memory an hour into
a run is the worst way to learn that, so both backends estimate their bytes
from the tracked shapes at init and fail with a message that names the
hyperparameters and the ways out.

Framework-free: the backends pass element counts and byte sizes, and ask
for the memory available where the state would live.
"""

from __future__ import annotations

import dataclasses
import os

from polyak.averaging.config import AveragingConfig, AveragingError


class AveragingMemoryError(AveragingError):
    """The averaging state would not fit in the memory where it is placed."""


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Bytes of one averaging state: what persists, and what an eval adds."""

    window: int = 0
    accumulator: int = 0
    staging: int = 0
    eval_buffers: int = 0

    @property
    def total(self) -> int:
        return self.window + self.accumulator + self.staging + self.eval_buffers


def estimate(
    config: AveragingConfig,
    num_elements: int,
    weight_bytes: int,
    *,
    staging: bool = False,
    stash: bool = True,
    world: int = 1,
) -> Footprint:
    """The bytes one rank holds for ``config``.

    ``num_elements`` and ``weight_bytes`` describe the tracked tensors (their
    element count and their size in their own dtypes). Snapshots keep the
    weights' dtype, accumulators are fp32. ``staging`` adds the buffer a
    host placement copies into; ``stash`` the copy of the live weights kept
    while the average is out for eval. ``world`` > 1 divides the persistent
    state by the number of ranks holding a slice each.
    """
    if not config.enabled:
        return Footprint()
    shard = -(-num_elements // world)
    shard_bytes = -(-weight_bytes // world)
    window = config.window * shard_bytes if config.keeps_window else 0
    accumulator = 4 * shard
    staged = shard_bytes if staging else 0
    # A sharded average is gathered whole (fp32) before it is loaded.
    gathered = 4 * shard * world if world > 1 else 0
    # TWA's fit holds θ̄ and K − 1 basis rows (fp32, this rank's slice) at eval.
    subspace = 4 * shard * config.window if config.mode == "twa" else 0
    return Footprint(
        window=window,
        accumulator=accumulator,
        staging=staged,
        eval_buffers=(weight_bytes if stash else 0) + gathered + subspace,
    )


def available_host_bytes() -> int | None:
    """Memory the OS could give this process now (MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits(
    config: AveragingConfig, needed: Footprint, available: int | None, where: str
) -> None:
    """Raises :class:`AveragingMemoryError` if ``needed`` exceeds ``available``.

    ``available`` None means the platform cannot tell; then nothing is checked.
    """
    if available is None or needed.total <= available:
        return
    settings = f"averaging={config.mode!r}"
    if config.keeps_window:
        settings += f", lawa_window={config.window}"
    settings += f", averaging_placement={config.placement!r}"
    ways_out = []
    if config.keeps_window:
        ways_out.append("a smaller lawa_window")
        ways_out.append("averaging='ema' (one copy instead of L)")
    if config.placement != "sharded":
        ways_out.append("averaging_placement='sharded' (1/world per rank under DDP)")
    if config.placement != "host":
        ways_out.append("averaging_placement='host' (CPU memory)")
    raise AveragingMemoryError(
        f"{settings} needs {_gib(needed.total)} of {where} memory "
        f"(window {_gib(needed.window)}, accumulator {_gib(needed.accumulator)}, "
        f"staging {_gib(needed.staging)}, eval {_gib(needed.eval_buffers)}), "
        f"but only {_gib(available)} is available; try " + ", or ".join(ways_out)
    )


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB"
