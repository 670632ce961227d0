"""Smoke test: a few steps of our submission on each real AlgoPerf workload.

``--suite=algoperf --smoke`` finds crashes before GPU hours are spent. For each
selected workload it builds the real AlgoPerf workload class, initialises the
model, and runs ``update_params`` a few times on synthetic batches, then
``prepare_for_eval`` and one more ``update_params`` (the step after an eval,
which must train the raw weights again). No dataset is read and no eval is run.

The synthetic batches have the shapes AlgoPerf's own
``tests/reference_algorithm_tests.py`` uses: random images, Criteo rows of
13 + 26 features, 320x320 MRI slices, 20 s audio with token targets, token
sequences of length 256, and small padded molecule graphs. Needs algoperf (and
the framework) installed; each workload's failure is reported and the others go on.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import inspect
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from polyak.runner.commands import find_repo_root, resolve_submission, submission_label
from polyak.runner.errors import AlgoPerfMissingError, RunnerError
from polyak.runner.search_space import load_search_space
from polyak.runner.submission_loader import load_submission_module
from polyak.runner.workload_table import select_benchmark_workloads

Emit = Callable[[str], None]
PER_DEVICE_BATCH = 2
_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class SmokeResult:
    workload: str
    framework: str
    ok: bool
    seconds: float
    detail: str = ""


def _import_workload(name: str, framework: str) -> Any:
    registry = importlib.import_module("algoperf.workloads.workloads")
    entry = registry.WORKLOADS[name]
    module = importlib.import_module(
        "algoperf.workloads." + entry["workload_path"].replace("/", ".") + f"_{framework}.workload"
    )
    return getattr(module, entry["workload_class_name"]), module


def _image_batch(
    rng: np.random.Generator, batch: int, shape: tuple[int, ...], classes: int
) -> dict:
    return {
        "inputs": rng.normal(size=(batch, *shape)).astype(np.float32),
        "targets": rng.integers(0, classes, size=(batch,)),
        "weights": np.ones((batch,), dtype=np.float32),
    }


def synthetic_batch(workload: str, framework: str, batch: int, seed: int = 0) -> dict[str, Any]:
    """A numpy batch of the workload's input shapes (ogbg is built separately)."""
    rng = np.random.default_rng(seed)
    if workload == "criteo1tb":
        targets = np.ones((batch,), dtype=np.float32)
        targets[0] = 0.0
        return {
            "inputs": np.ones((batch, 13 + 26), dtype=np.float32),
            "targets": targets,
            "weights": np.ones((batch,), dtype=np.float32),
        }
    if workload in ("imagenet_resnet", "imagenet_vit"):
        shape = (3, 224, 224) if framework == "pytorch" else (224, 224, 3)
        return _image_batch(rng, batch, shape, 1000)
    if workload == "fastmri":
        return {
            "inputs": rng.normal(size=(batch, 320, 320)).astype(np.float32),
            "targets": rng.normal(size=(batch, 320, 320)).astype(np.float32),
            "mean": np.zeros((batch,), dtype=np.float32),
            "std": np.ones((batch,), dtype=np.float32),
            "volume_max": np.ones((batch,), dtype=np.float32),
            "weights": np.ones((batch,), dtype=np.float32),
        }
    if workload.startswith("librispeech"):
        samples = 320_000
        frequencies = 2.0 ** (rng.random((batch, 1)) * 13)
        audio = np.sin(2 * np.pi * frequencies * np.arange(samples) / 16_000).astype(np.float32)
        tokens = rng.integers(1, 1024, size=(batch, 256))
        lengths = rng.integers(100, 256, size=(batch, 1))
        token_padding = (np.arange(256)[None, :] > lengths).astype(np.float32)
        return {
            "inputs": (audio, np.zeros_like(audio)),
            "targets": (tokens, token_padding),
        }
    if workload == "wmt":
        return {
            "inputs": rng.integers(0, 32_000, size=(batch, 256)),
            "targets": rng.integers(0, 32_000, size=(batch, 256)),
            "weights": rng.integers(0, 2, size=(batch, 256)).astype(np.float32),
        }
    raise RunnerError(f"no synthetic batch for workload {workload!r}")


def _ogbg_batch(framework: str, batch: int, workload_module: Any, num_outputs: int) -> dict:
    """Padded molecule graphs through AlgoPerf's own batching code (needs tensorflow)."""
    import tensorflow as tf

    input_pipeline = importlib.import_module("algoperf.workloads.ogbg.input_pipeline")

    def examples():
        while True:
            yield {
                "num_nodes": tf.ones((1,), dtype=tf.int64),
                "edge_index": tf.ones((1, 2), dtype=tf.int64),
                "node_feat": tf.random.normal((1, 9)),
                "edge_feat": tf.random.normal((1, 3)),
                "labels": tf.cast(
                    tf.random.uniform((num_outputs,), minval=0, maxval=2, dtype=tf.int32),
                    tf.float32,
                ),
            }

    if framework == "jax":
        return next(input_pipeline._get_batch_iterator(examples(), batch))
    import torch

    graphs = next(
        input_pipeline._get_batch_iterator(examples(), batch, num_shards=1, shard_dim=True)
    )
    to_torch = workload_module._pytorch_map
    return {
        "inputs": workload_module._graph_map(to_torch, graphs["inputs"]),
        "targets": to_torch(graphs["targets"]),
        "weights": to_torch(graphs["weights"]).to(torch.bool),
    }


def _to_framework(workload: str, framework: str, batch: dict[str, Any]) -> dict[str, Any]:
    if framework == "jax":
        sharding = importlib.import_module("algoperf.jax_sharding_utils")
        return sharding.shard_along_batch_dim(batch)
    import torch

    device = importlib.import_module("algoperf.pytorch_utils").pytorch_setup()[2]

    def convert(key: str, value: np.ndarray) -> Any:
        if key == "targets" and workload != "fastmri" and workload != "criteo1tb":
            dtype = torch.long
        elif key == "weights":
            dtype = torch.bool
        else:
            dtype = torch.float
        return torch.as_tensor(value, device=device, dtype=dtype)

    converted: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, tuple):
            converted[key] = tuple(convert(key, v) for v in value)
        else:
            converted[key] = convert(key, value)
    return converted


def _rngs(framework: str, count: int, seed: int = 0) -> list[Any]:
    if framework == "jax":
        import jax

        return list(jax.random.split(jax.random.PRNGKey(seed), count))
    draws = np.random.RandomState(seed).randint(0, _INT32_MAX, size=(count, 2), dtype=np.int64)
    return [row.astype(np.int32) for row in draws]


def _hyperparameters(
    repo_root: Path, submission: str, search_space: str | None, ruleset: str
) -> Any:
    if ruleset == "self":
        return None
    path = Path(search_space or f"tuning_search_spaces/{submission_label(submission)}.json")
    point = load_search_space(path if path.is_absolute() else repo_root / path).draw(1)[0]
    return collections.namedtuple("Hyperparameters", list(point))(**point)


def _batch_size(framework: str) -> int:
    if framework == "jax":
        import jax

        return PER_DEVICE_BATCH * jax.device_count()
    return PER_DEVICE_BATCH


def smoke_one(
    workload_name: str, framework: str, submission: Any, hyperparameters: Any, steps: int
) -> None:
    """Init, ``steps`` updates, prepare_for_eval, one more update. Raises on failure."""
    workload_class, workload_module = _import_workload(workload_name, framework)
    workload = workload_class()
    batch_size = _batch_size(framework)
    if workload_name == "ogbg":
        batch = _ogbg_batch(framework, batch_size, workload_module, workload._num_outputs)
    else:
        batch = _to_framework(
            workload_name, framework, synthetic_batch(workload_name, framework, batch_size)
        )
    model_rng, opt_rng, *step_rngs = _rngs(framework, 3 + steps)
    params, model_state = workload.init_model_fn(model_rng)
    optimizer_state = submission.init_optimizer_state(
        workload, params, model_state, hyperparameters, opt_rng
    )
    wants_train_state = "train_state" in inspect.signature(submission.update_params).parameters
    extra = {"train_state": {}} if wants_train_state else {}

    def update(step: int, rng: Any) -> None:
        nonlocal optimizer_state, params, model_state
        optimizer_state, params, model_state = submission.update_params(
            workload=workload,
            current_param_container=params,
            current_params_types=workload.model_params_types,
            model_state=model_state,
            hyperparameters=hyperparameters,
            batch=batch,
            loss_type=workload.loss_type,
            optimizer_state=optimizer_state,
            eval_results=[],
            global_step=step,
            rng=rng,
            **extra,
        )

    for step in range(steps):
        update(step, step_rngs[step])
    prepare = getattr(submission, "prepare_for_eval", None)
    if prepare is not None:
        optimizer_state, params, model_state = prepare(
            workload=workload,
            current_param_container=params,
            current_params_types=workload.model_params_types,
            model_state=model_state,
            hyperparameters=hyperparameters,
            loss_type=workload.loss_type,
            optimizer_state=optimizer_state,
            eval_results=[],
            global_step=steps,
            rng=step_rngs[-1],
        )
    update(steps, step_rngs[-1])


def run_smoke(
    workloads: str | Sequence[str],
    framework: str,
    submission: str = "nadamw",
    *,
    repo_root: str | Path | None = None,
    tuning_search_space: str | None = None,
    tuning_ruleset: str = "external",
    steps: int = 2,
    out: Emit = print,
) -> list[SmokeResult]:
    """Runs :func:`smoke_one` for each selected workload and reports each outcome."""
    names = select_benchmark_workloads(workloads)
    # Bad inputs first, each named, before the (slow, heavy) AlgoPerf import.
    root = find_repo_root(repo_root)
    path = resolve_submission(submission, framework, root)
    hyperparameters = _hyperparameters(root, submission, tuning_search_space, tuning_ruleset)
    try:
        importlib.import_module("algoperf.workloads.workloads")
    except ImportError as exc:
        raise AlgoPerfMissingError(str(exc)) from exc
    module = load_submission_module(root / path)
    results = []
    for name in names:
        started = time.monotonic()
        try:
            smoke_one(name, framework, module, hyperparameters, steps)
        except Exception as exc:
            seconds = time.monotonic() - started
            detail = f"{type(exc).__name__}: {exc}"
            out(f"smoke {name} ({framework}): FAILED after {seconds:.1f}s: {detail}")
            for line in traceback.format_exc().rstrip().splitlines()[-8:]:
                out(f"    | {line}")
            results.append(SmokeResult(name, framework, False, seconds, detail))
            continue
        seconds = time.monotonic() - started
        out(
            f"smoke {name} ({framework}): ok ({steps} steps + prepare_for_eval + 1 step, "
            f"{seconds:.1f}s)"
        )
        results.append(SmokeResult(name, framework, True, seconds))
    failed = [r.workload for r in results if not r.ok]
    out(
        f"smoke: {len(results) - len(failed)}/{len(results)} ok"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return results
