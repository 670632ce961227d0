r"""Calibrates the embedded workloads' targets and step hints the AlgoPerf way.

For each workload: NadamW, the first point of ``--search_space`` with no
averaging, trains ``step_hint`` steps on every seed of ``--seeds`` (PyTorch,
through ``polyak.workloads.loop.run_training``, never stopping at a target).
Each seed's best validation and test metric within ``step_hint`` is kept;
the targets are their medians. The target must then be hit late: the median
seed reaches it within [75%, 100%] of step_hint and no seed by 50%
(``polyak.workloads.calibration.summarize_seeds``).

Step hints are tried in the order given by ``--step_hints`` (the first is the
workload's own) until one passes; every attempt is recorded, and the first
passing one (else the last tried) is chosen. Averaging is never run here, so
nothing is tuned towards an averaging result. Then the JAX twin trains the
chosen step_hint on ``--jax_check_seeds`` and its steps to the (PyTorch)
target are recorded beside it.

The record goes to ``src/polyak/workloads/calibration/<workload>.json``:
seeds, per-seed bests and steps, medians, targets, the step_hint, the date,
library versions and the data fingerprint. The workloads read their targets
and step hint from there.

Examples:

  python scripts/calibrate_workloads.py --workloads=digits,diabetes
  python scripts/calibrate_workloads.py --workloads=textlm --seeds=0,1,2,3,4 \
      --step_hints=textlm:800,600
"""

from __future__ import annotations

import collections
import datetime
import importlib.metadata
import importlib.util
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from absl import app, flags, logging

from polyak.files import atomic_write_json
from polyak.workloads import calibration
from polyak.workloads.loop import LoopConfig, run_training
from polyak.workloads.registry import EMBEDDED_WORKLOADS, make_workload

REPO_ROOT = Path(__file__).resolve().parent.parent

flags.DEFINE_list("workloads", list(EMBEDDED_WORKLOADS), "Embedded workloads to calibrate.")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds (at least 5).")
flags.DEFINE_list(
    "step_hints",
    [],
    "Step-hint candidates per workload, tried in order, e.g. digits:1000:700,diabetes:600:300. "
    "A workload not named keeps only its recorded step_hint.",
)
flags.DEFINE_list("jax_check_seeds", ["0"], "Seeds the JAX twin is checked on (may be empty).")
flags.DEFINE_string(
    "search_space", "tuning_search_spaces/nadamw.json", "NadamW search space; point 0 is used."
)
flags.DEFINE_string(
    "output_dir",
    str(REPO_ROOT / "src" / "polyak" / "workloads" / "calibration"),
    "Where <workload>.json is written.",
)
FLAGS = flags.FLAGS

_SUBMISSIONS = {
    "pytorch": REPO_ROOT / "submissions" / "nadamw" / "pytorch" / "submission.py",
    "jax": REPO_ROOT / "submissions" / "nadamw" / "jax" / "submission.py",
}
_VERSIONED = ("numpy", "scikit-learn", "torch", "jax", "jaxlib", "flax", "optax")
_UNBOUNDED_RUNTIME_SEC = 1e9


def _load_submission(framework: str) -> ModuleType:
    path = _SUBMISSIONS[framework]
    module_spec = importlib.util.spec_from_file_location(f"calibration_nadamw_{framework}", path)
    if module_spec is None or module_spec.loader is None:
        raise FileNotFoundError(f"cannot import the NadamW submission at {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


class _WithWorkloadBatchSize:
    """The submission, with the batch size the workload recommends (its calibration batch)."""

    def __init__(self, submission: ModuleType, batch_size: int) -> None:
        self._submission = submission
        self._batch_size = batch_size

    def get_batch_size(self, workload_name: str) -> int:
        del workload_name
        return self._batch_size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._submission, name)


def _first_point(path: str) -> dict[str, Any]:
    space_path = Path(path) if Path(path).is_absolute() else REPO_ROOT / path
    points = json.loads(space_path.read_text(encoding="utf-8"))
    if not isinstance(points, list) or not points:
        raise ValueError(f"{space_path} must hold a non-empty JSON list of points")
    return {**points[0], "averaging": "none"}


def _step_hint_candidates(entries: list[str]) -> dict[str, list[int]]:
    candidates: dict[str, list[int]] = {}
    for entry in entries:
        name, *hints = entry.split(":")
        if name not in EMBEDDED_WORKLOADS or not hints:
            raise ValueError(
                f"--step_hints entry {entry!r}; expected <workload>:<int>[:<int>...] with a "
                f"workload among {', '.join(EMBEDDED_WORKLOADS)}"
            )
        candidates[name] = [int(h) for h in hints]
    return candidates


def _recorded_step_hint(name: str) -> int:
    try:
        return calibration.load_calibration(name).step_hint
    except calibration.CalibrationError as exc:
        raise app.UsageError(f"{exc}; give its step-hint candidates with --step_hints") from exc


def _calibration_workload(name: str, framework: str, step_hint: int) -> Any:
    workload = make_workload(name, framework)
    # Shadow the calibrated class values: the record may not exist yet, and the
    # runs must neither stop at nor be judged by an old target.
    workload._step_hint = step_hint
    workload._validation_target = float("nan")
    workload._test_target = float("nan")
    # A corpus that varies by installation (textlm) is calibrated as it is here.
    workload._verify_corpus = False
    return workload


def _run_seed(
    name: str, framework: str, step_hint: int, seed: int, hyperparameters: Any
) -> tuple[calibration.SeedCurve, dict[str, Any]]:
    workload = _calibration_workload(name, framework, step_hint)
    submission = _WithWorkloadBatchSize(
        _load_submission(framework), workload.recommended_batch_size
    )
    started = time.perf_counter()
    result = run_training(
        workload,
        submission,
        hyperparameters,
        framework=framework,
        config=LoopConfig(
            max_steps=step_hint,
            rng_seed=seed,
            stop_at_target=False,
            checkpoint=False,
            max_runtime_sec=_UNBOUNDED_RUNTIME_SEC,
        ),
    )
    metric = workload.target_metric_name
    curve = calibration.SeedCurve(
        seed=seed,
        steps=tuple(e.global_step for e in result.evals),
        validation=tuple(float(e.metrics[f"validation/{metric}"]) for e in result.evals),
        test=tuple(float(e.metrics[f"test/{metric}"]) for e in result.evals),
    )
    timing = {
        "seed": seed,
        "wall_sec": round(time.perf_counter() - started, 2),
        "submission_sec": round(result.total_submission_time, 2),
        "total_steps": result.total_steps,
    }
    return curve, timing


def _versions() -> dict[str, Any]:
    versions: dict[str, Any] = {"python": platform.python_version()}
    for package in _VERSIONED:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    versions["polyak_commit"] = _git("rev-parse", "HEAD")
    # Uncommitted changes to the code mean the commit alone does not reproduce the record.
    changes = _git(
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        "src",
        "submissions",
        ":(exclude)src/polyak/workloads/calibration/*.json",  # the records being written
    )
    versions["polyak_uncommitted_changes"] = None if changes is None else bool(changes)
    return versions


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _jax_check(
    name: str, chosen: dict[str, Any], seeds: list[int], hyperparameters: Any
) -> list[dict[str, Any]]:
    checks = []
    for seed in seeds:
        curve, timing = _run_seed(name, "jax", chosen["step_hint"], seed, hyperparameters)
        best, best_step = calibration.best_within(
            curve.steps, curve.validation, chosen["step_hint"], chosen["direction"]
        )
        reached = calibration.first_step_reaching(
            curve.steps, curve.validation, chosen["validation_target"], chosen["direction"]
        )
        checks.append(
            {
                **timing,
                "best_validation": best,
                "best_validation_step": best_step,
                "steps_to_validation_target": reached,
            }
        )
        print(f"  jax seed {seed}: best {best:.5f} at {best_step}, target reached at {reached}")
    return checks


def calibrate(
    name: str, step_hints: list[int], seeds: list[int], hyperparameters: Any
) -> dict[str, Any]:
    """Runs the PyTorch calibration of one workload and returns its record."""
    probe = _calibration_workload(name, "pytorch", step_hints[0])
    attempts = []
    timings = {}
    for step_hint in step_hints:
        curves = []
        timings[str(step_hint)] = []
        for seed in seeds:
            curve, timing = _run_seed(name, "pytorch", step_hint, seed, hyperparameters)
            curves.append(curve)
            timings[str(step_hint)].append(timing)
            print(f"  {name} step_hint {step_hint} seed {seed}: {timing['wall_sec']} s")
        summary = calibration.summarize_seeds(curves, step_hint, probe.target_direction)
        summary["curves"] = [
            {"seed": c.seed, "steps": c.steps, "validation": c.validation, "test": c.test}
            for c in curves
        ]
        attempts.append(summary)
        print(
            f"{name} step_hint {step_hint}: validation target "
            f"{summary['validation_target']:.6g}, median steps to target "
            f"{summary['median_steps_to_validation_target']} "
            f"({summary['median_fraction_of_step_hint']:.0%}), earliest "
            f"{summary['earliest_steps_to_validation_target']} "
            f"({summary['seeds_reaching_by_half']} seeds by half), passes={summary['passes']}"
        )
        if summary["passes"]:
            break
    chosen = next((a for a in attempts if a["passes"]), attempts[-1])
    return {
        "schema_version": calibration.SCHEMA_VERSION,
        "workload": name,
        "target_metric": probe.target_metric_name,
        "procedure": (
            "NadamW, first point of the search space, no averaging, PyTorch, "
            "LoopConfig(max_steps=step_hint, stop_at_target=False); target = median over "
            "seeds of the best metric at an eval step <= step_hint; a seed reaches the "
            "target at its first eval at least as good as it; passes when the median seed "
            f"reaches it in [{calibration.LATE_FRACTION}, 1] x step_hint and fewer than half "
            f"of the seeds by {calibration.EARLY_FRACTION} x step_hint"
        ),
        "framework": "pytorch",
        "search_space": FLAGS.search_space,
        "hyperparameters": dict(hyperparameters._asdict()),
        "batch_size": probe.recommended_batch_size,
        "eval_period_steps": probe.eval_period_steps,
        "seeds": seeds,
        "step_hint_candidates": step_hints,
        "chosen": {k: v for k, v in chosen.items() if k != "curves"},
        "attempts": attempts,
        "timings": timings,
        "jax_check": None,
        "dataset": probe.dataset_fingerprint.as_dict(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "machine": platform.platform(),
    }


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # the submissions log every step
    seeds = [int(s) for s in FLAGS.seeds]
    if len(seeds) < calibration.MIN_SEEDS:
        raise app.UsageError(f"--seeds has {len(seeds)}; at least {calibration.MIN_SEEDS}")
    jax_seeds = [int(s) for s in FLAGS.jax_check_seeds]
    candidates = _step_hint_candidates(FLAGS.step_hints)
    point = _first_point(FLAGS.search_space)
    hyperparameters = collections.namedtuple("Hyperparameters", list(point))(**point)
    for name in FLAGS.workloads:
        if name not in EMBEDDED_WORKLOADS:
            raise app.UsageError(f"unknown workload {name!r}; choices: {EMBEDDED_WORKLOADS}")
        step_hints = candidates.get(name) or [_recorded_step_hint(name)]
        print(f"calibrating {name}: step_hints {step_hints}, seeds {seeds}", flush=True)
        record = calibrate(name, step_hints, seeds, hyperparameters)
        path = Path(FLAGS.output_dir) / f"{name}.json"
        atomic_write_json(path, record)
        print(f"wrote {path}", flush=True)
        if jax_seeds:
            record["jax_check"] = _jax_check(name, record["chosen"], jax_seeds, hyperparameters)
            atomic_write_json(path, record)
            print(f"added the JAX check to {path}", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
