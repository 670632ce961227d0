r"""Build the time-to-target report from one or more experiment folders.

Each folder is read as in ``polyak.runner.results``: an AlgoPerf
``<experiment_dir>/<experiment_name>`` (one study), a folder of ``study_<k>/``
folders (AlgoPerf's scoring layout, what ``run_workloads.py --suite=algoperf``
writes), or the embedded suite's folder (one label per run). All folders are
pooled into one performance profile, whatever their framework, as the
leaderboard scores submissions; the report warns loudly when a score rests on
fewer studies or trials than the rules ask, on missing workloads or on
unfinished trials.

Example (the folders the algoperf suite writes for two search spaces):

  python scripts/report.py \
      --experiments=$HOME/experiment_runs/nadamw_nadamw,$HOME/experiment_runs/nadamw_nadamw_lawa \
      --output_dir=docs/results --num_accelerators=4
"""

from __future__ import annotations

import sys

from absl import app, flags

from polyak.runner.errors import RunnerError
from polyak.runner.workload_table import DEFAULT_ACCELERATOR_TYPE, DEFAULT_NUM_ACCELERATORS

flags.DEFINE_string("experiments", None, "Comma list of experiment folders.")
flags.DEFINE_string("labels", None, "Comma list of run labels, one per folder (default: names).")
flags.DEFINE_string("output_dir", None, "Where to write the report (default: <first>/report).")
flags.DEFINE_string("baseline", None, "The run the others are compared with (default: first).")
flags.DEFINE_integer(
    "num_accelerators",
    DEFAULT_NUM_ACCELERATORS,
    "Accelerators per run, for accelerator-hours (default: the current rules' count).",
)
flags.DEFINE_string(
    "accelerator_type", DEFAULT_ACCELERATOR_TYPE, "Accelerator type, shown with the hours."
)
flags.DEFINE_integer(
    "num_workloads",
    None,
    "Workload count n in rho(tau) (default: the installed algoperf's base workloads, else 8).",
)
flags.DEFINE_enum(
    "selection",
    "leaderboard",
    ["leaderboard", "fastest"],
    "Trial standing for a study: the earliest eval to hit (leaderboard) or the fastest.",
)
flags.DEFINE_string("title", "polyak results", "Report title.")
flags.DEFINE_boolean("plots", True, "Write PNG plots.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from polyak.runner.report import build_report, compare, time_to_target_table
    from polyak.runner.results import aggregate, load_results

    try:
        folders = [f.strip() for f in (FLAGS.experiments or "").split(",") if f.strip()]
        if not folders:
            raise RunnerError("--experiments is required (a comma list of experiment folders)")
        labels = [x.strip() for x in FLAGS.labels.split(",")] if FLAGS.labels else []
        if labels and len(labels) != len(folders):
            raise RunnerError(f"--labels has {len(labels)} name(s) for {len(folders)} folder(s)")
        trials = []
        for index, folder in enumerate(folders):
            trials += load_results(folder, labels[index] if labels else None)
        if not trials:
            raise RunnerError(f"no trial_<k>/eval_measurements.csv under {', '.join(folders)}")
        output_dir = FLAGS.output_dir or f"{folders[0].rstrip('/')}/report"
        files = build_report(
            trials,
            output_dir,
            title=FLAGS.title,
            num_accelerators=FLAGS.num_accelerators,
            baseline=FLAGS.baseline,
            num_workloads=FLAGS.num_workloads,
            plots=FLAGS.plots,
            selection=FLAGS.selection,
            accelerator_type=FLAGS.accelerator_type,
        )
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = aggregate(trials, FLAGS.selection)
    print(time_to_target_table(results))
    for comparison in compare(results, num_workloads=FLAGS.num_workloads):
        print(f"\nbenchmark scores (pooled: {comparison.framework}):")
        for label in comparison.labels:
            print(f"  {label:<32} {comparison.scores[label]:.4f}")
        for warning in comparison.warnings:
            print(f"WARNING: {warning}", file=sys.stderr)
    print(f"\nreport: {files.markdown}")
    return 0


if __name__ == "__main__":
    app.run(main)
