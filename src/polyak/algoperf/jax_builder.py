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

Placement. ``"device"`` (and ``"sharded"``, which JAX treats as ``"device"``)
keeps the averaging state replicated beside the params and folds a collection
into the train step. ``"host"`` keeps it on the CPU device: after the train
step, the new params are copied there with an asynchronous ``device_put`` and
folded by a jitted CPU program, so accelerator memory holds no window and the
step path never waits. The averaging state is then left out of the
accelerator programs' inputs, but the pytree keeps the same structure.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from polyak.algoperf import spec
from polyak.algoperf.api import Submission, data_selection, should_log
from polyak.algoperf.batch_sizes import get_batch_size
from polyak.algoperf.trial_config import OptimizerConfig, TrialConfig, resolve_trial_config
from polyak.averaging import jax_backend, monitoring
from polyak.averaging.config import AveragingConfig, AveragingError

OptimizerFactory = Callable[[Any, int], optax.GradientTransformation]
PyTree = Any

_GRAD_CLIP_EPS = 1e-6


class TrainPrograms:
    """The jitted steps of one trial, and the host's memory of the swap flag.

    It stands where AlgoPerf's baseline keeps ``opt_update_fn``; calling it
    applies the optax update, so code that treats it as that still works.
    """

    def __init__(
        self, workload: spec.Workload, tx: optax.GradientTransformation, config: TrialConfig
    ) -> None:
        self.tx = tx
        self.config = config
        averaging = self.averaging = config.averaging
        training = config.training
        mesh = Mesh(jax.devices(), ("batch",))
        replicated = NamedSharding(mesh, P())
        sharded = NamedSharding(mesh, P("batch"))
        step = functools.partial(
            _train_step,
            workload,
            tx,
            averaging,
            training.label_smoothing,
            training.dropout_rate,
            training.grad_clip,
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
        self.replicated = replicated
        self.timings = monitoring.Timings()
        self.num_skipped_logged = 0
        self.on_host = averaging.enabled and averaging.placement == "host"
        if averaging.enabled and averaging.placement == "sharded":
            logging.info(
                "averaging_placement='sharded' is implemented for PyTorch DDP; "
                "JAX keeps the averaging state replicated, as 'device' does"
            )
        if self.on_host:
            self.host = SingleDeviceSharding(_cpu_device())
            self._collect_on_host = jax.jit(
                functools.partial(jax_backend.collect, averaging),
                in_shardings=(self.host, self.host),
                out_shardings=self.host,
                donate_argnums=(0,),
            )
            self.swap_in_host_average = jax.jit(
                functools.partial(_swap_in_average, averaging),
                in_shardings=(replicated, replicated, replicated, replicated),
                out_shardings=(replicated, replicated, replicated),
                donate_argnums=(0, 1, 2),
            )

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

    # -- host placement: the averaging state on the CPU device --------------

    def _to_host(self, averaging_state: jax_backend.AveragingState) -> Any:
        # A restored checkpoint hands back arrays elsewhere; move them once.
        leaf = averaging_state.num_collected
        if getattr(leaf, "sharding", None) != self.host:
            averaging_state = jax.device_put(averaging_state, self.host)
        return averaging_state

    def collect_on_host(self, averaging_state: Any, tracked: PyTree) -> Any:
        """Folds ``tracked`` into the host state; dispatches and returns at once."""
        snapshot = _copy_to(tracked, self.host)
        return self._collect_on_host(self._to_host(averaging_state), snapshot)

    def upload_accumulator(self, averaging_state: Any) -> jax_backend.AveragingState:
        """The sum (or EMA) and counters on their way to the accelerators, without
        the window. The swap divides there, in the same program as the device
        placement: XLA's division is not correctly rounded, and its result
        depends on how the program around it is compiled."""
        summary = self._to_host(averaging_state)._replace(window=())
        return jax.device_put(summary, self.replicated)


def _cpu_device() -> jax.Device:
    try:
        return jax.devices("cpu")[0]
    except RuntimeError as error:
        raise AveragingError(
            "averaging_placement='host' needs JAX's CPU backend; include 'cpu' in "
            "JAX_PLATFORMS (for example JAX_PLATFORMS=cuda,cpu)"
        ) from error


def _copy_to(tree: PyTree, sharding: jax.sharding.Sharding) -> PyTree:
    """An asynchronous copy that never aliases ``tree``, whose buffers get donated."""
    try:
        return jax.device_put(tree, sharding, may_alias=False)
    except TypeError:  # jax without may_alias: copy on the source first
        return jax.device_put(jax.tree.map(jnp.copy, tree), sharding)


def _without_averaging(state: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Splits the host-placed averaging state from what the accelerator programs take."""
    return state["averaging"], {k: v for k, v in state.items() if k != "averaging"}


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
    new_state = {**state, "optimizer": opt_state, "swapped": jnp.zeros([], jnp.bool_)}
    if collect:
        new_state["averaging"] = jax_backend.collect(
            averaging, state["averaging"], _tracked(averaging, new_params, new_model_state)
        )
    return new_state, new_params, new_model_state, loss, grad_norm


def _swap_in_average(
    averaging: AveragingConfig,
    state: dict[str, Any],
    params: PyTree,
    model_state: PyTree,
    averaging_state: jax_backend.AveragingState | None = None,
) -> tuple[dict[str, Any], PyTree, PyTree]:
    """Loads the average; ``averaging_state`` overrides the state's own (host placement)."""
    if averaging_state is None:
        averaging_state = state["averaging"]
    tracked = _tracked(averaging, params, model_state)
    averaged_params, averaged_model_state = jax_backend.average(averaging, averaging_state, tracked)
    if averaging.buffers != "average":
        # The live statistics are evaluated with the average (the paper's
        # choice); the returned tree must not alias the donated input.
        averaged_model_state = jax.tree.map(jnp.copy, model_state)
    new_state = {**state, "live": tracked, "swapped": jnp.ones([], jnp.bool_)}
    return new_state, averaged_params, averaged_model_state


def build_submission(
    make_optimizer: OptimizerFactory,
    optimizer_config: type[OptimizerConfig],
    self_tuning_extra: Mapping[str, Any] | None = None,
) -> Submission:
    """Turns an optax optimizer factory and its config type into AlgoPerf's five functions."""

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
        averaging = config.averaging
        if averaging.mode == "twa":
            raise AveragingError(
                "averaging='twa' (trainable weight averaging) is implemented for PyTorch only; "
                "use the PyTorch submission, or averaging='lawa' / 'ema' with JAX"
            )
        tx = make_optimizer(config.optimizer, workload.step_hint)
        programs = TrainPrograms(workload, tx, config)
        # Fresh arrays throughout: AlgoPerf donates the params it hands us.
        shapes = jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype), model_params)
        tracked = _tracked(averaging, shapes, model_state)
        averaging_home = programs.host if programs.on_host else programs.replicated
        jax_backend.check_fits(averaging, tracked, next(iter(averaging_home.device_set)))
        state = {
            "optimizer": tx.init(shapes),
            # The slot for the live weights while the average is out for eval.
            "live": jax.tree.map(jnp.zeros_like, tracked) if averaging.enabled else ((), ()),
            "swapped": jnp.zeros([], jnp.bool_),
        }
        state = jax.device_put(state, programs.replicated)
        state["averaging"] = jax.device_put(jax_backend.init(averaging, tracked), averaging_home)
        return state, programs

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
            start = time.perf_counter()
            # Train the live weights; the evaluated tree takes their slot.
            live_params, live_model_state = state["live"]
            if programs.averaging.buffers == "average":
                state = {**state, "live": (params, model_state)}
                model_state = live_model_state
            else:
                state = {**state, "live": (params, ())}
            params = live_params
            programs.timings.record("restore", time.perf_counter() - start)
        collect = programs.averaging.should_collect(global_step + 1)
        if programs.on_host:
            averaging_state, state = _without_averaging(state)
            state, params, model_state, loss, grad_norm = programs.train_step(
                model_state, state, params, batch, rng
            )
            if collect:
                start = time.perf_counter()
                averaging_state = programs.collect_on_host(
                    averaging_state, _tracked(programs.averaging, params, model_state)
                )
                programs.timings.record("collect", time.perf_counter() - start)
            state = {**state, "averaging": averaging_state}
        else:
            step = programs.train_step_and_collect if collect else programs.train_step
            state, params, model_state, loss, grad_norm = step(
                model_state, state, params, batch, rng
            )
        programs.remember_swapped(state["swapped"], False)
        if should_log(global_step):
            _log_training_metrics(workload, loss, grad_norm, state, global_step, programs)
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
        start = time.perf_counter()
        if programs.on_host:
            averaging_state, state = _without_averaging(state)
            state, params, model_state = programs.swap_in_host_average(
                state,
                current_param_container,
                model_state,
                programs.upload_accumulator(averaging_state),
            )
            state = {**state, "averaging": averaging_state}
        else:
            state, params, model_state = programs.swap_in_average(
                state, current_param_container, model_state
            )
        programs.timings.record("swap", time.perf_counter() - start)
        programs.remember_swapped(state["swapped"], True)
        return (state, programs), params, model_state

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
    programs: TrainPrograms,
) -> None:
    averaging_state = state["averaging"]
    metrics: dict[str, float] = {"loss": float(loss), "grad_norm": float(grad_norm)}
    counters = (averaging_state.num_collected, averaging_state.num_skipped_nonfinite)
    # A host fold still in flight is not waited for; the next log reports it.
    if all(getattr(c, "is_ready", lambda: True)() for c in counters):
        num_collected, num_skipped = (int(c) for c in counters)
        metrics["averaging/num_collected"] = num_collected
        metrics["averaging/num_skipped_nonfinite"] = num_skipped
        if num_skipped > programs.num_skipped_logged:
            monitoring.warn_nonfinite(num_skipped)
            programs.num_skipped_logged = num_skipped
    metrics.update(programs.timings.drain_ms())
    logger = getattr(workload, "metrics_logger", None)
    if logger is not None:
        logger.append_scalar_metrics(metrics, global_step)
    logging.info(
        "%d) loss = %0.4f, grad_norm = %0.4f", global_step, metrics["loss"], metrics["grad_norm"]
    )
