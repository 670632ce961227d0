"""The runner's error types: each names the bad value and what was expected."""

from __future__ import annotations

ALGOPERF_COMMIT = "2c90454fc05d5bdf3598b0c7651e611f132a7060"
ALGOPERF_GIT_URL = "https://github.com/mlcommons/algorithmic-efficiency.git"
ALGOPERF_INSTALL_COMMAND = f"pip install 'algoperf @ git+{ALGOPERF_GIT_URL}@{ALGOPERF_COMMIT}'"
POLYAK_ALGOPERF_EXTRA_COMMAND = "pip install -e '.[algoperf]'"


class RunnerError(ValueError):
    """Base class: a user-facing problem with the runner's inputs or environment."""


class UnknownWorkloadError(RunnerError):
    """A workload name that is not in the selected suite."""


class UnknownSubmissionError(RunnerError):
    """A submission that is neither a known name nor an importable path."""


class SearchSpaceError(RunnerError):
    """A tuning search-space file that is missing or malformed."""


class DataDirError(RunnerError):
    """A data directory that does not exist."""


class LaunchConfigError(RunnerError):
    """An impossible combination of launcher settings."""


class ResultsFormatError(RunnerError):
    """An eval_measurements.csv (or metadata file) that cannot be read."""


class AlgoPerfMissingError(RunnerError):
    """algoperf (and its submission_runner module) is not installed."""

    def __init__(self, detail: str = "") -> None:
        message = (
            "AlgoPerf is not installed in this Python environment"
            + (f" ({detail})" if detail else "")
            + ". Install it (Python >= 3.11) with:\n"
            f"  {ALGOPERF_INSTALL_COMMAND}\n"
            "or, from the polyak checkout:\n"
            f"  {POLYAK_ALGOPERF_EXTRA_COMMAND}\n"
            "Use --dry_run to print the commands without AlgoPerf."
        )
        super().__init__(message)
