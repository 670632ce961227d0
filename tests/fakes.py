"""Tiny workloads and optimizers for testing the AlgoPerf builders in isolation.

A linear least-squares model with one BatchNorm-like float buffer, in both
frameworks, and plain SGD factories with the optimizer-factory signatures.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from polyak.algoperf import spec
from polyak.hyperparameters import lookup

IN_DIM, OUT_DIM, BATCH = 5, 3, 16
STEP_HINT = 40


def batches(seed: int, n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    true_w = rng.normal(size=(IN_DIM, OUT_DIM))
    out = []
    for _ in range(n):
        x = rng.normal(size=(BATCH, IN_DIM)).astype(np.float32)
        y = (x @ true_w + 0.1 * rng.normal(size=(BATCH, OUT_DIM))).astype(np.float32)
        out.append({"inputs": x, "targets": y})
    return out


class TorchLinearWorkload:
    """Enough of the Workload interface for update_params and prepare_for_eval."""

    step_hint = STEP_HINT
    metrics_logger = None

    def init_model_fn(self, seed: int = 0) -> Any:
        import torch

        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(IN_DIM, OUT_DIM))
        model.register_buffer("running_scale", torch.ones(OUT_DIM))
        return model, None

    def model_fn(
        self,
        params,
        augmented_and_preprocessed_input_batch,
        model_state,
        mode,
        rng,
        update_batch_norm,
        dropout_rate,
    ):
        import torch

        x = torch.as_tensor(augmented_and_preprocessed_input_batch["inputs"])
        out = params(x)
        if update_batch_norm and mode == spec.ForwardPassMode.TRAIN:
            with torch.no_grad():
                params.running_scale.mul_(0.9).add_(0.1 * out.detach().std(0))
        return out, model_state

    def loss_fn(self, label_batch, logits_batch, mask_batch=None, label_smoothing=0.0):
        import torch

        per_example = ((logits_batch - torch.as_tensor(label_batch)) ** 2).sum(-1)
        return {
            "summed": per_example.sum(),
            "n_valid_examples": torch.tensor(float(per_example.shape[0])),
            "per_example": per_example,
        }


class JaxLinearWorkload:
    step_hint = STEP_HINT
    metrics_logger = None

    def init_model_fn(self, seed: int = 0) -> Any:
        import jax.numpy as jnp

        rng = np.random.default_rng(seed)
        params = {
            "kernel": jnp.asarray(rng.normal(size=(IN_DIM, OUT_DIM)) * 0.3, jnp.float32),
            "bias": jnp.zeros((OUT_DIM,), jnp.float32),
        }
        model_state = {"running_scale": jnp.ones((OUT_DIM,), jnp.float32)}
        return params, model_state

    def model_fn(
        self,
        params,
        augmented_and_preprocessed_input_batch,
        model_state,
        mode,
        rng,
        update_batch_norm,
        dropout_rate,
    ):
        import jax

        x = augmented_and_preprocessed_input_batch["inputs"]
        out = x @ params["kernel"] + params["bias"]
        if update_batch_norm and mode == spec.ForwardPassMode.TRAIN:
            scale = 0.9 * model_state["running_scale"] + 0.1 * jax.lax.stop_gradient(out.std(0))
            model_state = {"running_scale": scale}
        return out, model_state

    def loss_fn(self, label_batch, logits_batch, mask_batch=None, label_smoothing=0.0):
        import jax.numpy as jnp

        per_example = ((logits_batch - label_batch) ** 2).sum(-1)
        return {
            "summed": per_example.sum(),
            "n_valid_examples": jnp.asarray(per_example.shape[0], jnp.float32),
            "per_example": per_example,
        }


@dataclasses.dataclass(frozen=True)
class SGDConfig:
    """The optimizer-config protocol of the builders, for plain SGD."""

    learning_rate: float = 0.05

    DEFAULT_HYPERPARAMETERS: ClassVar[Mapping[str, Any]] = {
        "learning_rate": 0.05,
        "dropout_rate": 0.0,
        "label_smoothing": 0.0,
    }
    HYPERPARAMETER_NAMES: ClassVar[frozenset[str]] = frozenset({"learning_rate"})

    @classmethod
    def from_hyperparameters(cls, hyperparameters: Any) -> SGDConfig:
        return cls(float(lookup(hyperparameters, "learning_rate", 0.05)))


SGD_DEFAULTS = SGDConfig.DEFAULT_HYPERPARAMETERS


def make_torch_sgd(params: Any, config: SGDConfig, step_hint: int) -> Any:
    import torch

    del step_hint
    optimizer = torch.optim.SGD(params, lr=config.learning_rate, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda count: 1.0 / (1 + 0.01 * count))
    return optimizer, scheduler


def make_jax_sgd(config: SGDConfig, step_hint: int) -> Any:
    import optax

    del step_hint
    return optax.sgd(lambda count: config.learning_rate / (1 + 0.01 * count), momentum=0.9)


def hparams(**kwargs: Any) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{**SGD_DEFAULTS, **kwargs})
