"""The Dockerfile and the docker launcher agree (no Docker engine needed).

Checked: every COPY source exists and is not excluded by .dockerignore, the
working directory is where the launcher expects the repository, the entrypoint
runs our runner's AlgoPerf suite, AlgoPerf is pinned to the same commit as
pyproject.toml, the docker launcher's command equals the canonical README
example, and the README (the lead's file) shows that example once it has one.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
from pathlib import Path

import pytest

from polyak.runner import commands
from polyak.runner.errors import ALGOPERF_COMMIT

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
LEAD_FILES = {"README.md"}  # written by the lead; checked once they exist


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def copy_sources() -> list[str]:
    sources = []
    for keyword, rest in instructions():
        if keyword == "COPY":
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            sources += parts[:-1]
    return sources


def test_every_copy_source_exists_and_is_not_ignored():
    sources = copy_sources()
    assert {"pyproject.toml", "src", "submissions", "tuning_search_spaces", "scripts"} <= set(
        sources
    )
    ignored = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for source in sources:
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), source
    missing = [s for s in sources if not (REPO / s).exists()]
    if set(missing) <= LEAD_FILES and missing:
        pytest.skip(f"not written yet by the lead: {missing}")
    assert missing == []


# AlgoPerf's own docker/Dockerfile at the pinned commit builds FROM this image.
ALGOPERF_CUDA_IMAGE = "nvidia/cuda:12.9.0-cudnn-devel-ubuntu20.04"


def test_workdir_entrypoint_and_pins():
    found = dict(instructions())
    assert found["WORKDIR"] == commands.CONTAINER_REPO_ROOT
    assert json.loads(found["ENTRYPOINT"]) == ["python", "docker/entrypoint.py"]
    assert (REPO / "docker" / "entrypoint.py").is_file()
    assert found["FROM"].startswith("${CUDA_IMAGE}")
    args = [rest for keyword, rest in instructions() if keyword == "ARG"]
    assert f"CUDA_IMAGE={ALGOPERF_CUDA_IMAGE}" in args
    assert f"ALGOPERF_COMMIT={ALGOPERF_COMMIT}" in args
    assert "python3.11" in DOCKERFILE.read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f"algorithmic-efficiency.git@{ALGOPERF_COMMIT}" in pyproject
    # The GPU extras AlgoPerf's own Dockerfile installs for each framework.
    text = DOCKERFILE.read_text()
    assert "algoperf[pytorch_gpu,jax_cpu,full]" in text
    assert "algoperf[pytorch_cpu,full]" in text and "algoperf[jax_gpu]" in text
    # Data, experiments and logs go where startup.sh (and the launcher) put them.
    for folder in (
        commands.CONTAINER_DATA_DIR,
        commands.CONTAINER_EXPERIMENT_DIR,
        commands.CONTAINER_LOGS_DIR,
    ):
        assert folder in text


# The README example, written out from startup.sh's flags: dataset, framework,
# submission path, workload, experiment name (study 0 of the study_<k> layout),
# search space, overwrite false (resume), ruleset, 5 trials, the study's seed, and
# polyak's --nproc_per_node for the 4 accelerators of the current rules.
EXPECTED_EXAMPLE = [
    "docker",
    "run",
    "--rm",
    "--gpus=all",
    "--ipc=host",
    "-v",
    "$HOME/data:/data",
    "-v",
    "$HOME/experiment_runs:/experiment_runs",
    "-v",
    "$HOME/experiment_runs/logs:/logs",
    "polyak:pytorch",
    *("-d", "ogbg", "-f", "pytorch", "-s", "submissions/nadamw/pytorch/submission.py"),
    *("-w", "ogbg", "-e", "nadamw_nadamw_lawa/study_0"),
    *("-t", "tuning_search_spaces/nadamw_lawa.json", "-o", "false"),
    *("--tuning_ruleset", "external", "--num_tuning_trials", "5"),
    *("--rng_seed", str(commands.study_seed(1234, 0, "ogbg")), "--nproc_per_node", "4"),
]


def test_docker_launcher_matches_the_canonical_example(tmp_path):
    assert commands.docker_example_argv() == EXPECTED_EXAMPLE
    build, run = commands.docker_example_command().splitlines()
    assert build == "docker build -t polyak:pytorch --build-arg framework=pytorch ."
    assert shlex.split(run.replace("$HOME", "HOME")) == [
        arg.replace("$HOME", "HOME") for arg in EXPECTED_EXAMPLE
    ]
    # The launcher builds the same command for the same settings (in a checkout with
    # five trial points, so nothing is clipped).
    repo = tmp_path / "repo"
    (repo / "submissions" / "nadamw" / "pytorch").mkdir(parents=True)
    (repo / "submissions" / "nadamw" / "pytorch" / "submission.py").write_text("# stub\n")
    (repo / "tuning_search_spaces").mkdir()
    (repo / "tuning_search_spaces" / "nadamw_lawa.json").write_text(
        json.dumps([{"learning_rate": 0.001 * k, "averaging": "lawa"} for k in range(1, 6)])
    )
    plan = commands.build_plan(
        "ogbg",
        commands.EXAMPLE_SETTINGS,
        repo,
        resume=True,
        study=0,
        rng_seed=commands.study_seed(1234, 0, "ogbg"),
    )
    assert list(plan.argv) == EXPECTED_EXAMPLE


def _container_command(argv: list[str], tmp_path: Path, nproc: int = 4) -> list[str]:
    """What the image's entrypoint runs for startup.sh-style arguments."""
    from polyak.runner import docker_entry

    repo = tmp_path / "image_repo"
    for framework in ("pytorch", "jax"):
        folder = repo / "submissions" / "nadamw" / framework
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "submission.py").write_text("# stub\n")
    args = docker_entry.parse_startup_args(argv)
    command, _ = docker_entry.submission_runner_command(args, repo_root=repo, nproc=nproc)
    return command


def test_entrypoint_runs_what_startup_sh_runs(tmp_path):
    # The flags AlgoPerf's scoring/utils/run_workloads.py gives an image, for a JAX run.
    algoperf_style = [
        "-d",
        "imagenet",
        "-f",
        "jax",
        "-s",
        "submissions/nadamw/jax/submission.py",
        "-w",
        "imagenet_vit",
        "-e",
        "my_experiment/study_1",
        "-m",
        "100",
        "--num_tuning_trials",
        "5",
        "--rng_seed",
        "42",
        "-c",
        "false",
        "-o",
        "true",
        "-i",
        "true",
        "--tuning_ruleset",
        "external",
        "-t",
        "tuning_search_spaces/nadamw.json",
        "--hparam_start_index",
        "2",
    ]
    assert _container_command(algoperf_style, tmp_path) == [
        "python",
        "-m",
        "submission_runner",
        "--framework=jax",
        "--workload=imagenet_vit",
        "--submission_path=submissions/nadamw/jax/submission.py",
        "--data_dir=/data/imagenet/jax",
        "--experiment_dir=/experiment_runs",
        "--experiment_name=my_experiment/study_1",
        "--save_checkpoints=false",
        "--overwrite=true",
        "--rng_seed=42",
        "--max_global_steps=100",
        "--imagenet_v2_data_dir=/data/imagenet/jax",
        "--tuning_ruleset=external",
        "--tuning_search_space=tuning_search_spaces/nadamw.json",
        "--num_tuning_trials=5",
        "--hparam_start_index=2",
    ]
    # PyTorch: torchrun over the node's GPUs, torch.compile as startup.sh does, and a
    # rerun without -o true resumes instead of waiting for keyboard input.
    command = _container_command(
        [
            "-d",
            "librispeech",
            "-f",
            "pytorch",
            "-s",
            "nadamw",
            "-w",
            "librispeech_conformer",
            "-e",
            "e/study_0",
            "--tuning_ruleset",
            "self",
        ],
        tmp_path,
        nproc=4,
    )
    assert command[:6] == [
        "torchrun",
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=4",
        "-m",
        "submission_runner",
    ]
    assert "--resume_last_run" in command and "--torch_compile=true" in command
    assert "--librispeech_tokenizer_vocab_path=/data/librispeech/spm_model.vocab" in command
    assert "--submission_path=submissions/nadamw/pytorch/submission.py" in command
    assert not any(a.startswith("--tuning_search_space") for a in command)


def test_entrypoint_tells_apart_the_two_flag_styles_and_names_bad_values(tmp_path):
    from polyak.runner import docker_entry
    from polyak.runner.errors import LaunchConfigError

    assert docker_entry.is_startup_invocation(["-d", "ogbg"])
    assert docker_entry.is_startup_invocation(["--dataset=ogbg"])
    assert not docker_entry.is_startup_invocation(["--workloads=ogbg", "--framework=jax"])
    cases = {
        "-d ogbg -f tensorflow -s nadamw -w ogbg -e x": "-f/--framework='tensorflow'",
        "-d wmt -f jax -s nadamw -w ogbg -e x -t t.json": "reads the 'ogbg' dataset, not 'wmt'",
        "-d ogbg -f jax -s nadamw -w ogbg -e x": "needs -t/--tuning_search_space",
        "-d ogbg -f jax -s nope.py -w ogbg -e x -t t.json": "--submission_path='nope.py'",
        "-d ogbg -f jax -w ogbg -e x": "missing startup.sh flag(s): -s/--submission_path",
        "-d ogbg -f jax -s nadamw -w ogbg -e x -o maybe": "--overwrite='maybe'",
        "-q 1": "unknown startup.sh flag '-q'",
    }
    for text, message in cases.items():
        with pytest.raises(LaunchConfigError) as info:
            _container_command(text.split(), tmp_path)
        assert message in str(info.value), text


def _normalise(text: str) -> str:
    return " ".join(text.replace("\\\n", " ").split())


def test_readme_shows_the_canonical_docker_lines():
    readme = REPO / "README.md"
    if not readme.is_file() or "docker run" not in readme.read_text():
        pytest.skip(
            "README.md has no docker example yet (the lead pastes docker_example_command())"
        )
    text = _normalise(readme.read_text())
    for line in commands.docker_example_command().splitlines():
        assert _normalise(line) in text, line


def test_entrypoint_runs_submission_runner_and_keeps_a_log(tmp_path, monkeypatch):
    """The whole startup path, with a stand-in submission_runner module that records its
    arguments: JAX runs it under python from the checkout, output goes to the log."""
    from polyak.runner import docker_entry

    repo = tmp_path / "image_repo"
    (repo / "submissions" / "nadamw" / "jax").mkdir(parents=True)
    (repo / "submissions" / "nadamw" / "jax" / "submission.py").write_text("# stub\n")
    fake_site = tmp_path / "site"
    fake_site.mkdir()
    record = tmp_path / "argv.json"
    (fake_site / "submission_runner.py").write_text(
        "import json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'cwd': os.getcwd()}}, open({str(record)!r}, 'w'))\n"
        "print('I0101 submission_runner.py:1] Final ogbg score: 12.5')\n"
    )
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(fake_site), os.environ.get("PYTHONPATH", "")])
    )
    home = tmp_path / "home"
    code = docker_entry.main(
        [
            *("-d", "ogbg", "-f", "jax", "-s", "nadamw", "-w", "ogbg", "-e", "exp/study_0"),
            *("--tuning_ruleset", "self", "-h", str(home), "--rng_seed", "3"),
        ],
        repo_root=repo,
    )
    assert code == 0
    ran = json.loads(record.read_text())
    assert ran["cwd"] == str(repo)
    assert "--data_dir=" + f"{home}/data/ogbg" in ran["argv"]
    assert "--experiment_dir=" + f"{home}/experiment_runs" in ran["argv"]
    assert "--resume_last_run" in ran["argv"] and "--rng_seed=3" in ran["argv"]
    (log,) = (home / "logs").glob("ogbg_jax_*.log")
    assert "Final ogbg score: 12.5" in log.read_text()
