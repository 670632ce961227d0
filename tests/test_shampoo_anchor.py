"""Shampoo against the AlgoPerf v0.5 winner's recorded trajectories.

The numbers live in tests/fixtures/shampoo_anchor.json.

The fixture holds, for each small problem of :mod:`shampoo_anchor_problems`
and each point of ``tuning_search_spaces/shampoo.json`` (roots every 5 steps),
sketches of the winner's parameters after every step, its learning rates and
losses, and ``float64_drift``: how far its own float32 run moved from the same
run with float64 factors. ``scripts/record_shampoo_anchor.py`` writes it where
the winner is importable; these tests need only the fixture.

The bar, per step: polyak's torch twin within ``1e-4`` of the winner (relative
to the parameter's norm), plus ``DRIFT_MARGIN`` times the winner's own
float32-vs-float64 drift at that step. Where that drift is large, round-off
of float32 ``eigh`` on rank-deficient factors decides the winner's step, and
polyak (whose roots are computed in float64) cannot and should not follow it
more closely than the winner follows itself. The JAX twin is held to the torch
twin at 1e-5 with float64 roots (``jax_enable_x64``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

import shampoo_anchor_problems as problems
from polyak.optim import shampoo_torch
from polyak.optim.shampoo_config import ShampooConfig

TOLERANCE = 1e-4
DRIFT_MARGIN = 3.0


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # These problems are tiny: a second thread only adds contention on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _fixture() -> dict[str, Any]:
    return json.loads(problems.FIXTURE.read_text())


def run_torch(problem: problems.Problem, point: dict[str, Any], steps: int) -> dict[str, Any]:
    """polyak's torch Shampoo, driven as the v0.5 submission drives its optimizer."""
    model = problem.build()
    named = dict(model.named_parameters())
    config = ShampooConfig.from_hyperparameters(point)
    optimizer, scheduler = shampoo_torch.make_shampoo(
        model.parameters(), config, problems.STEP_HINT
    )
    sketches = [problems.sketch(problem.name, named)]
    losses, rates = [], []
    for step in range(steps):
        optimizer.zero_grad()
        loss = problem.loss(model, problem.batch(step))
        loss.backward()
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        sketches.append(problems.sketch(problem.name, named))
    return {"loss": losses, "lr": rates, "sketches": sketches}


def run_jax(problem: problems.Problem, point: dict[str, Any], steps: int) -> dict[str, Any]:
    """polyak's JAX Shampoo on the same problem: torch computes the gradients at its parameters."""
    import jax
    import optax

    from polyak.optim import shampoo_jax

    model = problem.build()
    named = dict(model.named_parameters())
    params = {name: jax.numpy.asarray(p.detach().numpy().copy()) for name, p in named.items()}
    config = ShampooConfig.from_hyperparameters(point)
    tx = shampoo_jax.make_shampoo(config, problems.STEP_HINT)
    schedule = shampoo_jax.shampoo_schedule(config, problems.STEP_HINT)
    state = tx.init(params)

    @jax.jit
    def update(grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    sketches = [problems.sketch(problem.name, named)]
    losses, rates = [], []
    for step in range(steps):
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(torch.from_numpy(np.array(params[name])))
        model.zero_grad()
        loss = problem.loss(model, problem.batch(step))
        loss.backward()
        grads = {name: jax.numpy.asarray(p.grad.numpy()) for name, p in named.items()}
        rates.append(float(schedule(step)))
        params, state = update(grads, state, params)
        losses.append(float(loss.detach()))
        current = {name: torch.from_numpy(np.array(value)) for name, value in params.items()}
        sketches.append(problems.sketch(problem.name, current))
    return {"loss": losses, "lr": rates, "sketches": sketches}


# Distributed Shampoo's own numerics: float32 statistics and eigh, roots uncapped.
ANCHOR_NUMERICS = {"preconditioner_precision": "float32", "max_root_condition": 0}


def worst_excess(ours: dict[str, Any], anchor: dict[str, Any]) -> tuple[float, float, int]:
    """(max relative difference, max difference beyond the bar, step of the latter).

    The bar at a step is 1e-4 plus DRIFT_MARGIN times the largest float64
    drift of the anchor so far (round-off, once it has moved the anchor,
    stays in its trajectory). Steps after the anchor stopped (its guard
    against non-finite factors) are not compared.
    """
    differences = np.asarray(problems.relative_differences(ours["sketches"], anchor["sketches"]))
    # The float64 run may stop earlier than the float32 one: no bar after that.
    drifts = np.full(len(differences), np.inf)
    recorded = np.nan_to_num(anchor["float64_drift"], nan=np.inf)[: len(differences)]
    drifts[: len(recorded)] = np.maximum.accumulate(recorded)
    bars = TOLERANCE + DRIFT_MARGIN * drifts
    excesses = np.nan_to_num(differences - bars, nan=np.inf)
    excesses[~np.isfinite(bars)] = -np.inf
    where = int(np.argmax(excesses))
    finite = differences[np.isfinite(bars)]
    return float(np.nanmax(finite)), float(excesses[where]), where


POINTS = range(len(problems.search_space_points()))
CASES = [(name, index) for name in problems.PROBLEMS for index in POINTS]


@functools.cache
def _torch_run(problem_name: str, point_index: int, anchor_numerics: bool) -> dict[str, Any]:
    """One torch run per case, shared by the tests that need it."""
    overrides = ANCHOR_NUMERICS if anchor_numerics else {}
    point = _point(problem_name, point_index, **overrides)
    steps = len(_anchor_run(problem_name, point_index)["loss"])
    return run_torch(problems.PROBLEMS[problem_name], point, steps)


def _anchor_run(problem_name: str, point_index: int) -> dict[str, Any]:
    return _fixture()["runs"][problem_name][point_index]


def _point(problem_name: str, point_index: int, **overrides: Any) -> dict[str, Any]:
    problem = problems.PROBLEMS[problem_name]
    point = problems.parity_point(problems.search_space_points()[point_index], problem)
    return {**point, **overrides}


def test_fixture_records_its_origin() -> None:
    fixture = _fixture()
    assert len(fixture["anchor"]["commit"]) == 40
    assert fixture["anchor"]["path"].endswith("external_tuning/shampoo_submission")
    assert "record_shampoo_anchor.py" in fixture["command"]
    assert set(fixture["runs"]) == set(problems.PROBLEMS)
    assert problems.FIXTURE.stat().st_size < 1_000_000


@pytest.mark.parametrize(("problem_name", "point_index"), CASES)
def test_torch_follows_the_anchor(problem_name: str, point_index: int) -> None:
    """With the anchor's numerics, polyak follows the recorded trajectory."""
    anchor = _anchor_run(problem_name, point_index)
    ours = _torch_run(problem_name, point_index, anchor_numerics=True)
    # The anchor's warmup starts at 1e-10 of the peak, ours at 0.
    rates = anchor["lr"][: len(ours["lr"])]  # a stopped anchor recorded the rate of its last try
    np.testing.assert_allclose(ours["lr"], rates, rtol=1e-6, atol=1e-9 * max(rates))
    worst, excess, where = worst_excess(ours, anchor)
    assert excess <= 0.0, (
        f"{problem_name} point {point_index}: max relative difference {worst:.2e}; "
        f"step {where} exceeds 1e-4 + {DRIFT_MARGIN}·drift by {excess:.2e}"
    )


# Where float64 statistics and capped roots change the trajectory at all: the
# blocked and embedding problems follow the anchor to 1e-6 either way.
ROUND_OFF_DECIDED = ("least_squares", "mlp", "conv")


@pytest.mark.parametrize("problem_name", ROUND_OFF_DECIDED)
def test_default_numerics_reach_the_anchor_loss(problem_name: str) -> None:
    """float64 statistics and capped roots (deliberate differences) lose nothing.

    Best final loss over the five points: polyak's within 1% of the anchor's
    or lower (the anchor's diverging point counts as infinitely bad).
    """
    ours_best, anchor_best = math.inf, math.inf
    for index in POINTS:
        anchor = _anchor_run(problem_name, index)
        ours = _torch_run(problem_name, index, anchor_numerics=False)
        if len(anchor["loss"]) == problems.STEPS and math.isfinite(anchor["loss"][-1]):
            anchor_best = min(anchor_best, anchor["loss"][-1])
        if math.isfinite(ours["loss"][-1]):
            ours_best = min(ours_best, ours["loss"][-1])
    assert ours_best <= 1.01 * anchor_best, (problem_name, ours_best, anchor_best)


@contextlib.contextmanager
def float64_enabled() -> Iterator[None]:
    """x64 for the block only: jax >= 0.8 has jax.enable_x64, jax 0.7 the experimental one."""
    import jax

    enable = getattr(jax, "enable_x64", None)
    if enable is not None:
        with enable(True):
            yield
    else:
        from jax.experimental import enable_x64

        with enable_x64():
            yield


JAX_POINTS = (2, 3)  # SGD grafting with momentum; Adam grafting, inverse root 2, momentum


@pytest.mark.parametrize("point_index", JAX_POINTS)
@pytest.mark.parametrize("problem_name", list(problems.PROBLEMS))
def test_jax_twin_follows_the_torch_twin(problem_name: str, point_index: int) -> None:
    """Same problem, same gradients: the twins agree to 1e-5 with float64 statistics."""
    pytest.importorskip("jax")
    steps = len(_anchor_run(problem_name, point_index)["loss"])
    expected = _torch_run(problem_name, point_index, anchor_numerics=False)
    with float64_enabled():
        ours = run_jax(problems.PROBLEMS[problem_name], _point(problem_name, point_index), steps)
    # A diverging run (the SGD point on least squares) is compared until its
    # loss has grown tenfold: beyond that the parameters explode and relative
    # differences measure only the explosion.
    compared = next(
        (s for s, loss in enumerate(expected["loss"]) if not loss <= 10 * expected["loss"][0]),
        steps,
    )
    differences = problems.relative_differences(
        ours["sketches"][: compared + 1], expected["sketches"][: compared + 1]
    )
    assert max(differences) <= 1e-5, (problem_name, point_index, max(differences))
