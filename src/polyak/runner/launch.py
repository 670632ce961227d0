"""Running the AlgoPerf suite: one workload after another, one log file each.

For every selected workload the launcher

1. skips it when all its trials are finished (see :mod:`polyak.runner.completion`);
2. otherwise builds the plan: ``--resume_last_run`` when its output folder exists
   (with ``--hparam_start_index`` past the finished trials), ``--overwrite`` when it
   does not (or when the user asks for a fresh start);
3. runs it from the repository root with stdin closed (AlgoPerf's keyboard prompt
   can never hang a run), streaming the output to
   ``<experiment_dir>/<experiment_name>/logs/<workload>_<framework>.log`` and
   printing a progress line per eval;
4. marks the trials the process completed, reports a crash with the end of the
   log, and goes on with the next workload.

Before any GPU time is spent it checks that algoperf is installed (printing the
install command when not), that the search space is valid, that the submission
exists and that the data folders are there.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from polyak.runner.commands import (
    LaunchPlan,
    RunSettings,
    build_plan,
    dataset_dir,
    find_repo_root,
    resolve_search_space,
    resolve_submission,
    workload_output_dir,
)
from polyak.runner.completion import first_unfinished, reconcile_after_exit
from polyak.runner.errors import AlgoPerfMissingError, DataDirError, LaunchConfigError
from polyak.runner.progress import ProgressTracker
from polyak.runner.workload_table import (
    ALGOPERF_WORKLOADS,
    WorkloadInfo,
    get_workload,
    select_workloads,
)

Emit = Callable[[str], None]
ProcessRunner = Callable[[LaunchPlan, Emit], int]
TAIL_LINES = 20


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


def check_algoperf_installed() -> None:
    """Raises :class:`AlgoPerfMissingError` (with the install command) when absent."""
    for module in ("algoperf", "submission_runner"):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise AlgoPerfMissingError(f"module {module!r} not found")


def check_data_dirs(workloads: Sequence[str], settings: RunSettings) -> list[str]:
    """Problems with the data folders, one line each (empty when all are there)."""
    root = Path(settings.data_dir)
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
    """Runs (or, with ``dry_run``, prints) the selected workloads one after another."""
    names = select_workloads(workloads, ALGOPERF_WORKLOADS)
    settings = settings.with_absolute_paths()
    root = find_repo_root(repo_root)
    resolve_submission(settings.submission, settings.framework, root)
    _, space = resolve_search_space(settings, root)
    num_trials = space.num_trials(settings.num_tuning_trials) if space is not None else 1
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
    runner = runner or subprocess_runner

    outcomes = []
    for index, workload in enumerate(names, start=1):
        info = get_workload(workload, settings.framework)
        workload_dir = workload_output_dir(settings, workload)
        header = f"[{index}/{len(names)}] {workload} ({settings.framework})"
        if overwrite:
            first, resume = 1, False
        else:
            first_open = first_unfinished(workload_dir, num_trials)
            if first_open is None:
                out(f"{header}: all {num_trials} trial(s) finished, skipping")
                outcomes.append(
                    WorkloadOutcome(workload, settings.framework, "skipped", None, None, "finished")
                )
                continue
            first, resume = first_open, workload_dir.exists()
        plan = build_plan(
            workload, settings, root, resume=resume, first_trial=first, overwrite=overwrite
        )
        out(
            f"{header}: trial(s) {first}..{num_trials}, "
            f"{'resuming' if resume else 'fresh start'}, log {plan.log_path}"
        )
        out(f"  $ {plan.shell()}")
        if dry_run:
            outcomes.append(
                WorkloadOutcome(workload, settings.framework, "planned", None, plan.log_path)
            )
            continue
        outcomes.append(_run_plan(plan, info, runner, out))
    _print_summary(outcomes, out)
    return outcomes


def _run_plan(
    plan: LaunchPlan, info: WorkloadInfo, runner: ProcessRunner, out: Emit
) -> WorkloadOutcome:
    plan.log_path.parent.mkdir(parents=True, exist_ok=True)
    label = f"{plan.workload}_{plan.framework}"
    tracker = ProgressTracker(label, info, out, plan.num_trials)
    echo_all = plan.launcher == "docker"  # the container prints our own progress lines
    started = time.monotonic()
    with plan.log_path.open("a", encoding="utf-8") as log:
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        log.write(f"# {stamp} polyak runner: {plan.shell()}\n")
        log.flush()

        def on_line(line: str) -> None:
            log.write(line + "\n")
            log.flush()
            if echo_all:
                out(line)
            else:
                tracker.feed(line)

        try:
            exit_code = runner(plan, on_line)
            detail = ""
        except OSError as exc:  # e.g. the launcher executable vanished
            exit_code, detail = 127, f"could not start {plan.argv[0]!r}: {exc}"
            log.write(f"# {detail}\n")
    seconds = time.monotonic() - started
    marked = reconcile_after_exit(
        plan.workload_dir, range(plan.first_trial, plan.num_trials + 1), exit_code, plan.launcher
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
    )


def _print_summary(outcomes: Sequence[WorkloadOutcome], out: Emit) -> None:
    if not outcomes:
        return
    out("")
    out("summary:")
    for o in outcomes:
        code = "" if o.exit_code is None else f" (exit {o.exit_code})"
        out(f"  {o.workload:<24} {o.framework:<8} {o.status}{code}")
