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

Only the model is here: ``model_fn``, the loss (a window's mean over its
positions), batches, DDP and evaluation come from ``common_torch`` and
``base``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from polyak.workloads.common_torch import TorchEmbeddedWorkload, dropout
from polyak.workloads.textlm import BaseTextLMWorkload

INIT_STDDEV = 0.02
_RESIDUAL_OUTPUTS = ("attn_out", "mlp_out")


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
        x = x + dropout(self.attn_out(attended), dropout_rate, self.training, generator)
        hidden = F.gelu(self.mlp_in(self.ln2(x)))
        return x + dropout(self.mlp_out(hidden), dropout_rate, self.training, generator)


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


class TextLMWorkload(TorchEmbeddedWorkload, BaseTextLMWorkload):
    """AlgoPerf Workload for ``textlm`` on PyTorch: logits ``[batch, context_length, vocab]``."""

    def _build_model(self) -> nn.Module:
        return TransformerLM(**self.transformer_shape)
