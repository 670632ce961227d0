"""Launch plans: the exact command lines that run AlgoPerf's ``submission_runner``.

One plan per (study, workload), in AlgoPerf's scoring layout
``<experiment_dir>/<experiment_name>/study_<k>/<workload>_<framework>/trial_<j>/``
(the name given to ``submission_runner`` is ``<experiment_name>/study_<k>``), with
one seed per study and workload derived from the experiment's seed. Three launchers:

- ``python``: ``python -m submission_runner <flags>`` (one device, or JAX on all GPUs);
- ``torchrun``: ``torchrun --standalone --nnodes=1 --nproc_per_node=N -m submission_runner
  <flags>`` for PyTorch DDP; with ``--rdzv_endpoint`` (multi-node) ``--standalone`` is replaced
  by ``--nnodes=K --nproc_per_node=N --rdzv_backend=B --rdzv_endpoint=HOST:PORT``;
- ``docker``: ``docker run`` of our image with the flags of AlgoPerf's own
  ``docker/scripts/startup.sh`` (``-d/-f/-s/-w/-e/-t/-m/-o`` ...), which the image's
  entrypoint understands, so AlgoPerf's ``scoring/utils/run_workloads.py`` drives it too.

Rules that keep AlgoPerf from tripping:

- ``submission_runner`` is started as a module (algoperf installs it as the top-level module
  ``submission_runner``) from the repository root, so the relative ``--submission_path``
  (``submissions/nadamw/pytorch/submission.py``) is importable as a dotted module;
- ``--overwrite`` or ``--resume_last_run`` is always passed, so the runner never stops to
  ask on the keyboard whether to reuse an existing experiment directory;
- ``--data_dir`` is the dataset's folder in AlgoPerf's layout (``<root>/ogbg``,
  ``<root>/imagenet/<framework>``, ...), plus ``--imagenet_v2_data_dir`` for ImageNet and
  ``--librispeech_tokenizer_vocab_path`` for LibriSpeech, as AlgoPerf's docker script does;
- ``--experiment_dir`` and ``--data_dir`` are absolute paths.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from polyak.algoperf.submission_api import RULESETS, SUBMISSIONS
from polyak.averaging.config import MODES, TORCH_ONLY_MODES
from polyak.runner.errors import (
    LaunchConfigError,
    RunnerError,
    SearchSpaceError,
    UnknownSubmissionError,
)
from polyak.runner.search_space import SearchSpace, load_search_space
from polyak.runner.workload_table import (
    DEFAULT_ACCELERATOR_TYPE,
    DEFAULT_NUM_ACCELERATORS,
    FRAMEWORKS,
    known_workloads,
)

LAUNCHERS: tuple[str, ...] = ("python", "torchrun", "docker")
RUNNER_MODULE = "submission_runner"
# The leaderboard's rules: 3 studies per workload; 5 trials per study under external
# tuning, 1 under self-tuning (AlgoPerf's scoring/utils/run_workloads.py defaults).
DEFAULT_NUM_STUDIES = 3
DEFAULT_NUM_TRIALS: dict[str, int] = {"external": 5, "self": 1}
DEFAULT_RDZV_BACKEND = "c10d"
SEED_RANGE = 2**31 - 1

# Paths inside our docker image (see Dockerfile), as AlgoPerf's startup.sh lays them
# out with an empty --home_dir.
CONTAINER_REPO_ROOT = "/workspace/polyak"
CONTAINER_DATA_DIR = "/data"
CONTAINER_EXPERIMENT_DIR = "/experiment_runs"
CONTAINER_LOGS_DIR = "/logs"
CONTAINER_SEARCH_SPACE_DIR = "/search_spaces"

# AlgoPerf's dataset folder for each workload (datasets/README.md, docker/scripts/startup.sh).
DATASET_OF_WORKLOAD: dict[str, str] = {
    "criteo1tb": "criteo1tb",
    "fastmri": "fastmri",
    "imagenet_resnet": "imagenet",
    "imagenet_vit": "imagenet",
    "librispeech_conformer": "librispeech",
    "librispeech_deepspeech": "librispeech",
    "ogbg": "ogbg",
    "wmt": "wmt",
    "finewebedu_lm": "finewebedu",
}


def find_repo_root(start: str | Path | None = None) -> Path:
    """The polyak checkout: the first of ``start`` (or cwd) and this file's checkout that
    holds ``submissions/`` and ``tuning_search_spaces/``."""
    candidates = [Path(start) if start is not None else Path.cwd()]
    candidates.append(Path(__file__).resolve().parents[3])
    for candidate in candidates:
        candidate = candidate.resolve()
        if (candidate / "submissions").is_dir() and (candidate / "tuning_search_spaces").is_dir():
            return candidate
    raise RunnerError(
        "cannot find the polyak checkout (a directory with submissions/ and "
        f"tuning_search_spaces/); looked in {', '.join(str(c) for c in candidates)}. "
        "Run from the repository root."
    )


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Everything the user chose for an AlgoPerf-suite run (one framework)."""

    framework: str
    submission: str = "nadamw"
    data_dir: str = "~/data"
    experiment_dir: str = "~/experiment_runs"
    # None: "<submission>_<search space>" (see default_experiment_name).
    experiment_name: str | None = None
    tuning_search_space: str | None = None
    tuning_ruleset: str = "external"
    # None: the leaderboard's 5 (external) or 1 (self).
    num_tuning_trials: int | None = None
    num_studies: int = DEFAULT_NUM_STUDIES
    # Picks tuning_search_spaces/<submission>_<averaging>.json (or checks the given one).
    averaging: str | None = None
    rng_seed: int | None = None
    max_global_steps: int | None = None
    launcher: str = "python"
    nproc_per_node: int | None = None
    nnodes: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_backend: str | None = None
    docker_image: str | None = None
    python: str = "python"
    num_accelerators: int = DEFAULT_NUM_ACCELERATORS
    accelerator_type: str = DEFAULT_ACCELERATOR_TYPE

    def __post_init__(self) -> None:
        if self.framework not in FRAMEWORKS:
            raise LaunchConfigError(
                f"framework={self.framework!r}; expected one of {', '.join(FRAMEWORKS)}"
            )
        if self.launcher not in LAUNCHERS:
            raise LaunchConfigError(
                f"launcher={self.launcher!r}; expected one of {', '.join(LAUNCHERS)}"
            )
        if self.tuning_ruleset not in RULESETS:
            raise LaunchConfigError(
                f"tuning_ruleset={self.tuning_ruleset!r}; expected one of {RULESETS}"
            )
        if self.experiment_name is not None and (
            not self.experiment_name or self.experiment_name.startswith(("/", ".."))
        ):
            raise LaunchConfigError(
                f"experiment_name={self.experiment_name!r}; expected a relative, non-empty name"
            )
        if self.averaging is not None:
            if self.averaging not in MODES:
                raise LaunchConfigError(
                    f"averaging={self.averaging!r}; expected one of {', '.join(MODES)}"
                )
            if self.averaging in TORCH_ONLY_MODES and self.framework != "pytorch":
                raise LaunchConfigError(
                    f"averaging={self.averaging!r} is implemented for PyTorch only, and "
                    f"framework={self.framework!r} would run nothing; use --framework=pytorch"
                )
            if self.tuning_ruleset == "self" and self.averaging != "none":
                raise LaunchConfigError(
                    f"averaging={self.averaging!r} with the self-tuning ruleset: the "
                    "submission runs its documented defaults and gets no hyperparameters, so "
                    "the mode would be ignored; export a self-tuning submission with it "
                    "(scripts/export_submission.py --ruleset=self --averaging=...)"
                )
        for name in (
            "num_tuning_trials",
            "num_studies",
            "nproc_per_node",
            "nnodes",
            "max_global_steps",
            "num_accelerators",
        ):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise LaunchConfigError(f"{name}={value!r}; expected an integer >= 1")
        if self.launcher == "torchrun" and self.framework == "jax":
            raise LaunchConfigError(
                "launcher=torchrun with framework=jax: AlgoPerf runs JAX under plain python "
                "(one process drives all local GPUs); use --launcher=python"
            )
        if self.is_multi_node and not self.rdzv_endpoint:
            raise LaunchConfigError(
                f"nnodes={self.nnodes} needs --rdzv_endpoint=HOST:PORT (the rendezvous host)"
            )

    @property
    def requested_trials(self) -> int:
        """--num_tuning_trials, or the leaderboard's count for the ruleset."""
        return self.num_tuning_trials or DEFAULT_NUM_TRIALS[self.tuning_ruleset]

    @property
    def is_multi_node(self) -> bool:
        return bool(self.rdzv_endpoint) or (self.nnodes is not None and self.nnodes > 1)

    def with_absolute_paths(self) -> RunSettings:
        """Data and experiment directories made absolute, as AlgoPerf requires."""
        return dataclasses.replace(
            self,
            data_dir=os.path.abspath(os.path.expanduser(self.data_dir)),
            experiment_dir=os.path.abspath(os.path.expanduser(self.experiment_dir)),
        )


def _is_importable_path(relative: Path) -> bool:
    parts = relative.with_suffix("").parts
    return bool(parts) and all(part.isidentifier() for part in parts)


def resolve_submission(submission: str, framework: str, repo_root: Path) -> str:
    """The repo-relative ``--submission_path`` for a submission name or file path."""
    if submission in SUBMISSIONS:
        relative = Path("submissions", submission, framework, "submission.py")
        if not (repo_root / relative).is_file():
            raise UnknownSubmissionError(
                f"submission {submission!r} for {framework}: {repo_root / relative} does not exist"
            )
        return relative.as_posix()
    candidate = Path(os.path.expanduser(submission))
    absolute = candidate if candidate.is_absolute() else (repo_root / candidate)
    if not absolute.is_file() or absolute.suffix != ".py":
        raise UnknownSubmissionError(
            f"submission {submission!r} is neither a name ({', '.join(SUBMISSIONS)}) "
            "nor an existing .py file"
        )
    try:
        relative = absolute.resolve().relative_to(repo_root.resolve())
    except ValueError as exc:
        raise UnknownSubmissionError(
            f"submission {submission!r} lies outside {repo_root}; AlgoPerf imports "
            "--submission_path as a module relative to the working directory, so put it "
            "under the repository"
        ) from exc
    if not _is_importable_path(relative):
        raise UnknownSubmissionError(
            f"submission path {relative.as_posix()!r} is not importable as a Python module "
            "(every folder and the file name must be identifiers)"
        )
    return relative.as_posix()


def submission_label(submission: str) -> str:
    """A short name for a submission: the name itself, or the folder above the framework."""
    if submission in SUBMISSIONS:
        return submission
    path = Path(submission)
    if path.parent.name in FRAMEWORKS and path.parent.parent.name:
        return path.parent.parent.name
    return path.stem


def default_search_space(submission: str, averaging: str | None = None) -> str:
    """tuning_search_spaces/<submission>.json, or <submission>_<averaging>.json."""
    suffix = "" if averaging in (None, "none") else f"_{averaging}"
    return f"tuning_search_spaces/{submission_label(submission)}{suffix}.json"


def search_space_averaging(space: SearchSpace) -> set[str]:
    """The averaging modes a search space's points ask for (no key: ``none``)."""
    if space.kind == "points":
        return {str(point.get("averaging", "none")) for point in space.points}
    entry = space.ranges.get("averaging")
    if entry is None:
        return {"none"}
    return {str(v) for v in entry.get("feasible_points", [])} or {"?"}


def default_experiment_name(settings: RunSettings, search_space_arg: str | None) -> str:
    """``<submission>_<search space>``, so runs of two search spaces never share a folder
    (``nadamw_nadamw_lawa``; self-tuning: ``<submission>_self``)."""
    label = submission_label(settings.submission)
    if search_space_arg is None:
        return f"{label}_self"
    return f"{label}_{Path(search_space_arg).stem}"


def study_seed(experiment_seed: int, study: int, workload: str) -> int:
    """The ``--rng_seed`` of one study of one workload: a stable hash of the experiment's
    seed, the study index and the workload (AlgoPerf's scoring script folds the same
    three into a PRNG key), in [1, 2**31 - 1] since AlgoPerf draws a random seed for 0."""
    digest = hashlib.sha256(f"{experiment_seed}:{study}:{workload}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_RANGE + 1


def resolve_search_space(
    settings: RunSettings, repo_root: Path
) -> tuple[str | None, SearchSpace | None]:
    """The ``--tuning_search_space`` argument (repo-relative when inside the repo) and its
    validated contents; ``(None, None)`` for the self-tuning ruleset."""
    if settings.tuning_ruleset == "self":
        if settings.tuning_search_space:
            raise LaunchConfigError(
                "the self-tuning ruleset takes no --tuning_search_space (AlgoPerf rejects it)"
            )
        return None, None
    given = settings.tuning_search_space
    if not given:
        if settings.submission not in SUBMISSIONS:
            raise LaunchConfigError(
                f"submission {settings.submission!r} is a path: pass --tuning_search_space"
            )
        given = default_search_space(settings.submission, settings.averaging)
        if not (repo_root / given).is_file():
            available = sorted(
                p.stem.removeprefix(f"{settings.submission}_")
                for p in (repo_root / "tuning_search_spaces").glob(f"{settings.submission}_*.json")
            )
            raise SearchSpaceError(
                f"no search space for --submission={settings.submission} with "
                f"--averaging={settings.averaging}: {given} does not exist; averaging modes "
                f"with a search space: none, {', '.join(available)}"
            )
    path = Path(os.path.expanduser(given))
    absolute = path if path.is_absolute() else repo_root / path
    space = load_search_space(absolute)
    if settings.averaging is not None:
        modes = search_space_averaging(space)
        if modes != {settings.averaging}:
            raise SearchSpaceError(
                f"--averaging={settings.averaging} but the search space {given} asks for "
                f"averaging {', '.join(sorted(modes))}; the run would be labelled with a mode "
                "it does not use. Drop one of the two flags or make them agree"
            )
    try:
        argument = absolute.resolve().relative_to(repo_root.resolve()).as_posix()
    except ValueError:
        argument = str(absolute.resolve())
    return argument, space


def dataset_flags(workload: str, framework: str, data_root: str) -> list[str]:
    """``--data_dir`` and the workload's extra data flags in AlgoPerf's layout."""
    dataset = DATASET_OF_WORKLOAD[workload]
    data_dir = f"{data_root.rstrip('/')}/{dataset}"
    if dataset == "imagenet":
        data_dir = f"{data_dir}/{framework}"
        return [f"--data_dir={data_dir}", f"--imagenet_v2_data_dir={data_dir}"]
    if dataset == "librispeech":
        return [
            f"--data_dir={data_dir}",
            f"--librispeech_tokenizer_vocab_path={data_dir}/spm_model.vocab",
        ]
    return [f"--data_dir={data_dir}"]


def dataset_dir(workload: str, framework: str, data_root: str) -> str:
    return dataset_flags(workload, framework, data_root)[0].split("=", 1)[1]


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """One workload's command, where to run it, and where its output goes."""

    workload: str
    framework: str
    launcher: str
    argv: tuple[str, ...]
    cwd: Path
    log_path: Path
    workload_dir: Path
    resume: bool
    first_trial: int
    num_trials: int
    study: int = 0
    rng_seed: int | None = None

    def shell(self) -> str:
        return f"cd {shlex.quote(str(self.cwd))} && {shlex.join(self.argv)}"


def submission_runner_flags(
    workload: str,
    settings: RunSettings,
    *,
    submission_path: str,
    search_space_arg: str | None,
    resume: bool,
    num_trials: int | None = None,
    hparam_start_index: int | None = None,
    study: int = 0,
    rng_seed: int | None = None,
) -> list[str]:
    """The flags for AlgoPerf's ``submission_runner`` in a fixed order.

    ``num_trials`` is the trial count AlgoPerf will really run (a list-format search
    space clips ``--num_tuning_trials`` to its length); it defaults to the setting.
    ``rng_seed`` is the study's seed (default: the settings' seed)."""
    flags = [
        f"--framework={settings.framework}",
        f"--workload={workload}",
        f"--submission_path={submission_path}",
        *dataset_flags(workload, settings.framework, settings.data_dir),
        f"--experiment_dir={settings.experiment_dir}",
        f"--experiment_name={study_experiment_name(settings, study)}",
        f"--tuning_ruleset={settings.tuning_ruleset}",
    ]
    if settings.tuning_ruleset == "external":
        flags += [
            f"--tuning_search_space={search_space_arg}",
            f"--num_tuning_trials={num_trials or settings.requested_trials}",
        ]
        if hparam_start_index:
            flags.append(f"--hparam_start_index={hparam_start_index}")
    seed = rng_seed if rng_seed is not None else settings.rng_seed
    if seed is not None:
        flags.append(f"--rng_seed={seed}")
    if settings.max_global_steps is not None:
        flags.append(f"--max_global_steps={settings.max_global_steps}")
    flags.append("--resume_last_run" if resume else "--overwrite")
    return flags


def launcher_prefix(settings: RunSettings) -> list[str]:
    """``python -m submission_runner`` or the torchrun equivalent."""
    if settings.launcher == "python":
        return [settings.python, "-m", RUNNER_MODULE]
    if settings.launcher != "torchrun":
        raise LaunchConfigError(f"launcher {settings.launcher!r} has no local prefix")
    nproc = settings.nproc_per_node or settings.num_accelerators
    endpoint = settings.rdzv_endpoint if settings.is_multi_node else None
    return torchrun_prefix(nproc, settings.nnodes, settings.rdzv_backend, endpoint)


def torchrun_prefix(
    nproc: int | str,
    nnodes: int | str | None,
    rdzv_backend: str | None,
    rdzv_endpoint: str | None,
) -> list[str]:
    """``torchrun ... -m submission_runner``: standalone on one node, else a rendezvous."""
    if rdzv_endpoint:
        prefix = [
            "torchrun",
            f"--nnodes={nnodes or 1}",
            f"--nproc_per_node={nproc}",
            f"--rdzv_backend={rdzv_backend or DEFAULT_RDZV_BACKEND}",
            f"--rdzv_endpoint={rdzv_endpoint}",
        ]
    else:
        prefix = ["torchrun", "--standalone", "--nnodes=1", f"--nproc_per_node={nproc}"]
    return [*prefix, "-m", RUNNER_MODULE]


def docker_image_for(settings: RunSettings) -> str:
    return settings.docker_image or f"polyak:{settings.framework}"


def docker_build_command(framework: str = "pytorch", image: str | None = None) -> list[str]:
    """``docker build`` of our image for one framework (run from the repository root)."""
    if framework not in FRAMEWORKS:
        raise LaunchConfigError(f"framework={framework!r}; expected one of {FRAMEWORKS}")
    return [
        "docker",
        "build",
        "-t",
        image or f"polyak:{framework}",
        "--build-arg",
        f"framework={framework}",
        ".",
    ]


def study_experiment_name(settings: RunSettings, study: int) -> str:
    """What ``submission_runner`` gets as --experiment_name: ``<name>/study_<k>``."""
    if settings.experiment_name is None:
        raise LaunchConfigError("experiment_name is unset; call finalize_settings first")
    return f"{settings.experiment_name}/study_{study}"


def docker_argv(
    workload: str,
    settings: RunSettings,
    *,
    submission_arg: str,
    search_space_arg: str | None,
    search_space_mount: tuple[str, str] | None = None,
    num_trials: int | None = None,
    overwrite: bool = False,
    study: int = 0,
    rng_seed: int | None = None,
    hparam_start_index: int | None = None,
) -> list[str]:
    """``docker run`` of our image for one study of one workload, with the flags of
    AlgoPerf's ``docker/scripts/startup.sh``: ``-d`` dataset, ``-f`` framework, ``-s``
    submission path, ``-w`` workload, ``-e`` experiment name, ``-t`` search space,
    ``-m`` max steps, ``-o`` overwrite (else the container resumes), and the long flags
    ``--tuning_ruleset``, ``--num_tuning_trials``, ``--hparam_start_index``, ``--rng_seed``.
    Data, experiments and logs are mounted where startup.sh expects them."""
    argv = [
        "docker",
        "run",
        "--rm",
        "--gpus=all",
        "--ipc=host",
    ]
    if settings.is_multi_node:
        argv.append("--network=host")
    argv += [
        "-v",
        f"{settings.data_dir}:{CONTAINER_DATA_DIR}",
        "-v",
        f"{settings.experiment_dir}:{CONTAINER_EXPERIMENT_DIR}",
        "-v",
        f"{settings.experiment_dir}/logs:{CONTAINER_LOGS_DIR}",
    ]
    if search_space_mount is not None:
        argv += ["-v", f"{search_space_mount[0]}:{search_space_mount[1]}:ro"]
    argv += [
        docker_image_for(settings),
        "-d",
        DATASET_OF_WORKLOAD[workload],
        "-f",
        settings.framework,
        "-s",
        submission_arg,
        "-w",
        workload,
        "-e",
        study_experiment_name(settings, study),
    ]
    if search_space_arg is not None:
        argv += ["-t", search_space_arg]
    if settings.max_global_steps is not None:
        argv += ["-m", str(settings.max_global_steps)]
    argv += ["-o", "true" if overwrite else "false", "--tuning_ruleset", settings.tuning_ruleset]
    if search_space_arg is not None:
        argv += ["--num_tuning_trials", str(num_trials or settings.requested_trials)]
        if hparam_start_index:
            argv += ["--hparam_start_index", str(hparam_start_index)]
    seed = rng_seed if rng_seed is not None else settings.rng_seed
    if seed is not None:
        argv += ["--rng_seed", str(seed)]
    if settings.framework == "pytorch":
        # polyak's own extension of startup.sh's flags; AlgoPerf's image hard-codes 8.
        argv += ["--nproc_per_node", str(settings.nproc_per_node or settings.num_accelerators)]
        if settings.is_multi_node:
            argv += [
                "--nnodes",
                str(settings.nnodes or 1),
                "--rdzv_endpoint",
                str(settings.rdzv_endpoint),
                "--rdzv_backend",
                settings.rdzv_backend or DEFAULT_RDZV_BACKEND,
            ]
    return argv


def experiment_root(settings: RunSettings) -> Path:
    if settings.experiment_name is None:
        raise LaunchConfigError("experiment_name is unset; call finalize_settings first")
    return Path(settings.experiment_dir) / settings.experiment_name


def logs_dir(settings: RunSettings) -> Path:
    return experiment_root(settings) / "logs"


def workload_output_dir(settings: RunSettings, workload: str, study: int = 0) -> Path:
    """Where AlgoPerf writes ``trial_<k>/`` for this study of this workload."""
    return experiment_root(settings) / f"study_{study}" / f"{workload}_{settings.framework}"


def finalize_settings(settings: RunSettings, repo_root: Path) -> RunSettings:
    """The experiment name defaulted from the submission and the search space it will
    really use."""
    if settings.experiment_name is None:
        search_space_arg, _ = resolve_search_space(settings, repo_root)
        settings = dataclasses.replace(
            settings, experiment_name=default_experiment_name(settings, search_space_arg)
        )
    return settings


def build_plan(
    workload: str,
    settings: RunSettings,
    repo_root: Path,
    *,
    resume: bool,
    first_trial: int = 1,
    overwrite: bool = False,
    study: int = 0,
    rng_seed: int | None = None,
) -> LaunchPlan:
    """The launch plan for one study of one workload. ``first_trial`` (1-based) skips
    finished trials; ``rng_seed`` is the study's seed; ``overwrite`` starts fresh."""
    if workload not in DATASET_OF_WORKLOAD or workload not in known_workloads():
        raise RunnerError(
            f"unknown AlgoPerf workload {workload!r}; choices: {', '.join(known_workloads())}"
        )
    settings = finalize_settings(settings, repo_root)
    search_space_arg, space = resolve_search_space(settings, repo_root)
    num_trials = space.num_trials(settings.requested_trials) if space is not None else 1
    if not 1 <= first_trial <= num_trials:
        raise RunnerError(f"first_trial={first_trial}; expected 1..{num_trials}")
    log_name = f"study_{study}_{workload}_{settings.framework}"
    submission_path = resolve_submission(settings.submission, settings.framework, repo_root)
    if settings.launcher == "docker":
        mount = None
        container_ss = search_space_arg
        if search_space_arg is not None and os.path.isabs(search_space_arg):
            container_ss = f"{CONTAINER_SEARCH_SPACE_DIR}/{Path(search_space_arg).name}"
            mount = (search_space_arg, container_ss)
        argv = docker_argv(
            workload,
            settings,
            submission_arg=submission_path,
            search_space_arg=container_ss,
            search_space_mount=mount,
            num_trials=num_trials,
            overwrite=overwrite or not resume,
            study=study,
            rng_seed=rng_seed,
            hparam_start_index=first_trial - 1,
        )
        log_name += ".docker"
    else:
        argv = [
            *launcher_prefix(settings),
            *submission_runner_flags(
                workload,
                settings,
                submission_path=submission_path,
                search_space_arg=search_space_arg,
                resume=resume,
                num_trials=num_trials,
                hparam_start_index=first_trial - 1,
                study=study,
                rng_seed=rng_seed,
            ),
        ]
    return LaunchPlan(
        workload=workload,
        framework=settings.framework,
        launcher=settings.launcher,
        argv=tuple(argv),
        cwd=repo_root,
        log_path=logs_dir(settings) / f"{log_name}.log",
        workload_dir=workload_output_dir(settings, workload, study),
        resume=resume,
        first_trial=first_trial,
        num_trials=num_trials,
        study=study,
        rng_seed=rng_seed,
    )


_DISPLAY_SAFE = re.compile(r"^[A-Za-z0-9_@%+=:,./${}-]+$")


def display_join(argv: Sequence[str]) -> str:
    """Like ``shlex.join`` but leaves ``$HOME``-style tokens unquoted, for examples."""
    return " ".join(arg if _DISPLAY_SAFE.match(arg) else shlex.quote(arg) for arg in argv)


EXAMPLE_SETTINGS = RunSettings(
    framework="pytorch",
    submission="nadamw",
    data_dir="$HOME/data",
    experiment_dir="$HOME/experiment_runs",
    experiment_name="nadamw_nadamw_lawa",
    tuning_search_space="tuning_search_spaces/nadamw_lawa.json",
    averaging="lawa",
    launcher="docker",
    docker_image="polyak:pytorch",
    rng_seed=1234,
)
EXAMPLE_WORKLOAD = "ogbg"


def docker_example_argv() -> list[str]:
    """The canonical ``docker run`` for the README: NadamW + LAWA, PyTorch, OGBG, study 0
    of 3, 5 trials, on the default 4 accelerators, in AlgoPerf's startup.sh flags."""
    settings = EXAMPLE_SETTINGS
    return docker_argv(
        EXAMPLE_WORKLOAD,
        settings,
        submission_arg="submissions/nadamw/pytorch/submission.py",
        search_space_arg=settings.tuning_search_space,
        study=0,
        rng_seed=study_seed(1234, 0, EXAMPLE_WORKLOAD),
    )


def docker_example_command() -> str:
    """The README's docker lines (build, then run), one command per line."""
    build = display_join(docker_build_command("pytorch", EXAMPLE_SETTINGS.docker_image))
    return build + "\n" + display_join(docker_example_argv())
