"""Framework-free random keys for the PyTorch path, and seeds from any AlgoPerf rng.

AlgoPerf hands PyTorch code numpy "keys" (pairs of non-negative int32) made by
``random_utils`` with numpy, and JAX code ``jax.random`` keys. The PyTorch path
here must not import jax, so it gets its own small key algebra with the same
shape and range as AlgoPerf's numpy keys: :func:`prng_key`, :func:`split` and
:func:`fold_in`. They are built on numpy's ``SeedSequence``, which is stable
across platforms and numpy versions.

:func:`torch_seed` turns any rng a workload may receive (a Python int, a numpy
key, a raw ``uint32[2]`` jax key or a typed jax key) into a 63-bit seed for a
``torch.Generator``: the key's 32-bit words go through ``SeedSequence`` and two
output words form the seed. Equal keys give equal seeds; a typed jax key is
read through ``jax.random.key_data`` only if jax is already loaded, since one
cannot exist otherwise.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

_WORD_MASK = 0xFFFFFFFF
_SPLIT_TAG = 1
_FOLD_IN_TAG = 2


def rng_words(rng: Any) -> list[int]:
    """The 32-bit words of an rng of any supported kind."""
    if rng is None:
        raise ValueError("rng is None; expected an int, a numpy key or a jax key")
    if isinstance(rng, (bool, np.bool_)):
        raise ValueError(f"rng={rng!r} is a bool; expected an int or a key array")
    if isinstance(rng, (int, np.integer)):
        value = int(rng)
        return [value & _WORD_MASK, (value >> 32) & _WORD_MASK]
    dtype = getattr(rng, "dtype", None)
    if dtype is not None and "key" in str(dtype):
        jax = sys.modules.get("jax")
        if jax is None:  # pragma: no cover - a typed key implies jax is loaded
            raise ValueError(f"cannot read typed key {rng!r} without jax")
        rng = jax.random.key_data(rng)
    array = np.asarray(rng)
    if array.size == 0 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"rng of dtype {array.dtype} and shape {array.shape} is not a key; "
            "expected a non-empty integer array"
        )
    return [int(word) & _WORD_MASK for word in array.ravel().tolist()]


def _derive(words: list[int], count: int) -> np.ndarray:
    state = np.random.SeedSequence(words).generate_state(2 * count, dtype=np.uint32)
    # Non-negative int32, the range AlgoPerf's numpy keys use.
    return (state >> 1).astype(np.int32).reshape(count, 2)


def prng_key(seed: int) -> np.ndarray:
    """A key from an integer seed: int32[2] with non-negative entries."""
    return _derive([*rng_words(seed), 0], 1)[0]


def split(key: Any, num: int = 2) -> np.ndarray:
    """``num`` independent keys derived from ``key``: int32[num, 2]."""
    if num < 1:
        raise ValueError(f"num={num!r} must be >= 1")
    return _derive([*rng_words(key), _SPLIT_TAG, num], num)


def fold_in(key: Any, data: int) -> np.ndarray:
    """A key derived from ``key`` and an integer (a step number)."""
    return _derive([*rng_words(key), _FOLD_IN_TAG, int(data) & _WORD_MASK], 1)[0]


def torch_seed(rng: Any) -> int:
    """A deterministic seed in [0, 2**63) for ``torch.Generator.manual_seed``."""
    low, high = np.random.SeedSequence(rng_words(rng)).generate_state(2, dtype=np.uint32)
    return ((int(high) << 32) | int(low)) & (2**63 - 1)
