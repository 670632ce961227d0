"""The Shampoo submissions log the optimizer's own counters beside the averager's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fakes import JaxLinearWorkload, TorchLinearWorkload, batches
from polyak.optim.shampoo_config import COUNTER_NAMES, METRICS_PREFIX
from polyak.runner.submission_loader import load_submission_module

REPO = Path(__file__).resolve().parent.parent


class RecordingLogger:
    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, Any]]] = []

    def append_scalar_metrics(self, metrics: dict[str, Any], global_step: int) -> None:
        self.rows.append((global_step, dict(metrics)))


@pytest.mark.parametrize(
    ("framework", "workload_type"), [("pytorch", TorchLinearWorkload), ("jax", JaxLinearWorkload)]
)
def test_skipped_shampoo_steps_reach_the_training_log(framework: str, workload_type: type) -> None:
    submission = load_submission_module(
        REPO / "submissions" / "shampoo" / framework / "submission.py"
    )
    workload = workload_type()
    workload.metrics_logger = RecordingLogger()
    model, model_state = workload.init_model_fn(0)
    hyperparameters = {"precondition_frequency": 2, "start_preconditioning_step": 2}
    state = submission.init_optimizer_state(workload, model, model_state, hyperparameters, None)
    data = batches(0, 3)
    data[1] = {**data[1], "targets": np.full_like(data[1]["targets"], np.nan)}
    for global_step, batch in enumerate(data):
        state, model, model_state = submission.update_params(
            workload,
            model,
            None,
            model_state,
            hyperparameters,
            batch,
            None,
            state,
            [],
            global_step,
            None,
        )
    logged = dict(workload.metrics_logger.rows)
    for name in COUNTER_NAMES:
        assert f"{METRICS_PREFIX}{name}" in logged[0]
    assert logged[0][f"{METRICS_PREFIX}skipped_steps"] == 0
    # The NaN batch of step 1 was skipped, and the log says so from then on.
    assert logged[1][f"{METRICS_PREFIX}skipped_steps"] > 0
    assert (
        logged[2][f"{METRICS_PREFIX}skipped_steps"] == logged[1][f"{METRICS_PREFIX}skipped_steps"]
    )
