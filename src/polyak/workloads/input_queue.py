"""A batch iterator that counts what it hands out and can skip ahead cheaply.

Framework-free, so that both the workloads (numpy batches converted for one
framework) and the local loop (the queue handed to ``data_selection``, whose
position a checkpoint records) count and skip batches the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any


def fast_forward(batches: Iterator[Any], num_batches: int) -> None:
    """Advances ``batches`` by ``num_batches``, through its own ``fast_forward`` if it has one.

    An iterator with ``fast_forward`` (say the training stream) skips without
    building the batches it passes over.
    """
    skip = getattr(batches, "fast_forward", None)
    if skip is not None:
        skip(num_batches)
        return
    for _ in range(num_batches):
        next(batches)


class InputQueue:
    """The batches of ``batches``, passed through ``convert`` on demand and counted.

    ``fast_forward(n)`` skips ``n`` batches before conversion (no tensors, no
    device transfers); a resumed run uses it to continue the same stream.
    ``batches_drawn`` counts every batch taken or skipped; with a ``limit`` the
    queue ends after that many.
    """

    def __init__(
        self,
        batches: Iterator[Any],
        convert: Callable[[Any], Any] | None = None,
        limit: int | None = None,
    ) -> None:
        self._batches = batches
        self._convert = convert
        self._limit = limit
        self.batches_drawn = 0

    def fast_forward(self, num_batches: int) -> None:
        fast_forward(self._batches, num_batches)
        self.batches_drawn += num_batches

    def __iter__(self) -> InputQueue:
        return self

    def __next__(self) -> Any:
        if self._limit is not None and self.batches_drawn >= self._limit:
            raise StopIteration
        batch = next(self._batches)
        self.batches_drawn += 1
        return batch if self._convert is None else self._convert(batch)
