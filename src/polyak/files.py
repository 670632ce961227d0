"""Atomic file writes: a reader sees the old file or the whole new one, never half.

Every file polyak writes (runner tables, loop logs, checkpoints, exports) goes
through here. The bytes go to a temporary sibling of the target, are flushed to
disk, and replace the target with ``os.replace``. If anything fails on the way,
the temporary file is removed and the target is untouched.

A leaf module: it imports nothing of polyak, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, durable: bool = True) -> Iterator[str]:
    """A temporary sibling of ``path`` to write by name; replaces ``path`` on a clean exit.

    For writers that take a file name or open the file themselves
    (``torch.save``, ``pickle.dump`` through ``open``). ``durable`` flushes the
    bytes to disk before the replace, so the file survives a power loss too;
    the replace alone already guarantees readers never see half a file, which
    is all a log rewritten on every training step needs (an fsync there costs
    about 10 ms of submission time per write).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield tmp_name
        if durable:
            with open(tmp_name, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str], mode: str = "w", *, durable: bool = True
) -> Iterator[IO[Any]]:
    """Opens a temporary sibling of ``path``; on a clean exit it replaces ``path``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode={mode!r}; expected 'w' or 'wb'")
    kwargs: dict[str, Any] = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
    with atomic_path(path, durable=durable) as tmp_name, open(tmp_name, mode, **kwargs) as handle:
        yield handle
        handle.flush()


def atomic_write_text(path: str | os.PathLike[str], text: str, *, durable: bool = True) -> None:
    with atomic_open(path, "w", durable=durable) as handle:
        handle.write(text)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_json(path: str | os.PathLike[str], payload: Any) -> None:
    with atomic_open(path, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, allow_nan=True, default=str)
        handle.write("\n")
