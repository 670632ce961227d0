"""The PyTorch twin of the embedded workloads: model, loss, batches, evaluation.

Everything here is shared by ``digits_torch``, ``diabetes_torch`` and
``textlm_torch``; the first two only join this class with their dataset base,
``textlm_torch`` also brings its model (``_build_model``). What needs no
framework (the ``model_fn`` contract, the loss and metric formulas, the eval
loop) is in ``base``. The jax twin is ``common_jax``, with the same names in
the same order.

- ``init_model_fn(rng)`` builds a fresh model (an MLP unless
  ``_build_model`` says otherwise) and initializes it from a
  ``torch.Generator`` seeded by :func:`polyak.workloads.prng.torch_seed`, so it
  accepts a Python int, an AlgoPerf numpy key or a jax key and never touches
  the global torch RNG. Weights are uniform in ±1/√fan_in (torch's default
  bound), biases zero, BatchNorm scale one and shift zero: the same
  distribution as the jax twin. Under ``torch.distributed`` the module is
  wrapped in DDP.
- Dropout draws its masks from a generator seeded by the ``rng`` passed to
  ``model_fn`` (and the rank), so a step's masks depend only on its rng, as in
  jax. Without an rng it falls back to the global torch RNG.
- ``update_batch_norm=False`` in TRAIN mode normalizes with batch statistics
  but leaves the running statistics alone (momentum 0 for that call), as
  AlgoPerf's ``update_batch_norm_fn`` does.
- Batches are global; under DDP each rank keeps its contiguous slice, and eval
  sums are all-reduced.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from polyak.algoperf import spec
from polyak.distributed_torch import all_reduce_sum, is_distributed, rank_and_world
from polyak.workloads import prng
from polyak.workloads.base import EmbeddedWorkload, parameter_type


def default_device() -> torch.device:
    if torch.cuda.is_available():
        rank, _ = rank_and_world()
        return torch.device(f"cuda:{rank % torch.cuda.device_count()}")
    return torch.device("cpu")


def dropout(
    x: torch.Tensor, rate: float, training: bool, generator: torch.Generator | None
) -> torch.Tensor:
    if not training or rate == 0.0:
        return x
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate={rate!r} must lie in [0, 1)")
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= rate
    return x * keep / (1.0 - rate)


class MLP(nn.Module):
    """dense_i → (bn_i) → ReLU → dropout, repeated, then ``output``."""

    def __init__(
        self,
        num_features: int,
        hidden_widths: tuple[int, ...],
        num_outputs: int,
        use_batch_norm: bool,
    ) -> None:
        super().__init__()
        self._depth = len(hidden_widths)
        self._use_batch_norm = use_batch_norm
        width_in = num_features
        for index, width in enumerate(hidden_widths, start=1):
            setattr(self, f"dense{index}", nn.Linear(width_in, width))
            if use_batch_norm:
                setattr(self, f"bn{index}", nn.BatchNorm1d(width))
            width_in = width
        self.output = nn.Linear(width_in, num_outputs)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.in_features)
                weight = torch.empty(module.weight.shape).uniform_(
                    -bound, bound, generator=generator
                )
                module.weight.copy_(weight)
                module.bias.zero_()
            elif isinstance(module, nn.BatchNorm1d):
                module.reset_parameters()

    def forward(
        self,
        inputs: torch.Tensor,
        dropout_rate: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        x = inputs
        for index in range(1, self._depth + 1):
            x = getattr(self, f"dense{index}")(x)
            if self._use_batch_norm:
                x = getattr(self, f"bn{index}")(x)
            x = F.relu(x)
            x = dropout(x, dropout_rate, self.training, generator)
        return self.output(x)


@contextlib.contextmanager
def _frozen_batch_norm_statistics(model: nn.Module, frozen: bool) -> Iterator[None]:
    if not frozen:
        yield
        return
    saved = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            saved.append((module, module.momentum))
            module.momentum = 0.0
    try:
        yield
    finally:
        for module, momentum in saved:
            module.momentum = momentum


class TorchEmbeddedWorkload(EmbeddedWorkload):
    framework = "pytorch"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._device = default_device()

    # ---- model ----------------------------------------------------------------

    def init_model_fn(self, rng: spec.RandomState) -> spec.ModelInitState:
        """A fresh model initialized from ``rng`` (int, numpy key or jax key)."""
        generator = torch.Generator().manual_seed(prng.torch_seed(rng))
        # Module construction draws a default init from the global RNG; keep that draw private.
        with torch.random.fork_rng(devices=[]):
            model = self._build_model()
        model.reset_parameters(generator)
        self._param_shapes = {
            name: spec.ShapeTuple(tuple(p.shape)) for name, p in model.named_parameters()
        }
        self._param_types = {
            name: parameter_type(tuple(name.split("."))) for name in self._param_shapes
        }
        model.to(self._device)
        if is_distributed():
            device_ids = [self._device.index] if self._device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids)
        self._model = model
        return model, None

    def _build_model(self) -> nn.Module:
        """The untrained module; ``init_model_fn`` initializes it by ``reset_parameters``."""
        return MLP(self.num_features, self.hidden_widths, self.num_outputs, self.use_batch_norm)

    def is_output_params(self, param_key: spec.ParameterKey) -> bool:
        return param_key in ("output.weight", "output.bias")

    def _dropout_generator(self, rng: spec.RandomState) -> torch.Generator | None:
        if rng is None:
            return None
        rank, _ = rank_and_world()
        seed = prng.torch_seed([*prng.rng_words(rng), rank])
        return torch.Generator(device=self._device).manual_seed(seed)

    def _forward(
        self,
        params: spec.ParameterContainer,
        inputs: spec.Tensor,
        model_state: spec.ModelAuxiliaryState,
        train: bool,
        rng: spec.RandomState,
        update_batch_norm: bool,
        dropout_rate: float,
    ) -> tuple[spec.Tensor, spec.ModelAuxiliaryState]:
        del model_state  # BatchNorm statistics live in the module
        model = params
        if not train:
            model.eval()
            with torch.no_grad():
                return model(inputs), None
        model.train()
        dropout_rate = float(dropout_rate or 0.0)
        generator = self._dropout_generator(rng) if dropout_rate > 0.0 else None
        with _frozen_batch_norm_statistics(model, frozen=not update_batch_norm):
            logits = model(inputs, dropout_rate=dropout_rate, generator=generator)
        return logits, None

    # ---- array operations for the loss and metrics -----------------------------

    def _softmax_cross_entropy(
        self, labels: torch.Tensor, logits: torch.Tensor, label_smoothing: float
    ) -> torch.Tensor:
        # F.cross_entropy wants classes on dim 1; flattening also serves sequences.
        per_prediction = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels.reshape(-1).long(),
            reduction="none",
            label_smoothing=float(label_smoothing),
        )
        return per_prediction.reshape(labels.shape)

    def _squared_error(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        targets = labels.reshape(logits.shape).to(logits.dtype)
        return ((logits - targets) ** 2).sum(dim=-1)

    def _argmax(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1)

    def _cast(self, array: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return array.to(dtype)

    def _scalar_like(self, value: float, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(float(value), dtype=like.dtype, device=like.device)

    # ---- evaluation -------------------------------------------------------------

    def _eval_batch_sums(
        self, params: Any, batch: dict[str, Any], model_state: Any
    ) -> dict[str, float]:
        with torch.no_grad():
            sums = self._summed_eval_metrics(params, model_state, batch)
            names = sorted(sums)
            stacked = torch.stack([sums[name].to(torch.float64) for name in names])
        return dict(zip(names, all_reduce_sum(stacked).tolist(), strict=True))

    # ---- batches ------------------------------------------------------------

    def _to_framework_batch(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        rank, world = rank_and_world()
        size = batch["inputs"].shape[0]
        if size % world:
            raise ValueError(
                f"global batch size {size} is not divisible by the {world} DDP processes"
            )
        per_rank = size // world
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        input_dtype = torch.long if self._token_inputs else torch.float32
        target_dtype = (
            torch.long if self.loss_type == spec.LossType.SOFTMAX_CROSS_ENTROPY else torch.float32
        )
        converted = {
            "inputs": torch.tensor(batch["inputs"][rows], dtype=input_dtype),
            "targets": torch.tensor(batch["targets"][rows], dtype=target_dtype),
        }
        if "weights" in batch:
            converted["weights"] = torch.tensor(batch["weights"][rows], dtype=torch.float32)
        return {key: value.to(self._device) for key, value in converted.items()}
