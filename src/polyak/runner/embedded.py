"""The embedded suite: the small CPU workloads, trained through polyak's local loop.

It gives the runner something real to do on a machine without GPUs or
datasets. The grid is submissions x frameworks x averaging modes x workloads x
seeds x tuning trials:

- a submission (``nadamw``, ``shampoo`` or a path) is the module
  ``submissions/<name>/<framework>/submission.py``, loaded by file path;
- its hyperparameters are the k-th point of ``tuning_search_spaces/<name>.json``
  (or ``--tuning_search_space``), with the averaging mode merged in as an
  override: ``{"averaging": mode}`` for a mode of ``polyak.averaging.config.MODES``
  (the ones in ``TORCH_ONLY_MODES`` only for PyTorch);
- the run's *label* is the submission's name plus the mode (``nadamw``,
  ``nadamw_lawa``, ``nadamw_ema``), and each seed is one study.

Layout (AlgoPerf's, with the label as a folder and each seed as an experiment):

    <experiment_dir>/<experiment_name>/<label>/seed_<s>/<workload>_<framework>/trial_<k>/
        eval_measurements.csv   (written by the local loop, AlgoPerf's columns)
        hparams.json, meta_data_0.json, polyak_trial_finished.json

so ``<experiment_dir>/<experiment_name>`` reads like AlgoPerf's scoring folder
(submission = label, study = seed). Each run stops at the validation target,
at the workload's time budget, or at ``--max_global_steps`` (default: the
workload's ``step_hint``, where the LR schedule has decayed to zero anyway);
evals come every ``--eval_every_steps`` (default: the workload's
``eval_period_steps``). Before the first timed run of each submission x
framework x workload, an untimed warm-up (:class:`WarmUp`) absorbs the process's
one-time compilation, so that the table's seconds compare like with like.
Finished runs are skipped on resume. Each finished run's wall and CPU seconds go
into its completion marker. While it runs, the suite prints one line per run with
the elapsed time and an estimate of the time left.

With ``workers`` > 1 the runs are spread over that many processes
(:func:`run_in_workers`): one task per kind of run, so each kind is still warmed
up once, longest tasks first. JAX jits every trial's steps anew, so the CLI gives
every process a persistent compilation cache (:func:`use_jax_compilation_cache`)
under the experiment folder; later trials then load the programs instead of
compiling them.

The suite ends by printing the steps-to-target table of :mod:`polyak.runner.steps_table`
(median over seeds, hits per cell, ratios to ``none``, the seeds behind every
figure), built from the planned runs only, and writing it as
``steps_to_target.md`` and ``.csv`` into ``<experiment_dir>/<experiment_name>/``,
with the time-to-target report in its ``report/`` folder.

Defaults (the README's first command): both submissions, both frameworks,
none / LAWA / EMA / TWA (TWA on PyTorch only), every registered embedded
workload, :data:`DEFAULT_SEED_COUNT` seed(s), :data:`DEFAULT_WORKERS` worker processes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import importlib
import inspect
import math
import multiprocessing
import os
import queue
import shutil
import statistics
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from polyak.averaging.config import MODES, TORCH_ONLY_MODES
from polyak.runner.commands import (
    default_search_space,
    find_repo_root,
    resolve_submission,
    submission_label,
)
from polyak.runner.completion import EVAL_CSV, is_finished, mark_finished, read_marker
from polyak.runner.errors import LaunchConfigError, ResultsFormatError
from polyak.runner.report import ReportFiles, build_report
from polyak.runner.results import TrialLocation, TrialResult, WorkloadResult, aggregate, load_trial
from polyak.runner.search_space import load_search_space
from polyak.runner.steps_table import (
    SeedOutcome,
    SeedRun,
    StepsTable,
    TableLayout,
    build_steps_table,
    format_duration,
    write_steps_table,
)
from polyak.runner.submission_loader import load_submission_module
from polyak.runner.workload_table import FRAMEWORKS, select_workloads
from polyak.workloads import loop as local_loop
from polyak.workloads import registry as embedded_registry

# TWA's fit on training batches exists only in the PyTorch backend
# (polyak.averaging.twa); the runner's grids and the study read it from here.

DEFAULT_SUBMISSIONS: tuple[str, ...] = ("nadamw", "shampoo")
DEFAULT_AVERAGING: tuple[str, ...] = ("none", "lawa", "ema", "twa")
# Sized so that the default grid fits in about 10 minutes on an idle 2-core machine.
# Measured (CPU seconds, whose sum is what two idle cores share): one seed's 42 runs
# took 670-700 s, 90% of them textlm's, plus 70-85 s of warm-ups and start-up: about
# 6 minutes with two workers (8 minutes of wall time with other jobs on the machine,
# load average 2-5). Each further seed adds about 6 minutes, so two would take about
# 12 and three about 18; --seeds=3 gives medians.
DEFAULT_SEED_COUNT = 1
# One process per core: the embedded models are too small for intra-op threads to pay.
DEFAULT_WORKERS = max(1, min(2, os.cpu_count() or 1))
# Enough steps for every one-time cost of a kind of run: the first step, the first
# collection (averaging_every=2) and the first swap to the average (an eval at step 3).
WARM_UP_STEPS = 6
Emit = Callable[[str], None]
RunKind = tuple[str, str, str]  # (submission, framework, workload)


def _is_seed(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def seed_range(count: int, first: int = 0) -> tuple[int, ...]:
    """``count`` consecutive seeds from ``first``: one study each."""
    if not _is_seed(count) or count < 1:
        raise LaunchConfigError(f"seeds={count!r}; expected the number of seeds, an integer >= 1")
    if not _is_seed(first):
        raise LaunchConfigError(f"first seed (rng_seed) {first!r}; expected an integer >= 0")
    return tuple(range(first, first + count))


@dataclasses.dataclass(frozen=True)
class EmbeddedSettings:
    submissions: tuple[str, ...] = DEFAULT_SUBMISSIONS
    frameworks: tuple[str, ...] = FRAMEWORKS
    averaging: tuple[str, ...] = DEFAULT_AVERAGING
    workloads: str | tuple[str, ...] = "all"
    seeds: tuple[int, ...] = seed_range(DEFAULT_SEED_COUNT)
    num_tuning_trials: int = 1
    tuning_search_space: str | None = None
    experiment_dir: str = "~/experiment_runs"
    experiment_name: str = "embedded"
    max_global_steps: int | None = None
    eval_every_steps: int | None = None
    # The study turns this off to compare whole curves; time to target is unchanged.
    stop_at_target: bool = True

    def __post_init__(self) -> None:
        for name, allowed in (("frameworks", FRAMEWORKS), ("averaging", MODES)):
            values = getattr(self, name)
            if not values:
                raise LaunchConfigError(f"{name} is empty; choose from {', '.join(allowed)}")
            bad = [v for v in values if v not in allowed]
            if bad:
                raise LaunchConfigError(
                    f"{name}: unknown {', '.join(map(repr, bad))}; choices: {', '.join(allowed)}"
                )
        if not self.submissions:
            raise LaunchConfigError("no submission given")
        if not self.seeds:
            raise LaunchConfigError("seeds is empty; give at least one seed")
        bad_seeds = [s for s in self.seeds if not _is_seed(s)]
        if bad_seeds:
            raise LaunchConfigError(f"seeds {bad_seeds!r}; expected integers >= 0")
        if len(set(self.seeds)) != len(self.seeds):
            raise LaunchConfigError(f"seeds {self.seeds!r} repeat; each seed is one study")
        for name in ("num_tuning_trials", "max_global_steps", "eval_every_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise LaunchConfigError(f"{name}={value!r}; expected an integer >= 1")

    @property
    def root(self) -> Path:
        return Path(os.path.abspath(os.path.expanduser(self.experiment_dir))) / self.experiment_name


@dataclasses.dataclass(frozen=True)
class EmbeddedRun:
    """One cell of the grid."""

    submission: str
    submission_path: str
    framework: str
    averaging: str
    workload: str
    seed: int
    trial: int
    hyperparameters: dict[str, Any]

    @property
    def label(self) -> str:
        name = submission_label(self.submission)
        return name if self.averaging == "none" else f"{name}_{self.averaging}"

    @property
    def kind(self) -> RunKind:
        """What a process compiles once: the optimizer's step for this workload."""
        return (self.submission, self.framework, self.workload)

    @property
    def study(self) -> str:
        return f"seed_{self.seed}"

    def trial_dir(self, root: Path) -> Path:
        return (
            root
            / self.label
            / self.study
            / f"{self.workload}_{self.framework}"
            / f"trial_{self.trial}"
        )

    def describe(self) -> str:
        return f"{self.label} {self.framework} {self.workload} seed {self.seed} trial {self.trial}"


@dataclasses.dataclass(frozen=True)
class EmbeddedOutcome:
    runs: tuple[EmbeddedRun, ...]
    statuses: tuple[str, ...]
    trials: tuple[TrialResult, ...]
    results: tuple[WorkloadResult, ...]
    report: ReportFiles | None
    table: StepsTable | None = None
    table_files: tuple[Path, ...] = ()


def plan_runs(
    settings: EmbeddedSettings, repo_root: Path, workload_names: Sequence[str]
) -> list[EmbeddedRun]:
    """The grid, in a fixed order; validates submissions and search spaces up front."""
    runs = []
    for submission in settings.submissions:
        # The submission is named before its search space is looked for.
        paths = {fw: resolve_submission(submission, fw, repo_root) for fw in settings.frameworks}
        given = settings.tuning_search_space or default_search_space(submission)
        space_path = Path(os.path.expanduser(given))
        space = load_search_space(
            space_path if space_path.is_absolute() else repo_root / space_path
        )
        for framework in settings.frameworks:
            path = paths[framework]
            for averaging in settings.averaging:
                if averaging in TORCH_ONLY_MODES and framework != "pytorch":
                    continue
                for seed in settings.seeds:
                    points = space.draw(settings.num_tuning_trials, seed=seed)
                    for workload in workload_names:
                        for trial, point in enumerate(points, start=1):
                            runs.append(
                                EmbeddedRun(
                                    submission=submission,
                                    submission_path=path,
                                    framework=framework,
                                    averaging=averaging,
                                    workload=workload,
                                    seed=seed,
                                    trial=trial,
                                    hyperparameters={**point, "averaging": averaging},
                                )
                            )
    if not runs:
        raise LaunchConfigError(
            f"no run selected: averaging={','.join(settings.averaging)} with "
            f"frameworks={','.join(settings.frameworks)} leaves nothing to run "
            f"({', '.join(TORCH_ONLY_MODES)}: PyTorch only)"
        )
    return runs


def hyperparameter_tuple(point: dict[str, Any]) -> Any:
    """A search-space point with attribute access, as AlgoPerf hands it to a submission."""
    return collections.namedtuple("Hyperparameters", list(point))(**point)


@dataclasses.dataclass
class WarmUp:
    """One untimed run per submission x framework x workload, before the first timed one.

    A process pays one-time costs the first time it runs a kind of step: PyTorch's
    ``torch.compile`` of the fused optimizer step, XLA's start-up. Without a warm-up
    they land in whichever timed run comes first (30 s against 0.5 s for the same
    steps). The warm-up trains a fresh workload instance for a few steps with LAWA
    on, so the averaging's paths run too; it writes nothing and its result is
    dropped. Each timed run then starts from its own seed and state, as before.
    """

    repo_root: Path
    registry: Any
    loop: Any
    warmed: set[RunKind] = dataclasses.field(default_factory=set)

    def before(self, run: EmbeddedRun) -> float:
        """Warms up ``run``'s kind if nothing of that kind ran yet; the seconds it took."""
        if run.kind in self.warmed:
            return 0.0
        started = time.monotonic()
        workload = self.registry.make_workload(run.workload, run.framework)
        module = load_submission_module(self.repo_root / run.submission_path)
        point = {**run.hyperparameters, "averaging": "lawa", "averaging_every": 2, "lawa_window": 2}
        config = self.loop.LoopConfig(
            max_steps=WARM_UP_STEPS,
            eval_every_steps=WARM_UP_STEPS // 2,
            rng_seed=run.seed,
            stop_at_target=False,
            checkpoint=False,
        )
        self.loop.run_training(
            workload, module, hyperparameter_tuple(point), framework=run.framework, config=config
        )
        self.warmed.add(run.kind)
        return time.monotonic() - started


def use_jax_compilation_cache(directory: Path) -> bool:
    """Lets every JAX trial of this process reuse the programs compiled by earlier ones.

    The JAX builder jits its steps anew for every trial, so without a persistent
    cache each run recompiles them (about 2 s of CPU per Shampoo run, more than
    its steps) and the warm-up cannot absorb it. The cache stores the compiled
    executables under ``directory`` (private to the user: JAX trusts what it
    finds there); the programs and so the trajectories are the same. Process-wide,
    and only effective before the process's first compilation; False when jax is
    not installed.
    """
    try:
        import jax
    except ImportError:
        return False
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # The embedded programs compile in well under JAX's default 1 s threshold.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return True


def run_one(
    run: EmbeddedRun,
    root: Path,
    repo_root: Path,
    registry: Any,
    loop: Any,
    settings: EmbeddedSettings,
    out: Emit,
) -> Any:
    """Trains one cell into its trial folder and marks it finished; raises on failure.

    Returns the loop's result. The marker records the run's wall and CPU seconds
    (CPU seconds of the whole process, so they are what the run would take on an
    otherwise idle machine, whatever else shares the cores).
    """
    workload = registry.make_workload(run.workload, run.framework)
    module = load_submission_module(repo_root / run.submission_path)
    config = loop.LoopConfig(
        max_steps=settings.max_global_steps or int(workload.step_hint),
        eval_every_steps=settings.eval_every_steps,  # None: the workload's eval period
        rng_seed=run.seed,
        stop_at_target=settings.stop_at_target,
        checkpoint=True,
    )
    trial_path = run.trial_dir(root)
    resuming = trial_path.exists()
    trial_path.mkdir(parents=True, exist_ok=True)
    wall_started, cpu_started = time.monotonic(), time.process_time()
    result = loop.run_training(
        workload,
        module,
        hyperparameter_tuple(run.hyperparameters),
        framework=run.framework,
        config=config,
        output_dir=trial_path,
        progress=lambda line: out(f"    {run.describe()}: {line}"),
        resume=resuming,
    )
    mark_finished(
        trial_path,
        f"run_training stopped: {result.stop_reason}",
        label=run.label,
        submission=run.submission,
        averaging=run.averaging,
        seed=run.seed,
        target_metric=result.target_metric_name,
        validation_target=result.validation_target,
        direction=result.direction,
        max_runtime_sec=float(workload.max_allowed_runtime_sec),
        wall_seconds=time.monotonic() - wall_started,
        cpu_seconds=time.process_time() - cpu_started,
    )
    return result


def report_failure(prefix: str, exc: Exception, out: Emit) -> None:
    """The error and the last lines of its traceback, so a grid can go on to the next cell."""
    out(f"{prefix}: FAILED: {type(exc).__name__}: {exc}")
    for line in traceback.format_exc().rstrip().splitlines()[-6:]:
        out(f"    | {line}")


def run_embedded_suite(
    settings: EmbeddedSettings,
    *,
    repo_root: str | Path | None = None,
    dry_run: bool = False,
    resume: bool = True,
    report: bool = True,
    show_evals: bool = False,
    workers: int = 1,
    jax_cache_dir: Path | None = None,
    out: Emit = lambda line: print(line, flush=True),  # progress shows up in logs too
    registry: Any = embedded_registry,
    loop: Any = local_loop,
) -> EmbeddedOutcome:
    """Runs the grid (skipping finished cells), prints the table, writes it and the report.

    ``show_evals`` prints the loop's line for every eval too. ``workers`` > 1 trains
    in that many processes at once (:func:`run_in_workers`; ``jax_cache_dir`` is
    then each worker's JAX compilation cache). ``registry`` and ``loop`` are the
    embedded registry and the local loop, or stand-ins with their
    ``EMBEDDED_WORKLOADS`` / ``make_workload`` and ``LoopConfig`` / ``run_training``
    (importable modules when ``workers`` > 1).
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise LaunchConfigError(f"workers={workers!r}; expected an integer >= 1")
    repo = find_repo_root(repo_root)
    names = select_workloads(settings.workloads, tuple(registry.EMBEDDED_WORKLOADS))
    runs = plan_runs(settings, repo, names)
    root = settings.root
    pending = [r for r in runs if not (resume and is_finished(r.trial_dir(root)))]
    out(
        f"embedded suite: {len(runs)} run(s) into {root} ({len(runs) - len(pending)} finished "
        f"earlier); seeds {', '.join(map(str, settings.seeds))}; workloads {', '.join(names)}"
        + (f"; {workers} worker processes" if workers > 1 and not dry_run else "")
    )
    clock = SuiteClock(workers=workers, budgets={} if dry_run else _budgets(registry, names))
    if workers > 1 and not dry_run:
        if not (inspect.ismodule(registry) and inspect.ismodule(loop)):
            raise LaunchConfigError(
                f"workers={workers} needs the registry and the loop as importable modules "
                "(worker processes import them by name); stand-ins run with workers=1"
            )
        job = _Job(settings, repo, registry.__name__, loop.__name__, resume, show_evals)
        statuses = run_in_workers(job, runs, workers, clock, out, jax_cache_dir)
    else:
        grid = _Grid(settings, repo, registry, loop, WarmUp(repo, registry, loop), out, show_evals)
        statuses = grid.run_all(runs, dry_run, resume, clock)
    if dry_run or not root.is_dir():
        return EmbeddedOutcome(tuple(runs), tuple(statuses), (), (), None)
    if clock.runs or clock.warm_ups:
        out(clock.summary())
    return _conclude(settings, names, runs, statuses, report, out)


def _conclude(
    settings: EmbeddedSettings,
    workloads: Sequence[str],
    runs: Sequence[EmbeddedRun],
    statuses: Sequence[str],
    report: bool,
    out: Emit,
) -> EmbeddedOutcome:
    """The table (printed and written) and the report, from the planned runs on disk."""
    root = settings.root
    trials = planned_trials(runs, root, out)
    table = build_steps_table(table_layout(settings, workloads), seed_runs(runs, root))
    out("")
    out(table.text())
    table_files = write_steps_table(table, root, f"Embedded suite: {settings.experiment_name}")
    out(f"\ntable: {table_files[0]} and {table_files[1].name}")
    files = _write_report(trials, runs, settings, out) if report and trials else None
    return EmbeddedOutcome(
        tuple(runs),
        tuple(statuses),
        tuple(trials),
        tuple(aggregate(trials)),
        files,
        table,
        table_files,
    )


@dataclasses.dataclass(frozen=True)
class _Grid:
    settings: EmbeddedSettings
    repo: Path
    registry: Any
    loop: Any
    warm_up: WarmUp
    out: Emit
    show_evals: bool

    def run_all(
        self, runs: Sequence[EmbeddedRun], dry_run: bool, resume: bool, clock: SuiteClock
    ) -> list[str]:
        """Every cell in plan order, with the time left after each one that ran."""
        statuses = []
        for index, run in enumerate(runs, start=1):
            prefix = f"[{index}/{len(runs)}] {run.describe()}"
            statuses.append(self.run_cell(prefix, run, dry_run, resume, clock))
            if statuses[-1] in ("finished", "failed"):
                left = clock.seconds_left(
                    runs[index:], self.warm_up.warmed, self.settings.root, resume
                )
                self.out(f"    {clock.status(left)}")
        return statuses

    def run_cell(
        self,
        prefix: str,
        run: EmbeddedRun,
        dry_run: bool,
        resume: bool,
        clock: SuiteClock | _Forward,
    ) -> str:
        """One cell: skipped, planned (dry run), finished or failed."""
        root = self.settings.root
        trial_path = run.trial_dir(root)
        if resume and is_finished(trial_path):
            self.out(f"{prefix}: finished earlier, skipping")
            return "skipped"
        if dry_run:
            self.out(f"{prefix}: would run {run.submission_path} -> {trial_path}")
            return "planned"
        if not resume and trial_path.exists():
            shutil.rmtree(trial_path)  # --overwrite: start this run over
        try:
            warm_seconds = self.warm_up.before(run)
            if warm_seconds:
                clock.record_warm_up(warm_seconds)
                self.out(
                    f"{prefix}: warmed up {run.framework} {run.submission} on {run.workload} "
                    f"in {warm_seconds:.1f}s (untimed, discarded)"
                )
            started = time.monotonic()
            evals = self.out if self.show_evals else (lambda line: None)
            result = run_one(run, root, self.repo, self.registry, self.loop, self.settings, evals)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            report_failure(prefix, exc, self.out)
            return "failed"
        seconds = time.monotonic() - started
        clock.record_run(run, seconds)
        self.out(f"{prefix}: {_what_happened(run, root, result)} in {seconds:.1f}s")
        return "finished"


def _what_happened(run: EmbeddedRun, root: Path, result: Any) -> str:
    """The run as the table will score it, and where it stopped."""
    outcome = seed_outcome(run, root)
    stopped = getattr(result, "total_steps", None)
    at = f", stopped at step {stopped}" if stopped is not None else ""
    if outcome.hit:
        return f"target at step {outcome.steps}{at}"
    return f"no target ({outcome.status}{at})"


@dataclasses.dataclass(frozen=True)
class _Job:
    """What every worker process needs to run cells (picklable: modules by name)."""

    settings: EmbeddedSettings
    repo: Path
    registry_module: str
    loop_module: str
    resume: bool
    show_evals: bool


class _Forward:
    """Stands in for the output and the clock inside a worker: sends events to the parent."""

    def __init__(self, events: Any) -> None:
        self.events = events
        self.last_run_seconds = math.nan

    def __call__(self, line: str) -> None:
        self.events.put(("line", line))

    def record_warm_up(self, seconds: float) -> None:
        self.events.put(("warm_up", seconds))

    def record_run(self, run: EmbeddedRun, seconds: float) -> None:
        del run  # the "done" event that follows names the run and carries the seconds
        self.last_run_seconds = seconds


def _run_group(
    job: _Job, group: Sequence[tuple[int, EmbeddedRun]], total: int, events: Any
) -> None:
    """In a worker: the runs of one kind, in plan order, after that kind's warm-up."""
    registry = importlib.import_module(job.registry_module)
    loop = importlib.import_module(job.loop_module)
    forward = _Forward(events)
    warm_up = WarmUp(job.repo, registry, loop)
    grid = _Grid(job.settings, job.repo, registry, loop, warm_up, forward, job.show_evals)
    for index, run in group:
        forward.last_run_seconds = math.nan
        status = grid.run_cell(
            f"[{index}/{total}] {run.describe()}", run, False, job.resume, forward
        )
        events.put(("done", index, status, forward.last_run_seconds))


def _start_worker(jax_cache_dir: Path | None) -> None:
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # the parent's setting, lost by spawn
    if jax_cache_dir is not None:
        use_jax_compilation_cache(jax_cache_dir)


def run_in_workers(
    job: _Job,
    runs: Sequence[EmbeddedRun],
    workers: int,
    clock: SuiteClock,
    out: Emit,
    jax_cache_dir: Path | None,
) -> list[str]:
    """Trains the unfinished runs in ``workers`` processes; the statuses in plan order.

    A task is every unfinished run of one kind (submission x framework x workload),
    so each kind is warmed up once, in the process that runs it. Tasks start
    longest first (by the workload's time budget x runs), so that no long task is
    left to run alone at the end. Workers report through a queue; this process prints their lines,
    keeps the clock and prints the time left after every run.
    """
    root = job.settings.root
    statuses = ["skipped"] * len(runs)
    groups: dict[RunKind, list[tuple[int, EmbeddedRun]]] = {}
    for index, run in enumerate(runs, start=1):
        if job.resume and is_finished(run.trial_dir(root)):
            out(f"[{index}/{len(runs)}] {run.describe()}: finished earlier, skipping")
        else:
            groups.setdefault(run.kind, []).append((index, run))
    ordered = sorted(groups, key=lambda kind: -clock.budgets.get(kind[2], 1.0) * len(groups[kind]))
    remaining = {index: run for group in groups.values() for index, run in group}
    started_kinds: set[RunKind] = set()  # warmed up: a run of theirs is done
    context = multiprocessing.get_context("spawn")
    with (
        context.Manager() as manager,
        concurrent.futures.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=context,
            initializer=_start_worker,
            initargs=(jax_cache_dir,),
        ) as pool,
    ):
        events = manager.Queue()
        futures = {
            pool.submit(_run_group, job, groups[kind], len(runs), events): kind for kind in ordered
        }
        while remaining:
            try:
                event = events.get(timeout=1.0)
            except queue.Empty:
                _fail_crashed_groups(futures, groups, remaining, statuses, out)
                continue
            if event[0] == "line":
                out(event[1])
            elif event[0] == "warm_up":
                clock.record_warm_up(event[1])
            elif event[0] == "done":
                _, index, status, seconds = event
                run = remaining.pop(index)
                statuses[index - 1] = status
                started_kinds.add(run.kind)
                if status == "finished":
                    clock.record_run(run, seconds)
                left = clock.seconds_left(list(remaining.values()), started_kinds, root, job.resume)
                out(f"    {clock.status(left)}")
    return statuses


def _fail_crashed_groups(
    futures: Mapping[concurrent.futures.Future[None], RunKind],
    groups: Mapping[RunKind, Sequence[tuple[int, EmbeddedRun]]],
    remaining: dict[int, EmbeddedRun],
    statuses: list[str],
    out: Emit,
) -> None:
    """A worker that died (not a run that failed: those are caught) fails its group's rest."""
    for future, kind in futures.items():
        if future.done() and future.exception() is not None:
            for index, run in groups[kind]:
                if remaining.pop(index, None) is not None:
                    statuses[index - 1] = "failed"
                    out(
                        f"[{index}/{len(statuses)}] {run.describe()}: FAILED: worker "
                        f"{type(future.exception()).__name__}: {future.exception()}"
                    )


@dataclasses.dataclass
class SuiteClock:
    """Elapsed time and the time left, from the seconds of the runs finished so far.

    A pending run is estimated at the mean of the finished runs of its kind and
    averaging mode (TWA's fits cost more than LAWA's sums), else of its kind, else
    from every finished run scaled by the workloads' time budgets (``budgets``:
    ``max_allowed_runtime_sec`` per workload, which sizes a workload's cost as
    AlgoPerf does); a kind not warmed up yet adds the mean warm-up. With several
    workers the total is shared among them.
    """

    workers: int = 1
    budgets: Mapping[str, float] = dataclasses.field(default_factory=dict)
    started: float = dataclasses.field(default_factory=time.monotonic)
    runs: dict[tuple[RunKind, str], list[float]] = dataclasses.field(default_factory=dict)
    warm_ups: list[float] = dataclasses.field(default_factory=list)
    cpu_started: float = dataclasses.field(default_factory=lambda: _cpu_seconds())

    def record_run(self, run: EmbeddedRun, seconds: float) -> None:
        self.runs.setdefault((run.kind, run.averaging), []).append(seconds)

    def record_warm_up(self, seconds: float) -> None:
        self.warm_ups.append(seconds)

    def estimate(self, run: EmbeddedRun) -> float:
        same_mode = self.runs.get((run.kind, run.averaging))
        if same_mode:
            return statistics.fmean(same_mode)
        same_kind = [s for (kind, _), spent in self.runs.items() if kind == run.kind for s in spent]
        if same_kind:
            return statistics.fmean(same_kind)
        per_budget = [
            seconds / self.budgets.get(kind[2], 1.0)
            for (kind, _), spent in self.runs.items()
            for seconds in spent
        ]
        if not per_budget:
            return 0.0
        return statistics.fmean(per_budget) * self.budgets.get(run.workload, 1.0)

    def seconds_left(
        self, remaining: Sequence[EmbeddedRun], warmed: set[RunKind], root: Path, resume: bool
    ) -> float | None:
        """None until a run has finished (nothing to estimate from)."""
        if not self.runs:
            return None
        to_run = [r for r in remaining if not (resume and is_finished(r.trial_dir(root)))]
        unwarmed = {r.kind for r in to_run} - warmed
        warm_up = statistics.fmean(self.warm_ups) if self.warm_ups else 0.0
        total = sum(self.estimate(r) for r in to_run) + warm_up * len(unwarmed)
        return total / self.workers

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def status(self, seconds_left: float | None) -> str:
        left = "unknown" if seconds_left is None else f"about {format_duration(seconds_left)}"
        return f"elapsed {format_duration(self.elapsed())}, left {left}"

    def summary(self) -> str:
        run_seconds = sum(s for values in self.runs.values() for s in values)
        count = sum(len(values) for values in self.runs.values())
        return (
            f"\n{count} run(s) in {format_duration(run_seconds)} plus "
            f"{len(self.warm_ups)} warm-up(s) in {format_duration(sum(self.warm_ups))}; "
            f"elapsed {format_duration(self.elapsed())} "
            f"(CPU {format_duration(_cpu_seconds() - self.cpu_started)})"
        )


def _budgets(registry: Any, workloads: Sequence[str]) -> dict[str, float]:
    """Each workload's time budget, the suite's measure of how long its runs take."""
    return {
        name: float(registry.make_workload(name, "pytorch").max_allowed_runtime_sec)
        for name in workloads
    }


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished worker processes."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def planned_trials(runs: Sequence[EmbeddedRun], root: Path, out: Emit) -> list[TrialResult]:
    """The results of the planned runs that left readable measurements (nothing else).

    A run that crashed before recording its target cannot be read; it is left out
    of the report with a note (the table counts it as unfinished, a miss).
    """
    trials = []
    for run in runs:
        path = run.trial_dir(root)
        if (path / EVAL_CSV).is_file():
            location = TrialLocation(
                run.label, run.study, run.workload, run.framework, run.trial, path
            )
            try:
                trials.append(load_trial(location))
            except ResultsFormatError as exc:
                out(f"left out of the report: {exc}")
    return trials


def seed_outcome(run: EmbeddedRun, root: Path) -> SeedOutcome:
    """A planned run as the table scores it: only a finished run can hit."""
    path = run.trial_dir(root)
    if not (path / EVAL_CSV).is_file():
        return SeedOutcome(run.seed, "not run")
    marker = read_marker(path)
    if marker is None:
        return SeedOutcome(run.seed, "unfinished")
    seconds = float(marker.get("wall_seconds", math.nan))
    trial = load_trial(
        TrialLocation(run.label, run.study, run.workload, run.framework, run.trial, path)
    )
    if trial.hit and trial.steps_to_target is not None:
        return SeedOutcome(run.seed, "hit", trial.steps_to_target, seconds)
    return SeedOutcome(run.seed, "miss", seconds=seconds)


def seed_runs(runs: Sequence[EmbeddedRun], root: Path) -> list[SeedRun]:
    return [
        SeedRun(
            run.workload,
            submission_label(run.submission),
            run.framework,
            run.averaging,
            seed_outcome(run, root),
        )
        for run in runs
    ]


def table_layout(settings: EmbeddedSettings, workloads: Sequence[str]) -> TableLayout:
    return TableLayout(
        workloads=tuple(workloads),
        optimizers=tuple(dict.fromkeys(submission_label(s) for s in settings.submissions)),
        frameworks=settings.frameworks,
        modes=settings.averaging,
        seeds=settings.seeds,
        only_on={mode: "pytorch" for mode in TORCH_ONLY_MODES},
    )


def _write_report(
    trials: Sequence[TrialResult],
    runs: Sequence[EmbeddedRun],
    settings: EmbeddedSettings,
    out: Emit,
) -> ReportFiles:
    baseline = next((r.label for r in runs if r.averaging == "none"), None)
    files = build_report(
        trials,
        settings.root / "report",
        title=f"Embedded suite: {settings.experiment_name}",
        baseline=baseline,
        # The demo compares averaging within each framework, as its table does.
        pool_frameworks=False,
    )
    out(f"report: {files.markdown}")
    return files
