"""The JAX side of the local loop: rng keys, clocks, checkpoint contents.

The loop itself (``loop.py``) is framework-free; it asks a
:class:`~polyak.workloads.loop.LoopBackend` for these few things. This one
never imports torch: rng keys are ``jax.random`` keys, as in AlgoPerf's JAX
path.

Dispatch is asynchronous, so :meth:`JaxLoopBackend.block` waits for every
array the submission returned before the clock stops; otherwise a step's cost
would be billed to whatever synchronizes next (often the untimed eval).

Checkpoints follow AlgoPerf's contract that ``optimizer_state`` is the 2-tuple
``(pytree, update_fn)``: the pytree, params and model_state are saved as lists
of numpy leaves (with their tree structure for a check). Restoring pours the
leaves into the structure of a freshly initialized state, with each fresh
leaf's sharding, and keeps the fresh ``update_fn``.
"""

from __future__ import annotations

import pickle
import time
from typing import Any

import jax
import numpy as np

from polyak.workloads.loop import LoopBackend


class CheckpointMismatchError(ValueError):
    """A checkpoint whose trees do not fit the freshly initialized state."""


def _first_difference(saved: str, fresh: str, context: int = 60) -> tuple[str, str]:
    """Both texts around where they first differ: a whole PyTreeDef is unreadably long."""
    index = next(
        (i for i, (a, b) in enumerate(zip(saved, fresh)) if a != b), min(len(saved), len(fresh))
    )
    start = max(0, index - context)
    return saved[start : index + context], fresh[start : index + context]


class JaxLoopBackend(LoopBackend):
    framework = "jax"

    def set_cpu_threads(self, num_threads: int | None) -> int:
        del num_threads  # XLA sizes its CPU thread pool at start-up
        return 0

    # ---- rng ------------------------------------------------------------------

    def prng_key(self, seed: int) -> jax.Array:
        return jax.random.PRNGKey(seed)

    def split(self, key: Any, num: int) -> list[jax.Array]:
        return list(jax.random.split(key, num))

    def fold_in(self, key: Any, data: int) -> jax.Array:
        return jax.random.fold_in(key, data)

    # ---- devices and clocks -------------------------------------------------------

    def num_data_shards(self) -> int:
        return jax.device_count()

    def is_primary(self) -> bool:
        return jax.process_index() == 0

    def now(self) -> float:
        return time.perf_counter()

    def block(self, tree: Any) -> None:
        for leaf in jax.tree_util.tree_leaves(tree):
            if isinstance(leaf, jax.Array):
                leaf.block_until_ready()

    # ---- global rng state -------------------------------------------------------

    def seed_global_rng(self, seed: int) -> None:
        del seed  # jax has no global rng state

    def capture_rng_state(self) -> dict[str, Any]:
        return {}  # jax has no global rng state

    def restore_rng_state(self, state: dict[str, Any]) -> None:
        del state

    # ---- checkpoints -------------------------------------------------------------

    def _saved_states(
        self, optimizer_state: Any, model_params: Any, model_state: Any
    ) -> dict[str, Any]:
        opt_pytree, _ = _split_optimizer_state(optimizer_state)
        return {
            "optimizer_state": _tree_to_numpy(opt_pytree),
            "model_params": _tree_to_numpy(model_params),
            "model_state": _tree_to_numpy(model_state),
        }

    def _restored_states(
        self, saved: dict[str, Any], optimizer_state: Any, model_params: Any, model_state: Any
    ) -> tuple[Any, Any, Any]:
        opt_pytree, update_fn = _split_optimizer_state(optimizer_state)
        return (
            (_numpy_into_tree(saved["optimizer_state"], opt_pytree, "optimizer_state"), update_fn),
            _numpy_into_tree(saved["model_params"], model_params, "params"),
            _numpy_into_tree(saved["model_state"], model_state, "model_state"),
        )

    def _write(self, payload: dict[str, Any], path: str) -> None:
        with open(path, "wb") as file:
            pickle.dump(payload, file, protocol=pickle.HIGHEST_PROTOCOL)

    def _read(self, path: str) -> dict[str, Any]:
        with open(path, "rb") as file:
            return pickle.load(file)


def _split_optimizer_state(optimizer_state: Any) -> tuple[Any, Any]:
    if not (isinstance(optimizer_state, tuple) and len(optimizer_state) == 2):
        raise ValueError(
            "a JAX optimizer_state must be the 2-tuple (pytree, update_fn) that AlgoPerf's "
            f"checkpointing unpacks; got {type(optimizer_state).__name__}"
        )
    return optimizer_state


def _tree_to_numpy(tree: Any) -> dict[str, Any]:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return {
        "leaves": [np.asarray(jax.device_get(leaf)) for leaf in leaves],
        "structure": str(treedef),
    }


def _numpy_into_tree(saved: dict[str, Any], fresh: Any, what: str) -> Any:
    fresh_leaves, treedef = jax.tree_util.tree_flatten(fresh)
    saved_leaves = saved["leaves"]
    if len(saved_leaves) != len(fresh_leaves) or saved["structure"] != str(treedef):
        saved_text, fresh_text = _first_difference(saved["structure"], str(treedef))
        raise CheckpointMismatchError(
            f"checkpointed {what} does not fit the fresh state: {len(saved_leaves)} leaves "
            f"against {len(fresh_leaves)}, first differing at ...{saved_text}... (checkpoint) "
            f"against ...{fresh_text}... (fresh); it was saved by code with another state "
            "layout, so start this run over (a new experiment folder, or --overwrite)"
        )
    restored = []
    for index, (value, fresh_leaf) in enumerate(zip(saved_leaves, fresh_leaves, strict=True)):
        fresh_shape = np.shape(fresh_leaf)
        if value.shape != fresh_shape:
            raise CheckpointMismatchError(
                f"checkpointed {what} leaf {index} has shape {value.shape}; expected {fresh_shape}"
            )
        if isinstance(fresh_leaf, jax.Array):
            value = value.astype(fresh_leaf.dtype)
            # An uncommitted leaf (say a step count made outside jit) must stay
            # uncommitted, or jit would refuse to mix it with replicated params.
            if _is_committed(fresh_leaf):
                restored.append(jax.device_put(value, fresh_leaf.sharding))
            else:
                restored.append(jax.device_put(value))
        elif isinstance(fresh_leaf, np.ndarray):
            restored.append(value.astype(fresh_leaf.dtype))
        else:
            restored.append(type(fresh_leaf)(value.item()))
    return jax.tree_util.tree_unflatten(treedef, restored)


def _is_committed(array: jax.Array) -> bool:
    return bool(getattr(array, "committed", getattr(array, "_committed", True)))
