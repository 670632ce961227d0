"""The image's entrypoint: AlgoPerf's ``startup.sh`` flags, or polyak's runner flags.

AlgoPerf drives its images through ``docker/scripts/startup.sh`` (its scoring
script ``scoring/utils/run_workloads.py`` builds exactly those flags): ``-d``
dataset, ``-f`` framework, ``-s`` submission path, ``-w`` workload, ``-e``
experiment name, ``-t`` search space, ``-m`` max global steps, ``-o`` overwrite,
``-c`` save checkpoints, ``-a`` keep alive, ``-h`` home dir, and the long flags
``--tuning_ruleset``, ``--num_tuning_trials``, ``--hparam_start_index``,
``--hparam_end_index``, ``--rng_seed``, ``--additional_requirements_path``. Data is
read from ``<home>/data/<dataset>`` (ImageNet: ``/<framework>`` below it),
results go to ``<home>/experiment_runs`` and the log to ``<home>/logs``, with an
empty home dir by default, as there.

Given those flags, this entrypoint runs AlgoPerf's ``submission_runner`` the way
``startup.sh`` does (``torchrun`` over the node's GPUs for PyTorch, with
``--torch_compile=true``; plain ``python`` for JAX), except that it resumes
instead of waiting for keyboard input when the experiment folder exists and
``-o`` is not true. polyak adds ``--nproc_per_node`` (default: the GPUs
``nvidia-smi`` lists) and the multi-node ``--nnodes``/``--rdzv_endpoint``/
``--rdzv_backend``. AlgoPerf's internal mode (``-i true``, which its scoring script
passes) syncs data and logs with its cloud buckets; this image has no bucket
access, so it says so and reads the mounted data instead.

Anything else is handed to polyak's runner: ``scripts/run_workloads.py
--suite=algoperf <flags>``.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from polyak.algoperf.submission_api import SUBMISSIONS
from polyak.runner.commands import DATASET_OF_WORKLOAD, RUNNER_MODULE, torchrun_prefix
from polyak.runner.errors import LaunchConfigError

# startup.sh's short flags and their long names.
SHORT_FLAGS: dict[str, str] = {
    "-d": "--dataset",
    "-f": "--framework",
    "-s": "--submission_path",
    "-t": "--tuning_search_space",
    "-e": "--experiment_name",
    "-w": "--workload",
    "-a": "--keep_container_alive",
    "-m": "--max_global_steps",
    "-o": "--overwrite",
    "-c": "--save_checkpoints",
    "-r": "--rsync_data",
    "-i": "--internal_contributor",
    "-h": "--home_dir",
}
LONG_FLAGS: frozenset[str] = frozenset(
    {
        *SHORT_FLAGS.values(),
        "--tuning_ruleset",
        "--num_tuning_trials",
        "--hparam_start_index",
        "--hparam_end_index",
        "--rng_seed",
        "--traindiffs_test",
        "--additional_requirements_path",
        "--data_bucket",
        "--logs_bucket",
        # polyak's extensions
        "--nproc_per_node",
        "--nnodes",
        "--rdzv_endpoint",
        "--rdzv_backend",
    }
)
VALID_DATASETS = frozenset(DATASET_OF_WORKLOAD.values()) | {"mnist"}
REPO_ROOT_IN_IMAGE = Path("/workspace/polyak")


@dataclasses.dataclass(frozen=True)
class StartupArgs:
    """startup.sh's options with its defaults (overwrite false, checkpoints true)."""

    values: dict[str, str]

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.values.get(name, default)

    def flag(self, name: str, default: bool) -> bool:
        value = self.values.get(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered not in ("true", "false"):
            raise LaunchConfigError(f"{name}={value!r}; expected true or false")
        return lowered == "true"


def is_startup_invocation(argv: Sequence[str]) -> bool:
    """True when the arguments are startup.sh's (the first one is one of its flags)."""
    return bool(argv) and (argv[0] in SHORT_FLAGS or argv[0].split("=", 1)[0] in LONG_FLAGS)


def parse_startup_args(argv: Sequence[str]) -> StartupArgs:
    """``-d ogbg --framework=jax ...`` into long names; every flag takes one value."""
    values: dict[str, str] = {}
    items = list(argv)
    index = 0
    while index < len(items):
        token = items[index]
        name, equals, inline = token.partition("=")
        name = SHORT_FLAGS.get(name, name)
        if name not in LONG_FLAGS:
            raise LaunchConfigError(
                f"unknown startup.sh flag {token!r}; expected one of "
                f"{', '.join(sorted(SHORT_FLAGS))} or {', '.join(sorted(LONG_FLAGS))}"
            )
        if equals:
            value = inline
        else:
            index += 1
            if index >= len(items):
                raise LaunchConfigError(f"flag {token!r} needs a value")
            value = items[index]
        values[name] = value
        index += 1
    return StartupArgs(values)


def count_gpus() -> int:
    """GPUs ``nvidia-smi -L`` lists (1 when there is no nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return 1
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 1
    return max(1, sum(1 for line in listing.splitlines() if line.startswith("GPU ")))


def _submission_path(given: str, framework: str, repo_root: Path) -> str:
    if given in SUBMISSIONS:
        return f"submissions/{given}/{framework}/submission.py"
    path = Path(given)
    if path.is_absolute():
        try:
            path = path.relative_to(repo_root)
        except ValueError:
            raise LaunchConfigError(
                f"--submission_path={given!r} lies outside {repo_root}; AlgoPerf imports it "
                "as a module relative to that folder"
            ) from None
    if not (repo_root / path).is_file():
        raise LaunchConfigError(
            f"--submission_path={given!r}: {repo_root / path} does not exist (names: "
            f"{', '.join(SUBMISSIONS)}, or a path relative to {repo_root})"
        )
    return path.as_posix()


def submission_runner_command(
    args: StartupArgs, *, repo_root: Path, nproc: int | None = None, python: str = "python"
) -> tuple[list[str], Path]:
    """The command startup.sh would run for these flags, and its log file."""
    if args.flag("--traindiffs_test", False):
        raise LaunchConfigError("--traindiffs_test is AlgoPerf's own test; polyak's image has none")
    missing = [
        f"{short}/{long}"
        for short, long in SHORT_FLAGS.items()
        if long
        in ("--dataset", "--framework", "--submission_path", "--workload", "--experiment_name")
        and args.get(long) is None
    ]
    if missing:
        raise LaunchConfigError(f"missing startup.sh flag(s): {', '.join(missing)}")
    framework = str(args.get("--framework"))
    if framework not in ("jax", "pytorch"):
        raise LaunchConfigError(f"-f/--framework={framework!r}; expected jax or pytorch")
    dataset, workload = str(args.get("--dataset")), str(args.get("--workload"))
    if dataset not in VALID_DATASETS:
        raise LaunchConfigError(
            f"-d/--dataset={dataset!r}; expected one of {', '.join(sorted(VALID_DATASETS))}"
        )
    expected_dataset = DATASET_OF_WORKLOAD.get(workload)
    if expected_dataset is not None and expected_dataset != dataset:
        raise LaunchConfigError(
            f"-w/--workload={workload!r} reads the {expected_dataset!r} dataset, not {dataset!r}"
        )
    ruleset = str(args.get("--tuning_ruleset", "external"))
    if ruleset not in ("external", "self"):
        raise LaunchConfigError(f"--tuning_ruleset={ruleset!r}; expected external or self")
    home = str(args.get("--home_dir", ""))
    data_dir = f"{home}/data/{dataset}" + (f"/{framework}" if dataset == "imagenet" else "")
    experiment_dir = f"{home}/experiment_runs"
    experiment_name = str(args.get("--experiment_name"))
    stamp = datetime.datetime.now().strftime("%m-%d-%Y-%H-%M-%S")
    log_file = Path(f"{home}/logs/{workload}_{framework}_{stamp}.log")

    if framework == "pytorch":
        count = nproc or int(args.get("--nproc_per_node") or 0) or count_gpus()
        prefix = torchrun_prefix(
            count,
            args.get("--nnodes"),
            args.get("--rdzv_backend"),
            args.get("--rdzv_endpoint"),
        )
    else:
        prefix = [python, "-m", RUNNER_MODULE]
    overwrite = args.flag("--overwrite", False)
    submission = _submission_path(str(args.get("--submission_path")), framework, repo_root)
    command = [
        *prefix,
        f"--framework={framework}",
        f"--workload={workload}",
        f"--submission_path={submission}",
        f"--data_dir={data_dir}",
        f"--experiment_dir={experiment_dir}",
        f"--experiment_name={experiment_name}",
        f"--save_checkpoints={str(args.flag('--save_checkpoints', True)).lower()}",
        # startup.sh passes --overwrite=false, and submission_runner then waits for
        # keyboard input on an existing folder; resuming is what a rerun means here.
        "--overwrite=true" if overwrite else "--resume_last_run",
    ]
    if args.get("--rng_seed") is not None:
        command.append(f"--rng_seed={args.get('--rng_seed')}")
    if args.get("--max_global_steps") is not None:
        command.append(f"--max_global_steps={args.get('--max_global_steps')}")
    if dataset == "imagenet":
        command.append(f"--imagenet_v2_data_dir={data_dir}")
    elif dataset == "librispeech":
        command.append(f"--librispeech_tokenizer_vocab_path={data_dir}/spm_model.vocab")
    if framework == "pytorch":
        command.append("--torch_compile=true")
    command.append(f"--tuning_ruleset={ruleset}")
    if ruleset == "external":
        space = args.get("--tuning_search_space")
        if space is None:
            raise LaunchConfigError("--tuning_ruleset=external needs -t/--tuning_search_space")
        command.append(f"--tuning_search_space={space}")
        for name in ("--num_tuning_trials", "--hparam_start_index", "--hparam_end_index"):
            if args.get(name) is not None:
                command.append(f"{name}={args.get(name)}")
    return command, log_file


def run_startup(argv: Sequence[str], repo_root: Path = REPO_ROOT_IN_IMAGE) -> int:
    args = parse_startup_args(argv)
    if args.flag("--internal_contributor", False):
        print(
            "note: -i/--internal_contributor=true: polyak's image has no access to AlgoPerf's "
            "cloud buckets; reading the data mounted at <home>/data and keeping logs local",
            flush=True,
        )
    requirements = args.get("--additional_requirements_path")
    if requirements:
        subprocess.run([sys.executable, "-m", "pip", "install", "-r", requirements], check=True)
    command, log_file = submission_runner_command(args, repo_root=repo_root, python=sys.executable)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    print(shlex.join(command), flush=True)
    with log_file.open("a", encoding="utf-8") as log:
        log.write(shlex.join(command) + "\n")
        process = subprocess.Popen(
            command,
            cwd=repo_root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
        code = process.wait()
    print(f"Exiting with {code}", flush=True)
    if args.flag("--keep_container_alive", False):
        while True:  # AlgoPerf's debugging mode: keep the container for `docker exec`
            time.sleep(1000)
    return code


def main(argv: Sequence[str], repo_root: Path = REPO_ROOT_IN_IMAGE) -> int:
    if is_startup_invocation(argv):
        try:
            return run_startup(argv, repo_root)
        except LaunchConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    script = repo_root / "scripts" / "run_workloads.py"
    os.execv(sys.executable, [sys.executable, str(script), "--suite=algoperf", *argv])
    return 0  # not reached
