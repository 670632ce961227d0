"""The averaging study: Ajroldi, Orvieto & Geiping's questions, asked of the embedded workloads.

"When, Where and Why to Average Weights?" (ICML 2025) answers three questions
with thousands of GPU-hours of AlgoPerf runs. This package asks the same ones
of the small CPU workloads, so that anyone can check them in minutes:

1. *Does averaging reach the target sooner?* Every submission x framework x
   workload with no averaging, LAWA and EMA, both also with the best-of
   selection (``averaging_select="best"``), and TWA for PyTorch (at the default
   ``twa_budget`` and at one that fits at every eval), over several seeds: steps and submission time
   to the validation target, median and min-max.
2. *How sensitive is it to ν (``averaging_every``), L (``lawa_window``) and β
   (``ema_beta``)?* A grid for one submission and framework: ν x L for LAWA,
   ν x β for EMA, plus EMA with ν = 1 and β = 0.9 (the setting the paper calls
   poor).
3. *Does it replace learning-rate decay?* Cosine decay without averaging
   against a constant learning rate with LAWA or EMA (and cosine with LAWA):
   the best validation metric so far against steps and time.

For every averaged run the raw weights' curve is the run without averaging
with the same seed and hyperparameters: averaging never changes the training
trajectory in polyak, so that run *is* the raw trajectory (the study checks
this on the logged training losses and reports the largest difference).

One module per step, each using only those above it:

- :mod:`~polyak.runner.study.plan`: the settings and the runs they imply;
- :mod:`~polyak.runner.study.records`: the study's own files (wall times, sessions);
- :mod:`~polyak.runner.study.analysis`: finished runs read, paired with their raw
  partners and summarised per question;
- :mod:`~polyak.runner.study.prose`: numbers into words;
- :mod:`~polyak.runner.study.plots`: the figures;
- :mod:`~polyak.runner.study.page`: the tables and ``results.md``;
- :mod:`~polyak.runner.study.run`: running what is unfinished, then the page.

How runs are made. Each run is one cell of :mod:`polyak.runner.embedded`
(:func:`~polyak.runner.embedded.run_one`), in its layout
``<root>/<label>/seed_<s>/<workload>_<framework>/trial_1/`` with its
finished-markers, so an interrupted study resumes where it stopped and the
folder reads like any embedded-suite folder. Two things differ:

- runs never stop at the target: they train to ``step_hint`` (or the time
  budget) so that curves, best metrics and raw-vs-averaged gaps cover the
  whole run. Time to target is still AlgoPerf's: the submission time at the
  first eval that reaches the validation target.
- a constant learning rate uses the optimizer's own switch when it has one
  (``use_cosine_decay=False``); otherwise the workload's ``step_hint`` is
  stretched (x100 by default) so that the cosine stays flat, with
  ``warmup_factor`` scaled down to keep the same warmup steps and
  ``--max_global_steps`` at the real ``step_hint``. Which one was used is
  written into the results.

The suite's untimed warm-up (:class:`~polyak.runner.embedded.WarmUp`) precedes
the first recorded run of each submission, framework and workload, so that a
process's one-time compilation is not charged to whichever run comes first.
"""

from polyak.runner.study.analysis import RunStats, StudyAnalysis, Summary, analyze_study, spearman
from polyak.runner.study.page import write_results
from polyak.runner.study.plan import (
    COSINE_SWITCH,
    STRETCHED,
    Setting,
    StudyConfigError,
    StudyRun,
    StudySettings,
    constant_lr_method,
    constant_lr_overrides,
    plan_study,
    quick_settings,
)
from polyak.runner.study.records import read_sessions
from polyak.runner.study.run import StudyOutcome, remove_study, run_study, stretch_step_hint

__all__ = [
    "COSINE_SWITCH",
    "STRETCHED",
    "RunStats",
    "Setting",
    "StudyAnalysis",
    "StudyConfigError",
    "StudyOutcome",
    "StudyRun",
    "StudySettings",
    "Summary",
    "analyze_study",
    "constant_lr_method",
    "constant_lr_overrides",
    "plan_study",
    "quick_settings",
    "read_sessions",
    "remove_study",
    "run_study",
    "spearman",
    "stretch_step_hint",
    "write_results",
]
