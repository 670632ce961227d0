r"""Run the benchmark workloads and report where a submission stands.

Two suites:

- ``--suite=embedded`` (default): small CPU workloads trained through polyak's local loop,
  a grid of submissions x frameworks x averaging modes x workloads x seeds; prints the
  steps-to-target table (median over seeds, hits, ratios to no averaging, the seeds) and
  writes it with the report. No GPU, no datasets. With no flags: both submissions, both
  frameworks, none/LAWA/EMA/TWA (TWA on PyTorch), every embedded workload, 1 seed, 2 worker
  processes (about 6 minutes of 2 idle cores; each further seed about 6 more).
- ``--suite=algoperf``: the eight AlgoPerf workloads through AlgoPerf's own
  ``submission_runner`` (``--launcher=python|torchrun|docker``), one after another.

Examples:

  python scripts/run_workloads.py --submission=nadamw --averaging=none,lawa,ema --seeds=5

  python scripts/run_workloads.py --suite=algoperf --framework=pytorch --launcher=torchrun \
      --nproc_per_node=8 --submission=nadamw --num_tuning_trials=5 \
      --data_dir=$HOME/data --experiment_dir=$HOME/experiment_runs \
      --experiment_name=nadamw_study_1 --dry_run

  python scripts/run_workloads.py --suite=algoperf --smoke --framework=jax --workloads=ogbg,wmt
"""

from __future__ import annotations

import sys

from absl import app, flags
from absl import logging as absl_logging

from polyak.averaging.config import MODES, TORCH_ONLY_MODES
from polyak.runner.commands import (
    DEFAULT_ACCELERATOR_TYPE,
    DEFAULT_NUM_ACCELERATORS,
    DEFAULT_NUM_STUDIES,
    LAUNCHERS,
    RunSettings,
    finalize_settings,
    find_repo_root,
)
from polyak.runner.embedded import (
    DEFAULT_AVERAGING,
    DEFAULT_SEED_COUNT,
    DEFAULT_SUBMISSIONS,
    DEFAULT_WORKERS,
    EmbeddedSettings,
    run_embedded_suite,
    seed_range,
    use_jax_compilation_cache,
)
from polyak.runner.errors import RunnerError

flags.DEFINE_enum("suite", "embedded", ["embedded", "algoperf"], "Which workloads to run.")
flags.DEFINE_string("workloads", "all", "'all' or a comma-separated list of workload names.")
flags.DEFINE_string(
    "framework",
    None,
    "pytorch | jax (algoperf suite); pytorch, jax, both or a comma list (embedded).",
)
flags.DEFINE_string(
    "submission",
    None,
    "nadamw | shampoo | a path to submission.py (embedded: a comma list, default "
    f"{','.join(DEFAULT_SUBMISSIONS)}; algoperf: default nadamw).",
)
flags.DEFINE_string(
    "averaging",
    ",".join(DEFAULT_AVERAGING),
    f"Embedded suite: comma list of {','.join(MODES)} ({','.join(TORCH_ONLY_MODES)}: PyTorch "
    "only). Each submission x framework x workload first gets an untimed warm-up.",
)
flags.DEFINE_string(
    "tuning_search_space",
    None,
    "Search-space JSON; default tuning_search_spaces/<submission>.json.",
)
flags.DEFINE_enum("tuning_ruleset", "external", ["external", "self"], "AlgoPerf tuning ruleset.")
flags.DEFINE_integer(
    "num_tuning_trials",
    None,
    "Hyperparameter points (trials) per study and workload (default: 5 under external "
    "tuning, 1 under self-tuning, as the leaderboard scores; the embedded suite: 1).",
)
flags.DEFINE_integer(
    "num_studies",
    DEFAULT_NUM_STUDIES,
    "AlgoPerf suite: studies per workload, each with its own seed (the leaderboard scores 3).",
)
flags.DEFINE_integer("rng_seed", None, "RNG seed passed to AlgoPerf (embedded: the first seed).")
flags.DEFINE_integer(
    "seeds",
    DEFAULT_SEED_COUNT,
    "Embedded suite: how many seeds (one study each), from --rng_seed (default 0) on. The "
    f"default ({DEFAULT_SEED_COUNT}) keeps the default run to about 10 minutes on 2 idle cores; "
    "each further seed adds about 6 minutes there.",
)
flags.DEFINE_boolean("show_evals", False, "Embedded suite: print a line for every eval too.")
flags.DEFINE_integer(
    "workers",
    DEFAULT_WORKERS,
    "Embedded suite: processes training at once (default: the CPU cores, at most "
    f"{DEFAULT_WORKERS}); each kind of run (submission x framework x workload) stays in one.",
)
flags.DEFINE_string("data_dir", "~/data", "AlgoPerf data root (<data_dir>/<dataset>).")
flags.DEFINE_string("experiment_dir", "~/experiment_runs", "Root folder for all experiments.")
flags.DEFINE_string(
    "experiment_name",
    None,
    "Experiment name (default: embedded; AlgoPerf suite: <submission>_<search space>).",
)
flags.DEFINE_integer("max_global_steps", None, "Stop each trial after this many steps.")
flags.DEFINE_integer("eval_every_steps", None, "Embedded suite: steps between evals.")
flags.DEFINE_boolean("dry_run", False, "Print the exact commands and run nothing.")
flags.DEFINE_enum("launcher", "python", list(LAUNCHERS), "How to start submission_runner.")
flags.DEFINE_integer(
    "nproc_per_node", None, "torchrun processes per node (default: --num_accelerators)."
)
flags.DEFINE_integer("nnodes", None, "torchrun nodes (multi-node needs --rdzv_endpoint).")
flags.DEFINE_string("rdzv_endpoint", None, "torchrun rendezvous HOST:PORT (multi-node).")
flags.DEFINE_string("rdzv_backend", None, "torchrun rendezvous backend (default c10d).")
flags.DEFINE_string(
    "docker_image", None, "Image for --launcher=docker (default polyak:<framework>)."
)
flags.DEFINE_boolean("smoke", False, "AlgoPerf suite: a few steps per workload on synthetic data.")
flags.DEFINE_integer("smoke_steps", 2, "Steps per workload in --smoke mode.")
flags.DEFINE_boolean("report", False, "AlgoPerf suite: write the report after the runs.")
flags.DEFINE_integer(
    "num_accelerators",
    DEFAULT_NUM_ACCELERATORS,
    "Accelerators per run (the current rules' count), for torchrun and accelerator-hours.",
)
flags.DEFINE_string(
    "accelerator_type", DEFAULT_ACCELERATOR_TYPE, "Accelerator type named in the report."
)
flags.DEFINE_boolean("overwrite", False, "Start over instead of resuming finished/partial runs.")
flags.DEFINE_string("repo_root", None, "The polyak checkout (default: current directory).")
FLAGS = flags.FLAGS


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _embedded_frameworks(text: str | None) -> tuple[str, ...]:
    if text in (None, "", "both", "all"):
        return ("pytorch", "jax")
    return tuple(_split(text))


def _seeds() -> tuple[int, ...]:
    return seed_range(FLAGS.seeds, FLAGS.rng_seed if FLAGS.rng_seed is not None else 0)


def run_embedded() -> int:
    if not FLAGS["verbosity"].present:
        # Per-step INFO logs of the submissions drown the suite's progress lines.
        absl_logging.set_verbosity(absl_logging.WARNING)

    settings = EmbeddedSettings(
        submissions=tuple(_split(FLAGS.submission)) or DEFAULT_SUBMISSIONS,
        frameworks=_embedded_frameworks(FLAGS.framework),
        averaging=tuple(_split(FLAGS.averaging)),
        workloads=FLAGS.workloads,
        seeds=_seeds(),
        num_tuning_trials=FLAGS.num_tuning_trials or 1,
        tuning_search_space=FLAGS.tuning_search_space,
        experiment_dir=FLAGS.experiment_dir,
        experiment_name=FLAGS.experiment_name or "embedded",
        max_global_steps=FLAGS.max_global_steps,
        eval_every_steps=FLAGS.eval_every_steps,
    )
    jax_cache = None
    if "jax" in settings.frameworks and not FLAGS.dry_run:
        jax_cache = settings.root / "jax_compilation_cache"
        use_jax_compilation_cache(jax_cache)
    outcome = run_embedded_suite(
        settings,
        repo_root=FLAGS.repo_root,
        dry_run=FLAGS.dry_run,
        resume=not FLAGS.overwrite,
        show_evals=FLAGS.show_evals,
        workers=FLAGS.workers,
        jax_cache_dir=jax_cache,
    )
    return 1 if "failed" in outcome.statuses else 0


def _algoperf_settings() -> RunSettings:
    if FLAGS.framework not in ("pytorch", "jax"):
        raise RunnerError(
            f"--framework={FLAGS.framework!r}; the algoperf suite needs pytorch or jax"
        )
    submissions = _split(FLAGS.submission or "nadamw")
    if len(submissions) != 1:
        raise RunnerError(f"--submission={FLAGS.submission!r}; the algoperf suite takes one")
    averaging = None
    if FLAGS["averaging"].present:
        modes = _split(FLAGS.averaging)
        if len(modes) != 1:
            raise RunnerError(
                f"--averaging={FLAGS.averaging!r}; the algoperf suite runs one averaging mode "
                "per experiment (its search space), so give one"
            )
        averaging = modes[0]
    settings = RunSettings(
        framework=FLAGS.framework,
        submission=submissions[0],
        data_dir=FLAGS.data_dir,
        experiment_dir=FLAGS.experiment_dir,
        experiment_name=FLAGS.experiment_name,
        tuning_search_space=FLAGS.tuning_search_space,
        tuning_ruleset=FLAGS.tuning_ruleset,
        num_tuning_trials=FLAGS.num_tuning_trials,
        num_studies=FLAGS.num_studies,
        averaging=averaging,
        rng_seed=FLAGS.rng_seed,
        max_global_steps=FLAGS.max_global_steps,
        launcher=FLAGS.launcher,
        nproc_per_node=FLAGS.nproc_per_node,
        nnodes=FLAGS.nnodes,
        rdzv_endpoint=FLAGS.rdzv_endpoint,
        rdzv_backend=FLAGS.rdzv_backend,
        docker_image=FLAGS.docker_image,
        python=sys.executable if FLAGS.launcher == "python" else "python",
        num_accelerators=FLAGS.num_accelerators,
        accelerator_type=FLAGS.accelerator_type,
    )
    return finalize_settings(settings, find_repo_root(FLAGS.repo_root))


def _default_accelerators(settings: RunSettings) -> int:
    """PyTorch under plain python uses one GPU; JAX and torchrun use the whole node."""
    if settings.framework == "pytorch" and settings.launcher == "python":
        return 1
    return (settings.nproc_per_node or settings.num_accelerators) * (settings.nnodes or 1)


def run_algoperf() -> int:
    settings = _algoperf_settings()
    if FLAGS.smoke:
        from polyak.runner.smoke import run_smoke

        results = run_smoke(
            FLAGS.workloads,
            settings.framework,
            settings.submission,
            repo_root=FLAGS.repo_root,
            tuning_search_space=settings.tuning_search_space,
            tuning_ruleset=settings.tuning_ruleset,
            steps=FLAGS.smoke_steps,
        )
        return 0 if all(r.ok for r in results) else 1
    from polyak.runner.launch import run_algoperf_suite

    outcomes = run_algoperf_suite(
        FLAGS.workloads,
        settings,
        repo_root=FLAGS.repo_root,
        dry_run=FLAGS.dry_run,
        overwrite=FLAGS.overwrite,
    )
    if FLAGS.report and not FLAGS.dry_run:
        from polyak.runner.report import build_report
        from polyak.runner.results import load_results

        root = settings.with_absolute_paths()
        experiment = f"{root.experiment_dir}/{root.experiment_name}"
        trials = load_results(experiment)
        if trials:
            num = _default_accelerators(settings)
            files = build_report(
                trials,
                f"{experiment}/report",
                title=f"AlgoPerf: {settings.experiment_name}",
                num_accelerators=num,
                accelerator_type=settings.accelerator_type,
            )
            print(f"report: {files.markdown}")
        else:
            print(f"no eval_measurements.csv under {experiment} yet; no report written")
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        return run_algoperf() if FLAGS.suite == "algoperf" else run_embedded()
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    app.run(main)
