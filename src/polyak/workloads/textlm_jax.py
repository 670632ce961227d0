"""The ``textlm`` workload in JAX (flax linen): a decoder-only byte transformer.

The PyTorch twin is ``textlm_torch``, with the same parameter names
(``params['block0']['qkv']`` here is ``block0.qkv`` there; a flax ``kernel``
is the transpose of a torch ``weight``), the same initial distribution and
the same math, so one set of weights gives the same loss in both.
``dropout_rate`` may be traced, as in ``jax_common``: dropout never branches
on its value in Python.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from polyak.algoperf import spec
from polyak.workloads.jax_common import JaxEmbeddedWorkload, replicated_sharding
from polyak.workloads.textlm import BaseTextLMWorkload

INIT_STDDEV = 0.02
_LAYER_NORM_EPSILON = 1e-5  # torch.nn.LayerNorm's default


def _dropout(x: jax.Array, rate: Any, rng: jax.Array | None) -> jax.Array:
    if rng is None:
        return x
    keep_probability = 1.0 - rate
    keep = jax.random.bernoulli(rng, keep_probability, x.shape)
    return jnp.where(keep, x / keep_probability, jnp.zeros_like(x))


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
        x = x + _dropout(residual_dense(dim, name="attn_out")(attended), dropout_rate, rngs[0])

        hidden = nn.gelu(dense(self.mlp_dim, name="mlp_in")(layer_norm(name="ln2")(x)), False)
        return x + _dropout(residual_dense(dim, name="mlp_out")(hidden), dropout_rate, rngs[1])


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
        self, tokens: jax.Array, dropout_rate: Any = 0.0, dropout_rng: jax.Array | None = None
    ) -> jax.Array:
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


@functools.partial(jax.jit, static_argnums=(0,))
def _init_params(model: TransformerLM, rng: jax.Array, dummy: jax.Array) -> Any:
    return model.init({"params": rng}, dummy)["params"]


def parameter_type(path: tuple[str, ...]) -> spec.ParameterType:
    """AlgoPerf's type for one of our parameters, from its path in the params tree."""
    module, leaf = (path[-2] if len(path) > 1 else ""), path[-1]
    if path in (("token_embedding", "embedding"), ("position_embedding",)):
        return spec.ParameterType.EMBEDDING
    if module.startswith("ln") or module == "final_norm":
        return (
            spec.ParameterType.LAYER_NORM_SCALE
            if leaf == "scale"
            else spec.ParameterType.LAYER_NORM_BIAS
        )
    if module == "qkv":
        return (
            spec.ParameterType.ATTENTION_QKV
            if leaf == "kernel"
            else spec.ParameterType.ATTENTION_BIAS
        )
    if module == "attn_out" and leaf == "kernel":
        return spec.ParameterType.ATTENTION_OUT
    return spec.ParameterType.WEIGHT if leaf == "kernel" else spec.ParameterType.BIAS


def _as_key(rng: spec.RandomState) -> jax.Array:
    if isinstance(rng, (int, np.integer)):
        return jax.random.PRNGKey(int(rng))
    return rng


def _is_literal_zero(rate: Any) -> bool:
    return isinstance(rate, (int, float, np.number)) and float(rate) == 0.0


class TextLMWorkload(JaxEmbeddedWorkload, BaseTextLMWorkload):
    """AlgoPerf Workload for ``textlm`` on JAX."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._model = TransformerLM(
            self.vocab_size,
            self.context_length,
            self.model_dim,
            self.num_heads,
            self.num_layers,
            self.mlp_dim,
        )

    def init_model_fn(self, rng: spec.RandomState) -> spec.ModelInitState:
        """Replicated ``(params, None)`` from a jax key (or an int seed)."""
        dummy = jnp.zeros((1, self.context_length), jnp.int32)
        params = _init_params(self._model, _as_key(rng), dummy)
        self._param_shapes = jax.tree.map(lambda x: spec.ShapeTuple(tuple(x.shape)), params)
        self._param_types = jax.tree_util.tree_map_with_path(
            lambda path, _: parameter_type(tuple(str(k.key) for k in path)), params
        )
        return jax.device_put(params, replicated_sharding()), None

    def is_output_params(self, param_key: spec.ParameterKey) -> bool:
        return param_key == "output"

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
        del update_batch_norm  # no BatchNorm here
        train = mode == spec.ForwardPassMode.TRAIN
        use_dropout = train and not _is_literal_zero(dropout_rate)
        if use_dropout and rng is None:
            raise ValueError("model_fn needs an rng for dropout_rate != 0 in TRAIN mode")
        tokens = augmented_and_preprocessed_input_batch["inputs"]
        logits = self._model.apply(
            {"params": params},
            tokens,
            dropout_rate=dropout_rate,
            dropout_rng=_as_key(rng) if use_dropout else None,
        )
        return logits, model_state

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
        num_classes = logits_batch.shape[-1]
        one_hot = jax.nn.one_hot(label_batch, num_classes, dtype=logits_batch.dtype)
        smoothed = one_hot * (1.0 - label_smoothing) + label_smoothing / num_classes
        per_position = -jnp.sum(smoothed * jax.nn.log_softmax(logits_batch), axis=-1)
        per_example = jnp.mean(per_position, axis=-1)
        if mask_batch is not None:
            mask = mask_batch.astype(per_example.dtype)
            per_example = per_example * mask
            n_valid = jnp.sum(mask)
        else:
            n_valid = jnp.asarray(per_example.shape[0], dtype=per_example.dtype)
        return {
            "summed": jnp.sum(per_example),
            "n_valid_examples": n_valid,
            "per_example": per_example,
        }

    def _summed_metrics(
        self, logits: jax.Array, targets: jax.Array, weights: jax.Array
    ) -> dict[str, jax.Array]:
        return {"loss": self.loss_fn(targets, logits, weights)["summed"]}
