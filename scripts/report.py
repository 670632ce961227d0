r"""Build the time-to-target report from one or more experiment folders.

Each folder is read as in ``polyak.runner.results``: an AlgoPerf
``<experiment_dir>/<experiment_name>`` (one study), a folder of studies
(AlgoPerf's scoring layout), or the embedded suite's folder (one label per run).
Several folders are compared side by side, with time-to-target ratios against
the baseline, accelerator-hours to target and the AlgoPerf benchmark score.

Example:

  python scripts/report.py \
      --experiments=$HOME/experiment_runs/nadamw,$HOME/experiment_runs/nadamw_lawa \
      --output_dir=docs/results --num_accelerators=8
"""

from __future__ import annotations

import sys

from absl import app, flags

from polyak.runner.errors import RunnerError

flags.DEFINE_string("experiments", None, "Comma list of experiment folders.")
flags.DEFINE_string("labels", None, "Comma list of run labels, one per folder (default: names).")
flags.DEFINE_string("output_dir", None, "Where to write the report (default: <first>/report).")
flags.DEFINE_string("baseline", None, "The run the others are compared with (default: first).")
flags.DEFINE_integer("num_accelerators", 1, "Accelerators per run, for accelerator-hours.")
flags.DEFINE_integer(
    "num_workloads", None, "Workload count n in rho(tau) (default: 8 for AlgoPerf workloads)."
)
flags.DEFINE_string("title", "polyak results", "Report title.")
flags.DEFINE_boolean("plots", True, "Write PNG plots.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from polyak.runner.report import build_report, time_to_target_table
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
        )
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(time_to_target_table(aggregate(trials)))
    print(f"\nreport: {files.markdown}")
    return 0


if __name__ == "__main__":
    app.run(main)
