"""Running the AlgoPerf suite: study after study, one workload after another.

Studies x workloads in AlgoPerf's order (all workloads of study 0, then study 1,
...), each study with its own seed per workload (:func:`commands.study_seed` of the
experiment's seed, which is ``--rng_seed`` or drawn once and recorded in
``<experiment>/polyak_experiment.json``). For every (study, workload) the launcher

1. checks every trial already on disk against what this run would run (submission,
   search space, hyperparameter point, step limit, seed): a difference stops the run
   before anything starts, naming it, unless the user asks to start over
   (``overwrite``), which reruns those workloads from scratch;
2. skips it when all its trials are finished with the same identity;
3. otherwise builds the plan: ``--resume_last_run`` when its output folder exists
   (with ``--hparam_start_index`` past the finished trials), ``--overwrite`` when it
   does not (or when the user asks for a fresh start);
4. runs it from the repository root with stdin closed (AlgoPerf's keyboard prompt
   can never hang a run), streaming the output to
   ``<experiment>/logs/study_<k>_<workload>_<framework>.log`` and printing a progress
   line per eval (elapsed time, fraction of the step and time budgets, ETA);
5. marks the trials the process completed (with their identity), reports a crash
   with the end of the log, and goes on with the next workload.

Before any GPU time is spent it checks that algoperf is installed (printing the
install command when not), that the submission exists, that the search space is
valid and agrees with ``--averaging``, that the experiment folder can be a folder
and that the data folders are there.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from polyak.files import atomic_write_json
from polyak.runner.commands import (
    DEFAULT_NUM_STUDIES,
    DEFAULT_NUM_TRIALS,
    SEED_RANGE,
    LaunchPlan,
    RunSettings,
    build_plan,
    dataset_dir,
    experiment_root,
    finalize_settings,
    find_repo_root,
    resolve_search_space,
    resolve_submission,
    study_seed,
    workload_output_dir,
)
from polyak.runner.completion import (
    identity_differences,
    is_finished,
    reconcile_after_exit,
    trial_dir,
    trial_identity,
)
from polyak.runner.errors import (
    AlgoPerfMissingError,
    DataDirError,
    LaunchConfigError,
    RunnerError,
)
from polyak.runner.progress import ProgressTracker
from polyak.runner.search_space import SearchSpace
from polyak.runner.workload_table import (
    WorkloadInfo,
    get_workload,
    select_benchmark_workloads,
)

Emit = Callable[[str], None]
ProcessRunner = Callable[[LaunchPlan, Emit], int]
TAIL_LINES = 20


EXPERIMENT_RECORD = "polyak_experiment.json"


@dataclasses.dataclass(frozen=True)
class WorkloadOutcome:
    workload: str
    framework: str
    status: str  # "finished" | "failed" | "skipped" | "planned"
    exit_code: int | None
    log_path: Path | None
    detail: str = ""
    seconds: float = 0.0
    trials_marked: tuple[int, ...] = ()
    study: int = 0


def check_algoperf_installed() -> None:
    """Raises :class:`AlgoPerfMissingError` (with the install command) when absent."""
    for module in ("algoperf", "submission_runner"):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise AlgoPerfMissingError(f"module {module!r} not found")


def check_folder_path(flag: str, given: str) -> None:
    """Refuses a folder flag that is, or lies under, an existing file."""
    path = Path(given)
    for candidate in (path, *path.parents):
        if candidate.exists() and not candidate.is_dir():
            where = "is a file" if candidate == path else f"lies under the file {candidate}"
            raise LaunchConfigError(f"--{flag}={given!r} {where}; expected a folder")


def check_data_dirs(workloads: Sequence[str], settings: RunSettings) -> list[str]:
    """Problems with the data folders, one line each (empty when all are there)."""
    root = Path(settings.data_dir)
    if root.exists() and not root.is_dir():
        return [f"data directory {root} is a file, not a folder"]
    if not root.is_dir():
        return [f"data directory {root} does not exist"]
    problems = []
    for workload in workloads:
        folder = Path(dataset_dir(workload, settings.framework, settings.data_dir))
        if not folder.is_dir():
            problems.append(
                f"{workload}: {folder} does not exist (AlgoPerf's layout: "
                "<data_dir>/<dataset>, imagenet as <data_dir>/imagenet/<framework>; "
                "see AlgoPerf's datasets/README.md)"
            )
    return problems


def subprocess_runner(plan: LaunchPlan, on_line: Emit) -> int:
    """Runs the plan, feeding every output line to ``on_line``; returns the exit status."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        list(plan.argv),
        cwd=plan.cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env=env,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            on_line(line.rstrip("\n"))
        return process.wait()
    except BaseException:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        raise


def _tail(path: Path, count: int = TAIL_LINES) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()[-count:]
    except FileNotFoundError:
        return []


def _check_executable(settings: RunSettings) -> None:
    needed = {"docker": "docker", "torchrun": "torchrun"}.get(settings.launcher)
    if needed and shutil.which(needed) is None:
        raise LaunchConfigError(f"--launcher={settings.launcher}: {needed!r} is not on PATH")


def experiment_seed(settings: RunSettings, *, record: bool) -> int:
    """--rng_seed, else the seed recorded for this experiment, else a new one (recorded
    when ``record``), so a resumed experiment reruns each study with the same seed."""
    path = experiment_root(settings) / EXPERIMENT_RECORD
    recorded = None
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("rng_seed")
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, AttributeError):
        recorded = None
    if settings.rng_seed is not None:
        seed = settings.rng_seed
    elif isinstance(recorded, int):
        seed = recorded
    else:
        seed = secrets.randbelow(SEED_RANGE) + 1
    if record and recorded != seed:
        atomic_write_json(path, {"rng_seed": seed})
    return seed


def _expected_identities(
    settings: RunSettings,
    space: SearchSpace | None,
    space_path: Path | None,
    submission_path: str,
    num_trials: int,
    seed: int,
) -> dict[int, dict]:
    points = space.points if space is not None and space.kind == "points" else ()
    return {
        k: trial_identity(
            submission=submission_path,
            tuning_ruleset=settings.tuning_ruleset,
            search_space=space_path,
            hyperparameters=dict(points[k - 1]) if k <= len(points) else None,
            max_global_steps=settings.max_global_steps,
            rng_seed=seed,
        )
        for k in range(1, num_trials + 1)
    }


@dataclasses.dataclass(frozen=True)
class _Slot:
    """One (study, workload): its seed, expected identities and what is on disk."""

    study: int
    workload: str
    seed: int
    identities: dict[int, dict]
    first_open: int | None  # None: every trial finished with the same identity
    differences: tuple[str, ...]


def _inspect(
    settings: RunSettings, study: int, workload: str, seed: int, identities: dict[int, dict]
) -> _Slot:
    folder = workload_output_dir(settings, workload, study)
    differences: list[str] = []
    first_open = None
    for k, identity in identities.items():
        path = trial_dir(folder, k)
        for difference in identity_differences(path, identity):
            differences.append(f"{path}: {difference}")
        if first_open is None and not is_finished(path):
            first_open = k
    return _Slot(study, workload, seed, identities, first_open, tuple(differences))


def run_algoperf_suite(
    workloads: str | Sequence[str],
    settings: RunSettings,
    *,
    repo_root: str | Path | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    out: Emit = print,
    runner: ProcessRunner | None = None,
) -> list[WorkloadOutcome]:
    """Runs (or, with ``dry_run``, prints) the selected studies x workloads in order."""
    names = select_benchmark_workloads(workloads)
    check_folder_path("experiment_dir", os.path.expanduser(settings.experiment_dir))
    root = find_repo_root(repo_root)
    submission_path = resolve_submission(settings.submission, settings.framework, root)
    settings = finalize_settings(settings.with_absolute_paths(), root)
    search_space_arg, space = resolve_search_space(settings, root)
    space_path = None if search_space_arg is None else (root / search_space_arg).resolve()
    num_trials = space.num_trials(settings.requested_trials) if space is not None else 1
    problems = check_data_dirs(names, settings)
    if dry_run:
        for problem in problems:
            out(f"warning: {problem}")
    else:
        if settings.launcher != "docker":
            check_algoperf_installed()
        _check_executable(settings)
        if problems:
            raise DataDirError("missing data:\n  " + "\n  ".join(problems))
    seed = experiment_seed(settings, record=not dry_run)
    out(
        f"experiment {experiment_root(settings)}: {settings.num_studies} stud"
        f"{'y' if settings.num_studies == 1 else 'ies'} x {len(names)} workload(s) x "
        f"{num_trials} trial(s), search space {search_space_arg or '(self-tuning)'}, "
        f"seed {seed}"
    )
    required_trials = DEFAULT_NUM_TRIALS[settings.tuning_ruleset]
    if settings.num_studies < DEFAULT_NUM_STUDIES or num_trials < required_trials:
        out(
            f"warning: {settings.num_studies} stud{'y' if settings.num_studies == 1 else 'ies'} x "
            f"{num_trials} trial(s) per workload; the leaderboard scores {DEFAULT_NUM_STUDIES} "
            f"x {required_trials} ({settings.tuning_ruleset} tuning), so these results cannot "
            "give a leaderboard-grade score (the report will say so too)"
        )
    slots = [
        _inspect(
            settings,
            study,
            workload,
            study_seed(seed, study, workload),
            _expected_identities(
                settings,
                space,
                space_path,
                submission_path,
                num_trials,
                study_seed(seed, study, workload),
            ),
        )
        for study in range(settings.num_studies)
        for workload in names
    ]
    mismatched = [slot for slot in slots if slot.differences]
    if mismatched and not overwrite:
        lines = [d for slot in mismatched for d in slot.differences]
        trials = {line.split(": ", 1)[0] for line in lines}
        raise RunnerError(
            f"{len(trials)} trial(s) on disk were run differently from this run, so their "
            "results would be mislabelled:\n  "
            + "\n  ".join(lines[:10])
            + ("\n  ..." if len(lines) > 10 else "")
            + "\nPass --overwrite to rerun them from scratch (their old results are "
            "replaced), or choose another --experiment_name."
        )
    runner = runner or subprocess_runner

    outcomes = []
    for index, slot in enumerate(slots, start=1):
        workload = slot.workload
        info = get_workload(workload, settings.framework)
        workload_dir = workload_output_dir(settings, workload, slot.study)
        header = (
            f"[{index}/{len(slots)}] study {slot.study} {workload} ({settings.framework}, "
            f"seed {slot.seed})"
        )
        if overwrite:
            first, resume = 1, False
        elif slot.first_open is None:
            out(f"{header}: all {num_trials} trial(s) finished with these settings, skipping")
            outcomes.append(
                WorkloadOutcome(
                    workload,
                    settings.framework,
                    "skipped",
                    None,
                    None,
                    "finished",
                    study=slot.study,
                )
            )
            continue
        else:
            first, resume = slot.first_open, workload_dir.exists()
        plan = build_plan(
            workload,
            settings,
            root,
            resume=resume,
            first_trial=first,
            overwrite=overwrite,
            study=slot.study,
            rng_seed=slot.seed,
        )
        out(
            f"{header}: trial(s) {first}..{num_trials}, "
            f"{'resuming' if resume else 'fresh start'}, log {plan.log_path}"
        )
        out(f"  $ {plan.shell()}")
        if dry_run:
            outcomes.append(
                WorkloadOutcome(
                    workload,
                    settings.framework,
                    "planned",
                    None,
                    plan.log_path,
                    study=slot.study,
                )
            )
            continue
        outcomes.append(
            _run_plan(plan, info, runner, out, slot.identities, settings.max_global_steps)
        )
    _print_summary(outcomes, out)
    return outcomes


def _run_plan(
    plan: LaunchPlan,
    info: WorkloadInfo,
    runner: ProcessRunner,
    out: Emit,
    identities: dict[int, dict] | None = None,
    max_global_steps: int | None = None,
) -> WorkloadOutcome:
    plan.log_path.parent.mkdir(parents=True, exist_ok=True)
    label = f"study_{plan.study}/{plan.workload}_{plan.framework}"
    tracker = ProgressTracker(label, info, out, plan.num_trials, max_global_steps=max_global_steps)
    # The container runs submission_runner itself (startup.sh's way), so its log lines
    # are AlgoPerf's under every launcher.
    started = time.monotonic()
    with plan.log_path.open("a", encoding="utf-8") as log:
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        log.write(f"# {stamp} polyak runner: {plan.shell()}\n")
        log.flush()

        def on_line(line: str) -> None:
            log.write(line + "\n")
            log.flush()
            tracker.feed(line)

        try:
            exit_code = runner(plan, on_line)
            detail = ""
        except OSError as exc:  # e.g. the launcher executable vanished
            exit_code, detail = 127, f"could not start {plan.argv[0]!r}: {exc}"
            log.write(f"# {detail}\n")
    seconds = time.monotonic() - started
    marked = reconcile_after_exit(
        plan.workload_dir,
        range(plan.first_trial, plan.num_trials + 1),
        exit_code,
        plan.launcher,
        identities,
    )
    if exit_code == 0:
        out(f"  {label}: done in {seconds / 60:.1f} min; log {plan.log_path}")
        status = "finished"
    else:
        status = "failed"
        out(
            f"  {label}: FAILED with exit status {exit_code} after {seconds / 60:.1f} min. "
            f"{detail} Last lines of {plan.log_path}:"
        )
        for line in _tail(plan.log_path):
            out(f"    | {line}")
        out("  continuing with the next workload")
    return WorkloadOutcome(
        plan.workload,
        plan.framework,
        status,
        exit_code,
        plan.log_path,
        detail,
        seconds,
        tuple(marked),
        plan.study,
    )


def _print_summary(outcomes: Sequence[WorkloadOutcome], out: Emit) -> None:
    if not outcomes:
        return
    out("")
    out("summary:")
    for o in outcomes:
        code = "" if o.exit_code is None else f" (exit {o.exit_code})"
        out(f"  study_{o.study} {o.workload:<24} {o.framework:<8} {o.status}{code}")
