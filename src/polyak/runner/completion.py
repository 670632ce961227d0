"""What a finished trial is, and the marker file that records it.

A trial is *finished* when ``trial_<k>/polyak_trial_finished.json`` exists. The
runner writes that marker atomically, and only when it knows the trial's
training loop returned:

- the AlgoPerf process that ran the trial exited with status 0 (every trial
  directory it ran gets a marker), or
- AlgoPerf's own end-of-training row is in ``measurements.csv``: after its
  loop ends (target reached, budget spent or ``--max_global_steps`` hit),
  ``submission_runner`` appends one row holding only ``global_step``,
  ``score`` and ``preemption_count``. That rescues trials 1..k-1 when a later
  trial k crashes the process.
- for the embedded suite, ``run_training`` returned without raising.

Anything else (a crash, a kill, a preemption mid-trial) leaves no marker, so a
resumed run trains that trial again (AlgoPerf continues from its last
checkpoint under ``--resume_last_run``). A marker is never half-written: it is
written to a temporary file and renamed.

The marker also records what the trial ran: its *identity* (submission, ruleset,
search-space file and its hash, the hyperparameter point, step limit and seed).
A finished trial counts as done for a new run only when that identity equals the
new run's; :func:`identity_differences` says what differs, so a rerun with
another search space, step limit or seed is never answered with old results.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from polyak.files import atomic_write_json

MARKER_NAME = "polyak_trial_finished.json"
EVAL_CSV = "eval_measurements.csv"
MEASUREMENTS_CSV = "measurements.csv"


def trial_dir(workload_dir: Path, trial: int) -> Path:
    return Path(workload_dir) / f"trial_{trial}"


def read_marker(trial_path: Path) -> dict[str, Any] | None:
    """The marker's payload, or None when the trial is not finished (or the file is junk)."""
    marker = Path(trial_path) / MARKER_NAME
    try:
        payload = json.loads(marker.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def is_finished(trial_path: Path) -> bool:
    return read_marker(trial_path) is not None


def mark_finished(trial_path: Path, reason: str, **details: Any) -> None:
    payload = {
        "finished": True,
        "reason": reason,
        "marked_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **details,
    }
    atomic_write_json(Path(trial_path) / MARKER_NAME, payload)


def algoperf_training_ended(trial_path: Path) -> bool:
    """True when measurements.csv ends with AlgoPerf's end-of-training row."""
    path = Path(trial_path) / MEASUREMENTS_CSV
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (FileNotFoundError, NotADirectoryError, csv.Error, UnicodeDecodeError):
        return False
    if not rows:
        return False
    last = rows[-1]
    has_score = _is_number(last.get("score"))
    eval_fields = ("accumulated_submission_time", "total_duration", "accumulated_eval_time")
    return has_score and not any(_is_number(last.get(field)) for field in eval_fields)


def _is_number(text: str | None) -> bool:
    if text is None or text == "":
        return False
    try:
        return not math.isnan(float(text))
    except ValueError:
        return False


def finished_trials(workload_dir: Path, num_trials: int) -> list[int]:
    """The 1-based indices of finished trials among 1..num_trials."""
    return [k for k in range(1, num_trials + 1) if is_finished(trial_dir(workload_dir, k))]


def first_unfinished(workload_dir: Path, num_trials: int) -> int | None:
    """The first trial that still has to run, or None when all are finished."""
    for k in range(1, num_trials + 1):
        if not is_finished(trial_dir(workload_dir, k)):
            return k
    return None


def reconcile_after_exit(
    workload_dir: Path,
    trials: Iterable[int],
    exit_code: int,
    launcher: str,
    identities: dict[int, dict[str, Any]] | None = None,
) -> list[int]:
    """Marks the trials that a finished process completed (recording each one's identity);
    returns the newly marked ones."""
    marked = []
    for k in trials:
        path = trial_dir(workload_dir, k)
        if not path.is_dir() or is_finished(path):
            continue
        extra: dict[str, Any] = {"launcher": launcher}
        if identities and k in identities:
            extra["identity"] = identities[k]
        if exit_code == 0:
            mark_finished(path, "process exited 0", exit_code=0, **extra)
        elif algoperf_training_ended(path):
            mark_finished(path, "AlgoPerf end-of-training row", exit_code=exit_code, **extra)
        else:
            continue
        marked.append(k)
    return marked


IDENTITY_KEYS: tuple[str, ...] = (
    "submission",
    "tuning_ruleset",
    "search_space_sha256",
    "hyperparameters",
    "max_global_steps",
    "rng_seed",
)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def trial_identity(
    *,
    submission: str,
    tuning_ruleset: str,
    search_space: Path | None,
    hyperparameters: dict[str, Any] | None,
    max_global_steps: int | None,
    rng_seed: int | None,
) -> dict[str, Any]:
    """What a trial runs, as recorded in its marker and compared on resume."""
    return {
        "submission": submission,
        "tuning_ruleset": tuning_ruleset,
        "search_space": None if search_space is None else str(search_space),
        "search_space_sha256": None if search_space is None else file_sha256(search_space),
        "hyperparameters": hyperparameters,
        "max_global_steps": max_global_steps,
        "rng_seed": rng_seed,
    }


def _recorded_hyperparameters(trial_path: Path) -> dict[str, Any] | None:
    """AlgoPerf's hparams.json of a trial (it reuses that file on resume)."""
    try:
        data = json.loads((Path(trial_path) / "hparams.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def identity_differences(trial_path: Path, expected: dict[str, Any]) -> list[str]:
    """How the trial in ``trial_path`` differs from ``expected`` (empty: the same run).

    A finished trial is compared through its marker's identity; a started one through
    the hparams.json AlgoPerf would reuse. Hyperparameters are compared only where the
    expected point is known (list-format search spaces)."""
    marker = read_marker(trial_path)
    differences = []
    if marker is not None:
        recorded = marker.get("identity")
        if not isinstance(recorded, dict):
            return ["its finished marker records no hyperparameters, steps or seed"]
        for key in IDENTITY_KEYS:
            was, now = recorded.get(key), expected.get(key)
            if (key == "hyperparameters" and now is None) or was == now:
                continue
            if key == "search_space_sha256":
                old_path, new_path = recorded.get("search_space"), expected.get("search_space")
                if old_path == new_path:
                    differences.append(f"search space: {new_path} changed since the trial ran")
                else:
                    differences.append(f"search space: ran with {old_path}, now {new_path}")
            elif key == "hyperparameters" and isinstance(was, dict):
                differences.append(f"hyperparameters: {_dict_changes(was, now)}")
            else:
                differences.append(f"{key}: ran with {was!r}, now {now!r}")
        return differences
    wanted = expected.get("hyperparameters")
    started = _recorded_hyperparameters(trial_path)
    if wanted is not None and started is not None and started != wanted:
        differences.append(
            "hyperparameters: its hparams.json (which AlgoPerf reuses on resume) holds other "
            f"values: {_dict_changes(started, wanted)}"
        )
    return differences


def _dict_changes(old: dict[str, Any], new: dict[str, Any], limit: int = 4) -> str:
    """``name: old -> new`` for the keys that differ (a few of them)."""
    missing = object()
    changes = [
        f"{key}: {'(unset)' if old.get(key, missing) is missing else repr(old[key])} -> "
        f"{'(unset)' if new.get(key, missing) is missing else repr(new[key])}"
        for key in sorted(set(old) | set(new))
        if old.get(key, missing) != new.get(key, missing)
    ]
    more = f" and {len(changes) - limit} more" if len(changes) > limit else ""
    return "; ".join(changes[:limit]) + more
