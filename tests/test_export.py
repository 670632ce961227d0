"""The competition export: a folder that runs without an installed polyak."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from polyak.algoperf.export import (
    VENDORED_PACKAGE,
    ExportError,
    ExportRequest,
    export_submission,
    import_closure,
)

REPO = Path(__file__).resolve().parent.parent

INFO_FIELDS = {
    "submission_name",
    "submission_folder",
    "authors",
    "affiliations",
    "version",
    "ruleset",
    "framework",
    "description",
}


def _request(tmp_path: Path, **kwargs: object) -> ExportRequest:
    fields = {
        "optimizer": "nadamw",
        "framework": "pytorch",
        "averaging": "lawa",
        "ruleset": "external",
        "name": "polyak_test",
        "authors": "A. Author",
        "affiliations": "Somewhere",
        "out": tmp_path / "out",
        **kwargs,
    }
    return ExportRequest(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("framework", ["pytorch", "jax"])
@pytest.mark.parametrize("ruleset", ["external", "self"])
def test_layout_and_info(tmp_path: Path, framework: str, ruleset: str) -> None:
    request = _request(tmp_path, framework=framework, ruleset=ruleset)
    export_submission(request)
    out = request.out
    assert (out / "submission.py").is_file() and (out / "__init__.py").is_file()
    info = yaml.safe_load((out / "submission_info.yml").read_text())
    assert set(info) == INFO_FIELDS
    assert (info["ruleset"], info["framework"]) == (ruleset, framework)
    assert (out / "tuning_search_space.json").exists() == (ruleset == "external")
    if ruleset == "external":
        points = json.loads((out / "tuning_search_space.json").read_text())
        assert all(point["averaging"] == "lawa" for point in points)
    readme = (out / "README.md").read_text()
    assert "commit" in readme or "not from a git checkout" in readme
    assert f"--framework={framework}" in readme
    # Nothing in the folder imports the installed package.
    for path in out.rglob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            assert not stripped.startswith(("import polyak", "from polyak ", "from polyak.")), (
                path,
                line,
            )


def test_closure_follows_imports_and_not_the_other_framework() -> None:
    torch_modules = import_closure(("polyak.algoperf.builder_torch", "polyak.optim.nadamw_torch"))
    assert "polyak.averaging.averager_torch" in torch_modules
    assert "polyak.algoperf.spec" in torch_modules
    assert not any("jax" in m for m in torch_modules)
    jax_modules = import_closure(("polyak.algoperf.builder_jax", "polyak.optim.nadamw_jax"))
    assert "polyak.averaging.averager_jax" in jax_modules
    assert not any("torch" in m for m in jax_modules)
    assert not any(
        m.startswith(("polyak.runner", "polyak.workloads")) for m in torch_modules + jax_modules
    )


def test_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    request = _request(tmp_path)
    request.out.mkdir()
    (request.out / "keep.txt").write_text("precious")
    with pytest.raises(ExportError, match="is not empty; pass --force"):
        export_submission(request)
    assert (request.out / "keep.txt").read_text() == "precious"
    export_submission(_request(tmp_path, force=True))
    assert not (request.out / "keep.txt").exists()
    assert (request.out / VENDORED_PACKAGE).is_dir()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("optimizer", "adam", "--optimizer='adam' is unknown"),
        ("framework", "tensorflow", "--framework='tensorflow' is unknown"),
        ("averaging", "swa", "--averaging='swa' is unknown"),
        ("ruleset", "open", "--ruleset='open' is unknown"),
        ("name", "../escape", "--name='../escape' must be a folder name"),
    ],
)
def test_unknown_choices_are_clear_errors(
    tmp_path: Path, field: str, value: str, message: str
) -> None:
    with pytest.raises(ExportError, match=message.replace("(", r"\(").replace(".", r"\.")):
        _request(tmp_path, **{field: value})


def _drive(framework: str, source: str, paths: list[str], out: Path) -> dict:
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = Path(__file__).with_name("export_driver.py")
    subprocess.run(
        [sys.executable, str(driver), framework, str(out), source, *paths],
        check=True,
        env=env,
        cwd=Path(__file__).parent.parent,
        timeout=600,
    )
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["pytorch", "jax"])
def test_exported_folders_train_exactly_like_the_repo_submissions(
    tmp_path: Path, framework: str
) -> None:
    exported, in_repo = [], []
    for optimizer in ("nadamw", "shampoo"):
        for averaging in ("none", "lawa", "ema"):
            name = f"{optimizer}_{averaging}_{framework}"
            export_submission(
                _request(
                    tmp_path,
                    optimizer=optimizer,
                    framework=framework,
                    averaging=averaging,
                    name=name,
                    out=tmp_path / name,
                )
            )
            exported.append(str(tmp_path / name / "submission.py"))
            # The in-repo twin runs the same search-space point, copied beside it.
            twin = tmp_path / f"repo_{name}"
            twin.mkdir()
            (twin / "tuning_search_space.json").write_text(
                (tmp_path / name / "tuning_search_space.json").read_text()
            )
            repo_file = REPO / "submissions" / optimizer / framework / "submission.py"
            (twin / "submission.py").write_text(repo_file.read_text())
            in_repo.append(str(twin / "submission.py"))
    got = _drive(framework, "exported", exported, tmp_path / "exported.json")
    want = _drive(framework, "repo", in_repo, tmp_path / "repo.json")
    assert len(got) == len(want) == 6
    for exported_path, repo_path in zip(exported, in_repo):
        assert got[exported_path] == want[repo_path], exported_path
        assert got[exported_path] and got[exported_path][-1][0] == 4


@pytest.mark.parametrize("framework", ["pytorch", "jax"])
def test_exported_folder_imports_where_polyak_cannot(tmp_path: Path, framework: str) -> None:
    import subprocess
    import sys

    out = tmp_path / "export"
    export_submission(_request(tmp_path, framework=framework, out=out))
    script = (
        "import sys, importlib.util\n"
        "sys.modules['polyak'] = None\n"
        f"spec = importlib.util.spec_from_file_location('sub', {str(out / 'submission.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "names = ('init_optimizer_state', 'update_params', 'prepare_for_eval', "
        "'get_batch_size', 'data_selection')\n"
        "assert all(callable(getattr(m, n)) for n in names)\n"
        "assert m.get_batch_size('ogbg') == 512\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300, cwd=tmp_path)
