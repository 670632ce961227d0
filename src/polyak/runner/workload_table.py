"""The AlgoPerf workloads: target metric, direction, targets, budget, step hint.

Which workloads the benchmark scores, their targets and budgets move between
AlgoPerf releases (current AlgoPerf adds ``finewebedu_lm``, metric ``ppl``, to
v0.6's eight), so the list is the installed ``algoperf``'s ``BASE_WORKLOADS``
and the values are read from it when it can be imported: the workload class named in
``algoperf.workloads.workloads.WORKLOADS`` is imported lazily (that pulls in
torch, jax and tensorflow) and its properties are read without running its
constructor. Anything that goes wrong on the way (algoperf missing, a framework
missing, a broken CUDA install) falls back, per workload, to the table below,
which holds algoperf v0.6's values (main at commit 2c90454f).

Direction comes from the workload itself when it is imported (its
``has_reached_validation_target`` is probed on one value above and one below
the target), else from the metric name, as AlgoPerf's scoring code does.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from polyak.algoperf.submission_api import FRAMEWORKS
from polyak.runner.errors import RunnerError, UnknownWorkloadError

Direction = Literal["min", "max"]
Source = Literal["auto", "algoperf", "fallback"]

ALGOPERF_WORKLOADS: tuple[str, ...] = (
    "criteo1tb",
    "fastmri",
    "imagenet_resnet",
    "imagenet_vit",
    "librispeech_conformer",
    "librispeech_deepspeech",
    "ogbg",
    "wmt",
)
# The current rules' scoring machine (v0.6's pinned docs still say 8x V100; later
# AlgoPerf moved to 4 accelerators). Flags override both.
DEFAULT_NUM_ACCELERATORS = 4
DEFAULT_ACCELERATOR_TYPE = "A100"

# AlgoPerf's scoring treats these metric names as minimised / maximised (ppl: the
# language-model workload's perplexity).
MINIMIZED_METRICS = frozenset(
    {"loss", "ce_loss", "error_rate", "ctc_loss", "wer", "l1_loss", "ppl"}
)
MAXIMIZED_METRICS = frozenset({"accuracy", "ssim", "bleu", "mean_average_precision"})


@dataclasses.dataclass(frozen=True)
class WorkloadInfo:
    """What the runner needs to know about one workload."""

    name: str
    target_metric: str
    direction: Direction
    validation_target: float
    test_target: float | None
    max_runtime_sec: float
    step_hint: int
    eval_period_sec: float
    source: str = "fallback"

    def __post_init__(self) -> None:
        if self.direction not in ("min", "max"):
            raise RunnerError(f"direction={self.direction!r} for {self.name}; expected min or max")

    @property
    def validation_column(self) -> str:
        return f"validation/{self.target_metric}"

    @property
    def test_column(self) -> str:
        return f"test/{self.target_metric}"

    def reached(self, value: float) -> bool:
        """AlgoPerf's scoring rule: ``<=`` the target when minimising, ``>=`` when maximising."""
        return reached_target(value, self.validation_target, self.direction)


def reached_target(value: float, target: float, direction: Direction) -> bool:
    if value is None or math.isnan(value):
        return False
    return value <= target if direction == "min" else value >= target


def metric_direction(metric_name: str) -> Direction:
    """``min`` or ``max`` for a metric name (``wer``, ``validation/accuracy``, ...)."""
    base = metric_name.split("/")[-1]
    for prefix in ("best_", "final_"):
        base = base.removeprefix(prefix)
    if base in MINIMIZED_METRICS:
        return "min"
    if base in MAXIMIZED_METRICS:
        return "max"
    raise RunnerError(
        f"cannot tell whether metric {metric_name!r} is minimised or maximised; known: "
        f"min {sorted(MINIMIZED_METRICS)}, max {sorted(MAXIMIZED_METRICS)}"
    )


# algoperf v0.6 (main @ 2c90454f) workload classes: validation targets, budgets and
# step hints as in DESIGN.md; test targets and eval periods from the same classes.
FALLBACK_TABLE: dict[str, WorkloadInfo] = {
    info.name: info
    for info in (
        WorkloadInfo("criteo1tb", "loss", "min", 0.123735, 0.126041, 7_703, 10_666, 2 * 60),
        WorkloadInfo("fastmri", "ssim", "max", 0.723653, 0.740633, 4_430, 18_094, 80),
        WorkloadInfo(
            "imagenet_resnet", "accuracy", "max", 1 - 0.22569, 1 - 0.3440, 66_159, 195_999, 510
        ),
        WorkloadInfo(
            "imagenet_vit", "accuracy", "max", 1 - 0.22691, 1 - 0.3481, 69_768, 167_999, 7 * 60
        ),
        WorkloadInfo(
            "librispeech_conformer", "wer", "min", 0.085884, 0.052981, 58_015, 76_000, 24 * 60
        ),
        WorkloadInfo(
            "librispeech_deepspeech", "wer", "min", 0.119936, 0.074143, 44_405, 38_400, 24 * 60
        ),
        WorkloadInfo(
            "ogbg", "mean_average_precision", "max", 0.28098, 0.268729, 12_011, 52_000, 4 * 60
        ),
        WorkloadInfo("wmt", "bleu", "max", 30.8491, 30.7219, 43_336, 120_000, 14 * 60),
    )
}


def _unused(*args: Any, **kwargs: Any) -> None:
    del args, kwargs
    raise NotImplementedError("probe instance: only properties may be read")


def _uninitialized_instance(workload_class: type) -> Any:
    """An instance whose constructor never ran: reading constant properties is all we do."""
    abstract = getattr(workload_class, "__abstractmethods__", frozenset())
    if abstract:
        workload_class = type(
            f"_Probe{workload_class.__name__}",
            (workload_class,),
            {name: _unused for name in abstract},
        )
    return object.__new__(workload_class)


def probe_direction(instance: Any, metric: str, target: float) -> Direction | None:
    column = f"validation/{metric}"
    step = max(1.0, abs(target))
    try:
        above = bool(instance.has_reached_validation_target({column: target + step}))
        below = bool(instance.has_reached_validation_target({column: target - step}))
    except Exception:
        return None
    if above and not below:
        return "max"
    if below and not above:
        return "min"
    return None


def read_from_algoperf(name: str, framework: str) -> WorkloadInfo:
    """Reads one workload's properties from the installed algoperf; raises on any failure."""
    registry = importlib.import_module("algoperf.workloads.workloads")
    entry = registry.WORKLOADS[name]
    module_name = (
        "algoperf.workloads." + entry["workload_path"].replace("/", ".") + f"_{framework}.workload"
    )
    module = importlib.import_module(module_name)
    instance = _uninitialized_instance(getattr(module, entry["workload_class_name"]))
    metric = str(instance.target_metric_name)
    target = float(instance.validation_target_value)
    direction = probe_direction(instance, metric, target) or metric_direction(metric)
    test_target = instance.test_target_value
    return WorkloadInfo(
        name=name,
        target_metric=metric,
        direction=direction,
        validation_target=target,
        test_target=None if test_target is None else float(test_target),
        max_runtime_sec=float(instance.max_allowed_runtime_sec),
        step_hint=int(instance.step_hint),
        eval_period_sec=float(instance.eval_period_time_sec),
        source=f"algoperf ({module_name}.{entry['workload_class_name']})",
    )


@functools.cache
def _cached_algoperf(name: str, frameworks: tuple[str, ...]) -> tuple[WorkloadInfo | None, str]:
    reasons = []
    for framework in frameworks:
        try:
            return read_from_algoperf(name, framework), ""
        except Exception as exc:  # any failure means: use the fallback table
            reasons.append(f"{framework}: {type(exc).__name__}: {exc}")
    return None, "; ".join(reasons)


def known_workloads() -> tuple[str, ...]:
    """The workloads the runner accepts: the benchmark's, from the installed algoperf
    when it can be imported (v0.6's eight otherwise)."""
    return benchmark_workloads()


def _source_hint() -> str:
    if _algoperf_base_workloads() is not None:
        return "the installed algoperf's base workloads"
    return (
        "algoperf is not importable here, so only v0.6's built-in eight are known; "
        "install the algoperf that has the workload"
    )


def _check_name(name: str) -> None:
    choices = known_workloads()
    if name not in choices:
        raise UnknownWorkloadError(
            f"unknown AlgoPerf workload {name!r} ({_source_hint()}); choices: {', '.join(choices)}"
        )


def select_benchmark_workloads(selection: str | Sequence[str]) -> list[str]:
    """:func:`select_workloads` among :func:`known_workloads`, saying where the list is from."""
    try:
        return select_workloads(selection, known_workloads())
    except UnknownWorkloadError as exc:
        raise UnknownWorkloadError(f"{exc} ({_source_hint()})") from None


@functools.cache
def _algoperf_base_workloads() -> tuple[str, ...] | None:
    try:
        registry = importlib.import_module("algoperf.workloads.workloads")
        return tuple(str(name) for name in registry.BASE_WORKLOADS)
    except Exception:  # algoperf missing or broken: the fallback list stands
        return None


def benchmark_workloads() -> tuple[str, ...]:
    """The workloads the benchmark score counts: the installed algoperf's
    ``BASE_WORKLOADS``, else v0.6's eight."""
    return _algoperf_base_workloads() or ALGOPERF_WORKLOADS


def get_workload(name: str, framework: str = "jax", source: Source = "auto") -> WorkloadInfo:
    """One workload's info, from algoperf when importable (``source="auto"``)."""
    _check_name(name)
    if source not in ("auto", "algoperf", "fallback"):
        raise RunnerError(f"source={source!r}; expected auto, algoperf or fallback")
    if source == "fallback":
        if name not in FALLBACK_TABLE:
            raise RunnerError(
                f"workload {name!r} has no built-in v0.6 values; read it from algoperf"
            )
        return FALLBACK_TABLE[name]
    order = (framework, *[f for f in FRAMEWORKS if f != framework])
    info, reason = _cached_algoperf(name, order)
    if info is not None:
        return info
    if source == "algoperf" or name not in FALLBACK_TABLE:
        raise RunnerError(f"could not read workload {name!r} from algoperf: {reason}")
    return dataclasses.replace(FALLBACK_TABLE[name], source="fallback (algoperf not importable)")


def workload_table(
    names: Iterable[str] | None = None, framework: str = "jax", source: Source = "auto"
) -> dict[str, WorkloadInfo]:
    names = known_workloads() if names is None else names
    return {name: get_workload(name, framework, source) for name in names}


def select_workloads(selection: str | Sequence[str], choices: Sequence[str]) -> list[str]:
    """``"all"`` or a comma list (or a sequence) of names from ``choices``, in the given order."""
    if isinstance(selection, str):
        names = [part.strip() for part in selection.split(",") if part.strip()]
    else:
        names = [str(part).strip() for part in selection]
    if not names:
        raise UnknownWorkloadError(f"no workload selected; choices: all, {', '.join(choices)}")
    if names == ["all"]:
        return list(choices)
    unknown = [name for name in names if name not in choices]
    if unknown:
        raise UnknownWorkloadError(
            f"unknown workload(s) {', '.join(repr(n) for n in unknown)}; "
            f"choices: all, {', '.join(choices)}"
        )
    return list(dict.fromkeys(names))
