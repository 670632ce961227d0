"""The PyTorch side of the local loop: rng keys, clocks, checkpoint contents.

The loop itself (``loop.py``) is framework-free; it asks a
:class:`~polyak.workloads.loop.LoopBackend` for these few things. This one
never imports jax: rng keys are AlgoPerf-style numpy ``int32[2]`` keys from
:mod:`polyak.workloads.prng`.

Checkpoints follow AlgoPerf's ``checkpoint_utils``: the module's
``state_dict()`` (unwrapped from DDP / ``torch.compile``), and
``state_dict()`` of every value of ``optimizer_state`` (values without one are
skipped with a warning, as AlgoPerf does). Restoring calls
``load_state_dict`` on the values of a freshly initialized optimizer state.
The global torch RNG state is saved too, so a resumed run is bit-identical.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from polyak.distributed_torch import is_distributed, rank_and_world, unwrap_module
from polyak.workloads import prng
from polyak.workloads.loop import LoopBackend


class TorchLoopBackend(LoopBackend):
    framework = "pytorch"

    def set_cpu_threads(self, num_threads: int | None) -> int:
        previous = torch.get_num_threads()
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        return previous

    # ---- rng ------------------------------------------------------------------

    def prng_key(self, seed: int) -> np.ndarray:
        return prng.prng_key(seed)

    def split(self, key: Any, num: int) -> list[np.ndarray]:
        return list(prng.split(key, num))

    def fold_in(self, key: Any, data: int) -> np.ndarray:
        return prng.fold_in(key, data)

    # ---- devices and clocks -------------------------------------------------------

    def num_data_shards(self) -> int:
        return rank_and_world()[1]

    def is_primary(self) -> bool:
        return rank_and_world()[0] == 0

    def now(self) -> float:
        """Wall time, after pending GPU work; the max over ranks under DDP."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        if is_distributed():
            # Every rank must take the same budget and eval decisions.
            tensor = torch.tensor([now], dtype=torch.float64)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            now = float(tensor.item())
        return now

    def block(self, tree: Any) -> None:
        del tree  # torch runs eagerly on CPU; now() synchronizes CUDA.

    # ---- global rng state -------------------------------------------------------

    def seed_global_rng(self, seed: int) -> None:
        torch.manual_seed(seed)

    def capture_rng_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def restore_rng_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    # ---- checkpoints -------------------------------------------------------------

    def _saved_states(
        self, optimizer_state: Any, model_params: Any, model_state: Any
    ) -> dict[str, Any]:
        optimizer_state_dicts = {}
        for key, value in optimizer_state.items():
            if hasattr(value, "state_dict"):
                optimizer_state_dicts[key] = value.state_dict()
            else:
                warnings.warn(
                    f"optimizer_state[{key!r}] of type {type(value).__name__} has no "
                    "state_dict(); it is not checkpointed (as in AlgoPerf)",
                    stacklevel=3,
                )
        return {
            "optimizer_state": optimizer_state_dicts,
            "model_params": unwrap_module(model_params).state_dict(),
            "model_state": model_state,
        }

    def _restored_states(
        self, saved: dict[str, Any], optimizer_state: Any, model_params: Any, model_state: Any
    ) -> tuple[Any, Any, Any]:
        del model_state  # the saved one is taken whole
        # The module first, then the optimizer-state values that refer to its parameters.
        unwrap_module(model_params).load_state_dict(saved["model_params"])
        for key, value in optimizer_state.items():
            if key in saved["optimizer_state"]:
                value.load_state_dict(saved["optimizer_state"][key])
        return optimizer_state, model_params, saved["model_state"]

    def _write(self, payload: dict[str, Any], path: str) -> None:
        torch.save(payload, path)

    def _read(self, path: str) -> dict[str, Any]:
        return torch.load(path, map_location="cpu", weights_only=False)
