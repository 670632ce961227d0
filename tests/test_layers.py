"""The house's walls, checked by reading imports (docs/architecture.md, "Layers").

Every import statement of ``src/polyak`` and ``submissions`` counts, at module
level or inside a function, so a lazy import cannot slip past. A second check
imports each framework's twins in a fresh interpreter where the other framework
cannot be imported at all.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "src"

# Modules every layer may use: they import nothing of polyak.
LEAVES = frozenset({"polyak.files", "polyak.distributed_torch", "polyak.hyperparameters"})
TORCH_ROOTS = frozenset({"torch"})
JAX_ROOTS = frozenset({"jax", "jaxlib", "flax", "optax", "chex", "orbax"})


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str, root: Path) -> bool:
    candidate = root.joinpath(*name.split("."))
    return candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file()


def _imports(path: Path, module: str, root: Path) -> Iterator[str]:
    """Every module ``path`` imports, relative imports resolved against ``module``.

    ``from package import name`` counts as importing ``package.name`` when that
    is a module under ``root``, else as importing ``package``.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                yield submodule if _is_module(submodule, root) else target


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def layer_violations(source_root: Path) -> list[str]:
    """Each import that breaks a dependency rule, as ``module -> imported: rule``."""
    found: list[str] = []
    for path in sorted(source_root.rglob("*.py")):
        module = _module_name(path, source_root)
        if not _within(module, "polyak"):
            continue
        for imported in _imports(path, module, source_root):
            rule = _broken_rule(module, imported)
            if rule:
                found.append(f"{module} -> {imported}: {rule}")
    return sorted(set(found))


def _broken_rule(module: str, imported: str) -> str | None:
    root = imported.split(".")[0]
    ours = _within(imported, "polyak") and imported != "polyak"
    if _within(module, "polyak.runner"):
        return None  # the top floor may use everything
    if ours and _within(imported, "polyak.runner"):
        return "nothing imports polyak.runner"
    if module in LEAVES and ours:
        return "leaf modules import nothing of polyak"
    if _within(module, "polyak.optim") or _within(module, "polyak.averaging"):
        for upper in ("polyak.algoperf", "polyak.workloads"):
            if _within(imported, upper):
                return "optim and averaging are plain libraries, usable outside AlgoPerf"
    if _within(module, "polyak.algoperf") and _within(imported, "polyak.workloads"):
        return "the AlgoPerf adapter does not know the embedded workloads"
    if _within(module, "polyak.workloads") and ours:
        allowed = _within(imported, "polyak.workloads") or _within(imported, "polyak.algoperf.spec")
        if not (allowed or any(_within(imported, leaf) for leaf in LEAVES)):
            return "workloads use only the spec compatibility module and the leaves"
    if module.endswith("_torch") and root in JAX_ROOTS:
        return "torch modules never import jax"
    if module.endswith("_jax") and root in TORCH_ROOTS:
        return "jax modules never import torch"
    return None


def submission_violations(submissions_root: Path) -> list[str]:
    """Submission files import polyak and nothing else of this repository."""
    first_party = {"submissions", "tests", "scripts"}
    found = []
    for path in sorted(submissions_root.rglob("*.py")):
        module = _module_name(path, submissions_root.parent)
        for imported in _imports(path, module, submissions_root.parent):
            if imported.split(".")[0] in first_party:
                found.append(f"{path.relative_to(submissions_root.parent)} -> {imported}")
    return found


def test_the_source_tree_keeps_the_dependency_rules() -> None:
    assert layer_violations(SOURCE) == []


def test_submissions_import_only_polyak() -> None:
    assert submission_violations(REPO / "submissions") == []


@pytest.mark.parametrize(
    ("module", "source", "rule"),
    [
        ("polyak/optim/x_torch.py", "import jax\n", "torch modules never import jax"),
        ("polyak/averaging/y_jax.py", "def f():\n    import torch\n", "never import torch"),
        ("polyak/optim/z.py", "from polyak.algoperf import spec\n", "plain libraries"),
        ("polyak/averaging/z.py", "from ..workloads import base\n", "plain libraries"),
        ("polyak/workloads/w.py", "from polyak.averaging import config\n", "spec compatibility"),
        ("polyak/algoperf/a.py", "import polyak.runner.report\n", "nothing imports"),
        ("polyak/files.py", "from polyak.algoperf import spec\n", "leaf modules"),
    ],
)
def test_each_rule_catches_its_violation(
    tmp_path: Path, module: str, source: str, rule: str
) -> None:
    path = tmp_path / module
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    (tmp_path / "polyak" / "workloads").mkdir(parents=True, exist_ok=True)
    assert any(rule in line for line in layer_violations(tmp_path)), layer_violations(tmp_path)


def test_allowed_imports_are_not_flagged(tmp_path: Path) -> None:
    allowed = {
        "polyak/workloads/w_torch.py": "from polyak.algoperf import spec\nimport polyak.files\n",
        "polyak/runner/r.py": "import jax\nimport torch\nfrom polyak.averaging import config\n",
        "polyak/algoperf/b_jax.py": "from polyak.averaging import averager_jax\nimport optax\n",
        "polyak/algoperf/spec.py": "import abc\n",
    }
    for name, source in allowed.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    assert layer_violations(tmp_path) == []


_BLOCKER = """
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"{{name}} is not installed (blocked by the test)")
        return None
sys.meta_path.insert(0, _Absent())
import importlib, pathlib
root = pathlib.Path({source!r})
for path in sorted(root.rglob("*_{framework}.py")):
    name = ".".join(path.relative_to(root).with_suffix("").parts)
    importlib.import_module(name)
import polyak
print("imported")
"""


@pytest.mark.parametrize(
    ("framework", "blocked"), [("torch", sorted(JAX_ROOTS)), ("jax", sorted(TORCH_ROOTS))]
)
def test_each_twin_imports_without_the_other_framework(framework: str, blocked: list[str]) -> None:
    program = _BLOCKER.format(blocked=set(blocked), source=str(SOURCE), framework=framework)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(program)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(SOURCE), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imported" in result.stdout
