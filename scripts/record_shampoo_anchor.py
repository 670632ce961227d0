"""Records the AlgoPerf v0.5 winner's Shampoo trajectories into tests/fixtures/shampoo_anchor.json.

The anchor is the external-tuning winner of AlgoPerf v0.5,
``mlcommons/submissions_algorithms``,
``previous_leaderboards/algoperf_v05/submissions/external_tuning/shampoo_submission/``:
its ``submission.py`` and vendored ``DistributedShampoo``. It is not part of
this repository and never becomes one; this script runs it where it is
importable and writes numbers only.

Setup (outside the repository)::

    git clone https://github.com/mlcommons/submissions_algorithms /tmp/sa
    TEAM=/tmp/anchor_root/submissions/submissions_algorithms_v0_5/AlgoPerf_Team_21
    mkdir -p $TEAM/external_tuning
    ln -s /tmp/sa/previous_leaderboards/algoperf_v05/submissions/external_tuning/\\
shampoo_submission $TEAM/external_tuning/
    python scripts/record_shampoo_anchor.py --anchor_root=/tmp/anchor_root --anchor_commit=<sha>

(the vendored package imports itself by that long absolute module path).

How the anchor is driven: its own ``init_optimizer_state`` builds the
optimizers and the learning-rate schedule from each point of
``tuning_search_spaces/shampoo.json`` (with ``precondition_frequency`` =
``start`` = 5, see ``tests/shampoo_anchor_problems.py``), on a one-process
``gloo`` group. Two adjustments, both needed to run it in one process: the
submission's ``DDPShampooConfig`` (8 trainers per group) allocates its blocks
on CUDA, so it is replaced by ``distributed_config=None``, the single-process
distributor (with one process, DDP's distributor owns every block and its
all-gather is the identity); and ``algorithmic_efficiency``
(the pre-0.6 name of AlgoPerf) is stubbed with the two names the submission
imports. Each step is what its ``update_params`` does: ``zero_grad``, the loss
on the step's batch, ``backward``, ``optimizer.step()`` of both optimizers,
then both schedulers.

A second run per point with ``preconditioner_dtype=float64`` measures how much
of the float32 trajectory is decided by round-off (the ``float64_drift``
entries): where that drift is large, no implementation can follow the float32
anchor more closely than the anchor follows itself.
"""

from __future__ import annotations

import datetime
import enum
import json
import os
import sys
import types
from typing import Any

import torch
import torch.distributed as dist
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import shampoo_anchor_problems as problems
from polyak.files import atomic_write_text

ANCHOR_MODULE = (
    "submissions.submissions_algorithms_v0_5.AlgoPerf_Team_21.external_tuning.shampoo_submission"
)
ANCHOR_PATH = "previous_leaderboards/algoperf_v05/submissions/external_tuning/shampoo_submission"

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "anchor_root", "/tmp/anchor_root", "Directory from which ANCHOR_MODULE is importable."
)
flags.DEFINE_string("anchor_commit", "", "Commit of mlcommons/submissions_algorithms recorded.")
flags.DEFINE_string("output", str(problems.FIXTURE), "Fixture file to write.")
flags.DEFINE_list("problems", list(problems.PROBLEMS), "Problems to record.")


def _stub_algorithmic_efficiency() -> None:
    """The two names the submission imports from algorithmic_efficiency."""

    class ForwardPassMode(enum.Enum):
        TRAIN = 0
        EVAL = 1

    spec = types.SimpleNamespace(
        Workload=Any,
        ParameterContainer=Any,
        ModelAuxiliaryState=Any,
        Hyperparameters=Any,
        RandomState=Any,
        OptimizerState=Any,
        ParameterTypeTree=Any,
        Tensor=Any,
        LossType=Any,
        UpdateReturn=Any,
        ForwardPassMode=ForwardPassMode,
    )
    package = types.ModuleType("algorithmic_efficiency")
    package.spec = spec  # type: ignore[attr-defined]
    pytorch_utils = types.ModuleType("algorithmic_efficiency.pytorch_utils")
    pytorch_utils.pytorch_setup = lambda: (False, 0, torch.device("cpu"), 1)  # type: ignore[attr-defined]
    package.pytorch_utils = pytorch_utils  # type: ignore[attr-defined]
    sys.modules["algorithmic_efficiency"] = package
    sys.modules["algorithmic_efficiency.spec"] = spec  # type: ignore[assignment]
    sys.modules["algorithmic_efficiency.pytorch_utils"] = pytorch_utils


def _load_submission(preconditioner_dtype: torch.dtype) -> types.ModuleType:
    import importlib

    submission = importlib.import_module(ANCHOR_MODULE + ".submission")
    distributed_shampoo = importlib.import_module(
        ANCHOR_MODULE + ".optimizers.distributed_shampoo.distributed_shampoo"
    )

    def with_dtype(params: Any, **kwargs: Any) -> Any:
        return distributed_shampoo.DistributedShampoo(
            params,
            **{**kwargs, "preconditioner_dtype": preconditioner_dtype, "distributed_config": None},
        )

    submission.DistributedShampoo = with_dtype
    return submission


def _run(
    submission: types.ModuleType, problem: problems.Problem, point: dict[str, Any]
) -> dict[str, Any]:
    model = problem.build()
    named = dict(model.named_parameters())
    workload = types.SimpleNamespace(step_hint=problems.STEP_HINT)
    hyperparameters = types.SimpleNamespace(**point)
    state = submission.init_optimizer_state(workload, model, None, hyperparameters, None)
    optimizers = [state[k] for k in ("optimizer", "rws_optimizer") if k in state]
    schedulers = [state[k] for k in ("scheduler", "rws_scheduler") if k in state]
    sketches = [problems.sketch(problem.name, named)]
    losses: list[float] = []
    rates: list[float] = []
    for step in range(problems.STEPS):
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss = problem.loss(model, problem.batch(step))
        loss.backward()
        rates.append(float(optimizers[0].param_groups[0]["lr"]))
        try:
            for optimizer in optimizers:
                optimizer.step()
        except ValueError as error:  # its guard against non-finite factors
            return {"loss": losses, "lr": rates, "sketches": sketches, "stopped": str(error)[:200]}
        for scheduler in schedulers:
            scheduler.step()
        losses.append(float(loss.detach()))
        sketches.append(problems.sketch(problem.name, named))
    return {"loss": losses, "lr": rates, "sketches": sketches}


def _drift(float32: dict[str, Any], float64: dict[str, Any]) -> list[float]:
    """Per step, the largest relative difference over parameters between the two runs."""
    return problems.relative_differences(float32["sketches"], float64["sketches"])


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.8g}")
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def _compact_json(fixture: dict[str, Any]) -> str:
    header = {k: v for k, v in fixture.items() if k != "runs"}
    lines = ["{", *(f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in sorted(header.items()))]
    lines.append('  "runs": {')
    problem_lines = []
    for name, runs in fixture["runs"].items():
        body = ",\n".join("    " + json.dumps(run, separators=(",", ":")) for run in runs)
        problem_lines.append(f"  {json.dumps(name)}: [\n{body}\n  ]")
    lines.append(",\n".join(problem_lines))
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    del argv
    sys.path.insert(0, FLAGS.anchor_root)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("gloo", rank=0, world_size=1)
    _stub_algorithmic_efficiency()
    torch.set_num_threads(1)
    points = problems.search_space_points()
    runs: dict[str, list[dict[str, Any]]] = {}
    for name in FLAGS.problems:
        problem = problems.PROBLEMS[name]
        runs[name] = []
        for index, point in enumerate(points):
            parity = problems.parity_point(point, problem)
            float32 = _run(_load_submission(torch.float32), problem, parity)
            float64 = _run(_load_submission(torch.float64), problem, parity)
            drift = _drift(float32, float64)
            runs[name].append(
                {
                    "point": index,
                    **float32,
                    "float64_drift": drift,
                    "float64_sketches": float64["sketches"],
                    "float64_loss": float64["loss"],
                }
            )
            print(
                f"{name} point {index}: {len(float32['loss'])} steps, loss "
                f"{float32['loss'][0]:.4g} -> {float32['loss'][-1]:.4g}, "
                f"float64 drift max {max(drift):.2e}",
                flush=True,
            )
    command = "python scripts/record_shampoo_anchor.py " + " ".join(
        f"--{k}={v}"
        for k, v in (("anchor_root", FLAGS.anchor_root), ("anchor_commit", FLAGS.anchor_commit))
    )
    fixture: dict[str, Any] = {
        "anchor": {
            "repository": "mlcommons/submissions_algorithms",
            "commit": FLAGS.anchor_commit,
            "path": ANCHOR_PATH,
            "module": ANCHOR_MODULE,
            "adjustments": "distributed_config=None (one process; DDPShampooConfig allocates on "
            "CUDA); "
            "algorithmic_efficiency stubbed (spec, pytorch_setup)",
        },
        "command": command,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "steps": problems.STEPS,
        "step_hint": problems.STEP_HINT,
        "precondition_frequency": problems.PRECONDITION_FREQUENCY,
        "sketch_size": problems.SKETCH_SIZE,
        "runs": _rounded(runs),
    }
    # One line per run keeps the file small and its diffs readable.
    atomic_write_text(FLAGS.output, _compact_json(fixture))
    size = os.path.getsize(FLAGS.output)
    print(f"wrote {FLAGS.output} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    app.run(main)
