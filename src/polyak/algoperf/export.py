"""Exports a self-contained AlgoPerf competition submission folder.

AlgoPerf's organisers run a submission folder in their own environment,
where polyak is not installed. The export therefore carries the polyak
modules the submission imports — found by following its imports, nothing
more — as a package of another name (``polyak_vendored``), so the folder
never picks up, or clashes with, an installed polyak.

Layout (mlcommons/submissions_algorithms):
``submission.py``, ``__init__.py``, ``submission_info.yml``,
``tuning_search_space.json`` (external tuning only), and a ``README.md``
recording where the code came from.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

import polyak
from polyak.averaging.config import MODES, TORCH_ONLY_MODES

OPTIMIZERS: tuple[str, ...] = ("nadamw", "shampoo")
FRAMEWORKS: tuple[str, ...] = ("pytorch", "jax")
AVERAGING_MODES: tuple[str, ...] = MODES
PYTORCH_ONLY_AVERAGING: tuple[str, ...] = TORCH_ONLY_MODES
RULESETS: tuple[str, ...] = ("external", "self")

VENDORED_PACKAGE = "polyak_vendored"
PACKAGE_ROOT = Path(polyak.__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent.parent
SEARCH_SPACE_DIR = REPO_ROOT / "tuning_search_spaces"

_FRAMEWORK_MODULE = {"pytorch": "torch", "jax": "jax"}
_OPTIMIZER_TITLE = {"nadamw": "NadamW", "shampoo": "Shampoo"}


class ExportError(ValueError):
    """The export was asked for something it cannot produce."""


@dataclasses.dataclass(frozen=True)
class ExportRequest:
    optimizer: str
    framework: str
    averaging: str
    ruleset: str
    name: str
    authors: str
    affiliations: str
    out: Path
    force: bool = False

    def __post_init__(self) -> None:
        for field, value, choices in (
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("framework", self.framework, FRAMEWORKS),
            ("averaging", self.averaging, AVERAGING_MODES),
            ("ruleset", self.ruleset, RULESETS),
        ):
            if value not in choices:
                raise ExportError(f"--{field}={value!r} is unknown; expected one of {choices}")
        if self.averaging in PYTORCH_ONLY_AVERAGING and self.framework != "pytorch":
            raise ExportError(
                f"--averaging={self.averaging!r} is implemented for PyTorch only; "
                f"use --framework=pytorch, not {self.framework!r}"
            )
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", self.name):
            raise ExportError(
                f"--name={self.name!r} must be a folder name of letters, digits, '_', '-' or '.'"
            )

    @property
    def framework_module(self) -> str:
        return _FRAMEWORK_MODULE[self.framework]

    @property
    def entry_modules(self) -> tuple[str, ...]:
        """The polyak modules the submission file imports."""
        fw = self.framework_module
        return (
            f"polyak.algoperf.builder_{fw}",
            f"polyak.optim.{self.optimizer}_{fw}",
            f"polyak.optim.{self.optimizer}_config",
        )

    @property
    def search_space_file(self) -> Path:
        suffix = "" if self.averaging == "none" else f"_{self.averaging}"
        return SEARCH_SPACE_DIR / f"{self.optimizer}{suffix}.json"


def module_path(module: str) -> Path:
    """The source file of a polyak module (a package maps to its __init__.py)."""
    relative = Path(*module.split(".")[1:])
    candidate = PACKAGE_ROOT / relative
    if candidate.is_dir():
        return candidate / "__init__.py"
    path = candidate.with_suffix(".py")
    if not path.exists():
        raise ExportError(f"polyak module {module!r} not found at {path}")
    return path


def _polyak_imports(path: Path) -> set[str]:
    """Every polyak module a file imports, at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "polyak")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "polyak":
                continue
            found.add(node.module)
            for alias in node.names:
                # `from polyak.averaging import lawa_ema_jax` names a module.
                sub = f"{node.module}.{alias.name}"
                if (PACKAGE_ROOT / Path(*sub.split(".")[1:])).with_suffix(".py").exists():
                    found.add(sub)
    return found


def import_closure(entry_modules: tuple[str, ...]) -> list[str]:
    """The polyak modules reachable from the entries, with their parent packages."""
    seen: set[str] = set()
    pending = list(entry_modules)
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        pending.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        pending.extend(_polyak_imports(module_path(module)))
    return sorted(seen)


_IMPORT_LINE = re.compile(r"^(\s*)(from|import)(\s+)polyak(?=[\s.])", re.MULTILINE)


def _vendored_source(source: str) -> str:
    return _IMPORT_LINE.sub(rf"\1\2\3{VENDORED_PACKAGE}", source)


def source_revision() -> str:
    """polyak's version, and the git commit when exported from a checkout."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"polyak {polyak.__version__} (not from a git checkout)"
    suffix = " with uncommitted changes under src/" if dirty else ""
    return f"polyak {polyak.__version__}, commit {commit}{suffix}"


def _submission_source(request: ExportRequest, revision: str) -> str:
    fw = request.framework_module
    factory = f"make_{request.optimizer}"
    config = f"{_OPTIMIZER_TITLE[request.optimizer]}Config"
    title = _OPTIMIZER_TITLE[request.optimizer]
    framework = "PyTorch" if request.framework == "pytorch" else "JAX"
    if request.ruleset == "self":
        defaults = f"{{'averaging': {request.averaging!r}}}"
        averaging_note = (
            f"Self-tuning: the documented defaults, with averaging={request.averaging!r}."
        )
    else:
        defaults = "None"
        averaging_note = "External tuning: averaging comes from tuning_search_space.json."
    return f'''"""{title} with weight averaging, {framework}: an AlgoPerf submission.

Exported from {revision}.
{averaging_note}
"""

import os
import sys

# AlgoPerf imports this file by its path; the polyak code it needs sits
# beside it, as the package {VENDORED_PACKAGE}.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from {VENDORED_PACKAGE}.algoperf.builder_{fw} import build_submission  # noqa: E402
from {VENDORED_PACKAGE}.optim.{request.optimizer}_config import {config}  # noqa: E402
from {VENDORED_PACKAGE}.optim.{request.optimizer}_{fw} import {factory}  # noqa: E402

_submission = build_submission({factory}, {config}, {defaults})

init_optimizer_state = _submission.init_optimizer_state
update_params = _submission.update_params
prepare_for_eval = _submission.prepare_for_eval
get_batch_size = _submission.get_batch_size
data_selection = _submission.data_selection
'''


def _readme(request: ExportRequest, revision: str) -> str:
    ruleset = "external_tuning" if request.ruleset == "external" else "self_tuning"
    search = (
        " \\\n  --tuning_search_space=submissions/external_tuning/"
        f"{request.name}/tuning_search_space.json"
        if request.ruleset == "external"
        else ""
    )
    launcher = (
        "torchrun --standalone --nnodes=1 --nproc_per_node=8"
        if request.framework == "pytorch"
        else "python"
    )
    return f"""# {request.name}

{_OPTIMIZER_TITLE[request.optimizer]} for {request.framework} with `{request.averaging}` weight
averaging, ruleset `{request.ruleset}`.

Exported from {revision} by `scripts/export_submission.py`. The polyak code it needs is
vendored in `{VENDORED_PACKAGE}/`; the folder imports nothing from an installed polyak.

Run it from an AlgoPerf (v0.6) checkout, with this folder at
`submissions/{ruleset}/{request.name}/`:

```
{launcher} submission_runner.py \\
  --framework={request.framework} --workload=<workload> \\
  --data_dir=<data_dir> --experiment_dir=<experiment_dir> --experiment_name={request.name} \\
  --submission_path=submissions/{ruleset}/{request.name}/submission.py \\
  --tuning_ruleset={request.ruleset}{search} --overwrite
```
"""


def _submission_info(request: ExportRequest) -> dict[str, str]:
    title = _OPTIMIZER_TITLE[request.optimizer]
    return {
        "submission_name": request.name,
        "submission_folder": request.name,
        "authors": request.authors,
        "affiliations": request.affiliations,
        "version": polyak.__version__,
        "ruleset": request.ruleset,
        "framework": request.framework,
        "description": (
            f"{title} with warmup and cosine decay, and {request.averaging} weight averaging "
            "evaluated through prepare_for_eval (polyak)."
        ),
    }


def export_submission(request: ExportRequest) -> list[Path]:
    """Writes the folder and returns the files written, relative to it."""
    out = request.out
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out={str(out)!r} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not request.force:
        raise ExportError(f"--out={str(out)!r} is not empty; pass --force to replace it")
    if request.ruleset == "external" and not request.search_space_file.exists():
        raise ExportError(f"no search space for this submission at {request.search_space_file}")

    revision = source_revision()
    files: dict[Path, str] = {
        Path("__init__.py"): "",
        Path("submission.py"): _submission_source(request, revision),
        Path("README.md"): _readme(request, revision),
        Path("submission_info.yml"): yaml.safe_dump(_submission_info(request), sort_keys=False),
    }
    if request.ruleset == "external":
        points = json.loads(request.search_space_file.read_text())
        files[Path("tuning_search_space.json")] = json.dumps(points, indent=2) + "\n"
    for module in import_closure(request.entry_modules):
        source = module_path(module)
        target = Path(VENDORED_PACKAGE, *source.relative_to(PACKAGE_ROOT).parts)
        files[target] = _vendored_source(source.read_text())

    # Build beside the destination and swap in one rename, so an interrupted
    # export never leaves a half-written folder.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for relative, text in files.items():
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            (staging / relative).write_text(text)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return sorted(files)
