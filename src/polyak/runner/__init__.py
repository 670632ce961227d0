"""The runner: launch the eight AlgoPerf workloads (or the embedded CPU suite) and report.

Modules, one concept each:

- ``errors``: the error types (each names the bad value and what was expected).
- ``workload_table``: AlgoPerf's workloads from the installed algoperf (v0.6's eight as the
  fallback): targets, budgets, step hints.
- ``search_space``: validating and reading tuning search-space files.
- ``commands``: exact command lines for ``submission_runner`` (python, torchrun, docker).
- ``completion``: what a finished trial is, and the markers that record it.
- ``progress``: turning AlgoPerf's log stream into progress lines.
- ``launch``: running the plans one workload after another.
- ``results``: parsing ``eval_measurements.csv`` and time-to-target per trial and workload.
- ``scoring``: performance profiles and the AlgoPerf benchmark score.
- ``tables``: Markdown, CSV, terminal tables, PNG bytes and number formats (report and study).
- ``report``: Markdown/CSV tables and PNG plots.
- ``embedded``: the CPU suite on the embedded workloads through the local loop, with its
  untimed warm-up and worker processes.
- ``steps_table``: the suite's steps-to-target table over seeds (medians, misses, ratios).
- ``study``: the averaging study (a package: plan, records, analysis, prose, plots, page, run).
- ``submission_loader``: importing a submission file by path, as AlgoPerf does.
- ``smoke``: a few steps of each real AlgoPerf workload on synthetic batches.
- ``docker_entry``: the container's entry point (AlgoPerf's ``startup.sh`` flags, and polyak's).

Files are written atomically through :mod:`polyak.files`.

Nothing in polyak imports this package; it sits on top of everything else.
"""
