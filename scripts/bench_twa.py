"""TWA's share of submission time, and its steps to target against LAWA on the same window.

Trains the PyTorch NadamW submission (the first point of
``tuning_search_spaces/nadamw.json``, the point the embedded targets were
calibrated with) on an embedded workload through the local AlgoPerf loop, once
per setting and seed. The settings of one seed run back to back, so they share
the machine's load. Every run trains to the step limit (the workload's
``step_hint``) without stopping at the target, so each setting's submission
time covers the same steps.

Per run it prints the steps to the validation target, the submission time, the
time ``prepare_for_eval`` took (where TWA fits), its share of the submission
time, and how many evals ran a fit; then per setting the medians over seeds and
the steps ratio to LAWA of the same seed (a miss counts as the step limit + 1,
a lower bound).

An untimed warm-up run comes first: the first run of a process pays
``torch.compile``'s start-up.

  python scripts/bench_twa.py --workload=textlm --seeds=0,1 --every=10 --window=10 \\
      --eval_every=25
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from absl import app, flags

from polyak.runner.embedded import hyperparameter_tuple
from polyak.runner.submission_loader import load_submission_module
from polyak.workloads import loop
from polyak.workloads.registry import make_workload

flags.DEFINE_string("workload", "textlm", "Embedded workload.")
flags.DEFINE_list("seeds", ["0", "1"], "Seeds; each runs every setting.")
flags.DEFINE_integer("every", 10, "averaging_every (ν) of LAWA and TWA.")
flags.DEFINE_integer("window", 10, "lawa_window (L) of LAWA and TWA.")
flags.DEFINE_integer("eval_every", 25, "Steps between evals.")
flags.DEFINE_integer("max_steps", None, "Step limit (default: the workload's step_hint).")
flags.DEFINE_list(
    "settings",
    ["none", "lawa", "twa", "twa_uncapped"],
    "Which of: none, lawa, twa (the defaults), twa_uncapped (twa_budget=1e6: a fit at "
    "every eval, as before the budget existed).",
)
FLAGS = flags.FLAGS

REPO = Path(__file__).resolve().parent.parent
UNCAPPED_BUDGET = 1e6


def settings(every: int, window: int) -> dict[str, dict[str, Any]]:
    window_setting = {"averaging_every": every, "lawa_window": window}
    return {
        "none": {},
        "lawa": {"averaging": "lawa", **window_setting},
        "twa": {"averaging": "twa", **window_setting},
        "twa_uncapped": {"averaging": "twa", **window_setting, "twa_budget": UNCAPPED_BUDGET},
    }


class TimedSubmission:
    """The submission's functions, with ``prepare_for_eval`` timed and TWA's choices counted."""

    def __init__(self, module: Any) -> None:
        self._module = module
        self.prepare_seconds = 0.0
        self.evals = 0
        self.fits = 0
        self.fit_steps = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def prepare_for_eval(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = self._module.prepare_for_eval(*args, **kwargs)
        self.prepare_seconds += time.perf_counter() - start
        self.evals += 1
        averager = result[0].get("averager") if isinstance(result[0], dict) else None
        twa = getattr(averager, "last_twa_result", None)
        if twa is not None and twa.step_losses:
            self.fits += 1
            self.fit_steps += len(twa.step_losses)
        return result


def run(
    module: Any, point: dict[str, Any], seed: int, max_steps: int | None
) -> tuple[loop.RunResult, TimedSubmission]:
    submission = TimedSubmission(module)
    workload = make_workload(FLAGS.workload, "pytorch")
    config = loop.LoopConfig(
        max_steps=max_steps or int(workload.step_hint),
        eval_every_steps=FLAGS.eval_every,
        rng_seed=seed,
        stop_at_target=False,
        checkpoint=False,
    )
    result = loop.run_training(
        workload,
        submission,
        hyperparameter_tuple(point),
        framework="pytorch",
        config=config,
    )
    return result, submission


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main(argv: list[str]) -> None:
    del argv
    table = settings(FLAGS.every, FLAGS.window)
    unknown = [name for name in FLAGS.settings if name not in table]
    if unknown:
        raise app.UsageError(f"--settings {unknown} unknown; expected some of {list(table)}")
    if not all(seed.isdigit() for seed in FLAGS.seeds):
        raise app.UsageError(f"--seeds={','.join(FLAGS.seeds)}: expected integers >= 0")
    module = load_submission_module(REPO / "submissions/nadamw/pytorch/submission.py")
    base = json.loads((REPO / "tuning_search_spaces/nadamw.json").read_text())[0]
    limit = FLAGS.max_steps or int(make_workload(FLAGS.workload, "pytorch").step_hint)
    run(module, {**base, **table["twa"]}, 0, 2 * FLAGS.eval_every)  # warm-up, untimed
    print(
        f"{FLAGS.workload}: NadamW (pytorch), nu={FLAGS.every}, L={FLAGS.window}, eval every "
        f"{FLAGS.eval_every} steps, {limit} steps, seeds {','.join(FLAGS.seeds)}"
    )
    header = (
        f"{'setting':<14}{'seed':>5}{'steps to target':>17}{'submission s':>14}"
        f"{'prepare s':>11}{'share':>8}{'fits/evals':>12}{'fit steps':>11}"
    )
    print(header)
    rows: dict[str, list[tuple[int, float, float]]] = {name: [] for name in FLAGS.settings}
    for seed in (int(s) for s in FLAGS.seeds):
        for name in FLAGS.settings:
            result, timed = run(module, {**base, **table[name]}, seed, limit)
            steps = result.steps_to_target
            share = timed.prepare_seconds / result.total_submission_time
            rows[name].append((steps or limit + 1, result.total_submission_time, share))
            print(
                f"{name:<14}{seed:>5}{steps if steps else 'miss':>17}"
                f"{result.total_submission_time:>14.1f}{timed.prepare_seconds:>11.2f}"
                f"{share:>8.1%}{f'{timed.fits}/{timed.evals}':>12}{timed.fit_steps:>11}",
                flush=True,
            )
    print("\nmedians over seeds (steps: a miss counts as the step limit + 1)")
    for name in FLAGS.settings:
        steps, seconds, shares = (list(column) for column in zip(*rows[name]))
        line = (
            f"{name:<14} steps {median(steps):>7.1f}  submission s {median(seconds):>8.1f}  "
            f"share {median(shares):.1%}"
        )
        if name != "lawa" and "lawa" in rows:
            ratios = [a[0] / b[0] for a, b in zip(rows[name], rows["lawa"])]
            line += f"  steps / LAWA (per seed) {', '.join(f'{r:.3f}' for r in ratios)}"
        print(line)


if __name__ == "__main__":
    app.run(main)
