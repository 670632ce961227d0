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
from polyak.algoperf.submission_api import FRAMEWORKS, RULESETS, SUBMISSIONS
from polyak.averaging.config import MODES, TORCH_ONLY_MODES

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
    # The name shown on the leaderboard (default: "polyak <Optimizer> + <AVERAGING>").
    display_name: str = ""
    version: str = "1.0"

    def __post_init__(self) -> None:
        for field, value, choices in (
            ("optimizer", self.optimizer, SUBMISSIONS),
            ("framework", self.framework, FRAMEWORKS),
            ("averaging", self.averaging, MODES),
            ("ruleset", self.ruleset, RULESETS),
        ):
            if value not in choices:
                raise ExportError(f"--{field}={value!r} is unknown; expected one of {choices}")
        if self.averaging in TORCH_ONLY_MODES and self.framework != "pytorch":
            raise ExportError(
                f"--averaging={self.averaging!r} is implemented for PyTorch only; "
                f"use --framework=pytorch, not {self.framework!r}"
            )
        if not re.fullmatch(r"[a-z0-9_][a-z0-9_.-]*", self.name):
            raise ExportError(
                f"--name={self.name!r} must be a folder name of lowercase letters, digits, "
                "'_', '-' or '.' (the leaderboard's rule: lowercase, no spaces)"
            )
        if not re.fullmatch(r"\d+(\.\d+)*", self.version):
            raise ExportError(f"--version={self.version!r}; expected a number such as '1.0'")
        if "\n" in self.display_name:
            raise ExportError(f"--display_name={self.display_name!r} must be one line")

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
        "torchrun --standalone --nnodes=1 --nproc_per_node=4"
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


# submission_info.yml as the leaderboard repository's entries spell it
# (mlcommons/submissions_algorithms, previous_leaderboards/algoperf_v06): the
# folder's path inside that repository, the ruleset as "external" or
# "self-tuning", the framework's proper name and a quoted version string.
SUBMISSION_INFO_FIELDS: tuple[str, ...] = (
    "submission_name",
    "submission_folder",
    "authors",
    "affiliations",
    "version",
    "ruleset",
    "framework",
    "description",
)
_RULESET_INFO = {"external": "external", "self": "self-tuning"}
_RULESET_FOLDER = {"external": "external_tuning", "self": "self_tuning"}
_FRAMEWORK_INFO = {"pytorch": "PyTorch", "jax": "JAX"}
_AVERAGING_TITLE = {"none": "", "lawa": "LAWA", "ema": "EMA", "twa": "TWA"}


def submission_folder(request: ExportRequest) -> str:
    return f"submissions/{_RULESET_FOLDER[request.ruleset]}/{request.name}"


def submission_info(request: ExportRequest) -> dict[str, str]:
    """The fields of submission_info.yml, in the leaderboard's order."""
    title = _OPTIMIZER_TITLE[request.optimizer]
    averaging = _AVERAGING_TITLE[request.averaging]
    display = request.display_name or " + ".join(
        part for part in (f"polyak {title}", averaging) if part
    )
    if request.averaging == "none":
        averaging_text = "no weight averaging"
    else:
        averaging_text = (
            f"{averaging} weight averaging, whose averaged weights are what is evaluated "
            "(through prepare_for_eval)"
        )
    points = (
        "the hyperparameter points of tuning_search_space.json"
        if request.ruleset == "external"
        else "a single documented hyperparameter point"
    )
    return {
        "submission_name": display,
        "submission_folder": submission_folder(request),
        "authors": request.authors,
        "affiliations": request.affiliations,
        "version": request.version,
        "ruleset": _RULESET_INFO[request.ruleset],
        "framework": _FRAMEWORK_INFO[request.framework],
        "description": (
            f"{title} with a linear learning rate warmup followed by a cosine decay, and "
            f"{averaging_text}; {points}. Exported from polyak."
        ),
    }


def _yaml_scalar(value: str) -> str:
    """A plain scalar when YAML reads it back as the same string, else double-quoted."""
    if value and yaml.safe_load(value) == value and value.strip() == value and "#" not in value:
        return value
    return json.dumps(value)  # a JSON string is a valid YAML double-quoted scalar


def render_submission_info(request: ExportRequest) -> str:
    """submission_info.yml in the entries' own layout: the version always quoted and
    the description as a folded block (``>-``)."""
    info = submission_info(request)
    lines = []
    for field in SUBMISSION_INFO_FIELDS:
        value = info[field]
        if field == "description":
            lines += [f"{field}: >-", f"  {value}"]
        elif field == "version":
            lines.append(f"{field}: {json.dumps(value)}")
        else:
            lines.append(f"{field}: {_yaml_scalar(value)}")
    text = "\n".join(lines) + "\n"
    if yaml.safe_load(text) != info:  # the layout above must never change a value
        raise ExportError(f"submission_info.yml would not read back as written: {info}")
    return text


# What an export writes at the top of its folder; anything else found there on
# --force means the folder is not (only) an earlier export, and it is refused.
_EXPORTED_TOP_LEVEL = frozenset(
    {"__init__.py", "submission.py", "README.md", "submission_info.yml", "tuning_search_space.json"}
)
# Python and pytest leave these behind when an exported folder has been run.
_RUN_LEFTOVERS = frozenset({"__pycache__", ".pytest_cache"})
_README_MARK = "by `scripts/export_submission.py`"


def _is_inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out_dir(out: Path, *, cwd: Path | None = None, repo_root: Path = REPO_ROOT) -> Path:
    """The resolved ``--out``, after refusing folders whose replacement could lose data.

    ``--force`` replaces ``--out`` as a whole, so ``--out`` may never be the working
    directory or a folder holding it, nor the checkout or a folder holding the checkout,
    nor anything inside the package being exported."""
    cwd = (cwd or Path.cwd()).resolve()
    resolved = (cwd / out.expanduser()).resolve()
    shown = f"--out={str(out)!r}"
    if _is_inside(cwd, resolved):
        raise ExportError(
            f"{shown} is the current directory or one of its parents ({resolved}); "
            "the export replaces its --out folder, so give a new subfolder, e.g. "
            "--out=export/<name>"
        )
    if _is_inside(repo_root.resolve(), resolved):
        raise ExportError(
            f"{shown} is the polyak checkout {repo_root} or a folder above it; "
            "give a new subfolder, e.g. --out=export/<name>"
        )
    if _is_inside(resolved, PACKAGE_ROOT):
        raise ExportError(f"{shown} lies inside the exported package {PACKAGE_ROOT}")
    return resolved


def _foreign_entries(out: Path) -> list[str]:
    """Entries of an existing ``out`` that no earlier export wrote (empty: safe to replace)."""
    foreign = []
    for entry in sorted(out.iterdir()):
        name = entry.name
        if name in _RUN_LEFTOVERS and entry.is_dir():
            continue
        if name == VENDORED_PACKAGE and entry.is_dir() and not entry.is_symlink():
            foreign += [
                p.relative_to(out).as_posix()
                for p in entry.rglob("*")
                if p.is_symlink() or (p.is_file() and p.suffix not in (".py", ".pyc"))
            ]
            continue
        if name not in _EXPORTED_TOP_LEVEL or entry.is_symlink() or not entry.is_file():
            foreign.append(name)
    readme = out / "README.md"
    if not foreign and (not readme.is_file() or _README_MARK not in readme.read_text()):
        foreign.append("README.md (not written by scripts/export_submission.py)")
    return foreign


def export_submission(request: ExportRequest, *, cwd: Path | None = None) -> list[Path]:
    """Writes the folder and returns the files written, relative to it.

    Nothing is deleted that an export did not create: a non-empty ``--out`` is
    replaced (with ``force``) only when every entry in it is one an export writes."""
    out = check_out_dir(request.out, cwd=cwd)
    shown = f"--out={str(request.out)!r}"
    if out.exists() and not out.is_dir():
        raise ExportError(f"{shown} exists and is not a folder ({out})")
    if out.is_symlink():
        raise ExportError(f"{shown} is a symbolic link ({out}); give a real folder")
    if out.exists() and any(out.iterdir()):
        if not request.force:
            raise ExportError(f"{shown} is not empty; pass --force to replace an earlier export")
        foreign = _foreign_entries(out)
        if foreign:
            raise ExportError(
                f"{shown} holds files an export did not write ({', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''}); --force only replaces an earlier "
                "export, so move them or choose another --out"
            )
    if request.ruleset == "external" and not request.search_space_file.exists():
        raise ExportError(f"no search space for this submission at {request.search_space_file}")

    revision = source_revision()
    files: dict[Path, str] = {
        Path("__init__.py"): "",
        Path("submission.py"): _submission_source(request, revision),
        Path("README.md"): _readme(request, revision),
        Path("submission_info.yml"): render_submission_info(request),
    }
    if request.ruleset == "external":
        points = json.loads(request.search_space_file.read_text())
        files[Path("tuning_search_space.json")] = json.dumps(points, indent=2) + "\n"
    for module in import_closure(request.entry_modules):
        source = module_path(module)
        target = Path(VENDORED_PACKAGE, *source.relative_to(PACKAGE_ROOT).parts)
        files[target] = _vendored_source(source.read_text())

    # Build in a fresh sibling folder and swap it in by renames, so an interrupted
    # export never leaves a half-written folder, and the only tree ever removed is
    # one this function created (the staging folder) or checked (an earlier export).
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging.", dir=out.parent))
    retired: Path | None = None
    try:
        for relative, text in files.items():
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            (staging / relative).write_text(text)
        if out.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, retired / out.name)
        os.replace(staging, out)
    except BaseException:
        if retired is not None and (retired / out.name).exists() and not out.exists():
            os.replace(retired / out.name, out)
        raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
        # Kept when the swap failed and the earlier export could not be moved back.
        if retired is not None and retired.exists() and out.exists():
            shutil.rmtree(retired)
    return sorted(files)
