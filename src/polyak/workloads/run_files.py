"""The files of a run directory, in AlgoPerf's layout, all written atomically.

``eval_measurements.csv`` and ``measurements.csv`` (through
:class:`MetricsLogger`, AlgoPerf's ``MetricLogger`` twin), ``hparams.json``,
the ``meta_data_<k>.json`` / ``flags_<k>.json`` pairs and the
``checkpoint_<step>`` files of the local loop (``loop.py``), which decides
what goes in them.
"""

from __future__ import annotations

import csv
import glob
import importlib.metadata
import io
import json
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from polyak.files import atomic_write_text
from polyak.hyperparameters import as_dict

if TYPE_CHECKING:  # algoperf's spec imports both frameworks; this module imports neither
    from polyak.algoperf import spec

EVAL_CSV = "eval_measurements.csv"
MEASUREMENTS_CSV = "measurements.csv"
HPARAMS_JSON = "hparams.json"
_CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d+)$")


class OutputDirectoryInUseError(ValueError):
    """``output_dir`` already holds a run and ``resume`` was not asked for."""


def as_scalar(value: Any) -> Any:
    """A plain Python value for a 0-d tensor or array or a numpy scalar, as CSV and JSON need."""
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
        row = {key: as_scalar(value) for key, value in metrics.items()}
        row["global_step"] = int(global_step)
        if preemption_count is not None:
            row["preemption_count"] = int(preemption_count)
        self.rows.append(row)
        (self.eval_rows if is_eval else self.train_rows).append(row)
        self._write(is_eval)

    def _write(self, is_eval: bool) -> None:
        if self.output_dir is None:
            return
        # Rewritten on logged training steps, inside update_params: not fsynced
        # (submission time); the checkpoints that resume a run are.
        measurements = os.path.join(self.output_dir, MEASUREMENTS_CSV)
        atomic_write_text(measurements, _csv_text(self.rows), durable=False)
        if is_eval:
            eval_path = os.path.join(self.output_dir, EVAL_CSV)
            atomic_write_text(eval_path, _csv_text(self.eval_rows), durable=False)

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


def write_json(path: str, content: Any) -> None:
    atomic_write_text(path, json.dumps(content, indent=2, default=str) + "\n")


def package_versions(framework: str) -> dict[str, str | None]:
    names = ["polyak", "numpy", "scikit-learn", "algoperf"]
    names += ["torch"] if framework == "pytorch" else ["jax", "jaxlib", "flax", "optax"]
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def workload_properties(workload: spec.Workload) -> dict[str, Any]:
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


def checkpoint_path(output_dir: str, global_step: int) -> str:
    return os.path.join(output_dir, f"checkpoint_{global_step}")


def latest_checkpoint(output_dir: str) -> str | None:
    steps = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint_*")):
        match = _CHECKPOINT_PATTERN.match(os.path.basename(path))
        if match:
            steps.append((int(match.group(1)), path))
    return max(steps)[1] if steps else None


def remove_older_checkpoints(output_dir: str, keep: str) -> None:
    for path in glob.glob(os.path.join(output_dir, "checkpoint_*")):
        if _CHECKPOINT_PATTERN.match(os.path.basename(path)) and path != keep:
            os.unlink(path)


def check_or_write_hparams(output_dir: str, hyperparameters: Any, resume: bool) -> None:
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
    write_json(path, current)


def check_output_dir(output_dir: str, resume: bool) -> None:
    os.makedirs(output_dir, exist_ok=True)
    if resume:
        return
    leftovers = [
        name
        for name in (EVAL_CSV, MEASUREMENTS_CSV)
        if os.path.exists(os.path.join(output_dir, name))
    ]
    if leftovers or latest_checkpoint(output_dir):
        found = ", ".join(leftovers) or "a checkpoint"
        raise OutputDirectoryInUseError(
            f"output_dir {output_dir!r} already holds a run ({found}); "
            "pass resume=True to continue it, or choose an empty directory"
        )
