"""Builds AlgoPerf's five submission functions for PyTorch.

A submission is an optimizer factory plus its config type; the builder adds
what every polyak submission shares: the loss as AlgoPerf's baseline computes
it (summed / n_valid, all-reduced under DDP), label smoothing, dropout,
optional gradient clipping, training metrics, and weight averaging evaluated
through ``prepare_for_eval``.

The hyperparameters are read once, in ``init_optimizer_state``, into a
:class:`~polyak.algoperf.trial_config.TrialConfig` kept in the optimizer state.
``optimizer_state`` is a dict whose every value has ``state_dict`` and
``load_state_dict``, because AlgoPerf's torch checkpointing calls them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from absl import logging

from polyak.algoperf import spec
from polyak.algoperf.submission_api import Submission, should_log
from polyak.algoperf.trial_config import OptimizerConfig, TrialConfig, resolve_trial_config
from polyak.averaging.averager_torch import TorchAverager, TWAFitContext
from polyak.distributed_torch import is_distributed

OptimizerFactory = Callable[
    [Iterable[torch.Tensor], Any, int],
    "tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]",
]


def build_submission(
    make_optimizer: OptimizerFactory,
    optimizer_config: type[OptimizerConfig],
    self_tuning_extra: Mapping[str, Any] | None = None,
    optimizer_metrics: Callable[[torch.optim.Optimizer], Mapping[str, float]] | None = None,
) -> Submission:
    """Turns an optimizer factory and its config type into AlgoPerf's five functions.

    ``optimizer_metrics`` reads the optimizer's own counters (for example
    Shampoo's skipped steps) for the training log, at the logging cadence.
    """

    def init_optimizer_state(
        workload: spec.Workload,
        model_params: torch.nn.Module,
        model_state: Any,
        hyperparameters: Any,
        rng: Any,
    ) -> dict[str, Any]:
        del model_state, rng
        config = resolve_trial_config(
            hyperparameters,
            optimizer_config,
            workload.step_hint,
            # Self-tuning keeps the window off the accelerator when there is one.
            accelerator_present=hyperparameters is None and torch.cuda.is_available(),
            self_tuning_extra=self_tuning_extra,
        )
        optimizer, scheduler = make_optimizer(
            model_params.parameters(), config.optimizer, workload.step_hint
        )
        return {
            "config": config,
            "optimizer": optimizer,
            "scheduler": scheduler,
            "averager": TorchAverager(config.averaging, model_params),
        }

    def update_params(
        workload: spec.Workload,
        current_param_container: torch.nn.Module,
        current_params_types: Any,
        model_state: Any,
        hyperparameters: Any,
        batch: dict[str, torch.Tensor],
        loss_type: Any,
        optimizer_state: dict[str, Any],
        eval_results: list[tuple[int, float]],
        global_step: int,
        rng: Any,
        train_state: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], torch.nn.Module, Any]:
        del current_params_types, hyperparameters, loss_type, eval_results, train_state
        training = optimizer_state["config"].training
        model = current_param_container
        averager: TorchAverager = optimizer_state["averager"]
        optimizer: torch.optim.Optimizer = optimizer_state["optimizer"]
        # prepare_for_eval may have loaded the average: train the live weights.
        averager.restore_live()

        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss, new_model_state = _training_loss(
            workload,
            model,
            model_state,
            batch,
            rng,
            update_batch_norm=True,
            dropout_rate=training.dropout_rate,
            label_smoothing=training.label_smoothing,
        )
        # The weights after step global_step are still the module's, and the loss
        # just computed is theirs: a finite loss is the guard that keeps a
        # non-finite snapshot out of the average, and it reads no weights. (A
        # weight the loss does not read, such as an embedding row absent from
        # the batch, is not judged by it; NaN/inf spread to the loss otherwise.)
        averager.collect(global_step, finite=torch.isfinite(loss.detach()))
        loss.backward()

        if training.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=training.grad_clip)
        # A host-placed snapshot may still be copying the weights (CUDA only).
        averager.before_optimizer_step()
        optimizer.step()
        optimizer_state["scheduler"].step()
        # TWA fits on recent batches, averaging_select="best" scores on them.
        averager.remember_batch(batch, global_step + 1)

        if should_log(global_step):
            extra = optimizer_metrics(optimizer) if optimizer_metrics else {}
            _log_training_metrics(workload, model, loss, averager, global_step, extra)
        return optimizer_state, current_param_container, new_model_state

    def prepare_for_eval(
        workload: spec.Workload,
        current_param_container: torch.nn.Module,
        current_params_types: Any,
        model_state: Any,
        hyperparameters: Any,
        loss_type: Any,
        optimizer_state: dict[str, Any],
        eval_results: list[tuple[int, float]],
        global_step: int,
        rng: Any,
    ) -> tuple[dict[str, Any], torch.nn.Module, Any]:
        del current_params_types, hyperparameters, loss_type, eval_results
        config: TrialConfig = optimizer_state["config"]
        averager: TorchAverager = optimizer_state["averager"]
        fit_context = None
        if config.averaging.mode == "twa":
            fit_context = _twa_fit_context(
                workload, model_state, rng, config.training.label_smoothing
            )
        # The last step's weights have no loss yet: the averager checks them itself
        # (once per eval, and only on a collection step; the next update_params
        # does not collect them again).
        averager.collect(global_step)
        # TWA fits here, inside prepare_for_eval: its time is submission time.
        if not config.averaging.selects_best:
            averager.swap_in_average(fit_context=fit_context)
            return optimizer_state, current_param_container, model_state
        start = time.perf_counter()
        # The loss the eval computes: eval mode, no label smoothing.
        score_fn = _frozen_loss_fn(
            workload, model_state, rng, mode=spec.ForwardPassMode.EVAL, label_smoothing=0.0
        )
        live_loss = averager.score(score_fn)
        swap_start = time.perf_counter()
        averager.swap_in_average(fit_context=fit_context)
        swap_seconds = time.perf_counter() - swap_start
        average_loss = averager.score(score_fn) if averager.swapped else math.inf
        uses_average = average_loss <= live_loss
        if averager.swapped and not uses_average:
            averager.restore_live()  # the live weights stay what trains next
        averager.last_selection = _selection_metrics(uses_average, live_loss, average_loss)
        averager.timings.record("select", time.perf_counter() - start - swap_seconds)
        return optimizer_state, current_param_container, model_state

    return Submission(init_optimizer_state, update_params, prepare_for_eval)


def _training_loss(
    workload: spec.Workload,
    model: torch.nn.Module,
    model_state: Any,
    batch: dict[str, Any],
    rng: Any,
    *,
    update_batch_norm: bool,
    dropout_rate: float,
    label_smoothing: float,
    mode: spec.ForwardPassMode = spec.ForwardPassMode.TRAIN,
) -> tuple[torch.Tensor, Any]:
    """The loss as AlgoPerf's baseline computes it: summed / n_valid over all ranks."""
    logits, new_model_state = workload.model_fn(
        params=model,
        augmented_and_preprocessed_input_batch=batch,
        model_state=model_state,
        mode=mode,
        rng=rng,
        update_batch_norm=update_batch_norm,
        dropout_rate=dropout_rate,
    )
    loss_dict = workload.loss_fn(
        label_batch=batch["targets"],
        logits_batch=logits,
        mask_batch=batch.get("weights"),
        label_smoothing=label_smoothing,
    )
    summed_loss = loss_dict["summed"]
    n_valid = loss_dict["n_valid_examples"]
    if is_distributed():
        # The autograd-aware all_reduce scales gradients by the global
        # number of examples, as AlgoPerf's baseline does.
        import torch.distributed.nn as dist_nn

        summed_loss = dist_nn.all_reduce(summed_loss)
        n_valid = dist_nn.all_reduce(n_valid)
    return summed_loss / n_valid, new_model_state


def _frozen_loss_fn(
    workload: spec.Workload,
    model_state: Any,
    rng: Any,
    *,
    mode: spec.ForwardPassMode,
    label_smoothing: float,
) -> Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor]:
    """A module's loss on a batch with BatchNorm statistics frozen and no dropout,
    summed over the ranks so that every rank sees the same value."""

    def loss_fn(module: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        loss, _ = _training_loss(
            workload,
            module,
            model_state,
            batch,
            rng,
            mode=mode,
            update_batch_norm=False,
            dropout_rate=0.0,
            label_smoothing=label_smoothing,
        )
        return loss

    return loss_fn


def _selection_metrics(
    uses_average: bool, live_loss: float, average_loss: float
) -> dict[str, float]:
    return {
        "averaging/eval_uses_average": float(uses_average),
        "averaging/select_live_loss": live_loss,
        "averaging/select_average_loss": average_loss,
    }


def _twa_fit_context(
    workload: spec.Workload, model_state: Any, rng: Any, label_smoothing: float
) -> TWAFitContext:
    """The training loss for TWA's fit (no dropout, BatchNorm frozen) and a
    forward pass that updates BatchNorm statistics for their recomputation."""

    def loss_with(smoothing: float) -> Callable[[torch.nn.Module, Any], torch.Tensor]:
        return _frozen_loss_fn(
            workload, model_state, rng, mode=spec.ForwardPassMode.TRAIN, label_smoothing=smoothing
        )

    def forward_fn(module: torch.nn.Module, batch: dict[str, Any]) -> Any:
        return workload.model_fn(
            params=module,
            augmented_and_preprocessed_input_batch=batch,
            model_state=model_state,
            mode=spec.ForwardPassMode.TRAIN,
            rng=rng,
            update_batch_norm=True,
            dropout_rate=0.0,
        )

    # The fit is judged on its held-out batches by the loss the eval reports
    # (no label smoothing), not by the one it descends.
    return TWAFitContext(
        loss_fn=loss_with(label_smoothing),
        forward_fn=forward_fn,
        validation_loss_fn=None if label_smoothing == 0.0 else loss_with(0.0),
    )


@torch.no_grad()
def _log_training_metrics(
    workload: spec.Workload,
    model: torch.nn.Module,
    loss: torch.Tensor,
    averager: TorchAverager,
    global_step: int,
    optimizer_metrics: Mapping[str, float],
) -> None:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else 0.0
    metrics = {
        "loss": float(loss),
        "grad_norm": float(grad_norm),
        # Counters and collect/swap/restore timings; never waits for a host fold.
        **averager.metrics(),
        **optimizer_metrics,
    }
    logger = getattr(workload, "metrics_logger", None)
    if logger is not None:
        logger.append_scalar_metrics(metrics, global_step)
    logging.info(
        "%d) loss = %0.4f, grad_norm = %0.4f", global_step, metrics["loss"], metrics["grad_norm"]
    )
