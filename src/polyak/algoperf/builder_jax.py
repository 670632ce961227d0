"""Builds AlgoPerf's five submission functions for JAX.

The twin of ``builder_torch``. It follows AlgoPerf v0.6's JAX conventions:
one ``jax.jit`` program per kind of step, with params and state replicated,
the batch sharded along its first axis, and params and state donated.

``optimizer_state`` is the 2-tuple ``(pytree, programs)`` that AlgoPerf's
checkpointing unpacks: the pytree holds the optax state, the averaging state,
and a slot for the live params; ``programs`` holds the compiled steps, the
resolved hyperparameters and the averager, and is carried through checkpoints
untouched.

The hyperparameters are read once, in ``init_optimizer_state``, into a
:class:`~polyak.algoperf.trial_config.TrialConfig` kept in ``programs``.
Weight averaging is :class:`~polyak.averaging.averager_jax.JaxAverager`'s: it
owns the averaging entries of the pytree, the swap and its placement; this
module only jits the train step, into which the averager folds a collection.
"""

from __future__ import annotations

import collections
import functools
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from polyak.algoperf import spec
from polyak.algoperf.submission_api import Submission, should_log
from polyak.algoperf.trial_config import (
    OptimizerConfig,
    TrainingConfig,
    TrialConfig,
    resolve_trial_config,
)
from polyak.averaging.averager_jax import JaxAverager

OptimizerFactory = Callable[[Any, int], optax.GradientTransformation]
PyTree = Any

_GRAD_CLIP_EPS = 1e-6


class TrainPrograms:
    """The jitted steps of one trial, its resolved hyperparameters and its averager.

    It stands where AlgoPerf's baseline keeps ``opt_update_fn``; calling it
    applies the optax update, so code that treats it as that still works.
    """

    def __init__(
        self, workload: spec.Workload, tx: optax.GradientTransformation, config: TrialConfig
    ) -> None:
        self.tx = tx
        self.config = config
        mesh = Mesh(jax.devices(), ("batch",))
        self.replicated = NamedSharding(mesh, P())
        sharded = NamedSharding(mesh, P("batch"))
        self.averager = JaxAverager(config.averaging, self.replicated)
        step = functools.partial(_train_step, workload, tx, config.training, self.averager)
        jit_step = functools.partial(
            jax.jit,
            in_shardings=(self.replicated,) * 3 + (sharded, self.replicated),
            out_shardings=(self.replicated,) * 5,
            donate_argnums=(0, 1, 2),
        )
        self.train_step = jit_step(functools.partial(step, collect=False))
        self.train_step_and_collect = jit_step(functools.partial(step, collect=True))
        # averaging_select="best": the recent training batches (references: the
        # train step does not donate its batch) and the eval's loss on one.
        self.recent_batches: collections.deque[dict[str, jax.Array]] = collections.deque(
            maxlen=config.averaging.twa.batches if config.averaging.selects_best else 0
        )
        self.eval_loss = jax.jit(functools.partial(_eval_loss, workload))

    def score(self, params: PyTree, model_state: PyTree, rng: jax.Array) -> float:
        """The eval's mean loss over the recent batches (``inf`` if none or not finite)."""
        if not self.recent_batches:
            return math.inf
        totals = [self.eval_loss(params, model_state, b, rng) for b in self.recent_batches]
        summed = sum(float(t[0]) for t in totals)
        count = sum(float(t[1]) for t in totals)
        value = summed / count if count > 0 else math.inf
        return value if math.isfinite(value) else math.inf

    def __call__(self, updates: PyTree, state: PyTree, params: PyTree | None = None) -> Any:
        return self.tx.update(updates, state, params)


def _eval_loss(
    workload: spec.Workload,
    params: PyTree,
    model_state: PyTree,
    batch: dict[str, jax.Array],
    rng: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """(summed loss, examples) as the eval computes them: eval mode, no smoothing."""
    logits, _ = workload.model_fn(
        params,
        batch,
        model_state,
        spec.ForwardPassMode.EVAL,
        rng,
        update_batch_norm=False,
        dropout_rate=0.0,
    )
    loss_dict = workload.loss_fn(
        label_batch=batch["targets"],
        logits_batch=logits,
        mask_batch=batch.get("weights"),
        label_smoothing=0.0,
    )
    return loss_dict["summed"], loss_dict["n_valid_examples"]


def _train_step(
    workload: spec.Workload,
    tx: optax.GradientTransformation,
    training: TrainingConfig,
    averager: JaxAverager,
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
            dropout_rate=training.dropout_rate,
        )
        loss_dict = workload.loss_fn(
            label_batch=batch["targets"],
            logits_batch=logits,
            mask_batch=batch.get("weights"),
            label_smoothing=training.label_smoothing,
        )
        return loss_dict["summed"], (loss_dict["n_valid_examples"], new_model_state)

    (summed, (n_valid, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    loss = summed / n_valid
    grads = jax.tree.map(lambda g: g / n_valid, grads)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    if training.grad_clip is not None:
        scale = jnp.clip(training.grad_clip / (grad_norm + _GRAD_CLIP_EPS), 0.0, 1.0)
        grads = jax.tree.map(lambda g: g * scale, grads)
    updates, opt_state = tx.update(grads, state["optimizer"], params)
    new_params = optax.apply_updates(params, updates)
    new_state = averager.after_update(
        {**state, "optimizer": opt_state}, new_params, new_model_state, collect=collect
    )
    return new_state, new_params, new_model_state, loss, grad_norm


def build_submission(
    make_optimizer: OptimizerFactory,
    optimizer_config: type[OptimizerConfig],
    self_tuning_extra: Mapping[str, Any] | None = None,
    optimizer_metrics: Callable[[optax.OptState], Mapping[str, float]] | None = None,
) -> Submission:
    """Turns an optax optimizer factory and its config type into AlgoPerf's five functions.

    ``optimizer_metrics`` reads the optimizer's own counters from its state (for
    example Shampoo's skipped steps) for the training log, at the logging cadence.
    """

    def init_optimizer_state(
        workload: spec.Workload,
        model_params: PyTree,
        model_state: PyTree,
        hyperparameters: Any,
        rng: Any,
    ) -> tuple[dict[str, Any], TrainPrograms]:
        del rng
        config = resolve_trial_config(
            hyperparameters,
            optimizer_config,
            workload.step_hint,
            # Self-tuning keeps the window off the accelerator when there is one
            # (asked here, not at import, so that importing initializes no backend).
            accelerator_present=hyperparameters is None and jax.default_backend() != "cpu",
            self_tuning_extra=self_tuning_extra,
        )
        tx = make_optimizer(config.optimizer, workload.step_hint)
        programs = TrainPrograms(workload, tx, config)
        # Fresh arrays throughout: AlgoPerf donates the params it hands us.
        shapes = jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype), model_params)
        averaging_entries = programs.averager.init_state(shapes, model_state)
        state = {"optimizer": jax.device_put(tx.init(shapes), programs.replicated)}
        return {**state, **averaging_entries}, programs

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
        averager = programs.averager
        # prepare_for_eval may have handed out the average: train the live weights.
        state, params, model_state = averager.restore_live(
            state, current_param_container, model_state
        )
        step = global_step + 1
        train_step = (
            programs.train_step_and_collect
            if averager.collects_in_step(step)
            else programs.train_step
        )
        held, state = averager.split_off(state, step)
        state, params, model_state, loss, grad_norm = train_step(
            model_state, state, params, batch, rng
        )
        state = averager.collect(held, state, params, model_state, step)
        if programs.recent_batches.maxlen:
            programs.recent_batches.append(batch)
        if should_log(global_step):
            extra = optimizer_metrics(state["optimizer"]) if optimizer_metrics else {}
            _log_training_metrics(workload, loss, grad_norm, averager, state, global_step, extra)
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
        del eval_results, global_step
        state, programs = optimizer_state
        averager = programs.averager
        if not programs.config.averaging.selects_best:
            state, params, model_state = averager.swap_in_average(
                state, current_param_container, model_state
            )
            return (state, programs), params, model_state
        start = time.perf_counter()
        live_loss = programs.score(current_param_container, model_state, rng)
        swap_start = time.perf_counter()
        state, params, model_state = averager.swap_in_average(
            state, current_param_container, model_state
        )
        swap_seconds = time.perf_counter() - swap_start
        average_loss = programs.score(params, model_state, rng)
        uses_average = average_loss <= live_loss
        if not uses_average:
            # The live weights are evaluated; they stay what trains next.
            state, params, model_state = averager.put_back_live(state, params, model_state)
        averager.last_selection = {
            "averaging/eval_uses_average": float(uses_average),
            "averaging/select_live_loss": live_loss,
            "averaging/select_average_loss": average_loss,
        }
        averager.timings.record("select", time.perf_counter() - start - swap_seconds)
        return (state, programs), params, model_state

    return Submission(init_optimizer_state, update_params, prepare_for_eval)


def _log_training_metrics(
    workload: spec.Workload,
    loss: jax.Array,
    grad_norm: jax.Array,
    averager: JaxAverager,
    state: dict[str, Any],
    global_step: int,
    optimizer_metrics: Mapping[str, float],
) -> None:
    metrics = {"loss": float(loss), "grad_norm": float(grad_norm)}
    # After the values above are read, so the step's counters are ready too.
    metrics.update(averager.metrics(state))
    metrics.update(optimizer_metrics)
    logger = getattr(workload, "metrics_logger", None)
    if logger is not None:
        logger.append_scalar_metrics(metrics, global_step)
    logging.info(
        "%d) loss = %0.4f, grad_norm = %0.4f", global_step, metrics["loss"], metrics["grad_norm"]
    )
