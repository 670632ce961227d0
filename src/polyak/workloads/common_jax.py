"""The JAX (flax linen) twin of the embedded workloads: model, loss, batches, evaluation.

Everything here is shared by ``digits_jax``, ``diabetes_jax`` and
``textlm_jax``; the first two only join this class with their dataset base,
``textlm_jax`` also brings its model (``_build_model``). What needs no
framework (the ``model_fn`` contract, the loss and metric formulas, the eval
loop) is in ``base``. The PyTorch twin is ``common_torch``, with the same
names in the same order.

- ``init_model_fn(rng)`` returns ``(params, model_state)`` replicated over all
  devices (``NamedSharding(Mesh(jax.devices(), ('batch',)), P())``).
  ``model_state`` is ``{'batch_stats': ...}`` when the model has BatchNorm,
  else ``None``. Weights are uniform in ±1/√fan_in, biases zero: the same
  distribution as the torch twin.
- Input queues yield global batches sharded along the batch axis
  (``P('batch')``); batch sizes must be divisible by the device count.
- ``dropout_rate`` may be a traced value (AlgoPerf's baseline passes it into
  its jitted step), so dropout never branches on it in Python; it needs the
  ``rng`` passed to ``model_fn`` unless the rate is a literal 0.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from polyak.algoperf import spec
from polyak.workloads.base import EmbeddedWorkload, parameter_type

BATCH_AXIS = "batch"


def _mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), (BATCH_AXIS,))


def replicated_sharding() -> NamedSharding:
    return NamedSharding(_mesh(), P())


def batch_sharding() -> NamedSharding:
    return NamedSharding(_mesh(), P(BATCH_AXIS))


def _as_key(rng: spec.RandomState) -> jax.Array:
    """``rng`` as a jax key (an int is a seed)."""
    if isinstance(rng, (int, np.integer)):
        return jax.random.PRNGKey(int(rng))
    return rng


def dropout(x: jax.Array, rate: Any, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout with masks from ``rng``; none without an ``rng``."""
    if rng is None:
        return x
    keep_probability = 1.0 - rate
    keep = jax.random.bernoulli(rng, keep_probability, x.shape)
    return jnp.where(keep, x / keep_probability, jnp.zeros_like(x))


class MLP(nn.Module):
    """dense_i → (bn_i) → ReLU → dropout, repeated, then ``output``."""

    hidden_widths: tuple[int, ...]
    num_outputs: int
    use_batch_norm: bool

    @nn.compact
    def __call__(
        self,
        inputs: jax.Array,
        train: bool,
        dropout_rate: Any = 0.0,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        # Uniform in ±1/√fan_in, torch's default bound for Linear weights.
        kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
        x = inputs
        for index, width in enumerate(self.hidden_widths, start=1):
            x = nn.Dense(width, kernel_init=kernel_init, name=f"dense{index}")(x)
            if self.use_batch_norm:
                x = nn.BatchNorm(
                    use_running_average=not train,
                    momentum=0.9,
                    epsilon=1e-5,
                    name=f"bn{index}",
                )(x)
            x = nn.relu(x)
            if train and dropout_rng is not None:
                x = dropout(x, dropout_rate, jax.random.fold_in(dropout_rng, index))
        return nn.Dense(self.num_outputs, kernel_init=kernel_init, name="output")(x)


@functools.partial(jax.jit, static_argnums=(0,))
def _init_variables(model: nn.Module, rng: jax.Array, dummy: jax.Array) -> Any:
    # One compiled program (cached across workload instances: equal modules
    # hash equal) instead of dozens of op-by-op compilations.
    return model.init({"params": rng}, dummy, train=False)


def _is_literal_zero(rate: Any) -> bool:
    """Whether ``rate`` is a Python or numpy zero (a traced rate never is)."""
    return isinstance(rate, (int, float, np.number)) and float(rate) == 0.0


class JaxEmbeddedWorkload(EmbeddedWorkload):
    framework = "jax"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._model = self._build_model()
        self._jitted_eval_sums: Any = None

    # ---- model ----------------------------------------------------------------

    def init_model_fn(self, rng: spec.RandomState) -> spec.ModelInitState:
        """Replicated ``(params, model_state)`` from a jax key (or an int seed)."""
        input_dtype = jnp.int32 if self._token_inputs else jnp.float32
        dummy = jnp.zeros((1, self.num_features), input_dtype)
        variables = dict(_init_variables(self._model, _as_key(rng), dummy))
        params = variables.pop("params")
        model_state = {"batch_stats": variables["batch_stats"]} if self.use_batch_norm else None
        self._param_shapes = jax.tree.map(lambda x: spec.ShapeTuple(tuple(x.shape)), params)
        self._param_types = jax.tree_util.tree_map_with_path(
            lambda path, _: parameter_type(tuple(str(key.key) for key in path)), params
        )
        replicated = replicated_sharding()
        return jax.device_put(params, replicated), jax.device_put(model_state, replicated)

    def _build_model(self) -> nn.Module:
        """The flax module, called as ``(inputs, train, dropout_rate, dropout_rng)``."""
        return MLP(self.hidden_widths, self.num_outputs, self.use_batch_norm)

    def is_output_params(self, param_key: spec.ParameterKey) -> bool:
        return param_key == "output"

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
        use_dropout = train and not _is_literal_zero(dropout_rate)
        if use_dropout and rng is None:
            raise ValueError("model_fn needs an rng for dropout_rate != 0 in TRAIN mode")
        variables = {"params": params, **(model_state or {})}
        call_args = {
            "train": train,
            "dropout_rate": dropout_rate,
            "dropout_rng": _as_key(rng) if use_dropout else None,
        }
        if train and self.use_batch_norm:
            logits, updates = self._model.apply(
                variables, inputs, mutable=["batch_stats"], **call_args
            )
            if update_batch_norm:
                return logits, {"batch_stats": updates["batch_stats"]}
            return logits, model_state
        return self._model.apply(variables, inputs, **call_args), model_state

    # ---- array operations for the loss and metrics -----------------------------

    def _softmax_cross_entropy(
        self, labels: jax.Array, logits: jax.Array, label_smoothing: float
    ) -> jax.Array:
        num_classes = logits.shape[-1]
        one_hot = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
        smoothed = one_hot * (1.0 - label_smoothing) + label_smoothing / num_classes
        return -jnp.sum(smoothed * jax.nn.log_softmax(logits), axis=-1)

    def _squared_error(self, labels: jax.Array, logits: jax.Array) -> jax.Array:
        targets = jnp.reshape(labels, logits.shape).astype(logits.dtype)
        return jnp.sum((logits - targets) ** 2, axis=-1)

    def _argmax(self, logits: jax.Array) -> jax.Array:
        return jnp.argmax(logits, axis=-1)

    def _cast(self, array: jax.Array, dtype: Any) -> jax.Array:
        return array.astype(dtype)

    def _scalar_like(self, value: float, like: jax.Array) -> jax.Array:
        return jnp.asarray(value, dtype=like.dtype)

    # ---- evaluation -------------------------------------------------------------

    def _eval_batch_sums(
        self, params: Any, batch: dict[str, Any], model_state: Any
    ) -> dict[str, float]:
        if self._jitted_eval_sums is None:
            self._jitted_eval_sums = jax.jit(
                self._summed_eval_metrics, out_shardings=replicated_sharding()
            )
        sums = self._jitted_eval_sums(params, model_state, batch)
        return {name: float(value) for name, value in jax.device_get(sums).items()}

    # ---- batches ------------------------------------------------------------

    def _to_framework_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        size = batch["inputs"].shape[0]
        num_devices = jax.device_count()
        if size % num_devices:
            raise ValueError(
                f"global batch size {size} is not divisible by the {num_devices} JAX devices"
            )
        return jax.device_put(dict(batch), batch_sharding())
