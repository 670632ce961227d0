"""The ``textlm`` workload in JAX (flax linen): a decoder-only byte transformer.

The PyTorch twin is ``textlm_torch``, with the same parameter names
(``params['block0']['qkv']`` here is ``block0.qkv`` there; a flax ``kernel``
is the transpose of a torch ``weight``), the same initial distribution and
the same math, so one set of weights gives the same loss in both.
``dropout_rate`` may be traced, as in ``common_jax``: dropout never branches
on its value in Python.

Only the model is here: ``model_fn``, the loss (a window's mean over its
positions), batches and evaluation come from ``common_jax`` and ``base``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from polyak.workloads.common_jax import JaxEmbeddedWorkload, dropout
from polyak.workloads.textlm import BaseTextLMWorkload

INIT_STDDEV = 0.02
_LAYER_NORM_EPSILON = 1e-5  # torch.nn.LayerNorm's default


class Block(nn.Module):
    model_dim: int
    num_heads: int
    mlp_dim: int
    residual_stddev: float

    @nn.compact
    def __call__(self, x: jax.Array, dropout_rate: Any, dropout_rng: jax.Array | None) -> jax.Array:
        batch, length, dim = x.shape
        dense = functools.partial(nn.Dense, kernel_init=nn.initializers.normal(INIT_STDDEV))
        residual_dense = functools.partial(
            nn.Dense, kernel_init=nn.initializers.normal(self.residual_stddev)
        )
        layer_norm = functools.partial(nn.LayerNorm, epsilon=_LAYER_NORM_EPSILON)
        rngs = (None, None) if dropout_rng is None else tuple(jax.random.split(dropout_rng))

        qkv = dense(3 * dim, name="qkv")(layer_norm(name="ln1")(x))
        heads = qkv.reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        query, key, value = jnp.moveaxis(heads, 2, 0)  # each [batch, length, heads, head_dim]
        scores = jnp.einsum("bqhd,bkhd->bhqk", query, key) / math.sqrt(dim // self.num_heads)
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        attended = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), value)
        attended = attended.reshape(batch, length, dim)
        x = x + dropout(residual_dense(dim, name="attn_out")(attended), dropout_rate, rngs[0])

        hidden = nn.gelu(dense(self.mlp_dim, name="mlp_in")(layer_norm(name="ln2")(x)), False)
        return x + dropout(residual_dense(dim, name="mlp_out")(hidden), dropout_rate, rngs[1])


class TransformerLM(nn.Module):
    """Byte embeddings and positions → pre-LN blocks → final LayerNorm → ``output``."""

    vocab_size: int
    context_length: int
    model_dim: int
    num_heads: int
    num_layers: int
    mlp_dim: int

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        train: bool,
        dropout_rate: Any = 0.0,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        if not train:
            dropout_rng = None
        if self.model_dim % self.num_heads:
            raise ValueError(
                f"model_dim={self.model_dim} is not divisible by num_heads={self.num_heads}"
            )
        normal = nn.initializers.normal(INIT_STDDEV)
        embedding = nn.Embed(
            self.vocab_size, self.model_dim, embedding_init=normal, name="token_embedding"
        )
        positions = self.param("position_embedding", normal, (self.context_length, self.model_dim))
        x = embedding(tokens) + positions[: tokens.shape[1]]
        for index in range(self.num_layers):
            rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
            x = Block(
                self.model_dim,
                self.num_heads,
                self.mlp_dim,
                INIT_STDDEV / math.sqrt(2 * self.num_layers),
                name=f"block{index}",
            )(x, dropout_rate, rng)
        x = nn.LayerNorm(epsilon=_LAYER_NORM_EPSILON, name="final_norm")(x)
        return nn.Dense(self.vocab_size, kernel_init=normal, name="output")(x)


class TextLMWorkload(JaxEmbeddedWorkload, BaseTextLMWorkload):
    """AlgoPerf Workload for ``textlm`` on JAX: logits ``[batch, context_length, vocab]``."""

    def _build_model(self) -> nn.Module:
        return TransformerLM(**self.transformer_shape)
