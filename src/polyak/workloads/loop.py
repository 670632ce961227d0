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

``_train`` reads like ``train_once``: named steps (set up, initialize, open
the output directory and maybe resume, the step, the eval, the checkpoint, the
stop rule, the summary) over two small objects, ``_Run`` (what stays fixed)
and ``_RunState`` (what changes). What needs a framework goes through a
:class:`LoopBackend` (``loop_torch``, ``loop_jax``); the files of the run
directory are written by ``run_files``.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import os
import platform
import random
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from polyak.files import atomic_path
from polyak.workloads.data import DatasetFingerprint
from polyak.workloads.input_queue import InputQueue
from polyak.workloads.run_files import (
    EVAL_CSV,
    HPARAMS_JSON,
    MEASUREMENTS_CSV,
    MetricsLogger,
    OutputDirectoryInUseError,
    as_scalar,
    check_or_write_hparams,
    check_output_dir,
    checkpoint_path,
    latest_checkpoint,
    package_versions,
    remove_older_checkpoints,
    workload_properties,
    write_json,
)

if TYPE_CHECKING:  # algoperf's spec imports both frameworks; the loop imports neither
    from polyak.algoperf import spec

# The public face of the loop, with the run-directory names the runner reads.
__all__ = [
    "EVAL_CSV",
    "HPARAMS_JSON",
    "MEASUREMENTS_CSV",
    "STOP_MAX_STEPS",
    "STOP_TARGET",
    "STOP_TIME_BUDGET",
    "STOP_TRAINING_COMPLETE",
    "EvalRecord",
    "LoopBackend",
    "LoopConfig",
    "MetricsLogger",
    "OutputDirectoryInUseError",
    "RunResult",
    "run_training",
]

_REQUIRED_FUNCTIONS = ("init_optimizer_state", "update_params", "get_batch_size", "data_selection")

# Stop reasons recorded in RunResult.stop_reason and in checkpoints.
STOP_TARGET = "target"
STOP_MAX_STEPS = "max_steps"
STOP_TIME_BUDGET = "time_budget"
STOP_TRAINING_COMPLETE = "training_complete"


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


class LoopBackend(abc.ABC):
    """What the loop needs from a framework: rng keys, devices, clocks, checkpoint contents.

    One twin per framework (``loop_torch.TorchLoopBackend``,
    ``loop_jax.JaxLoopBackend``), with the same methods in the same order.
    Writing and reading checkpoint files is shared: the twins only say what
    goes in and how it comes back.
    """

    framework: str

    @abc.abstractmethod
    def set_cpu_threads(self, num_threads: int | None) -> int:
        """Sets intra-op threads (if given); returns the previous count for restoring."""

    # ---- rng ------------------------------------------------------------------

    @abc.abstractmethod
    def prng_key(self, seed: int) -> Any:
        """The run's root key, as AlgoPerf's ``prng.PRNGKey(seed)``."""

    @abc.abstractmethod
    def split(self, key: Any, num: int) -> list[Any]:
        """``num`` keys derived from ``key``."""

    @abc.abstractmethod
    def fold_in(self, key: Any, data: int) -> Any:
        """A key derived from ``key`` and a step number."""

    # ---- devices and clocks -------------------------------------------------------

    @abc.abstractmethod
    def num_data_shards(self) -> int:
        """Devices or ranks a global batch is split over."""

    @abc.abstractmethod
    def is_primary(self) -> bool:
        """Whether this process writes the run's files."""

    @abc.abstractmethod
    def now(self) -> float:
        """Wall time in seconds, the same on every process."""

    @abc.abstractmethod
    def block(self, tree: Any) -> None:
        """Waits until every array in ``tree`` is computed."""

    # ---- global rng state -------------------------------------------------------

    @abc.abstractmethod
    def seed_global_rng(self, seed: int) -> None:
        """Seeds the framework's global rng, if it has one."""

    @abc.abstractmethod
    def capture_rng_state(self) -> dict[str, Any]:
        """The framework's global rng state, for a checkpoint."""

    @abc.abstractmethod
    def restore_rng_state(self, state: dict[str, Any]) -> None:
        """Undoes :meth:`capture_rng_state`."""

    # ---- checkpoints -------------------------------------------------------------

    def save_checkpoint(
        self,
        path: str,
        optimizer_state: Any,
        model_params: Any,
        model_state: Any,
        extra: dict[str, Any],
    ) -> None:
        """Writes the three AlgoPerf states and ``extra`` to ``path``, atomically."""
        payload = {**self._saved_states(optimizer_state, model_params, model_state), **extra}
        with atomic_path(path) as temporary_path:
            self._write(payload, temporary_path)

    def load_checkpoint(
        self, path: str, optimizer_state: Any, model_params: Any, model_state: Any
    ) -> tuple[Any, Any, Any, dict[str, Any]]:
        """The states saved at ``path`` poured into fresh ones, and the ``extra`` saved beside."""
        try:
            extra = self._read(path)
            saved = {key: extra.pop(key) for key in _STATE_KEYS}
        except Exception as error:  # each serializer fails its own way on a damaged file
            raise UnreadableCheckpointError(
                f"checkpoint {path} is truncated or unreadable ({type(error).__name__}: "
                f"{error}); delete it to resume from the previous checkpoint, or start "
                "the run afresh"
            ) from error
        restored = self._restored_states(saved, optimizer_state, model_params, model_state)
        return (*restored, extra)

    @abc.abstractmethod
    def _saved_states(
        self, optimizer_state: Any, model_params: Any, model_state: Any
    ) -> dict[str, Any]:
        """The three states as they are written, keyed by :data:`_STATE_KEYS`."""

    @abc.abstractmethod
    def _restored_states(
        self, saved: dict[str, Any], optimizer_state: Any, model_params: Any, model_state: Any
    ) -> tuple[Any, Any, Any]:
        """Undoes :meth:`_saved_states`, into freshly initialized states."""

    @abc.abstractmethod
    def _write(self, payload: dict[str, Any], path: str) -> None:
        """Serializes ``payload`` to the file ``path``."""

    @abc.abstractmethod
    def _read(self, path: str) -> dict[str, Any]:
        """Undoes :meth:`_write`."""


_STATE_KEYS = ("optimizer_state", "model_params", "model_state")


class UnreadableCheckpointError(RuntimeError):
    """A checkpoint file that cannot be read back (truncated, corrupted, foreign)."""


def _backend_for(framework: str) -> LoopBackend:
    if framework == "pytorch":
        from polyak.workloads.loop_torch import TorchLoopBackend

        return TorchLoopBackend()
    if framework == "jax":
        from polyak.workloads.loop_jax import JaxLoopBackend

        return JaxLoopBackend()
    raise ValueError(f"unknown framework {framework!r}; choices: pytorch, jax")


# ---- the run: what stays fixed, and the state that evolves ---------------------------


@dataclasses.dataclass(frozen=True)
class _Submission:
    """A submission's AlgoPerf functions, checked once."""

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


@dataclasses.dataclass(frozen=True)
class _Run:
    """What stays fixed during a run: its parts, its limits and where it writes."""

    workload: spec.Workload
    name: str
    submission: _Submission
    hyperparameters: Any
    config: LoopConfig
    backend: LoopBackend
    output_dir: str | None
    resume: bool
    say: Callable[[str], None]
    global_batch_size: int
    eval_batch_size: int
    eval_every: int
    budget: float
    dataset: DatasetFingerprint | None
    primary: bool

    @property
    def framework(self) -> str:
        return self.backend.framework

    @property
    def writes_checkpoints(self) -> bool:
        return self.config.checkpoint and self.output_dir is not None and self.primary


@dataclasses.dataclass
class _RunState:
    """Everything that changes during a run.

    A checkpoint holds all of it but ``rng`` (the loop key every step folds
    its number into) and the queue, which a resumed run derives again from
    the seed, the queue skipping the batches already drawn. ``train_state`` is
    AlgoPerf's dict of the same name, handed read-only to ``update_params``.
    """

    rng: Any
    input_queue: InputQueue
    optimizer_state: Any
    model_params: Any
    model_state: Any
    logger: MetricsLogger
    train_state: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {
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
    )
    global_step: int = 0
    preemption_count: int = 0
    evals: list[EvalRecord] = dataclasses.field(default_factory=list)


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


def _check_batch_size(label: str, size: int, shards: int) -> int:
    if size < 1 or size % shards:
        raise ValueError(
            f"the {label} ({size}) has to be a positive multiple of the number of "
            f"devices ({shards})"
        )
    return size


def _training_complete_error() -> type[Exception]:
    # Looked up only when update_params raises: algoperf's spec imports both frameworks.
    from polyak.algoperf import spec

    return spec.TrainingCompleteError


# ---- the steps of a run, in the order train_once takes them ---------------------------


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
        run = _set_up(
            workload, submission, hyperparameters, backend, config, output_dir, resume, progress
        )
        return _train(run)
    finally:
        if config.cpu_threads is not None:
            backend.set_cpu_threads(previous_threads)


def _train(run: _Run) -> RunResult:
    """One run, step by step as AlgoPerf's ``train_once`` takes it."""
    state = _initialize(run)
    if run.output_dir is not None:
        _open_output_dir(run, state)
    run.workload.attach_metrics_logger(state.logger)
    _stop_at_step_limit(run, state)
    run_start_time = run.backend.now()
    while _keeps_training(run, state):
        step_start_time = run.backend.now()
        step_rng = run.backend.fold_in(state.rng, state.global_step)
        data_select_rng, update_rng, prep_eval_rng, eval_rng = run.backend.split(step_rng, 4)
        _train_step(run, state, data_select_rng, update_rng)
        state.train_state["accumulated_submission_time"] += run.backend.now() - step_start_time
        if _out_of_time(run, state):
            break
        if not _eval_due(run, state):
            continue
        _prepare_for_eval(run, state, prep_eval_rng)
        if _out_of_time(run, state):
            break
        metrics = _evaluate(run, state, eval_rng, run_start_time)
        _log_eval_and_checkpoint(run, state, metrics)
    return _finish(run, state)


def _set_up(
    workload: spec.Workload | str,
    submission: Any,
    hyperparameters: Any,
    backend: LoopBackend,
    config: LoopConfig,
    output_dir: str | os.PathLike[str] | None,
    resume: bool,
    progress: Callable[[str], None] | None,
) -> _Run:
    """Checks the arguments and settles the run's batch sizes, eval period and budget."""
    workload, name = _resolve_workload(workload, backend.framework)
    functions = _Submission.from_object(submission)
    if resume and output_dir is None:
        raise ValueError("resume=True needs the output_dir that holds the checkpoint")
    global_batch_size = int(functions.get_batch_size(name))
    get_eval_batch_size = functions.get_eval_batch_size
    eval_batch_size = int(
        get_eval_batch_size(name) if get_eval_batch_size is not None else workload.eval_batch_size
    )
    shards = backend.num_data_shards()
    return _Run(
        workload=workload,
        name=name,
        submission=functions,
        hyperparameters=hyperparameters,
        config=config,
        backend=backend,
        output_dir=None if output_dir is None else os.fspath(output_dir),
        resume=resume,
        say=progress or (lambda line: None),
        global_batch_size=_check_batch_size("global batch size", global_batch_size, shards),
        eval_batch_size=_check_batch_size("eval batch size", eval_batch_size, shards),
        eval_every=config.eval_every_steps or int(getattr(workload, "eval_period_steps", 1) or 1),
        budget=float(config.max_runtime_sec or workload.max_allowed_runtime_sec),
        dataset=getattr(workload, "dataset_fingerprint", None),
        primary=backend.is_primary(),
    )


def _initialize(run: _Run) -> _RunState:
    """Seeds, splits the root key, and builds the input queue, model and optimizer state."""
    # Global RNGs too, so that equal seeds give equal runs within one process;
    # a resumed run then overwrites them with the checkpointed states.
    global_seed = int(np.random.SeedSequence([run.config.rng_seed, 0x5EED]).generate_state(1)[0])
    np.random.seed(global_seed)
    random.seed(global_seed)
    run.backend.seed_global_rng(global_seed)

    # rng, exactly as train_once / score_submission_on_workload split it.
    rng = run.backend.prng_key(run.config.rng_seed)
    rng, _ = run.backend.split(rng, 2)
    data_rng, opt_init_rng, model_init_rng, rng = run.backend.split(rng, 4)

    input_queue = InputQueue(
        run.workload._build_input_queue(
            data_rng, "train", data_dir=None, global_batch_size=run.global_batch_size
        )
    )
    model_params, model_state = run.workload.init_model_fn(model_init_rng)
    optimizer_state = run.submission.init_optimizer_state(
        run.workload, model_params, model_state, run.hyperparameters, opt_init_rng
    )
    writes_files = run.output_dir is not None and run.primary
    return _RunState(
        rng=rng,
        input_queue=input_queue,
        optimizer_state=optimizer_state,
        model_params=model_params,
        model_state=model_state,
        logger=MetricsLogger(run.output_dir if writes_files else None),
    )


def _open_output_dir(run: _Run, state: _RunState) -> None:
    """Checks the directory and hyperparameters, resumes if asked, and writes the meta data."""
    output_dir = run.output_dir
    assert output_dir is not None
    if run.primary:
        check_output_dir(output_dir, run.resume)
        check_or_write_hparams(output_dir, run.hyperparameters, run.resume)
    latest = latest_checkpoint(output_dir) if run.resume else None
    if latest is not None:
        _restore_checkpoint(run, state, latest)
        where = f"{latest} at step {state.global_step}"
        run.say(f"[{run.name}/{run.framework}] resumed from {where}")
    if run.primary:
        count = state.preemption_count
        write_json(os.path.join(output_dir, f"meta_data_{count}.json"), _meta_data(run))
        write_json(os.path.join(output_dir, f"flags_{count}.json"), _flags(run))


def _meta_data(run: _Run) -> dict[str, Any]:
    meta = workload_properties(run.workload)
    meta.update(
        {
            "os_platform": platform.platform(),
            "python_version": platform.python_version(),
            "python_compiler": platform.python_compiler(),
            "cpu_count": os.cpu_count(),
            "rng_seed": run.config.rng_seed,
            "framework": run.framework,
            "versions": package_versions(run.framework),
            "dataset": run.dataset.as_dict() if run.dataset is not None else None,
            "loop_config": dataclasses.asdict(run.config),
        }
    )
    return meta


def _flags(run: _Run) -> dict[str, Any]:
    return {
        "workload": run.name,
        "framework": run.framework,
        "rng_seed": run.config.rng_seed,
        "max_global_steps": run.config.max_steps,
        "eval_every_steps": run.eval_every,
        "max_runtime_sec": run.budget,
        "stop_at_target": run.config.stop_at_target,
        "save_checkpoints": run.config.checkpoint,
        "resume_last_run": run.resume,
    }


# ---- checkpoints ------------------------------------------------------------------


def _save_checkpoint(run: _Run, state: _RunState) -> None:
    """``checkpoint_<step>`` with everything a resumed run needs; older ones are removed."""
    if not run.writes_checkpoints:
        return
    assert run.output_dir is not None
    path = checkpoint_path(run.output_dir, state.global_step)
    extra = {
        "train_state": dict(state.train_state),
        "global_step": state.global_step,
        "preemption_count": state.preemption_count,
        "evals": [dataclasses.asdict(record) for record in state.evals],
        "metrics_logger": state.logger.state(),
        "batches_consumed": state.input_queue.batches_drawn,
        "rng_state": {
            "numpy": np.random.get_state(),
            "python": random.getstate(),
            "framework": run.backend.capture_rng_state(),
        },
    }
    run.backend.save_checkpoint(
        path, state.optimizer_state, state.model_params, state.model_state, extra
    )
    remove_older_checkpoints(run.output_dir, keep=path)


def _restore_checkpoint(run: _Run, state: _RunState, path: str) -> None:
    """Undoes :func:`_save_checkpoint`, and lifts the limits a longer run may pass."""
    state.optimizer_state, state.model_params, state.model_state, saved = (
        run.backend.load_checkpoint(
            path, state.optimizer_state, state.model_params, state.model_state
        )
    )
    state.train_state.update(saved["train_state"])
    state.global_step = int(saved["global_step"])
    state.preemption_count = int(saved["preemption_count"]) + 1
    state.evals = [EvalRecord(**record) for record in saved["evals"]]
    state.logger.restore(saved["metrics_logger"])
    state.input_queue.fast_forward(int(saved["batches_consumed"]))
    np.random.set_state(saved["rng_state"]["numpy"])
    random.setstate(saved["rng_state"]["python"])
    run.backend.restore_rng_state(saved["rng_state"]["framework"])
    # A run stopped by its step or time limit may go on under a larger one.
    train_state = state.train_state
    if train_state["stop_reason"] == STOP_MAX_STEPS:
        train_state["training_complete"] = False
        train_state["stop_reason"] = None
    if train_state["stop_reason"] == STOP_TIME_BUDGET:
        train_state["stop_reason"] = None
    train_state["is_time_remaining"] = train_state["accumulated_submission_time"] < run.budget


# ---- the stop rule ----------------------------------------------------------------


def _goals_reached(run: _Run, state: _RunState) -> bool:
    return run.config.stop_at_target and (
        state.train_state["validation_goal_reached"] and state.train_state["test_goal_reached"]
    )


def _keeps_training(run: _Run, state: _RunState) -> bool:
    train_state = state.train_state
    return (
        train_state["is_time_remaining"]
        and not _goals_reached(run, state)
        and not train_state["training_complete"]
    )


def _complete(state: _RunState, reason: str) -> None:
    state.train_state["training_complete"] = True
    if state.train_state["stop_reason"] is None:
        state.train_state["stop_reason"] = reason


def _stop_at_step_limit(run: _Run, state: _RunState) -> None:
    if run.config.max_steps is not None and state.global_step >= run.config.max_steps:
        _complete(state, STOP_MAX_STEPS)


def _out_of_time(run: _Run, state: _RunState) -> bool:
    """Whether submission time has used up the budget (then the run stops, without an eval)."""
    train_state = state.train_state
    if train_state["accumulated_submission_time"] < run.budget:
        return False
    train_state["is_time_remaining"] = False
    train_state["stop_reason"] = train_state["stop_reason"] or STOP_TIME_BUDGET
    return True


# ---- one step, one eval -------------------------------------------------------------


def _algoperf_arguments(run: _Run, state: _RunState, rng: Any) -> dict[str, Any]:
    """The arguments ``update_params`` and ``prepare_for_eval`` share."""
    return {
        "workload": run.workload,
        "current_param_container": state.model_params,
        "current_params_types": run.workload.model_params_types,
        "model_state": state.model_state,
        "hyperparameters": run.hyperparameters,
        "loss_type": run.workload.loss_type,
        "optimizer_state": state.optimizer_state,
        "eval_results": [(record.global_step, record.metrics) for record in state.evals],
        "global_step": state.global_step,
        "rng": rng,
    }


def _train_step(run: _Run, state: _RunState, data_select_rng: Any, update_rng: Any) -> None:
    """``data_selection``, then ``update_params``; the step count goes up by one."""
    batch = run.submission.data_selection(
        run.workload,
        state.input_queue,
        state.optimizer_state,
        state.model_params,
        state.model_state,
        run.hyperparameters,
        state.global_step,
        data_select_rng,
    )
    arguments = _algoperf_arguments(run, state, update_rng)
    if run.submission.update_params_takes_train_state:
        arguments["train_state"] = MappingProxyType(state.train_state)
    try:
        state.optimizer_state, state.model_params, state.model_state = run.submission.update_params(
            batch=batch, **arguments
        )
    except _training_complete_error():
        _complete(state, STOP_TRAINING_COMPLETE)
    run.backend.block((state.optimizer_state, state.model_params, state.model_state))
    state.global_step += 1
    _stop_at_step_limit(run, state)


def _eval_due(run: _Run, state: _RunState) -> bool:
    last_eval_step = state.train_state["last_eval_step"]
    return (
        last_eval_step is None
        or state.global_step - last_eval_step >= run.eval_every
        or state.train_state["training_complete"]
    )


def _prepare_for_eval(run: _Run, state: _RunState, prep_eval_rng: Any) -> None:
    """The submission's ``prepare_for_eval``, if it has one; its time is submission time."""
    if run.submission.prepare_for_eval is None:
        return
    start_time = run.backend.now()
    state.optimizer_state, state.model_params, state.model_state = run.submission.prepare_for_eval(
        **_algoperf_arguments(run, state, prep_eval_rng)
    )
    run.backend.block((state.optimizer_state, state.model_params, state.model_state))
    state.train_state["accumulated_submission_time"] += run.backend.now() - start_time


def _evaluate(run: _Run, state: _RunState, eval_rng: Any, run_start_time: float) -> dict[str, Any]:
    """An untimed ``eval_model``; records the eval and whether the targets are reached."""
    train_state = state.train_state
    eval_start_time = run.backend.now()
    metrics = dict(
        run.workload.eval_model(
            run.eval_batch_size,
            state.model_params,
            state.model_state,
            eval_rng,
            None,
            None,
            state.global_step,
        )
    )
    train_state["validation_goal_reached"] = bool(
        train_state["validation_goal_reached"]
        or run.workload.has_reached_validation_target(metrics)
    )
    train_state["test_goal_reached"] = bool(
        train_state["test_goal_reached"] or run.workload.has_reached_test_target(metrics)
    )
    eval_end_time = run.backend.now()
    train_state["accumulated_eval_time"] += eval_end_time - eval_start_time
    train_state["last_eval_step"] = state.global_step
    submission_time = train_state["accumulated_submission_time"]
    metrics.update(
        {
            "score": submission_time,
            "total_duration": eval_end_time - run_start_time,
            "accumulated_submission_time": submission_time,
            "accumulated_eval_time": train_state["accumulated_eval_time"],
            "accumulated_logging_time": train_state["accumulated_logging_time"],
        }
    )
    metrics = {key: as_scalar(value) for key, value in metrics.items()}
    record = EvalRecord(state.global_step, submission_time, metrics, state.preemption_count)
    state.evals.append(record)
    if _goals_reached(run, state):
        train_state["stop_reason"] = train_state["stop_reason"] or STOP_TARGET
    return metrics


def _log_eval_and_checkpoint(run: _Run, state: _RunState, metrics: dict[str, Any]) -> None:
    """Logs the eval and checkpoints, billed as logging time; reports progress."""
    start_time = run.backend.now()
    state.logger.append_scalar_metrics(
        metrics,
        global_step=state.global_step,
        preemption_count=state.preemption_count,
        is_eval=True,
    )
    _save_checkpoint(run, state)
    state.train_state["accumulated_logging_time"] += run.backend.now() - start_time
    run.say(_progress_line(run, state.global_step, metrics))


def _progress_line(run: _Run, step: int, metrics: Mapping[str, Any]) -> str:
    shown = [
        f"{key}={value:.4f}"
        for key, value in metrics.items()
        if "/" in key and not key.endswith("num_examples") and isinstance(value, float)
    ]
    return (
        f"[{run.name}/{run.framework}] step {step}: {' '.join(shown)} "
        f"(submission {metrics['accumulated_submission_time']:.2f}s)"
    )


# ---- the summary --------------------------------------------------------------------


def _finish(run: _Run, state: _RunState) -> RunResult:
    """Settles the stop reason, logs the final score, checkpoints and summarizes."""
    train_state = state.train_state
    if train_state["stop_reason"] is None:
        if _goals_reached(run, state):
            train_state["stop_reason"] = STOP_TARGET
        elif not train_state["is_time_remaining"]:
            train_state["stop_reason"] = STOP_TIME_BUDGET
        else:
            train_state["stop_reason"] = STOP_TRAINING_COMPLETE
    train_metrics = list(state.logger.train_rows)
    state.logger.append_scalar_metrics(
        {"score": train_state["accumulated_submission_time"]},
        global_step=state.global_step,
        preemption_count=state.preemption_count,
    )
    state.logger.finish()
    _save_checkpoint(run, state)
    result = _summarize(run, state, train_metrics)
    target = "reached" if result.reached_target else "not reached"
    run.say(
        f"[{run.name}/{run.framework}] done at step {state.global_step} ({result.stop_reason}): "
        f"validation target {target}, submission {result.total_submission_time:.2f}s"
    )
    return result


def _summarize(run: _Run, state: _RunState, train_metrics: list[dict[str, Any]]) -> RunResult:
    workload, evals = run.workload, state.evals
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
        workload=run.name,
        framework=run.framework,
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
        total_steps=state.global_step,
        total_submission_time=state.train_state["accumulated_submission_time"],
        dataset=run.dataset,
        stop_reason=state.train_state["stop_reason"],
        preemption_count=state.preemption_count,
        train_metrics=tuple(train_metrics),
        output_dir=run.output_dir,
    )
