"""Builds AlgoPerf's five submission functions for JAX.

The twin of ``torch_builder``. It follows AlgoPerf v0.6's JAX conventions:
one ``jax.jit`` program per kind of step, with params and state replicated,
the batch sharded along its first axis, and params and state donated.

``optimizer_state`` is the 2-tuple ``(pytree, programs)`` that AlgoPerf's
checkpointing unpacks: the pytree holds the optax state, the averaging state,
and a slot for the live params; ``programs`` holds the compiled steps and is
carried through checkpoints untouched.

Weight averaging. ``prepare_for_eval`` moves the live params into the slot and
returns the average, which AlgoPerf evaluates and then passes back to
``update_params``. ``update_params`` sees the ``swapped`` flag, trains the
params from the slot, and puts the tree it was handed into the slot in
exchange, so the pytree keeps its structure and nothing is copied. The flag
lives in the pytree (so it survives checkpoints), and its last value is
remembered on the host, so ordinary steps never wait on the device.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from polyak.algoperf import spec
from polyak.algoperf.batch_sizes import get_batch_size
from polyak.algoperf.defaults import resolve_hyperparameters
from polyak.averaging import jax_backend
from polyak.averaging.config import AveragingConfig

OptimizerFactory = Callable[[Any, int], optax.GradientTransformation]
PyTree = Any

_GRAD_CLIP_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class Submission:
    """AlgoPerf's submission API, as plain functions with v0.6 signatures."""

    init_optimizer_state: Callable[..., Any]
    update_params: Callable[..., Any]
    prepare_for_eval: Callable[..., Any]
    get_batch_size: Callable[[str], int]
    data_selection: Callable[..., Any]


def _should_log(global_step: int) -> bool:
    # The baseline's cadence; reading the loss back stalls the device queue.
    return global_step <= 100 or global_step % 500 == 0


class TrainPrograms:
    """The jitted steps of one trial, and the host's memory of the swap flag.

    It stands where AlgoPerf's baseline keeps ``opt_update_fn``; calling it
    applies the optax update, so code that treats it as that still works.
    """

    def __init__(
        self,
        workload: spec.Workload,
        tx: optax.GradientTransformation,
        averaging: AveragingConfig,
        label_smoothing: float,
        dropout_rate: float,
        grad_clip: float | None,
    ) -> None:
        self.tx = tx
        self.averaging = averaging
        mesh = Mesh(jax.devices(), ("batch",))
        replicated = NamedSharding(mesh, P())
        sharded = NamedSharding(mesh, P("batch"))
        step = functools.partial(
            _train_step, workload, tx, averaging, label_smoothing, dropout_rate, grad_clip
        )
        jit_step = functools.partial(
            jax.jit,
            in_shardings=(replicated, replicated, replicated, sharded, replicated),
            out_shardings=(replicated, replicated, replicated, replicated, replicated),
            donate_argnums=(0, 1, 2),
        )
        self.train_step = jit_step(functools.partial(step, collect=False))
        self.train_step_and_collect = jit_step(functools.partial(step, collect=True))
        self.swap_in_average = jax.jit(
            functools.partial(_swap_in_average, averaging),
            in_shardings=(replicated, replicated, replicated),
            out_shardings=(replicated, replicated, replicated),
            donate_argnums=(0, 1, 2),
        )
        self._last_flag: tuple[Any, bool] | None = None

    def __call__(self, updates: PyTree, state: PyTree, params: PyTree | None = None) -> Any:
        return self.tx.update(updates, state, params)

    def remember_swapped(self, flag: jax.Array, value: bool) -> None:
        self._last_flag = (flag, value)

    def is_swapped(self, flag: jax.Array) -> bool:
        """The flag's value, read from the device only if this host did not set it."""
        if self._last_flag is not None and self._last_flag[0] is flag:
            return self._last_flag[1]
        value = bool(jax.device_get(flag))
        self._last_flag = (flag, value)
        return value


def _tracked(averaging: AveragingConfig, params: PyTree, model_state: PyTree) -> PyTree:
    """What is averaged: the params, and the float model state if asked."""
    if averaging.buffers == "average":
        return (params, model_state)
    return (params, ())


def _train_step(
    workload: spec.Workload,
    tx: optax.GradientTransformation,
    averaging: AveragingConfig,
    label_smoothing: float,
    dropout_rate: float,
    grad_clip: float | None,
    model_state: PyTree,
    state: dict[str, Any],
    params: PyTree,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    collect: bool,
) -> tuple[dict[str, Any], PyTree, PyTree, jax.Array, jax.Array]:
    def loss_fn(p: PyTree) -> tuple[jax.Array, tuple[jax.Array, PyTree]]:
        logits, new_model_state = workload.model_fn(
            p,
            batch,
            model_state,
            spec.ForwardPassMode.TRAIN,
            rng,
            update_batch_norm=True,
            dropout_rate=dropout_rate,
        )
        loss_dict = workload.loss_fn(
            label_batch=batch["targets"],
            logits_batch=logits,
            mask_batch=batch.get("weights"),
            label_smoothing=label_smoothing,
        )
        return loss_dict["summed"], (loss_dict["n_valid_examples"], new_model_state)

    (summed, (n_valid, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    loss = summed / n_valid
    grads = jax.tree.map(lambda g: g / n_valid, grads)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    if grad_clip is not None:
        scale = jnp.clip(grad_clip / (grad_norm + _GRAD_CLIP_EPS), 0.0, 1.0)
        grads = jax.tree.map(lambda g: g * scale, grads)
    updates, opt_state = tx.update(grads, state["optimizer"], params)
    new_params = optax.apply_updates(params, updates)
    averaging_state = state["averaging"]
    if collect:
        averaging_state = jax_backend.collect(
            averaging, averaging_state, _tracked(averaging, new_params, new_model_state)
        )
    new_state = {
        **state,
        "optimizer": opt_state,
        "averaging": averaging_state,
        "swapped": jnp.zeros([], jnp.bool_),
    }
    return new_state, new_params, new_model_state, loss, grad_norm


def _swap_in_average(
    averaging: AveragingConfig, state: dict[str, Any], params: PyTree, model_state: PyTree
) -> tuple[dict[str, Any], PyTree, PyTree]:
    tracked = _tracked(averaging, params, model_state)
    averaged_params, averaged_model_state = jax_backend.average(
        averaging, state["averaging"], tracked
    )
    if averaging.buffers != "average":
        # The live statistics are evaluated with the average (the paper's
        # choice); the returned tree must not alias the donated input.
        averaged_model_state = jax.tree.map(jnp.copy, model_state)
    new_state = {**state, "live": tracked, "swapped": jnp.ones([], jnp.bool_)}
    return new_state, averaged_params, averaged_model_state


def build_submission(
    make_optimizer: OptimizerFactory,
    optimizer_defaults: Mapping[str, Any],
    self_tuning_extra: Mapping[str, Any] | None = None,
) -> Submission:
    """Turns an optax optimizer factory into AlgoPerf's five submission functions."""

    def hyperparameters_of(hyperparameters: Any) -> Any:
        return resolve_hyperparameters(hyperparameters, optimizer_defaults, self_tuning_extra)

    def init_optimizer_state(
        workload: spec.Workload,
        model_params: PyTree,
        model_state: PyTree,
        hyperparameters: Any,
        rng: Any,
    ) -> tuple[dict[str, Any], TrainPrograms]:
        del rng
        hp = hyperparameters_of(hyperparameters)
        averaging = AveragingConfig.from_hyperparameters(hp, workload.step_hint)
        tx = make_optimizer(hp, workload.step_hint)
        programs = TrainPrograms(
            workload,
            tx,
            averaging,
            label_smoothing=float(getattr(hp, "label_smoothing", 0.0)),
            dropout_rate=float(getattr(hp, "dropout_rate", 0.0)),
            grad_clip=getattr(hp, "grad_clip", None),
        )
        # Fresh arrays throughout: AlgoPerf donates the params it hands us.
        shapes = jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype), model_params)
        tracked = _tracked(averaging, shapes, model_state)
        state = {
            "optimizer": tx.init(shapes),
            "averaging": jax_backend.init(averaging, tracked),
            # The slot for the live weights while the average is out for eval.
            "live": jax.tree.map(jnp.zeros_like, tracked) if averaging.enabled else ((), ()),
            "swapped": jnp.zeros([], jnp.bool_),
        }
        replicated = NamedSharding(Mesh(jax.devices(), ("batch",)), P())
        return jax.device_put(state, replicated), programs

    def update_params(
        workload: spec.Workload,
        current_param_container: PyTree,
        current_params_types: Any,
        model_state: PyTree,
        hyperparameters: Any,
        batch: dict[str, Any],
        loss_type: Any,
        optimizer_state: tuple[dict[str, Any], TrainPrograms],
        eval_results: list[tuple[int, float]],
        global_step: int,
        rng: Any,
        train_state: dict[str, Any] | None = None,
    ) -> tuple[tuple[dict[str, Any], TrainPrograms], PyTree, PyTree]:
        del current_params_types, hyperparameters, loss_type, eval_results, train_state
        state, programs = optimizer_state
        params = current_param_container
        if programs.averaging.enabled and programs.is_swapped(state["swapped"]):
            # Train the live weights; the evaluated tree takes their slot.
            live_params, live_model_state = state["live"]
            if programs.averaging.buffers == "average":
                state = {**state, "live": (params, model_state)}
                model_state = live_model_state
            else:
                state = {**state, "live": (params, ())}
            params = live_params
        collect = programs.averaging.should_collect(global_step + 1)
        step = programs.train_step_and_collect if collect else programs.train_step
        state, params, model_state, loss, grad_norm = step(model_state, state, params, batch, rng)
        programs.remember_swapped(state["swapped"], False)
        if _should_log(global_step):
            _log_training_metrics(workload, loss, grad_norm, state, global_step)
        return (state, programs), params, model_state

    def prepare_for_eval(
        workload: spec.Workload,
        current_param_container: PyTree,
        current_params_types: Any,
        model_state: PyTree,
        hyperparameters: Any,
        loss_type: Any,
        optimizer_state: tuple[dict[str, Any], TrainPrograms],
        eval_results: list[tuple[int, float]],
        global_step: int,
        rng: Any,
    ) -> tuple[tuple[dict[str, Any], TrainPrograms], PyTree, PyTree]:
        del workload, current_params_types, hyperparameters, loss_type
        del eval_results, global_step, rng
        state, programs = optimizer_state
        if not programs.averaging.enabled or programs.is_swapped(state["swapped"]):
            return optimizer_state, current_param_container, model_state
        state, params, model_state = programs.swap_in_average(
            state, current_param_container, model_state
        )
        programs.remember_swapped(state["swapped"], True)
        return (state, programs), params, model_state

    def data_selection(
        workload: spec.Workload,
        input_queue: Iterator[dict[str, Any]],
        optimizer_state: Any,
        current_param_container: PyTree,
        model_state: PyTree,
        hyperparameters: Any,
        global_step: int,
        rng: Any,
    ) -> dict[str, Any]:
        del workload, optimizer_state, current_param_container, model_state
        del hyperparameters, global_step, rng
        return next(input_queue)

    return Submission(
        init_optimizer_state=init_optimizer_state,
        update_params=update_params,
        prepare_for_eval=prepare_for_eval,
        get_batch_size=get_batch_size,
        data_selection=data_selection,
    )


def _log_training_metrics(
    workload: spec.Workload,
    loss: jax.Array,
    grad_norm: jax.Array,
    state: dict[str, Any],
    global_step: int,
) -> None:
    averaging_state = state["averaging"]
    metrics = {
        "loss": float(loss),
        "grad_norm": float(grad_norm),
        "averaging/num_collected": int(averaging_state.num_collected),
        "averaging/num_skipped_nonfinite": int(averaging_state.num_skipped_nonfinite),
    }
    logger = getattr(workload, "metrics_logger", None)
    if logger is not None:
        logger.append_scalar_metrics(metrics, global_step)
    logging.info(
        "%d) loss = %0.4f, grad_norm = %0.4f", global_step, metrics["loss"], metrics["grad_norm"]
    )
