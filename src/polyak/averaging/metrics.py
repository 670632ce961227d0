"""What averaging reports to the training log: what it costs and what it skipped.

Averaging has to cost nothing measurable, so its three moments are timed:
collection (on the step path), swap (in ``prepare_for_eval``) and restore
(at the next step). A background fold is timed too, though it overlaps the
step. Times are host wall-clock: with an accelerator they are what the step
path waits, not the device time of the copies.

Non-finite weights are skipped, never collected; a warning says so, at most
once a minute, so a diverging run does not flood the log.
"""

from __future__ import annotations

import threading

from absl import logging

PREFIX = "averaging/"
NONFINITE_WARNING_SECONDS = 60


class Timings:
    """Mean milliseconds per event since the last :meth:`drain_ms`; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def record(self, name: str, seconds: float) -> None:
        with self._lock:
            self._seconds[name] = self._seconds.get(name, 0.0) + seconds
            self._counts[name] = self._counts.get(name, 0) + 1

    def drain_ms(self) -> dict[str, float]:
        """``{"averaging/<name>_ms": mean}`` for each event seen since the last call."""
        with self._lock:
            means = {
                f"{PREFIX}{name}_ms": 1e3 * total / self._counts[name]
                for name, total in self._seconds.items()
            }
            self._seconds.clear()
            self._counts.clear()
        return means


def warn_nonfinite(num_skipped: int) -> None:
    """Logs that non-finite weights were left out of the average (rate-limited)."""
    logging.log_every_n_seconds(
        logging.WARNING,
        "averaging: non-finite weights were not collected (%d collection(s) skipped so far); "
        "the average keeps only finite snapshots",
        NONFINITE_WARNING_SECONDS,
        num_skipped,
    )
