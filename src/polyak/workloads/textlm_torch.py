"""The ``textlm`` workload in PyTorch: a decoder-only byte transformer.

The jax twin is ``textlm_jax``, with the same parameter names (``block0.qkv``
here is ``params['block0']['qkv']`` there), the same initial distribution and
the same math, so one set of weights gives the same loss in both.

- Pre-LayerNorm blocks: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``, causal
  multi-head attention, a GELU MLP (exact erf form), learned positions, a
  final LayerNorm and an untied output layer.
- Init (GPT-2's): weights and embeddings normal(0, 0.02), the two residual
  output projections normal(0, 0.02/√(2·num_layers)), biases 0, LayerNorm
  scale 1 and shift 0, drawn from a ``torch.Generator`` seeded by the rng.
- Dropout (the ``dropout_rate`` hyperparameter) on both residual branches,
  with masks drawn from a generator seeded by the step's rng.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from polyak.algoperf import spec
from polyak.distributed_torch import rank_and_world
from polyak.workloads import prng
from polyak.workloads.textlm import BaseTextLMWorkload
from polyak.workloads.torch_common import TorchEmbeddedWorkload

INIT_STDDEV = 0.02
_RESIDUAL_OUTPUTS = ("attn_out", "mlp_out")


def _dropout(
    x: torch.Tensor, rate: float, training: bool, generator: torch.Generator | None
) -> torch.Tensor:
    if not training or rate == 0.0:
        return x
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate={rate!r} must lie in [0, 1)")
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= rate
    return x * keep / (1.0 - rate)


class Block(nn.Module):
    def __init__(self, model_dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        if model_dim % num_heads:
            raise ValueError(f"model_dim={model_dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.ln1 = nn.LayerNorm(model_dim)
        self.qkv = nn.Linear(model_dim, 3 * model_dim)
        self.attn_out = nn.Linear(model_dim, model_dim)
        self.ln2 = nn.LayerNorm(model_dim)
        self.mlp_in = nn.Linear(model_dim, mlp_dim)
        self.mlp_out = nn.Linear(mlp_dim, model_dim)

    def forward(
        self, x: torch.Tensor, dropout_rate: float, generator: torch.Generator | None
    ) -> torch.Tensor:
        batch, length, dim = x.shape
        heads = self.qkv(self.ln1(x)).view(batch, length, 3, self.num_heads, -1)
        query, key, value = heads.permute(2, 0, 3, 1, 4)  # each [batch, heads, length, head_dim]
        attended = F.scaled_dot_product_attention(query, key, value, is_causal=True)
        attended = attended.transpose(1, 2).reshape(batch, length, dim)
        x = x + _dropout(self.attn_out(attended), dropout_rate, self.training, generator)
        hidden = F.gelu(self.mlp_in(self.ln2(x)))
        return x + _dropout(self.mlp_out(hidden), dropout_rate, self.training, generator)


class TransformerLM(nn.Module):
    """Byte embeddings and positions → pre-LN blocks → final LayerNorm → ``output``."""

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        model_dim: int,
        num_heads: int,
        num_layers: int,
        mlp_dim: int,
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.token_embedding = nn.Embedding(vocab_size, model_dim)
        self.position_embedding = nn.Parameter(torch.zeros(context_length, model_dim))
        for index in range(num_layers):
            setattr(self, f"block{index}", Block(model_dim, num_heads, mlp_dim))
        self.final_norm = nn.LayerNorm(model_dim)
        self.output = nn.Linear(model_dim, vocab_size)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        residual_stddev = INIT_STDDEV / math.sqrt(2 * self.num_layers)
        for name, parameter in self.named_parameters():
            module_name, _, leaf = name.rpartition(".")
            if module_name.rpartition(".")[2].startswith("ln") or module_name == "final_norm":
                parameter.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf == "bias":
                parameter.zero_()
            else:
                residual = module_name.rpartition(".")[2] in _RESIDUAL_OUTPUTS
                stddev = residual_stddev if residual else INIT_STDDEV
                parameter.copy_(
                    torch.empty(parameter.shape).normal_(0.0, stddev, generator=generator)
                )

    def forward(
        self,
        tokens: torch.Tensor,
        dropout_rate: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        length = tokens.shape[1]
        x = self.token_embedding(tokens) + self.position_embedding[:length]
        for index in range(self.num_layers):
            x = getattr(self, f"block{index}")(x, dropout_rate, generator)
        return self.output(self.final_norm(x))


def parameter_type(name: str) -> spec.ParameterType:
    """AlgoPerf's type for one of our parameter names."""
    module_name, _, leaf = name.rpartition(".")
    module = module_name.rpartition(".")[2]
    if name in ("token_embedding.weight", "position_embedding"):
        return spec.ParameterType.EMBEDDING
    if module.startswith("ln") or module == "final_norm":
        return (
            spec.ParameterType.LAYER_NORM_SCALE
            if leaf == "weight"
            else spec.ParameterType.LAYER_NORM_BIAS
        )
    if module == "qkv":
        return (
            spec.ParameterType.ATTENTION_QKV
            if leaf == "weight"
            else spec.ParameterType.ATTENTION_BIAS
        )
    if module == "attn_out" and leaf == "weight":
        return spec.ParameterType.ATTENTION_OUT
    return spec.ParameterType.WEIGHT if leaf == "weight" else spec.ParameterType.BIAS


class TextLMWorkload(TorchEmbeddedWorkload, BaseTextLMWorkload):
    """AlgoPerf Workload for ``textlm`` on PyTorch."""

    def init_model_fn(self, rng: spec.RandomState) -> spec.ModelInitState:
        """A fresh transformer initialized from ``rng`` (int, numpy key or jax key)."""
        generator = torch.Generator().manual_seed(prng.torch_seed(rng))
        # Module construction draws a default init from the global RNG; keep it private.
        with torch.random.fork_rng(devices=[]):
            model = TransformerLM(
                self.vocab_size,
                self.context_length,
                self.model_dim,
                self.num_heads,
                self.num_layers,
                self.mlp_dim,
            )
        model.reset_parameters(generator)
        self._param_shapes = {
            name: spec.ShapeTuple(tuple(p.shape)) for name, p in model.named_parameters()
        }
        self._param_types = {name: parameter_type(name) for name in self._param_shapes}
        model.to(self._device)
        _, world = rank_and_world()
        if world > 1:
            device_ids = [self._device.index] if self._device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids)
        self._model = model
        return model, None

    def is_output_params(self, param_key: spec.ParameterKey) -> bool:
        return param_key in ("output.weight", "output.bias")

    def model_fn(
        self,
        params: spec.ParameterContainer,
        augmented_and_preprocessed_input_batch: dict[str, spec.Tensor],
        model_state: spec.ModelAuxiliaryState,
        mode: spec.ForwardPassMode,
        rng: spec.RandomState,
        update_batch_norm: bool,
        dropout_rate: float = 0.0,
    ) -> tuple[spec.Tensor, spec.ModelAuxiliaryState]:
        """Next-byte logits ``[batch, context_length, vocab_size]``."""
        del model_state, update_batch_norm  # no BatchNorm here
        model = params
        tokens = augmented_and_preprocessed_input_batch["inputs"]
        if mode == spec.ForwardPassMode.EVAL:
            model.eval()
            with torch.no_grad():
                return model(tokens), None
        model.train()
        dropout_rate = float(dropout_rate or 0.0)
        generator = self._dropout_generator(rng) if dropout_rate > 0.0 else None
        return model(tokens, dropout_rate=dropout_rate, generator=generator), None

    def loss_fn(
        self,
        label_batch: spec.Tensor,
        logits_batch: spec.Tensor,
        mask_batch: spec.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> dict[str, spec.Tensor]:
        """Per-window mean next-byte cross-entropy, its (masked) sum and the window count.

        Labels are smoothed as ``(1-α)·onehot + α/K``, as in the other workloads.
        """
        batch, length, vocab = logits_batch.shape
        per_position = F.cross_entropy(
            logits_batch.reshape(batch * length, vocab),
            label_batch.reshape(batch * length).long(),
            reduction="none",
            label_smoothing=float(label_smoothing),
        )
        per_example = per_position.reshape(batch, length).mean(dim=1)
        if mask_batch is not None:
            mask = mask_batch.to(per_example.dtype)
            per_example = per_example * mask
            n_valid = mask.sum()
        else:
            n_valid = torch.tensor(float(batch), dtype=per_example.dtype, device=per_example.device)
        return {
            "summed": per_example.sum(),
            "n_valid_examples": n_valid,
            "per_example": per_example,
        }

    def _summed_metrics(
        self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return {"loss": self.loss_fn(targets, logits, weights)["summed"]}

    def _to_framework_batch(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        rank, world = rank_and_world()
        size = batch["inputs"].shape[0]
        if size % world:
            raise ValueError(
                f"global batch size {size} is not divisible by the {world} DDP processes"
            )
        per_rank = size // world
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        converted = {
            "inputs": torch.tensor(batch["inputs"][rows], dtype=torch.long),
            "targets": torch.tensor(batch["targets"][rows], dtype=torch.long),
        }
        if "weights" in batch:
            converted["weights"] = torch.tensor(batch["weights"][rows], dtype=torch.float32)
        return {key: value.to(self._device) for key, value in converted.items()}
