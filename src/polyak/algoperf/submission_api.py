"""What both framework builders share of AlgoPerf's submission API."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from polyak.algoperf import spec
from polyak.algoperf.batch_sizes import get_batch_size

# The submissions polyak ships, the frameworks each comes in, and AlgoPerf's rulesets.
SUBMISSIONS: tuple[str, ...] = ("nadamw", "shampoo")
FRAMEWORKS: tuple[str, ...] = ("pytorch", "jax")
RULESETS: tuple[str, ...] = ("external", "self")


def data_selection(
    workload: spec.Workload,
    input_queue: Iterator[dict[str, Any]],
    optimizer_state: Any,
    current_param_container: Any,
    model_state: Any,
    hyperparameters: Any,
    global_step: int,
    rng: Any,
) -> dict[str, Any]:
    """The next batch of AlgoPerf's pre-shuffled queue: polyak selects no data."""
    del workload, optimizer_state, current_param_container, model_state
    del hyperparameters, global_step, rng
    return next(input_queue)


def should_log(global_step: int) -> bool:
    """The baseline's logging cadence: the first 100 steps, then every 500.

    Logging reads values back to the host, which would stall every step otherwise.
    """
    return global_step <= 100 or global_step % 500 == 0


@dataclasses.dataclass(frozen=True)
class Submission:
    """AlgoPerf's submission API, as plain functions with v0.6 signatures.

    Both builders share the batch sizes and the data selection; they supply
    the three functions that differ by framework.
    """

    init_optimizer_state: Callable[..., Any]
    update_params: Callable[..., Any]
    prepare_for_eval: Callable[..., Any]
    get_batch_size: Callable[[str], int] = get_batch_size
    data_selection: Callable[..., Any] = data_selection
