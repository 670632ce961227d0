"""Progress lines from AlgoPerf's log stream.

``submission_runner`` logs ``--- Tuning run k/K ---`` when a trial starts and,
after every eval, ``Time since start: Ts, Step: N, {metrics}``. The tracker
reads those lines as they stream by and prints one short line per eval: which
workload, which trial, the step, the validation metric against its target and
the submission time. Under torchrun every rank logs the same eval, so repeats
of (trial, step) are printed once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from polyak.runner.workload_table import WorkloadInfo, reached_target

TRIAL_RE = re.compile(r"--- Tuning run (\d+)/(\d+) ---")
EVAL_RE = re.compile(r"Time since start: ([0-9.eE+-]+)s,\s*Step: (\d+),\s*(\{.*\})")
FINAL_RE = re.compile(r"Final (\S+) score: (\S+)")
# "'validation/accuracy': 0.5", also numpy 2 reprs such as np.float64(0.5).
_METRIC_RE = re.compile(
    r"'([\w/.-]+)':\s*(?:[\w.]+\()?\s*([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+|nan|inf))"
)


def parse_metrics(text: str) -> dict[str, float]:
    """Numeric entries of a logged eval-result dict."""
    return {name: float(value) for name, value in _METRIC_RE.findall(text)}


class ProgressTracker:
    """Feeds on log lines; emits progress lines through ``emit``."""

    def __init__(
        self,
        label: str,
        info: WorkloadInfo | None,
        emit: Callable[[str], None],
        num_trials: int | None = None,
    ) -> None:
        self.label = label
        self.info = info
        self.emit = emit
        self.num_trials = num_trials
        self.trial: int | None = None
        self._seen: set[tuple[int | None, int]] = set()
        self.last_metrics: dict[str, float] = {}
        self.traceback_seen = False

    def feed(self, line: str) -> None:
        if "Traceback (most recent call last)" in line:
            self.traceback_seen = True
        if match := TRIAL_RE.search(line):
            trial, total = int(match.group(1)), int(match.group(2))
            if self.trial != trial:
                self.trial = trial
                self.emit(f"  {self.label}: trial {trial}/{total} started")
            return
        if match := EVAL_RE.search(line):
            step = int(match.group(2))
            if (self.trial, step) in self._seen:
                return
            self._seen.add((self.trial, step))
            self.last_metrics = parse_metrics(match.group(3))
            self.emit(self.format_eval(step, self.last_metrics))
            return
        if match := FINAL_RE.search(line):
            self.emit(f"  {self.label}: final score (submission time) {match.group(2)}")

    def format_eval(self, step: int, metrics: dict[str, float]) -> str:
        trial = f"trial {self.trial}" if self.trial is not None else "trial ?"
        if self.num_trials:
            trial += f"/{self.num_trials}"
        parts = [f"  {self.label} {trial} step {step}:"]
        if self.info is not None:
            column = self.info.validation_column
            value = metrics.get(column, math.nan)
            sign = "<=" if self.info.direction == "min" else ">="
            parts.append(f"{column}={value:.6g} (target {sign} {self.info.validation_target:.6g})")
            if reached_target(value, self.info.validation_target, self.info.direction):
                parts.append("TARGET REACHED")
        else:
            shown = {k: v for k, v in metrics.items() if k.startswith("validation/")}
            parts.append(", ".join(f"{k}={v:.6g}" for k, v in sorted(shown.items())))
        seconds = metrics.get("accumulated_submission_time", metrics.get("score"))
        if seconds is not None:
            parts.append(f"submission time {seconds:.1f}s")
        return " ".join(parts)
