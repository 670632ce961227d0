"""Small deterministic problems on which Shampoo is compared with the AlgoPerf v0.5 winner.

Shared by ``scripts/record_shampoo_anchor.py`` (which runs the winner's
DistributedShampoo where it is importable and writes
``tests/fixtures/shampoo_anchor.json``) and ``tests/test_shampoo_anchor.py``
(which replays polyak's twins against that fixture). Everything here is torch;
the JAX twin is fed the gradients these torch problems compute at its own
parameters, so both twins see the same problem without a second model.

A parameter is recorded as a sketch: ``SKETCH_SIZE`` Gaussian projections
(fixed seed per problem and parameter) plus its norm. Since the sketch is
linear, ``‖S(θ − θ*)‖ / ‖Sθ*‖`` estimates ``‖θ − θ*‖ / ‖θ*‖`` without storing
the parameter.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import zlib
from collections.abc import Callable
from typing import Any

import torch

STEPS = 60
STEP_HINT = 100
# Roots every few steps, so that 60 steps see a dozen of them and the early,
# rank-deficient factors.
PRECONDITION_FREQUENCY = 5
SKETCH_SIZE = 6
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SEARCH_SPACE = REPO_ROOT / "tuning_search_spaces" / "shampoo.json"
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "shampoo_anchor.json"

Batch = tuple[torch.Tensor, ...]


@dataclasses.dataclass(frozen=True)
class Problem:
    """A model factory, a batch per step and a loss; ``overrides`` adjust the point."""

    name: str
    build: Callable[[], torch.nn.Module]
    batch: Callable[[int], Batch]
    loss: Callable[[torch.nn.Module, Batch], torch.Tensor]
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


def _generator(name: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{name}/{step}".encode()))


def _seeded(name: str, factory: Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        torch.manual_seed(zlib.crc32(name.encode()))
        return factory()

    return build


def _mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((prediction - target) ** 2).mean()


# -- ill-conditioned least squares: inputs scaled 1…30 ------------------------------

_LSQ_SCALES = torch.linspace(1.0, 30.0, 8)
_LSQ_TEACHER = torch.randn(16, 8, generator=torch.Generator().manual_seed(7)) / 8.0


def _lsq_batch(step: int) -> Batch:
    inputs = torch.randn(32, 8, generator=_generator("lsq", step)) * _LSQ_SCALES
    return inputs, inputs @ _LSQ_TEACHER.T


def _lsq_model() -> torch.nn.Module:
    return torch.nn.Linear(8, 16, bias=False)


def _linear_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    inputs, targets = batch
    return _mse(model(inputs), targets)


# -- 2-layer MLP with a LayerNorm: matrices, biases and a 1-D scale ------------------


def _mlp_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(12, 32), torch.nn.LayerNorm(32), torch.nn.Tanh(), torch.nn.Linear(32, 4)
    )


_MLP_TEACHER = torch.randn(4, 12, generator=torch.Generator().manual_seed(11))


def _mlp_batch(step: int) -> Batch:
    inputs = torch.randn(64, 12, generator=_generator("mlp", step))
    return inputs, torch.sin(inputs @ _MLP_TEACHER.T)


# -- a conv kernel: 16×8×3×3 merges to (384, 3) with max_preconditioner_dim 1024 ------


def _conv_model() -> torch.nn.Module:
    return torch.nn.Conv2d(8, 16, 3)


def _conv_batch(step: int) -> Batch:
    generator = _generator("conv", step)
    inputs = torch.randn(4, 8, 6, 6, generator=generator)
    return inputs, torch.tanh(inputs[:, :4].repeat(1, 4, 1, 1)[:, :, 1:-1, 1:-1])


# -- a parameter larger than max_preconditioner_dim (reduced to 8 here): 6 blocks ----


def _blocked_model() -> torch.nn.Module:
    return torch.nn.Linear(12, 20, bias=False)


_BLOCKED_TEACHER = torch.randn(20, 12, generator=torch.Generator().manual_seed(13)) / 4.0


def _blocked_batch(step: int) -> Batch:
    inputs = torch.randn(16, 12, generator=_generator("blocked", step))
    return inputs, inputs @ _BLOCKED_TEACHER.T


# -- a dimension >= 1,000,000 (Criteo-like embedding): grafted only -----------------

_EMBEDDING_ROWS = 1_000_000


class _Embedding(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(_EMBEDDING_ROWS) * 0.1)
        self.dense = torch.nn.Linear(4, 1, bias=False)

    def forward(self, ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.table[ids].sum(dim=1) + self.dense(features).squeeze(-1)


def _embedding_batch(step: int) -> Batch:
    generator = _generator("embedding", step)
    ids = torch.randint(0, 500, (32, 3), generator=generator) * 1999
    features = torch.randn(32, 4, generator=generator)
    return ids, features, torch.cos(ids.float().mean(dim=1) / 1e5) + features[:, 0]


def _embedding_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    ids, features, targets = batch
    return _mse(model(ids, features), targets)


def _mlp_or_conv_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    inputs, targets = batch
    return _mse(model(inputs), targets)


PROBLEMS: dict[str, Problem] = {
    problem.name: problem
    for problem in (
        Problem("least_squares", _seeded("least_squares", _lsq_model), _lsq_batch, _linear_loss),
        Problem("mlp", _seeded("mlp", _mlp_model), _mlp_batch, _mlp_or_conv_loss),
        Problem("conv", _seeded("conv", _conv_model), _conv_batch, _mlp_or_conv_loss),
        Problem(
            "blocked",
            _seeded("blocked", _blocked_model),
            _blocked_batch,
            _linear_loss,
            overrides={"max_preconditioner_dim": 8},
        ),
        Problem("embedding", _seeded("embedding", _Embedding), _embedding_batch, _embedding_loss),
    )
}


def search_space_points() -> list[dict[str, Any]]:
    """The points of tuning_search_spaces/shampoo.json (the v0.5 winner's five)."""
    return json.loads(SEARCH_SPACE.read_text())


def parity_point(point: dict[str, Any], problem: Problem) -> dict[str, Any]:
    """A search-space point with roots every PRECONDITION_FREQUENCY steps, plus overrides."""
    return {
        **point,
        "precondition_frequency": PRECONDITION_FREQUENCY,
        "start_preconditioning_step": -1,
        **problem.overrides,
    }


_SKETCHES: dict[tuple[str, str], torch.Tensor] = {}


def sketch_matrix(problem: str, parameter: str, numel: int) -> torch.Tensor:
    key = (problem, parameter)
    if key not in _SKETCHES:
        generator = torch.Generator().manual_seed(
            zlib.crc32(f"sketch/{problem}/{parameter}".encode())
        )
        _SKETCHES[key] = torch.randn(SKETCH_SIZE, numel, generator=generator, dtype=torch.float64)
    return _SKETCHES[key]


def sketch(problem: str, named: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per parameter: SKETCH_SIZE projections, then the norm (float64)."""
    result = {}
    for name, value in named.items():
        flat = value.detach().reshape(-1).to(torch.float64)
        projections = sketch_matrix(problem, name, flat.numel()) @ flat
        result[name] = [*projections.tolist(), float(flat.norm())]
    return result


def relative_differences(
    ours: list[dict[str, list[float]]], anchor: list[dict[str, list[float]]]
) -> list[float]:
    """Per step, the largest ``‖S(θ − θ*)‖ / scale`` over parameters.

    ``scale`` is the largest ``‖Sθ*‖`` of that parameter along the anchor's
    run, so a parameter that starts at zero (a bias) is measured against the
    size it reaches rather than against nothing. The norms stored after the
    projections are not used.
    """
    names = list(anchor[0])
    scales = {
        name: max(float(torch.tensor(s[name][:SKETCH_SIZE]).norm()) for s in anchor) or 1.0
        for name in names
    }
    result = []
    for a, b in zip(ours, anchor, strict=False):
        result.append(
            max(
                float(
                    (
                        torch.tensor(a[name][:SKETCH_SIZE], dtype=torch.float64)
                        - torch.tensor(b[name][:SKETCH_SIZE], dtype=torch.float64)
                    ).norm()
                )
                / scales[name]
                for name in names
            )
        )
    return result
