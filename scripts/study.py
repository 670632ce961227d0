r"""When, where and why to average weights: the paper's questions on the embedded workloads.

Runs (or resumes) the averaging study of ``polyak.runner.study`` and writes
``docs/results.md`` with tables and plots under ``docs/results/``:

1. steps and time to target for NadamW and Shampoo in PyTorch and JAX, with
   no averaging, LAWA and EMA (each also with the best-of selection) and TWA
   for PyTorch (also with a capped fit), over several seeds;
2. the sensitivity grid ν x L (LAWA) and ν x β (EMA), plus ν = 1, β = 0.9;
3. averaging against LR decay (cosine vs constant LR, with and without averaging).

Finished runs are skipped, so rerunning the same command after an
interruption continues where it stopped. ``--quick`` runs one workload, one
seed and a reduced grid (a few minutes on 2 cores).

Examples:

  python scripts/study.py                 # the full study (see docs/results.md)
  python scripts/study.py --quick --output_dir=/tmp/study_quick
  python scripts/study.py --analyze_only  # rebuild the page from finished runs
"""

from __future__ import annotations

import shlex
import sys
from typing import TYPE_CHECKING

from absl import app, flags
from absl import logging as absl_logging

from polyak.runner.errors import RunnerError

if TYPE_CHECKING:
    from polyak.runner.study import StudySettings

flags.DEFINE_boolean("quick", False, "One workload, one seed, a reduced grid (a few minutes).")
flags.DEFINE_string("workloads", None, "Question 1 workloads, comma list (default: all).")
flags.DEFINE_string("submissions", None, "Question 1 optimizers (default nadamw,shampoo).")
flags.DEFINE_string("frameworks", None, "Question 1 frameworks (default pytorch,jax).")
flags.DEFINE_string("seeds", None, "Question 1 seeds, comma list (default 0,1).")
flags.DEFINE_string("grid_workloads", None, "Question 2 workloads (default digits,diabetes).")
flags.DEFINE_string("grid_seeds", None, "Question 2 seeds (default 0,1).")
flags.DEFINE_string("decay_workloads", None, "Question 3 workloads (default: all).")
flags.DEFINE_string("decay_seeds", None, "Question 3 seeds (default 0,1).")
flags.DEFINE_string("experiment_dir", "~/experiment_runs", "Root folder for the runs.")
flags.DEFINE_string(
    "experiment_name", None, "Folder of this study (default averaging_study[_quick])."
)
flags.DEFINE_string("output_dir", "docs", "Where results.md and results/ are written.")
flags.DEFINE_boolean("analyze_only", False, "Run nothing; rebuild the page from finished runs.")
flags.DEFINE_boolean("overwrite", False, "Delete this study's runs first and start over.")
flags.DEFINE_boolean("verbose", False, "Print every eval and every skipped run.")
flags.DEFINE_string("repo_root", None, "The polyak checkout (default: current directory).")
FLAGS = flags.FLAGS


def _names(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _ints(name: str) -> tuple[int, ...] | None:
    parts = _names(FLAGS[name].value)
    if parts is None:
        return None
    try:
        return tuple(int(part) for part in parts)
    except ValueError as exc:
        raise RunnerError(
            f"--{name}={FLAGS[name].value!r}; expected comma-separated integers"
        ) from exc


def _settings() -> StudySettings:
    from polyak.runner.study import StudySettings, quick_settings

    overrides = {
        "workloads": _names(FLAGS.workloads),
        "submissions": _names(FLAGS.submissions),
        "frameworks": _names(FLAGS.frameworks),
        "seeds": _ints("seeds"),
        "grid_workloads": _names(FLAGS.grid_workloads),
        "grid_seeds": _ints("grid_seeds"),
        "decay_workloads": _names(FLAGS.decay_workloads),
        "decay_seeds": _ints("decay_seeds"),
        "experiment_dir": FLAGS.experiment_dir,
        "experiment_name": FLAGS.experiment_name,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return quick_settings(**overrides) if FLAGS.quick else StudySettings(**overrides)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:
        # The submissions' per-step INFO logs would drown the progress lines.
        absl_logging.set_verbosity(absl_logging.WARNING)
    from polyak.runner.study import remove_study, run_study

    try:
        settings = _settings()
        if FLAGS.overwrite and not FLAGS.analyze_only:
            remove_study(settings)
        # The command that makes the runs (--analyze_only only rebuilds the page).
        arguments = [a for a in sys.argv[1:] if a not in ("--analyze_only", "--overwrite")]
        command = shlex.join(["python", "scripts/study.py", *arguments])
        outcome = run_study(
            settings,
            repo_root=FLAGS.repo_root,
            output_dir=FLAGS.output_dir,
            command=command,
            run=not FLAGS.analyze_only,
            verbose=FLAGS.verbose,
        )
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if "failed" in outcome.statuses else 0


if __name__ == "__main__":
    app.run(main)
