"""A local training loop with AlgoPerf's semantics, for tests, the demo and studies.

:func:`run_training` mirrors ``train_once`` of AlgoPerf v0.6's
``submission_runner.py``:

- rng: ``PRNGKey(seed)``, split once, then split into data / optimizer-init /
  model-init / loop keys; each step folds the step number into the loop key
  and splits it into data-selection / update / prepare-for-eval / eval keys.
  (PyTorch: AlgoPerf-style numpy keys; JAX: ``jax.random`` keys.)
- each step: ``data_selection`` then ``update_params`` (``global_step`` =
  steps completed before it, 0-based), then ``global_step += 1``. Their time
  counts as submission time; under JAX the clock stops only once the returned
  arrays are ready.
- evals: right after step 1, then whenever ``eval_every_steps`` steps have
  passed since the last one (the step-count twin of AlgoPerf's
  ``eval_period_time_sec``), and at the last step. Each first runs a timed
  ``prepare_for_eval`` (if the submission has one); what it returns is
  evaluated (untimed ``workload.eval_model``) and handed to the next
  ``update_params``.
- stops when validation and test targets are both reached (if
  ``stop_at_target``), at ``max_steps``, when ``update_params`` raises
  ``TrainingCompleteError``, or when submission time reaches the budget
  (checked after every step and after ``prepare_for_eval``; no eval is run
  past the budget).
- outputs (rank 0 only): ``eval_measurements.csv`` and ``measurements.csv`` in
  AlgoPerf's column layout, ``hparams.json``, ``meta_data_<k>.json`` and
  ``flags_<k>.json`` (k = preemption count), all written atomically.
- checkpoints after every eval and at the end (``checkpoint_<step>``, only
  the latest kept), like AlgoPerf's ``checkpoint_utils``. ``resume=True``
  restores the latest one into freshly initialized states, and also restores
  the global rng states and the position in the training data stream, so a
  resumed run continues bit for bit like an uninterrupted one on CPU.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import importlib.metadata
import inspect
import io
import json
import os
import platform
import random
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from polyak.hyperparameters import as_dict
from polyak.workloads.data import DatasetFingerprint

if TYPE_CHECKING:  # algoperf's spec imports both frameworks; the loop imports neither
    from polyak.algoperf import spec

EVAL_CSV = "eval_measurements.csv"
MEASUREMENTS_CSV = "measurements.csv"
HPARAMS_JSON = "hparams.json"
_CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d+)$")

_REQUIRED_FUNCTIONS = ("init_optimizer_state", "update_params", "get_batch_size", "data_selection")

# Stop reasons recorded in RunResult.stop_reason and in checkpoints.
STOP_TARGET = "target"
STOP_MAX_STEPS = "max_steps"
STOP_TIME_BUDGET = "time_budget"
STOP_TRAINING_COMPLETE = "training_complete"


class OutputDirectoryInUseError(ValueError):
    """``output_dir`` already holds a run and ``resume`` was not asked for."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How long to train and how often to evaluate.

    ``None`` takes the workload's value: ``eval_every_steps`` from
    ``workload.eval_period_steps`` and ``max_runtime_sec`` from
    ``workload.max_allowed_runtime_sec``. ``max_steps=None`` trains until the
    targets or the time budget end the run.

    ``cpu_threads`` sets PyTorch's intra-op threads for the run (restored
    afterwards; ``None`` keeps the process setting). The embedded models are
    far too small to gain from intra-op parallelism, and on a loaded 2-core
    box two threads made each step about 15x slower than one. JAX ignores
    it: XLA sizes its CPU thread pool at start-up.
    """

    max_steps: int | None = None
    eval_every_steps: int | None = None
    max_runtime_sec: float | None = None
    rng_seed: int = 0
    stop_at_target: bool = True
    checkpoint: bool = True
    cpu_threads: int | None = 1

    def __post_init__(self) -> None:
        for name in ("max_steps", "eval_every_steps", "cpu_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"LoopConfig.{name}={value!r} must be None or an int >= 1")
        if self.max_runtime_sec is not None and not self.max_runtime_sec > 0:
            raise ValueError(
                f"LoopConfig.max_runtime_sec={self.max_runtime_sec!r} must be None or > 0"
            )
        if not isinstance(self.rng_seed, int) or self.rng_seed < 0:
            raise ValueError(f"LoopConfig.rng_seed={self.rng_seed!r} must be an int >= 0")


@dataclasses.dataclass(frozen=True)
class EvalRecord:
    """One eval: the step, the submission time so far and every metric AlgoPerf logs."""

    global_step: int
    accumulated_submission_time: float
    metrics: dict[str, Any]
    preemption_count: int = 0


@dataclasses.dataclass(frozen=True)
class RunResult:
    """The outcome of one run, as AlgoPerf's scoring reads it.

    ``time_to_target`` is the submission time at the first eval reaching the
    validation target (``None`` if none did); ``direction`` is ``"max"`` when
    higher values of the target metric are better, ``"min"`` otherwise.
    """

    workload: str
    framework: str
    target_metric_name: str
    direction: str
    validation_target: float
    test_target: float
    evals: tuple[EvalRecord, ...]
    reached_target: bool
    reached_test_target: bool
    steps_to_target: int | None
    time_to_target: float | None
    best_metric: float | None
    total_steps: int
    total_submission_time: float
    dataset: DatasetFingerprint | None
    stop_reason: str
    preemption_count: int
    train_metrics: tuple[dict[str, Any], ...] = ()
    output_dir: str | None = None


# ---- files --------------------------------------------------------------------


def _atomic_write_text(path: str, text: str) -> None:
    directory = os.path.dirname(path) or "."
    handle, temp_path = tempfile.mkstemp(dir=directory, prefix=".tmp.", suffix=".part")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as file:
            file.write(text)
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.unlink(temp_path)
        raise


def _write_json(path: str, content: Any) -> None:
    _atomic_write_text(path, json.dumps(content, indent=2, default=str) + "\n")


def _scalar(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def _csv_text(rows: list[dict[str, Any]]) -> str:
    """Rows in the column order pandas gives AlgoPerf's logger.

    The first row's keys sorted, then keys first seen in later rows appended
    in their order; missing values are empty.
    """
    columns: list[str] = []
    for index, row in enumerate(rows):
        new = [key for key in row if key not in columns]
        columns.extend(sorted(new) if index == 0 else new)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else _format_cell(row[c]) for c in columns])
    return buffer.getvalue()


def _format_cell(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


class MetricsLogger:
    """Records what AlgoPerf's ``MetricLogger`` records, and writes it atomically.

    Submissions reach it as ``workload.metrics_logger`` and log train metrics
    with ``append_scalar_metrics(metrics, global_step)``; the loop logs every
    eval with ``is_eval=True``. With an ``output_dir`` every call rewrites
    ``measurements.csv`` (and ``eval_measurements.csv`` for evals) whole,
    through a temp file and ``os.replace``.
    """

    def __init__(self, output_dir: str | None) -> None:
        self.output_dir = output_dir
        self.rows: list[dict[str, Any]] = []
        self.eval_rows: list[dict[str, Any]] = []
        self.train_rows: list[dict[str, Any]] = []

    def append_scalar_metrics(
        self,
        metrics: Mapping[str, Any],
        global_step: int,
        preemption_count: int | None = None,
        is_eval: bool = False,
    ) -> None:
        row = {key: _scalar(value) for key, value in metrics.items()}
        row["global_step"] = int(global_step)
        if preemption_count is not None:
            row["preemption_count"] = int(preemption_count)
        self.rows.append(row)
        (self.eval_rows if is_eval else self.train_rows).append(row)
        self._write(is_eval)

    def _write(self, is_eval: bool) -> None:
        if self.output_dir is None:
            return
        _atomic_write_text(os.path.join(self.output_dir, MEASUREMENTS_CSV), _csv_text(self.rows))
        if is_eval:
            _atomic_write_text(os.path.join(self.output_dir, EVAL_CSV), _csv_text(self.eval_rows))

    def finish(self) -> None:
        pass

    def state(self) -> dict[str, Any]:
        return {
            "rows": list(self.rows),
            "eval_rows": list(self.eval_rows),
            "train_rows": list(self.train_rows),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        self.rows = list(state["rows"])
        self.eval_rows = list(state["eval_rows"])
        self.train_rows = list(state["train_rows"])
        if self.eval_rows:
            self._write(is_eval=True)
        elif self.rows:
            self._write(is_eval=False)


# ---- submissions and workloads ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Submission:
    init_optimizer_state: Callable[..., Any]
    update_params: Callable[..., Any]
    prepare_for_eval: Callable[..., Any] | None
    get_batch_size: Callable[[str], int]
    get_eval_batch_size: Callable[[str], int] | None
    data_selection: Callable[..., Any]
    update_params_takes_train_state: bool

    @classmethod
    def from_object(cls, submission: Any) -> _Submission:
        missing = [
            name for name in _REQUIRED_FUNCTIONS if not callable(getattr(submission, name, None))
        ]
        if missing:
            raise ValueError(
                f"submission {submission!r} lacks AlgoPerf function(s) {', '.join(missing)}; "
                f"expected {', '.join(_REQUIRED_FUNCTIONS)} (and optionally prepare_for_eval)"
            )
        update_params = submission.update_params
        return cls(
            init_optimizer_state=submission.init_optimizer_state,
            update_params=update_params,
            prepare_for_eval=getattr(submission, "prepare_for_eval", None),
            get_batch_size=submission.get_batch_size,
            get_eval_batch_size=getattr(submission, "get_eval_batch_size", None),
            data_selection=submission.data_selection,
            update_params_takes_train_state=(
                "train_state" in inspect.signature(update_params).parameters
            ),
        )


def _backend_for(framework: str) -> Any:
    if framework == "pytorch":
        from polyak.workloads.loop_torch import TorchLoopBackend

        return TorchLoopBackend()
    if framework == "jax":
        from polyak.workloads.loop_jax import JaxLoopBackend

        return JaxLoopBackend()
    raise ValueError(f"unknown framework {framework!r}; choices: pytorch, jax")


def _resolve_workload(workload: Any, framework: str) -> tuple[spec.Workload, str]:
    if isinstance(workload, str):
        from polyak.workloads.registry import make_workload

        return make_workload(workload, framework), workload
    name = getattr(workload, "workload_name", None)
    if not name:
        raise ValueError(
            f"workload {workload!r} has no workload_name; pass an embedded workload or its "
            "name (the name is what submission.get_batch_size receives)"
        )
    own_framework = getattr(workload, "framework", framework)
    if own_framework != framework:
        raise ValueError(
            f"workload {name!r} is the {own_framework} twin but framework={framework!r}"
        )
    return workload, name


class _CountingQueue:
    """The training queue handed to ``data_selection``, counting what it takes."""

    def __init__(self, queue: Iterator[Any]) -> None:
        self._queue = queue
        self.consumed = 0

    def skip(self, num_batches: int) -> None:
        fast_forward = getattr(self._queue, "fast_forward", None)
        if fast_forward is not None:
            fast_forward(num_batches)
        else:
            for _ in range(num_batches):
                next(self._queue)
        self.consumed += num_batches

    def __iter__(self) -> _CountingQueue:
        return self

    def __next__(self) -> Any:
        batch = next(self._queue)
        self.consumed += 1
        return batch


# ---- metadata ---------------------------------------------------------------------


def _package_versions(framework: str) -> dict[str, str | None]:
    names = ["polyak", "numpy", "scikit-learn", "algoperf"]
    names += ["torch"] if framework == "pytorch" else ["jax", "jaxlib", "flax", "optax"]
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _workload_properties(workload: spec.Workload) -> dict[str, Any]:
    """Primitive public properties as ``workload.<name>``, as AlgoPerf's meta data has."""
    properties = {}
    for key in dir(workload):
        if key.startswith("_") or key in ("param_shapes", "model_params_types"):
            continue
        try:
            value = getattr(workload, key)
        except Exception:  # a property may need init_model_fn first
            continue
        if isinstance(value, (bool, int, float, str)):
            properties[f"workload.{key}"] = value
    return properties


def _meta_data(
    workload: spec.Workload, framework: str, config: LoopConfig, dataset: DatasetFingerprint | None
) -> dict[str, Any]:
    meta = _workload_properties(workload)
    meta.update(
        {
            "os_platform": platform.platform(),
            "python_version": platform.python_version(),
            "python_compiler": platform.python_compiler(),
            "cpu_count": os.cpu_count(),
            "rng_seed": config.rng_seed,
            "framework": framework,
            "versions": _package_versions(framework),
            "dataset": dataset.as_dict() if dataset is not None else None,
            "loop_config": dataclasses.asdict(config),
        }
    )
    return meta


def _latest_checkpoint(output_dir: str) -> str | None:
    steps = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint_*")):
        match = _CHECKPOINT_PATTERN.match(os.path.basename(path))
        if match:
            steps.append((int(match.group(1)), path))
    return max(steps)[1] if steps else None


def _remove_older_checkpoints(output_dir: str, keep: str) -> None:
    for path in glob.glob(os.path.join(output_dir, "checkpoint_*")):
        if _CHECKPOINT_PATTERN.match(os.path.basename(path)) and path != keep:
            os.unlink(path)


def _check_or_write_hparams(output_dir: str, hyperparameters: Any, resume: bool) -> None:
    path = os.path.join(output_dir, HPARAMS_JSON)
    current = json.loads(json.dumps(as_dict(hyperparameters), default=str))
    if resume and os.path.exists(path):
        with open(path, encoding="utf-8") as file:
            saved = json.load(file)
        if saved != current:
            raise ValueError(
                f"resuming {output_dir} with hyperparameters {current} that differ from the "
                f"saved {saved}"
            )
        return
    _write_json(path, current)


def _prepare_output_dir(output_dir: str, resume: bool) -> None:
    os.makedirs(output_dir, exist_ok=True)
    if resume:
        return
    leftovers = [
        name
        for name in (EVAL_CSV, MEASUREMENTS_CSV)
        if os.path.exists(os.path.join(output_dir, name))
    ]
    if leftovers or _latest_checkpoint(output_dir):
        found = ", ".join(leftovers) or "a checkpoint"
        raise OutputDirectoryInUseError(
            f"output_dir {output_dir!r} already holds a run ({found}); "
            "pass resume=True to continue it, or choose an empty directory"
        )


# ---- the loop ---------------------------------------------------------------------


def _summarize(
    workload: spec.Workload,
    name: str,
    framework: str,
    evals: list[EvalRecord],
    total_steps: int,
    total_time: float,
    dataset: DatasetFingerprint | None,
    stop_reason: str,
    preemption_count: int,
    train_metrics: list[dict[str, Any]],
    output_dir: str | None,
) -> RunResult:
    metric_key = f"validation/{workload.target_metric_name}"
    direction = getattr(workload, "target_direction", None)
    if direction is None:
        # Mirror the real workloads: loss-like metrics are lower-is-better.
        lower = workload.target_metric_name in ("loss", "wer", "mse", "mae")
        direction = "min" if lower else "max"
    first_hit = next((e for e in evals if workload.has_reached_validation_target(e.metrics)), None)
    values = [e.metrics[metric_key] for e in evals if metric_key in e.metrics]
    best = (max(values) if direction == "max" else min(values)) if values else None
    return RunResult(
        workload=name,
        framework=framework,
        target_metric_name=workload.target_metric_name,
        direction=direction,
        validation_target=float(workload.validation_target_value),
        test_target=float(workload.test_target_value),
        evals=tuple(evals),
        reached_target=first_hit is not None,
        reached_test_target=any(workload.has_reached_test_target(e.metrics) for e in evals),
        steps_to_target=first_hit.global_step if first_hit else None,
        time_to_target=first_hit.accumulated_submission_time if first_hit else None,
        best_metric=best,
        total_steps=total_steps,
        total_submission_time=total_time,
        dataset=dataset,
        stop_reason=stop_reason,
        preemption_count=preemption_count,
        train_metrics=tuple(train_metrics),
        output_dir=output_dir,
    )


def _progress_line(name: str, framework: str, step: int, metrics: Mapping[str, Any]) -> str:
    shown = [
        f"{key}={value:.4f}"
        for key, value in metrics.items()
        if "/" in key and not key.endswith("num_examples") and isinstance(value, float)
    ]
    return (
        f"[{name}/{framework}] step {step}: {' '.join(shown)} "
        f"(submission {metrics['accumulated_submission_time']:.2f}s)"
    )


def run_training(
    workload: spec.Workload | str,
    submission: Any,
    hyperparameters: Any,
    *,
    framework: str,
    config: LoopConfig | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
    resume: bool = False,
) -> RunResult:
    """Trains ``submission`` on ``workload`` with AlgoPerf's loop semantics.

    ``workload`` is a Workload instance with a ``workload_name`` (the embedded
    ones have it) or an embedded workload's name. ``submission`` is any
    module or object with AlgoPerf's functions. ``hyperparameters`` is one
    search-space point (namedtuple, SimpleNamespace, dict) or ``None``.
    ``resume=True`` continues from the latest checkpoint in ``output_dir``
    (starting fresh if there is none).
    """
    config = config or LoopConfig()
    backend = _backend_for(framework)
    previous_threads = backend.set_cpu_threads(config.cpu_threads)
    try:
        return _train(
            workload,
            submission,
            hyperparameters,
            framework=framework,
            config=config,
            backend=backend,
            output_dir=None if output_dir is None else os.fspath(output_dir),
            progress=progress,
            resume=resume,
        )
    finally:
        if config.cpu_threads is not None:
            backend.set_cpu_threads(previous_threads)


def _train(
    workload: spec.Workload | str,
    submission: Any,
    hyperparameters: Any,
    *,
    framework: str,
    config: LoopConfig,
    backend: Any,
    output_dir: str | None,
    progress: Callable[[str], None] | None,
    resume: bool,
) -> RunResult:
    from polyak.algoperf import spec

    workload, name = _resolve_workload(workload, framework)
    functions = _Submission.from_object(submission)
    say = progress or (lambda line: None)
    if resume and output_dir is None:
        raise ValueError("resume=True needs the output_dir that holds the checkpoint")

    global_batch_size = int(functions.get_batch_size(name))
    eval_batch_size = int(
        functions.get_eval_batch_size(name)
        if functions.get_eval_batch_size is not None
        else workload.eval_batch_size
    )
    shards = backend.num_data_shards()
    for label, size in (
        ("global batch size", global_batch_size),
        ("eval batch size", eval_batch_size),
    ):
        if size < 1 or size % shards:
            raise ValueError(
                f"the {label} ({size}) has to be a positive multiple of the number of "
                f"devices ({shards})"
            )
    eval_every = config.eval_every_steps or int(getattr(workload, "eval_period_steps", 1) or 1)
    budget = float(config.max_runtime_sec or workload.max_allowed_runtime_sec)
    dataset = getattr(workload, "dataset_fingerprint", None)
    primary = backend.is_primary()
    writes_files = output_dir is not None and primary
    checkpointing = config.checkpoint and output_dir is not None

    # Global RNGs too, so that equal seeds give equal runs within one process;
    # a resumed run then overwrites them with the checkpointed states.
    global_seed = int(np.random.SeedSequence([config.rng_seed, 0x5EED]).generate_state(1)[0])
    np.random.seed(global_seed)
    random.seed(global_seed)
    backend.seed_global_rng(global_seed)

    # rng, exactly as train_once / score_submission_on_workload split it.
    rng = backend.prng_key(config.rng_seed)
    rng, _ = backend.split(rng, 2)
    data_rng, opt_init_rng, model_init_rng, rng = backend.split(rng, 4)

    input_queue = _CountingQueue(
        workload._build_input_queue(
            data_rng, "train", data_dir=None, global_batch_size=global_batch_size
        )
    )
    model_params, model_state = workload.init_model_fn(model_init_rng)
    optimizer_state = functions.init_optimizer_state(
        workload, model_params, model_state, hyperparameters, opt_init_rng
    )

    train_state: dict[str, Any] = {
        "validation_goal_reached": False,
        "test_goal_reached": False,
        "is_time_remaining": True,
        "last_eval_step": None,
        "training_complete": False,
        "stop_reason": None,
        "accumulated_submission_time": 0.0,
        "accumulated_eval_time": 0.0,
        "accumulated_logging_time": 0.0,
    }
    global_step = 0
    preemption_count = 0
    evals: list[EvalRecord] = []
    logger = MetricsLogger(output_dir if writes_files else None)

    if output_dir is not None:
        if primary:
            _prepare_output_dir(output_dir, resume)
            _check_or_write_hparams(output_dir, hyperparameters, resume)
        checkpoint_path = _latest_checkpoint(output_dir) if resume else None
        if checkpoint_path is not None:
            optimizer_state, model_params, model_state, saved = backend.load_checkpoint(
                checkpoint_path, optimizer_state, model_params, model_state
            )
            train_state.update(saved["train_state"])
            global_step = int(saved["global_step"])
            preemption_count = int(saved["preemption_count"]) + 1
            evals = [EvalRecord(**record) for record in saved["evals"]]
            logger.restore(saved["metrics_logger"])
            input_queue.skip(int(saved["batches_consumed"]))
            np.random.set_state(saved["rng_state"]["numpy"])
            random.setstate(saved["rng_state"]["python"])
            backend.restore_rng_state(saved["rng_state"]["framework"])
            # A run stopped by its step or time limit may go on under a larger one.
            if train_state["stop_reason"] == STOP_MAX_STEPS:
                train_state["training_complete"] = False
                train_state["stop_reason"] = None
            if train_state["stop_reason"] == STOP_TIME_BUDGET:
                train_state["stop_reason"] = None
            train_state["is_time_remaining"] = train_state["accumulated_submission_time"] < budget
            say(f"[{name}/{framework}] resumed from {checkpoint_path} at step {global_step}")
        if primary:
            _write_json(
                os.path.join(output_dir, f"meta_data_{preemption_count}.json"),
                _meta_data(workload, framework, config, dataset),
            )
            _write_json(
                os.path.join(output_dir, f"flags_{preemption_count}.json"),
                {
                    "workload": name,
                    "framework": framework,
                    "rng_seed": config.rng_seed,
                    "max_global_steps": config.max_steps,
                    "eval_every_steps": eval_every,
                    "max_runtime_sec": budget,
                    "stop_at_target": config.stop_at_target,
                    "save_checkpoints": config.checkpoint,
                    "resume_last_run": resume,
                },
            )
    workload.attach_metrics_logger(logger)

    def save_checkpoint() -> None:
        if not (checkpointing and primary):
            return
        path = os.path.join(output_dir, f"checkpoint_{global_step}")
        extra = {
            "train_state": dict(train_state),
            "global_step": global_step,
            "preemption_count": preemption_count,
            "evals": [dataclasses.asdict(record) for record in evals],
            "metrics_logger": logger.state(),
            "batches_consumed": input_queue.consumed,
            "rng_state": {
                "numpy": np.random.get_state(),
                "python": random.getstate(),
                "framework": backend.capture_rng_state(),
            },
        }
        backend.save_checkpoint(path, optimizer_state, model_params, model_state, extra)
        _remove_older_checkpoints(output_dir, keep=path)

    def goals_reached() -> bool:
        return config.stop_at_target and (
            train_state["validation_goal_reached"] and train_state["test_goal_reached"]
        )

    def finish(reason: str) -> None:
        train_state["training_complete"] = True
        if train_state["stop_reason"] is None:
            train_state["stop_reason"] = reason

    if config.max_steps is not None and global_step >= config.max_steps:
        finish(STOP_MAX_STEPS)
    global_start_time = backend.now()

    while (
        train_state["is_time_remaining"]
        and not goals_reached()
        and not train_state["training_complete"]
    ):
        step_start_time = backend.now()
        step_rng = backend.fold_in(rng, global_step)
        data_select_rng, update_rng, prep_eval_rng, eval_rng = backend.split(step_rng, 4)
        batch = functions.data_selection(
            workload,
            input_queue,
            optimizer_state,
            model_params,
            model_state,
            hyperparameters,
            global_step,
            data_select_rng,
        )
        try:
            optimizer_state, model_params, model_state = functions.update_params(
                workload=workload,
                current_param_container=model_params,
                current_params_types=workload.model_params_types,
                model_state=model_state,
                hyperparameters=hyperparameters,
                batch=batch,
                loss_type=workload.loss_type,
                optimizer_state=optimizer_state,
                eval_results=[(record.global_step, record.metrics) for record in evals],
                global_step=global_step,
                rng=update_rng,
                **(
                    {"train_state": MappingProxyType(train_state)}
                    if functions.update_params_takes_train_state
                    else {}
                ),
            )
        except spec.TrainingCompleteError:
            finish(STOP_TRAINING_COMPLETE)
        backend.block((optimizer_state, model_params, model_state))
        del batch
        global_step += 1
        if config.max_steps is not None and global_step >= config.max_steps:
            finish(STOP_MAX_STEPS)
        train_state["accumulated_submission_time"] += backend.now() - step_start_time
        if train_state["accumulated_submission_time"] >= budget:
            train_state["is_time_remaining"] = False
            train_state["stop_reason"] = train_state["stop_reason"] or STOP_TIME_BUDGET
            break

        last_eval_step = train_state["last_eval_step"]
        eval_due = (
            last_eval_step is None
            or global_step - last_eval_step >= eval_every
            or train_state["training_complete"]
        )
        if not eval_due:
            continue

        if functions.prepare_for_eval is not None:
            prepare_start_time = backend.now()
            optimizer_state, model_params, model_state = functions.prepare_for_eval(
                workload=workload,
                current_param_container=model_params,
                current_params_types=workload.model_params_types,
                model_state=model_state,
                hyperparameters=hyperparameters,
                loss_type=workload.loss_type,
                optimizer_state=optimizer_state,
                eval_results=[(record.global_step, record.metrics) for record in evals],
                global_step=global_step,
                rng=prep_eval_rng,
            )
            backend.block((optimizer_state, model_params, model_state))
            train_state["accumulated_submission_time"] += backend.now() - prepare_start_time
        if train_state["accumulated_submission_time"] >= budget:
            train_state["is_time_remaining"] = False
            train_state["stop_reason"] = train_state["stop_reason"] or STOP_TIME_BUDGET
            break

        eval_start_time = backend.now()
        metrics = dict(
            workload.eval_model(
                eval_batch_size,
                model_params,
                model_state,
                eval_rng,
                None,
                None,
                global_step,
            )
        )
        train_state["validation_goal_reached"] = bool(
            train_state["validation_goal_reached"]
            or workload.has_reached_validation_target(metrics)
        )
        train_state["test_goal_reached"] = bool(
            train_state["test_goal_reached"] or workload.has_reached_test_target(metrics)
        )
        eval_end_time = backend.now()
        train_state["accumulated_eval_time"] += eval_end_time - eval_start_time
        train_state["last_eval_step"] = global_step
        submission_time = train_state["accumulated_submission_time"]
        metrics.update(
            {
                "score": submission_time,
                "total_duration": eval_end_time - global_start_time,
                "accumulated_submission_time": submission_time,
                "accumulated_eval_time": train_state["accumulated_eval_time"],
                "accumulated_logging_time": train_state["accumulated_logging_time"],
            }
        )
        metrics = {key: _scalar(value) for key, value in metrics.items()}
        evals.append(EvalRecord(global_step, submission_time, metrics, preemption_count))
        if goals_reached():
            train_state["stop_reason"] = train_state["stop_reason"] or STOP_TARGET

        logging_start_time = backend.now()
        logger.append_scalar_metrics(
            metrics, global_step=global_step, preemption_count=preemption_count, is_eval=True
        )
        save_checkpoint()
        train_state["accumulated_logging_time"] += backend.now() - logging_start_time
        say(_progress_line(name, framework, global_step, metrics))

    if train_state["stop_reason"] is None:
        if goals_reached():
            train_state["stop_reason"] = STOP_TARGET
        elif not train_state["is_time_remaining"]:
            train_state["stop_reason"] = STOP_TIME_BUDGET
        else:
            train_state["stop_reason"] = STOP_TRAINING_COMPLETE
    train_metrics = list(logger.train_rows)
    logger.append_scalar_metrics(
        {"score": train_state["accumulated_submission_time"]},
        global_step=global_step,
        preemption_count=preemption_count,
    )
    logger.finish()
    save_checkpoint()
    result = _summarize(
        workload,
        name,
        framework,
        evals,
        global_step,
        train_state["accumulated_submission_time"],
        dataset,
        train_state["stop_reason"],
        preemption_count,
        train_metrics,
        output_dir,
    )
    target = "reached" if result.reached_target else "not reached"
    say(
        f"[{name}/{framework}] done at step {global_step} ({result.stop_reason}): validation "
        f"target {target}, submission {result.total_submission_time:.2f}s"
    )
    return result
