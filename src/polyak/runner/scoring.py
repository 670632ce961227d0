"""Performance profiles and the AlgoPerf benchmark score.

Given per-workload times to target ``t[s][w]`` for several submissions s (the
median over studies; infinity for a miss), AlgoPerf's scoring
(``scoring/performance_profile.py`` and ``score_submissions.py``) does:

All submissions are pooled into one profile, whatever their framework: the
leaderboard ranks a JAX baseline and a PyTorch Shampoo against each other.
An unknown time (NaN: the workload is unfinished) counts like a miss in the
profile and never as the best time; the report flags such scores as provisional.

1. per workload, the best time ``b[w] = min_s t[s][w]``;
2. a time more than 4x the best becomes infinity;
3. the ratio ``r[s][w] = t[s][w] / b[w]`` (with a reference submission: divided by
   its time instead); a workload nobody solved gives inf/inf, which counts nowhere;
4. the profile ``rho_s(tau) = #{w : r[s][w] <= tau} / n`` on ``num_points = 100``
   evenly spaced ``tau`` in ``[1, 4]``, where ``n`` is the number of benchmark
   workloads (8), not the number present; a missing workload counts as a miss;
5. the score: the trapezoid integral of ``rho_s`` over those points divided by
   ``4 - 1``, so 1.0 means fastest everywhere.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from polyak.runner.errors import RunnerError

MIN_TAU = 1.0
MAX_TAU = 4.0
NUM_POINTS = 100
# Times beyond this multiple of the best get no credit (AlgoPerf: r_max = 4).
MAX_RATIO = 4.0
# The leaderboard's rules (scoring/performance_profile.py): 3 studies per workload,
# 5 trials per study under external tuning, one under self-tuning.
REQUIRED_STUDIES = 3
REQUIRED_TRIALS: dict[str, int] = {"external": 5, "self": 1}


@dataclasses.dataclass(frozen=True)
class PerformanceProfile:
    taus: np.ndarray
    rho: dict[str, np.ndarray]
    ratios: dict[str, dict[str, float]]
    workloads: tuple[str, ...]
    num_workloads: int


def performance_ratios(
    times: Mapping[str, Mapping[str, float]],
    workloads: Sequence[str],
    reference: str | None = None,
) -> dict[str, dict[str, float]]:
    """``r[s][w]`` after the 4x cut; NaN where nobody (or the reference) missed."""
    if reference is not None and reference not in times:
        raise RunnerError(f"reference submission {reference!r} is not among {sorted(times)}")
    table = {s: {w: float(times[s].get(w, math.inf)) for w in workloads} for s in times}
    for w in workloads:
        best = _best(table[s][w] for s in table)
        for s in table:
            if table[s][w] > MAX_RATIO * best:
                table[s][w] = math.inf
    ratios: dict[str, dict[str, float]] = {s: {} for s in table}
    for w in workloads:
        best = _best(table[s][w] for s in table)
        denominator = table[reference][w] if reference is not None else best
        for s in table:
            ratios[s][w] = _ratio(table[s][w], denominator)
    return ratios


def _best(values: Iterable[float]) -> float:
    """The smallest known time (NaN, unknown, is skipped; inf when none is known)."""
    return min((v for v in values if not math.isnan(v)), default=math.inf)


def _ratio(time: float, denominator: float) -> float:
    if math.isinf(denominator) or math.isnan(denominator) or math.isnan(time):
        return math.nan
    if denominator == 0:
        return 1.0 if time == 0 else math.inf
    return time / denominator


def performance_profiles(
    times: Mapping[str, Mapping[str, float]],
    workloads: Sequence[str],
    *,
    num_workloads: int | None = None,
    reference: str | None = None,
    min_tau: float = MIN_TAU,
    max_tau: float = MAX_TAU,
    num_points: int = NUM_POINTS,
) -> PerformanceProfile:
    """rho_s(tau) for every submission in ``times`` (submission -> workload -> seconds)."""
    if not times:
        raise RunnerError("no submissions to score")
    if not workloads:
        raise RunnerError("no workloads to score")
    n = num_workloads if num_workloads is not None else len(workloads)
    if n < len(workloads):
        raise RunnerError(f"num_workloads={n} is smaller than the {len(workloads)} workloads given")
    if not (max_tau > min_tau and num_points >= 2):
        raise RunnerError(f"tau range [{min_tau}, {max_tau}] with {num_points} points is empty")
    ratios = performance_ratios(times, workloads, reference)
    taus = np.linspace(min_tau, max_tau, num=num_points)
    rho = {}
    for s, per_workload in ratios.items():
        r = np.array([per_workload[w] for w in workloads], dtype=float)
        with np.errstate(invalid="ignore"):
            rho[s] = np.array([(r <= tau).sum() / n for tau in taus], dtype=float)
    return PerformanceProfile(taus, rho, ratios, tuple(workloads), n)


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


def benchmark_scores(profile: PerformanceProfile, normalize: bool = True) -> dict[str, float]:
    """The integral of each profile over tau, divided by the tau range when ``normalize``."""
    span = float(profile.taus[-1] - profile.taus[0])
    scores = {}
    for s, rho in profile.rho.items():
        area = _trapezoid(rho, profile.taus)
        scores[s] = area / span if normalize else area
    return scores
