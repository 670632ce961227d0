"""Launch plans: the exact AlgoPerf command lines for every workload, framework and launcher.

The expected argv lists are written out here from the rules (DESIGN.md "Runner",
AlgoPerf's submission_runner flags, docker/scripts/startup.sh's flags and data
layout, the study_<k> layout of its scoring scripts), not taken from the code
under test. Seeds: one per study and workload, a hash of the experiment's seed.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from polyak.runner import commands
from polyak.runner.commands import RunSettings, build_plan, study_seed
from polyak.runner.errors import (
    LaunchConfigError,
    SearchSpaceError,
    UnknownSubmissionError,
    UnknownWorkloadError,
)
from polyak.runner.launch import run_algoperf_suite

WORKLOADS = [
    "criteo1tb",
    "fastmri",
    "imagenet_resnet",
    "imagenet_vit",
    "librispeech_conformer",
    "librispeech_deepspeech",
    "ogbg",
    "wmt",
]
# AlgoPerf's data layout: <root>/<dataset>, ImageNet split by framework.
DATASET_FOLDER = {
    "criteo1tb": "criteo1tb",
    "fastmri": "fastmri",
    "imagenet_resnet": "imagenet/{fw}",
    "imagenet_vit": "imagenet/{fw}",
    "librispeech_conformer": "librispeech",
    "librispeech_deepspeech": "librispeech",
    "ogbg": "ogbg",
    "wmt": "wmt",
}
POINTS = [
    {"learning_rate": 0.001, "beta2": 0.999, "warmup_factor": 0.05},
    {"learning_rate": 0.002, "beta2": 0.99, "warmup_factor": 0.1},
    {"learning_rate": 0.003, "beta2": 0.9, "warmup_factor": 0.02},
]


def make_repo(root: Path) -> Path:
    """A minimal polyak checkout: the four submission files and two search spaces."""
    for name in ("nadamw", "shampoo"):
        for framework in ("pytorch", "jax"):
            folder = root / "submissions" / name / framework
            folder.mkdir(parents=True)
            (folder / "submission.py").write_text("# stub\n")
    spaces = root / "tuning_search_spaces"
    spaces.mkdir()
    (spaces / "nadamw.json").write_text(json.dumps(POINTS))
    (spaces / "shampoo.json").write_text(json.dumps(POINTS[:2]))
    return root


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "repo")


def expected_runner_flags(
    workload, framework, data, exp, *, trials=3, resume=False, start=0, study=0
):
    folder = f"{data}/{DATASET_FOLDER[workload].format(fw=framework)}"
    flags = [
        f"--framework={framework}",
        f"--workload={workload}",
        f"--submission_path=submissions/nadamw/{framework}/submission.py",
        f"--data_dir={folder}",
    ]
    if workload.startswith("imagenet"):
        flags.append(f"--imagenet_v2_data_dir={folder}")
    if workload.startswith("librispeech"):
        flags.append(f"--librispeech_tokenizer_vocab_path={folder}/spm_model.vocab")
    flags += [
        f"--experiment_dir={exp}",
        f"--experiment_name=exp_a/study_{study}",
        "--tuning_ruleset=external",
        "--tuning_search_space=tuning_search_spaces/nadamw.json",
        f"--num_tuning_trials={trials}",
    ]
    if start:
        flags.append(f"--hparam_start_index={start}")
    flags += [f"--rng_seed={study_seed(7, study, workload)}", "--max_global_steps=100"]
    flags.append("--resume_last_run" if resume else "--overwrite")
    return flags


def expected_argv(launcher, workload, framework, data, exp):
    if launcher == "python":
        return [
            "python",
            "-m",
            "submission_runner",
            *expected_runner_flags(workload, framework, data, exp),
        ]
    if launcher == "torchrun":
        return [
            "torchrun",
            "--standalone",
            "--nnodes=1",
            "--nproc_per_node=4",
            "-m",
            "submission_runner",
            *expected_runner_flags(workload, framework, data, exp),
        ]
    # startup.sh's flags; the dataset folder name, not the workload's.
    dataset = DATASET_FOLDER[workload].split("/")[0]
    return [
        "docker",
        "run",
        "--rm",
        "--gpus=all",
        "--ipc=host",
        "-v",
        f"{data}:/data",
        "-v",
        f"{exp}:/experiment_runs",
        "-v",
        f"{exp}/logs:/logs",
        f"polyak:{framework}",
        *("-d", dataset, "-f", framework),
        *("-s", f"submissions/nadamw/{framework}/submission.py", "-w", workload),
        *("-e", "exp_a/study_0", "-t", "tuning_search_spaces/nadamw.json"),
        *("-m", "100", "-o", "true", "--tuning_ruleset", "external", "--num_tuning_trials", "3"),
        *("--rng_seed", str(study_seed(7, 0, workload))),
        *(["--nproc_per_node", "4"] if framework == "pytorch" else []),
    ]


def settings_for(launcher, framework, data, exp, **overrides):
    values = dict(
        framework=framework,
        submission="nadamw",
        data_dir=str(data),
        experiment_dir=str(exp),
        experiment_name="exp_a",
        num_studies=1,
        num_tuning_trials=5,  # clipped to the 3 points in the file, as AlgoPerf does
        rng_seed=7,
        max_global_steps=100,
        launcher=launcher,
        nproc_per_node=4,
    )
    values.update(overrides)
    return RunSettings(**values)


def dry_run_commands(lines: list[str]) -> list[tuple[str, list[str]]]:
    """(cwd, argv) of every '  $ cd X && cmd' line printed by a dry run."""
    found = []
    for line in lines:
        if line.startswith("  $ cd "):
            cd_part, command = line[4:].split(" && ", 1)
            found.append((shlex.split(cd_part)[1], shlex.split(command)))
    return found


@pytest.mark.parametrize("launcher", ["python", "torchrun", "docker"])
@pytest.mark.parametrize("framework", ["pytorch", "jax"])
def test_dry_run_prints_exact_commands_for_all_workloads(repo, tmp_path, launcher, framework):
    data, exp = tmp_path / "data", tmp_path / "exp"
    if launcher == "torchrun" and framework == "jax":
        # AlgoPerf runs JAX as one python process per host; torchrun is refused clearly.
        with pytest.raises(LaunchConfigError, match="plain python"):
            settings_for(launcher, framework, data, exp)
        return
    settings = settings_for(launcher, framework, data, exp)
    lines: list[str] = []
    outcomes = run_algoperf_suite("all", settings, repo_root=repo, dry_run=True, out=lines.append)
    assert [o.status for o in outcomes] == ["planned"] * 8
    found = dry_run_commands(lines)
    assert [cwd for cwd, _ in found] == [str(repo.resolve())] * 8
    for workload, (_, argv) in zip(WORKLOADS, found):
        assert argv == expected_argv(launcher, workload, framework, str(data), str(exp))
    # A dry run runs nothing and writes nothing.
    assert not exp.exists()
    assert any("does not exist" in line for line in lines)  # the data warning


def test_multi_node_torchrun_replaces_standalone(repo, tmp_path):
    settings = settings_for(
        "torchrun", "pytorch", tmp_path / "d", tmp_path / "e", nnodes=2, rdzv_endpoint="node0:29500"
    ).with_absolute_paths()
    plan = build_plan("wmt", settings, repo, resume=False)
    assert list(plan.argv[:7]) == [
        "torchrun",
        "--nnodes=2",
        "--nproc_per_node=4",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=node0:29500",
        "-m",
        "submission_runner",
    ]
    settings = settings_for(
        "torchrun",
        "pytorch",
        tmp_path / "d",
        tmp_path / "e",
        nnodes=2,
        rdzv_endpoint="node0:29500",
        rdzv_backend="etcd",
    ).with_absolute_paths()
    assert "--rdzv_backend=etcd" in build_plan("wmt", settings, repo, resume=False).argv
    with pytest.raises(LaunchConfigError, match="rdzv_endpoint"):
        settings_for("torchrun", "pytorch", "d", "e", nnodes=2)


def test_resume_plan_skips_finished_trials(repo, tmp_path):
    data, exp = tmp_path / "data", tmp_path / "exp"
    settings = settings_for("python", "jax", data, exp).with_absolute_paths()
    plan = build_plan(
        "ogbg",
        settings,
        repo,
        resume=True,
        first_trial=3,
        study=2,
        rng_seed=study_seed(7, 2, "ogbg"),
    )
    assert list(plan.argv) == [
        "python",
        "-m",
        "submission_runner",
        *expected_runner_flags("ogbg", "jax", str(data), str(exp), resume=True, start=2, study=2),
    ]
    assert plan.workload_dir == exp / "exp_a" / "study_2" / "ogbg_jax"
    assert plan.log_path == exp / "exp_a" / "logs" / "study_2_ogbg_jax.log"
    assert (plan.first_trial, plan.num_trials) == (3, 3)


def test_self_tuning_ruleset_passes_no_search_space(repo, tmp_path):
    settings = settings_for(
        "python", "pytorch", tmp_path / "d", tmp_path / "e", tuning_ruleset="self"
    ).with_absolute_paths()
    argv = build_plan("fastmri", settings, repo, resume=False).argv
    assert "--tuning_ruleset=self" in argv
    assert not any(a.startswith(("--tuning_search_space", "--num_tuning_trials")) for a in argv)
    with pytest.raises(LaunchConfigError, match="self-tuning"):
        build_plan(
            "fastmri",
            settings_for(
                "python",
                "pytorch",
                "d",
                "e",
                tuning_ruleset="self",
                tuning_search_space="tuning_search_spaces/nadamw.json",
            ),
            repo,
            resume=False,
        )


def test_submission_paths(repo, tmp_path):
    custom = repo / "submissions" / "mine" / "pytorch"
    custom.mkdir(parents=True)
    (custom / "submission.py").write_text("# stub\n")
    assert commands.resolve_submission(str(custom / "submission.py"), "pytorch", repo) == (
        "submissions/mine/pytorch/submission.py"
    )
    assert commands.resolve_submission("submissions/mine/pytorch/submission.py", "jax", repo) == (
        "submissions/mine/pytorch/submission.py"
    )
    assert commands.submission_label("submissions/mine/pytorch/submission.py") == "mine"
    outside = tmp_path / "elsewhere.py"
    outside.write_text("# stub\n")
    with pytest.raises(UnknownSubmissionError, match="outside"):
        commands.resolve_submission(str(outside), "pytorch", repo)
    bad = repo / "submissions" / "my-sub"
    bad.mkdir()
    (bad / "submission.py").write_text("# stub\n")
    with pytest.raises(UnknownSubmissionError, match="not importable"):
        commands.resolve_submission("submissions/my-sub/submission.py", "pytorch", repo)
    with pytest.raises(UnknownSubmissionError, match="neither a name"):
        commands.resolve_submission("adamw", "pytorch", repo)
    # A path submission has no default search space.
    settings = settings_for("python", "pytorch", "d", "e", submission=str(custom / "submission.py"))
    with pytest.raises(LaunchConfigError, match="--tuning_search_space"):
        build_plan("ogbg", settings, repo, resume=False)


def test_bad_search_spaces_give_clear_errors(repo, tmp_path):
    cases = {
        "missing.json": None,
        "not_json.json": "{nope",
        "scalar.json": "3",
        "empty_list.json": "[]",
        "nested.json": json.dumps([{"learning_rate": [0.1, 0.2]}]),
        "keys_differ.json": json.dumps([{"a": 1}, {"b": 2}]),
        "bad_name.json": json.dumps([{"learning-rate": 0.1}]),
        "no_scaling.json": json.dumps({"learning_rate": {"min": 0.1, "max": 1.0}}),
        "bad_scaling.json": json.dumps({"lr": {"min": 0.1, "max": 1.0, "scaling": "cubic"}}),
        "log_zero.json": json.dumps({"lr": {"min": 0.0, "max": 1.0, "scaling": "log"}}),
        "min_gt_max.json": json.dumps({"lr": {"min": 2.0, "max": 1.0, "scaling": "linear"}}),
        "empty_feasible.json": json.dumps({"lr": {"feasible_points": []}}),
    }
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        settings = settings_for("python", "jax", "d", "e", tuning_search_space=str(path))
        with pytest.raises(SearchSpaceError) as info:
            build_plan("ogbg", settings, repo, resume=False)
        assert name in str(info.value), name
    good = tmp_path / "ranges.json"
    good.write_text(
        json.dumps(
            {
                "learning_rate": {"min": 1e-4, "max": 1e-2, "scaling": "log"},
                "dropout_rate": {"feasible_points": [0.0, 0.1]},
            }
        )
    )
    settings = settings_for("python", "jax", "d", "e", tuning_search_space=str(good))
    plan = build_plan("ogbg", settings.with_absolute_paths(), repo, resume=False)
    assert f"--tuning_search_space={good.resolve()}" in plan.argv
    assert "--num_tuning_trials=5" in plan.argv  # the range format is not clipped
    assert plan.num_trials == 5


def test_bad_settings_and_unknown_workload(repo):
    with pytest.raises(LaunchConfigError, match="framework"):
        RunSettings(framework="tensorflow")
    with pytest.raises(LaunchConfigError, match="launcher"):
        RunSettings(framework="jax", launcher="slurm")
    with pytest.raises(LaunchConfigError, match="num_tuning_trials"):
        RunSettings(framework="jax", num_tuning_trials=0)
    with pytest.raises(UnknownWorkloadError) as info:
        run_algoperf_suite(
            "ogbg,imagenet",
            RunSettings(framework="jax"),
            repo_root=repo,
            dry_run=True,
            out=lambda line: None,
        )
    message = str(info.value)
    assert "'imagenet'" in message
    for name in WORKLOADS:
        assert name in message


def test_cli_dry_run_and_errors(repo, tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "run_workloads.py"
    base = [
        sys.executable,
        str(script),
        "--suite=algoperf",
        f"--repo_root={repo}",
        f"--data_dir={tmp_path / 'data'}",
        f"--experiment_dir={tmp_path / 'exp'}",
    ]
    done = subprocess.run(
        [
            *base,
            "--framework=pytorch",
            "--workloads=ogbg",
            "--launcher=torchrun",
            "--nproc_per_node=2",
            "--num_tuning_trials=2",
            "--experiment_name=exp_a",
            "--dry_run",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    found = dry_run_commands(done.stdout.splitlines())
    # The leaderboard's three studies, each under study_<k> with its own seed.
    assert len(found) == 3
    names = [a for _, argv in found for a in argv if a.startswith("--experiment_name=")]
    assert names == [f"--experiment_name=exp_a/study_{k}" for k in range(3)]
    seeds = {a for _, argv in found for a in argv if a.startswith("--rng_seed=")}
    assert len(seeds) == 3
    argv = found[0][1]
    assert argv[:6] == [
        "torchrun",
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
        "-m",
        "submission_runner",
    ]
    assert "--num_tuning_trials=2" in argv and "--overwrite" in argv
    failed = subprocess.run(
        [*base, "--framework=pytorch", "--workloads=ogbg,bogus", "--dry_run"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert failed.returncode == 2
    assert "bogus" in failed.stderr and "librispeech_conformer" in failed.stderr


def test_docker_forwards_overwrite_and_multi_node(repo, tmp_path):
    settings = settings_for(
        "docker", "pytorch", tmp_path / "d", tmp_path / "e", nnodes=2, rdzv_endpoint="n0:29500"
    ).with_absolute_paths()
    argv = list(build_plan("ogbg", settings, repo, resume=False, overwrite=True).argv)
    assert argv[:6] == ["docker", "run", "--rm", "--gpus=all", "--ipc=host", "--network=host"]
    assert argv[argv.index("-o") + 1] == "true"
    assert argv[-8:] == [
        "--nproc_per_node",
        "4",
        "--nnodes",
        "2",
        "--rdzv_endpoint",
        "n0:29500",
        "--rdzv_backend",
        "c10d",
    ]
    resumed = list(build_plan("ogbg", settings, repo, resume=True, first_trial=2).argv)
    assert resumed[resumed.index("-o") + 1] == "false"
    assert resumed[resumed.index("--hparam_start_index") + 1] == "1"
    # A search space outside the checkout is mounted read-only into the container.
    outside = tmp_path / "mine.json"
    outside.write_text(json.dumps(POINTS))
    settings = settings_for(
        "docker", "jax", tmp_path / "d", tmp_path / "e", tuning_search_space=str(outside)
    ).with_absolute_paths()
    argv = list(build_plan("ogbg", settings, repo, resume=False).argv)
    assert f"{outside.resolve()}:/search_spaces/mine.json:ro" in argv
    assert argv[argv.index("-t") + 1] == "/search_spaces/mine.json"


def test_the_cli_picks_the_averaging_search_space_and_names_the_experiment(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "run_workloads.py"
    common = ["--suite=algoperf", "--workloads=ogbg", "--framework=pytorch", "--dry_run"]
    common += [f"--experiment_dir={tmp_path}"]
    result = subprocess.run(
        [sys.executable, str(script), *common, "--averaging=ema"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "--tuning_search_space=tuning_search_spaces/nadamw_ema.json" in result.stdout
    assert "--experiment_name=nadamw_nadamw_ema/study_0" in result.stdout
    assert "--experiment_name=nadamw_nadamw_ema/study_2" in result.stdout  # three studies
    refused = subprocess.run(
        [sys.executable, str(script), *common, "--averaging=lawa,ema"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2
    assert "one averaging mode" in refused.stderr
