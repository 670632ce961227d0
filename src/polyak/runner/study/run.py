"""Running the study: each planned run is one cell of the embedded suite, trained to the end."""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from polyak.runner.commands import find_repo_root
from polyak.runner.completion import is_finished
from polyak.runner.embedded import (
    EmbeddedSettings,
    Emit,
    RunKind,
    WarmUp,
    report_failure,
    run_one,
)
from polyak.runner.study.analysis import StudyAnalysis, analyze_study
from polyak.runner.study.page import write_results
from polyak.runner.study.plan import STRETCHED, StudyRun, StudySettings, plan_study
from polyak.runner.study.prose import duration_text
from polyak.runner.study.records import append_session, end_session, start_session, write_timing
from polyak.workloads import loop as local_loop
from polyak.workloads import registry as embedded_registry


def stretch_step_hint(workload: Any, factor: int) -> Any:
    """The same workload object, now reporting ``factor`` times its ``step_hint``."""
    base = type(workload)
    hint = int(workload.step_hint) * factor
    stretched = type(
        f"{base.__name__}StepHintTimes{factor}",
        (base,),
        {"step_hint": property(lambda self: hint), "__module__": base.__module__},
    )
    workload.__class__ = stretched
    return workload


class _StretchedRegistry:
    """The embedded registry, with the step_hint stretched for emulated constant-LR runs."""

    def __init__(self, registry: Any, stretch: int) -> None:
        self._registry = registry
        self._stretch = stretch

    def make_workload(self, name: str, framework: str) -> Any:
        return stretch_step_hint(self._registry.make_workload(name, framework), self._stretch)


@dataclasses.dataclass(frozen=True)
class StudyOutcome:
    runs: tuple[StudyRun, ...]
    statuses: tuple[str, ...]
    analysis: StudyAnalysis | None
    markdown: Path | None
    files: tuple[Path, ...]


def run_study(
    settings: StudySettings,
    *,
    repo_root: str | Path | None = None,
    output_dir: str | Path | None = None,
    command: str | None = None,
    run: bool = True,
    out: Emit = print,
    verbose: bool = False,
    registry: Any = embedded_registry,
    loop: Any = local_loop,
) -> StudyOutcome:
    """Runs what is not finished yet (with progress), then writes the results page.

    ``output_dir`` receives ``results.md`` and ``results/`` (nothing is written when it
    is None); ``run=False`` only rebuilds the page from the runs already on disk.
    """
    repo = find_repo_root(repo_root)
    runs = plan_study(settings, repo, registry)
    root = settings.root
    statuses: list[str] = []
    if run:
        session = start_session(command)
        started = time.monotonic()
        try:
            statuses = _Execution(settings, repo, registry, loop, out, verbose).run_all(runs)
            session["interrupted"] = False
        finally:
            append_session(root, end_session(session, statuses, time.monotonic() - started))
    analysis = analyze_study(settings, runs, root)
    markdown, files = None, []
    if output_dir is not None:
        markdown, files = write_results(
            analysis, Path(output_dir), command=command, rebuilt_only=not run
        )
        out(f"results: {markdown}")
    return StudyOutcome(tuple(runs), tuple(statuses), analysis, markdown, tuple(files))


class _Execution:
    """Trains the unfinished runs in plan order, printing progress and time left."""

    def __init__(
        self,
        settings: StudySettings,
        repo: Path,
        registry: Any,
        loop: Any,
        out: Emit,
        verbose: bool,
    ) -> None:
        self.settings = settings
        self.repo = repo
        self.registry = registry
        self.loop = loop
        self.out = out
        self.verbose = verbose
        self.warm_up = WarmUp(repo, registry, loop)
        self.spent: dict[RunKind, list[float]] = {}  # seconds per run, by kind of run

    def run_all(self, runs: Sequence[StudyRun]) -> list[str]:
        root = self.settings.root
        pending = [r for r in runs if not is_finished(r.trial_dir(root))]
        self.out(
            f"averaging study: {len(runs)} run(s) into {root}; {len(runs) - len(pending)} "
            f"finished earlier, {len(pending)} to run"
        )
        started_all = time.monotonic()
        statuses: list[str] = []
        processed = 0
        for index, study_run in enumerate(runs, start=1):
            prefix = f"[{index}/{len(runs)}] {study_run.describe()}"
            if is_finished(study_run.trial_dir(root)):
                statuses.append("skipped")
                if self.verbose:
                    self.out(f"{prefix}: finished earlier, skipping")
                continue
            processed += 1
            seconds = self._run(prefix, study_run)
            statuses.append("failed" if seconds is None else "finished")
            if seconds is not None:
                left = _remaining_seconds(pending[processed:], self.spent)
                self.out(
                    f"{prefix}: done in {seconds:.1f}s ({processed}/{len(pending)}, elapsed "
                    f"{duration_text(time.monotonic() - started_all)}, about "
                    f"{duration_text(left)} left)"
                )
        return statuses

    def _run(self, prefix: str, study_run: StudyRun) -> float | None:
        """Trains one run; its seconds without the warm-up, or None when it failed."""
        started = time.monotonic()
        try:
            started += self.warm_up.before(study_run)  # one-off, not a run's cost
            run_started = time.monotonic()
            run_one(
                study_run,
                self.settings.root,
                self.repo,
                self._registry_for(study_run),
                self.loop,
                self._limits(study_run),
                self.out if self.verbose else (lambda line: None),
            )
            write_timing(
                study_run.trial_dir(self.settings.root),
                time.monotonic() - run_started,
                study_run.name,
            )
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            report_failure(prefix, exc, self.out)
            return None
        self.spent.setdefault(study_run.kind, []).append(time.monotonic() - started)
        return self.spent[study_run.kind][-1]

    def _registry_for(self, study_run: StudyRun) -> Any:
        if study_run.constant_lr_method == STRETCHED:
            return _StretchedRegistry(self.registry, self.settings.constant_lr_stretch)
        return self.registry

    def _limits(self, study_run: StudyRun) -> EmbeddedSettings:
        """Whole runs to the real step_hint (not the stretched one), never stopping early."""
        step_hint = int(self.registry.make_workload(study_run.workload, "pytorch").step_hint)
        return EmbeddedSettings(
            max_global_steps=self.settings.max_global_steps or step_hint,
            eval_every_steps=self.settings.eval_every_steps,
            stop_at_target=False,
        )


def _remaining_seconds(
    remaining: Sequence[StudyRun], spent: Mapping[RunKind, Sequence[float]]
) -> float:
    """Runs still to go, each at the mean time of finished runs of its kind (else of all)."""
    every = [seconds for values in spent.values() for seconds in values]
    overall = sum(every) / len(every) if every else 0.0
    total = 0.0
    for run in remaining:
        values = spent.get(run.kind)
        total += sum(values) / len(values) if values else overall
    return total


def remove_study(settings: StudySettings) -> None:
    """``--overwrite``: deletes the study's experiment folder (all its runs)."""
    if settings.root.is_dir():
        shutil.rmtree(settings.root)
