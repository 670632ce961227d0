"""What the study records beside the loop's files: each run's wall time, each session."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

from polyak.files import atomic_write_json

TIMING_FILE = "study_timing.json"
SESSIONS_FILE = "study_sessions.json"


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; empty when the file is missing or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def write_timing(trial_path: Path, wall_seconds: float, setting: str) -> None:
    atomic_write_json(trial_path / TIMING_FILE, {"wall_seconds": wall_seconds, "setting": setting})


def read_sessions(root: Path) -> list[dict[str, Any]]:
    """Every invocation that ran (part of) this study: command, start, elapsed, load."""
    try:
        sessions = json.loads((root / SESSIONS_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return []
    return [s for s in sessions if isinstance(s, dict)] if isinstance(sessions, list) else []


def append_session(root: Path, session: dict[str, Any]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / SESSIONS_FILE, [*read_sessions(root), session])


def start_session(command: str | None) -> dict[str, Any]:
    """A session record, marked interrupted until :func:`end_session` says otherwise."""
    return {
        "command": command,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": load_average(),
        "interrupted": True,
    }


def end_session(
    session: dict[str, Any], statuses: list[str], elapsed_seconds: float
) -> dict[str, Any]:
    return {
        **session,
        "elapsed_seconds": round(elapsed_seconds, 1),
        "runs_finished": statuses.count("finished"),
        "runs_failed": statuses.count("failed"),
        "load_average_end": load_average(),
    }


def load_average() -> tuple[float, float, float] | None:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]
    except OSError:
        return None
