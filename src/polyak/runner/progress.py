"""Progress lines from AlgoPerf's log stream.

``submission_runner`` logs ``--- Tuning run k/K ---`` when a trial starts and,
after every eval, ``Time since start: Ts, Step: N, {metrics}``. The tracker
reads those lines as they stream by and prints one short line per eval: which
workload, which trial, the step, the validation metric against its target, the
submission time, and what one needs to plan: wall-clock time elapsed, the
fraction of the step budget (``--max_global_steps``, else the workload's step
hint) and of the time budget used, and an ETA for the trial and for the
workload's remaining trials, extrapolated from the wall-clock time per unit of
budget so far. Under torchrun every rank logs the same eval, so repeats of
(trial, step) are printed once.
"""

from __future__ import annotations

import math
import re
import time
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
        *,
        max_global_steps: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.info = info
        self.emit = emit
        self.num_trials = num_trials
        self.max_global_steps = max_global_steps
        self.clock = clock
        self.started = clock()
        self.trial_started = self.started
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
                self.trial_started = self.clock()
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
        parts.append(self.budget_text(step, seconds))
        return " ".join(parts)

    def budget_fractions(self, step: int, seconds: float | None) -> tuple[float, float]:
        """(fraction of the step budget, fraction of the time budget) used; NaN if unknown."""
        step_budget = self.max_global_steps or (self.info.step_hint if self.info else None)
        time_budget = self.info.max_runtime_sec if self.info else None
        step_fraction = step / step_budget if step_budget else math.nan
        time_fraction = seconds / time_budget if time_budget and seconds is not None else math.nan
        return step_fraction, time_fraction

    def budget_text(self, step: int, seconds: float | None) -> str:
        now = self.clock()
        elapsed = now - self.started
        step_fraction, time_fraction = self.budget_fractions(step, seconds)
        step_name = "step limit" if self.max_global_steps else "step hint"
        parts = [f"| elapsed {format_duration(elapsed)}"]
        if not math.isnan(step_fraction):
            parts.append(f"{step_fraction:.0%} of {step_name}")
        if not math.isnan(time_fraction):
            parts.append(f"{time_fraction:.0%} of time budget")
        # Whichever budget runs out first ends the trial (a hit may end it sooner);
        # the step hint is no limit, so only a real step limit counts.
        ends = [f for f in (time_fraction,) if not math.isnan(f)]
        if self.max_global_steps and not math.isnan(step_fraction):
            ends.append(step_fraction)
        done = min(max(ends), 1.0) if ends else math.nan
        trial_elapsed = now - self.trial_started
        if done > 0 and not math.isnan(done):
            trial_total = trial_elapsed / done
            remaining = trial_total - trial_elapsed
            text = f"ETA trial {format_duration(remaining)}"
            if self.num_trials and self.trial is not None and self.trial < self.num_trials:
                left = remaining + trial_total * (self.num_trials - self.trial)
                text += f", all trials {format_duration(left)} (if none stops early)"
            parts.append(text)
        return ", ".join(parts)


def format_duration(seconds: float) -> str:
    """``1h02m``, ``3m20s`` or ``45s``."""
    if math.isnan(seconds) or math.isinf(seconds):
        return "?"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
