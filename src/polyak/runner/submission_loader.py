"""Importing a submission file by path, the way AlgoPerf imports ``--submission_path``."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from polyak.runner.errors import UnknownSubmissionError

REQUIRED_FUNCTIONS: tuple[str, ...] = (
    "init_optimizer_state",
    "update_params",
    "get_batch_size",
    "data_selection",
)


def module_name_for(path: str | Path, prefix: str = "polyak_submission") -> str:
    """A module name unique to this file, so two checkouts never share a cached module."""
    resolved = str(Path(path).resolve())
    digest = hashlib.sha1(resolved.encode("utf-8")).hexdigest()[:10]
    stem = "_".join(part for part in Path(resolved).parts[-3:-1] if part.isidentifier())
    return f"{prefix}_{stem}_{digest}"


def load_submission_module(path: str | Path, module_name: str | None = None) -> ModuleType:
    """Imports ``path`` once (under ``module_name``) and checks AlgoPerf's API functions."""
    path = Path(path)
    module_name = module_name or module_name_for(path)
    if module_name in sys.modules:
        return sys.modules[module_name]
    if not path.is_file():
        raise UnknownSubmissionError(f"submission file {path} does not exist")
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UnknownSubmissionError(f"cannot import submission {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    missing = [name for name in REQUIRED_FUNCTIONS if not hasattr(module, name)]
    if missing:
        del sys.modules[module_name]
        raise UnknownSubmissionError(f"submission {path} lacks {', '.join(missing)}")
    return module
