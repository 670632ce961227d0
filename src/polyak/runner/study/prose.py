"""Numbers into words: the formats of the study's tables and every sentence of its page.

Each comparative sentence is computed from the summaries, so the page cannot
claim what the numbers do not show.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence

from polyak.runner.results import median
from polyak.runner.study.analysis import StudyAnalysis, Summary, spearman
from polyak.runner.study.plan import COSINE_SWITCH, Setting, StudySettings, number_text
from polyak.runner.tables import format_number

# The paper's numbers the text compares against (Ajroldi, Orvieto & Geiping 2025).
PAPER_STEP_RATIO = 0.82
PAPER_HORIZON_FRACTION = 0.01


# Differences smaller than this fraction of the metric's value are called "the same".
NEGLIGIBLE_FRACTION = 0.001


def duration_text(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def fmt_steps(value: float) -> str:
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "miss"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def fmt_metric(value: float) -> str:
    return format_number(value) if not (isinstance(value, float) and math.isnan(value)) else "-"


def fmt_gain(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:+.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:+.2g}"


def _steps_phrase(value: float) -> str:
    if math.isinf(value):
        return "no hit (median over seeds a miss)"
    return f"{fmt_steps(value)} steps"


def _negligible(difference: float, scale: float) -> bool:
    """Below NEGLIGIBLE_FRACTION of the metric's size: a difference no one would act on."""
    return abs(difference) <= NEGLIGIBLE_FRACTION * abs(scale)


def _versus(value: float, reference: float, direction: str) -> str:
    """ "better", "worse" or "the same (within 0.1%)" for value against reference."""
    if _negligible(value - reference, reference):
        return f"the same (within {percent(NEGLIGIBLE_FRACTION)})"
    return "better" if _better(value, reference, direction) else "worse"


def _better(a: float, b: float, direction: str) -> bool:
    return a > b if direction == "max" else a < b


def fmt_ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def fmt_ratio(value: float) -> str:
    if math.isnan(value):
        return "-"
    return "miss" if math.isinf(value) else f"{value:.2f}"


def with_spread(summary: Summary, name: str, fmt: Callable[[float], str]) -> str:
    mid = summary.median(name)
    low, high = summary.spread(name)
    if len(summary.members) == 1 or math.isnan(low):
        return fmt(mid)
    return f"{fmt(mid)} [{fmt(low)}–{fmt(high)}]"


def percent(value: float) -> str:
    percent = 100 * value
    return f"{percent:.0f}%" if percent >= 100 else f"{percent:.3g}%"


def _rank_key(summary: Summary) -> tuple[float, float]:
    """Fewer steps to target first (median over seeds), then the larger gain over raw."""
    gain = summary.median("mean_gain")
    return (summary.median("steps"), -gain if not math.isnan(gain) else math.inf)


# ---- question 1: time to target


SystemKey = tuple[str, str, str]  # (workload, submission, framework)


def _system(summary: Summary) -> SystemKey:
    return (summary.workload, summary.submission, summary.framework)


def findings_time_to_target(analysis: StudyAnalysis) -> list[str]:
    """Question 1, in sentences computed from the part-1 summaries."""
    summaries = analysis.time_to_target
    raw = {_system(s): s for s in summaries if not s.setting.averaged}
    # One sentence per averaging row (a mode and its variants: best-of selection, TWA's budget).
    rows = list(dict.fromkeys(s.setting.short() for s in summaries if s.setting.averaged))
    lines = [_mode_finding([s for s in summaries if s.setting.short() == row], raw) for row in rows]
    load_note = _load_spread_finding(summaries)
    return lines + ([load_note] if load_note else [])


def _step_comparison(members: Sequence[Summary], raw: Mapping[SystemKey, Summary]) -> str:
    """In how many cases the median steps were fewer, as many or more than without averaging."""
    fewer = same = more = 0
    for s in members:
        base = raw.get(_system(s))
        if base is None:
            continue
        a, b = s.median("steps"), base.median("steps")
        if a < b:
            fewer += 1
        elif a > b:
            more += 1
        else:
            same += 1
    return (
        f"needed fewer steps than no averaging (median over seeds) in {fewer} of "
        f"{fewer + same + more} workload × optimizer × framework cases, as many in {same} and "
        f"more in {more}"
    )


def _paper_step_text(step_ratio: float) -> str:
    if math.isnan(step_ratio):
        return (
            "no seed hit the target with or without averaging, so the paper's "
            f"≈{PAPER_STEP_RATIO:.2f} cannot be checked"
        )
    paper = f"(the paper: ≈{PAPER_STEP_RATIO:.2f} on AlgoPerf)"
    if step_ratio == 1:
        return f"as many steps as without averaging {paper}"
    word = "fewer" if step_ratio < 1 else "more"
    return f"{word} steps than without averaging {paper}"


def _pooled_median(values: Sequence[float]) -> float:
    return median(list(values)) if values else math.nan


def _mode_finding(members: Sequence[Summary], raw: Mapping[SystemKey, Summary]) -> str:
    """One averaging mode over every workload × optimizer × framework of question 1."""
    bases = [raw[key] for key in {_system(s) for s in members} if key in raw]
    step_ratio = _pooled_median([r for s in members for r in s.step_ratios])
    time_ratio = _pooled_median([r for s in members for r in s.time_ratios])
    gains = [s.median("mean_gain") for s in members]
    positive = sum(1 for g in gains if g > 0)
    return (
        f"**{members[0].setting.short()}** hit the target in {sum(s.hits for s in members)} of "
        f"{sum(len(s.members) for s in members)} runs (no averaging: "
        f"{sum(b.hits for b in bases)} of {sum(len(b.members) for b in bases)}) and "
        f"{_step_comparison(members, raw)}. Pooled over cases and seeds, the median ratio "
        f"averaged / raw (same seed) is {fmt_ratio(step_ratio)} in steps, "
        f"{_paper_step_text(step_ratio)}, and {fmt_ratio(time_ratio)} in submission time. The "
        f"averaged model scored better than the raw weights on average over the run in "
        f"{positive} of {len(gains)} cases."
    )


def _load_spread_finding(summaries: Sequence[Summary]) -> str | None:
    spreads = [
        high / low
        for s in summaries
        for low, high in [s.spread("ms_per_step")]
        if len(s.members) > 1 and low > 0 and math.isfinite(high)
    ]
    if not spreads:
        return None
    return (
        "Submission times are less trustworthy than steps here: the same configuration's "
        f"steady-state ms per step varied across seeds by up to {max(spreads):.1f}x "
        f"(median {median(spreads):.2f}x) as the shared machine's load changed; step "
        "counts do not depend on the load."
    )


# ---- question 2: sensitivity


def findings_sensitivity(analysis: StudyAnalysis) -> list[str]:
    lines = []
    for workload, summaries in analysis.sensitivity.items():
        if summaries:
            lines += _grid_findings(workload, summaries, analysis.settings)
    return lines


def _grid_findings(
    workload: str, summaries: Sequence[Summary], settings: StudySettings
) -> list[str]:
    raw = next((s for s in summaries if not s.setting.averaged), None)
    raw_steps = raw.median("steps") if raw is not None else math.nan
    hint = summaries[0].step_hint if summaries else 1
    lines = []
    for name, mode in (("LAWA", "lawa"), ("EMA", "ema")):
        group = [s for s in summaries if s.setting.averaging == mode]
        if group:
            lines += _grid_group_findings(workload, name, group, raw_steps, hint)
    ema = [s for s in summaries if s.setting.averaging == "ema"]
    if settings.poor_ema is not None and ema:
        lines += _poor_ema_finding(workload, settings.poor_ema, ema, raw_steps)
    return lines


def _grid_group_findings(
    workload: str, name: str, group: Sequence[Summary], raw_steps: float, hint: int
) -> list[str]:
    """The best and worst settings of one grid, and how steps follow the horizon."""
    ranked = sorted(group, key=_rank_key)
    best, worst = ranked[0], ranked[-1]
    horizons = [s.setting.horizon() or math.nan for s in group]
    rho = spearman(horizons, [s.median("steps") for s in group])
    rho_gain = spearman(horizons, [s.median("mean_gain") for s in group])
    trend = "rise with" if rho > 0.5 else "fall with" if rho < -0.5 else "show no clear trend in"
    horizon_word = "ν·L" if name == "LAWA" else "ν/(1−β)"
    criterion = (
        "fewest median steps to target, ties broken by the larger mean gain over raw"
        if math.isfinite(best.median("steps"))
        else "no setting reached the target in the median, so: the larger mean gain over raw"
    )
    lines = [
        f"{workload}, {name}: the best setting ({criterion}) is **{best.setting.short()}** "
        f"with {_steps_phrase(best.median('steps'))} (no averaging: "
        f"{_steps_phrase(raw_steps)}) and horizon {horizon_word} = "
        f"{best.setting.horizon():.0f} steps = {percent(best.setting.horizon() / hint)} of "
        f"step_hint {hint}; the worst is {worst.setting.short()} with "
        f"{_steps_phrase(worst.median('steps'))} (horizon "
        f"{percent(worst.setting.horizon() / hint)}). Median steps to target {trend} the "
        f"horizon (Spearman ρ = {rho:.2f}); the mean gain over raw has ρ = {rho_gain:.2f} "
        f"with the horizon."
    ]
    if name == "LAWA":
        lines.append(_paper_horizon_finding(workload, best, min(horizons), hint))
    return lines


def _paper_horizon_finding(workload: str, best: Summary, shortest: float, hint: int) -> str:
    best_is_shortest = best.setting.horizon() == shortest
    return (
        f"{workload}: the paper's best horizon is ν·L ≈ "
        f"{percent(PAPER_HORIZON_FRACTION)} of the budget; this grid's shortest is "
        f"{percent(shortest / hint)} of step_hint, and the winning horizon here is "
        f"{percent(best.setting.horizon() / hint)}"
        + (
            ", the shortest on offer: consistent with a short horizon winning, though "
            "the grid cannot resolve 1%."
            if best_is_shortest
            else ", not the shortest on offer."
        )
    )


def _poor_ema_finding(
    workload: str, poor: Setting, ema: Sequence[Summary], raw_steps: float
) -> list[str]:
    """Where the paper's 'poor' EMA (ν = 1, β = 0.9) ranks among the EMA settings."""
    ranked = sorted(ema, key=_rank_key)
    position = next((i for i, s in enumerate(ranked) if s.setting == poor), None)
    if position is None:
        return []
    entry = ranked[position]
    gains = [s.median("mean_gain") for s in ema]
    median_gain = median([g for g in gains if not math.isnan(g)])
    steps, gain = entry.median("steps"), entry.median("mean_gain")
    if steps < raw_steps or (steps == raw_steps and gain > 0):
        verdict = "it beats no averaging here, so the paper's 'poor' does not reproduce"
    elif position < len(ranked) / 2:
        verdict = (
            "it gives nothing over no averaging (poor in that sense, as the paper says), "
            "yet the other EMA settings here do worse still"
        )
    else:
        verdict = "it is among the worse EMA settings, consistent with the paper"
    return [
        f"{workload}: EMA with ν={poor.every}, β={number_text(poor.beta)} ranks "
        f"{position + 1} of {len(ranked)} EMA settings with {_steps_phrase(steps)} "
        f"(no averaging: {_steps_phrase(raw_steps)}) and a mean gain over raw of "
        f"{fmt_gain(gain)} (EMA grid median {fmt_gain(median_gain)}): {verdict}."
    ]


# ---- question 3: averaging against LR decay


def findings_decay(analysis: StudyAnalysis) -> list[str]:
    """Question 3, in sentences computed from the part-3 summaries."""
    lines = []
    settings = analysis.settings
    for workload, summaries in analysis.decay.items():
        by_setting = {s.setting: s for s in summaries}
        cosine = by_setting.get(Setting())
        if cosine is None:
            continue
        constant = by_setting.get(Setting(schedule="constant"))
        for averaged in (settings.lawa, settings.ema):
            entry = by_setting.get(dataclasses.replace(averaged, schedule="constant"))
            if entry is not None:
                lines.append(_constant_lr_finding(workload, averaged, entry, cosine, constant))
        with_decay = by_setting.get(settings.lawa)
        if with_decay is not None:
            lines.append(_annealed_gain_finding(workload, with_decay, cosine))
    return lines


def _seed_ranges_text(entry: Summary, cosine: Summary) -> str:
    if min(len(entry.members), len(cosine.members)) == 1:
        return "one seed each"
    low, high = entry.spread("best_metric")
    c_low, c_high = cosine.spread("best_metric")
    overlap = not (high < c_low or low > c_high)
    return f"the seed ranges {'overlap' if overlap else 'do not overlap'}"


def _constant_lr_finding(
    workload: str,
    averaged: Setting,
    entry: Summary,
    cosine: Summary,
    constant: Summary | None,
) -> str:
    """Constant LR with averaging against cosine decay without it, and what that means."""
    direction = cosine.direction
    reference = cosine.median("best_metric")
    value = entry.median("best_metric")
    low, high = entry.spread("best_metric")
    c_low, c_high = cosine.spread("best_metric")
    verdict = _versus(value, reference, direction)
    spread = (
        f" (median; seeds {fmt_metric(low)}–{fmt_metric(high)})" if len(entry.members) > 1 else ""
    )
    reference_spread = (
        f" ({fmt_metric(c_low)}–{fmt_metric(c_high)})" if len(cosine.members) > 1 else ""
    )
    text = (
        f"{workload}: constant LR with {averaged.short()} reaches a best validation "
        f"{cosine.members[0].trial.metric} of {fmt_metric(value)}{spread} against "
        f"{fmt_metric(reference)}{reference_spread} with cosine decay and no averaging: "
        f"{verdict} ({_seed_ranges_text(entry, cosine)})."
    )
    constant_alone = "worse"
    if constant is not None:
        raw_best = constant.median("best_metric")
        constant_alone = _versus(raw_best, reference, direction)
        text += (
            " Against its own raw weights on the constant LR (best "
            f"{fmt_metric(raw_best)}) the averaged model's best is "
            f"{_versus(value, raw_best, direction)}."
        )
    if constant_alone == "better":
        return text + (
            " But the constant LR without averaging is better than cosine decay too: within "
            "this budget the decay costs more progress than it gives back, so this workload "
            "cannot tell whether averaging replaces decay; "
            "it shows what averaging adds on top of a constant LR."
        )
    if constant_alone != "worse":
        return text + (
            " But the constant LR without averaging is not worse than cosine decay "
            "either, so LR decay makes no difference to the best metric on this "
            "workload and it cannot tell whether averaging replaces decay."
        )
    if verdict == "worse":
        return text + " Averaging does not replace LR decay here, as the paper found."
    return text + (
        " LR decay matters here (constant LR alone is worse), and averaging on a "
        "constant LR makes up for it, unlike the paper's finding."
    )


def _annealed_gain_finding(workload: str, with_decay: Summary, cosine: Summary) -> str:
    """What averaging adds on top of cosine decay, over the run and once annealed."""
    reference = cosine.median("best_metric")
    final_gain = with_decay.median("final_gain")
    mean_gain = with_decay.median("mean_gain")
    final_step = median([float(m.trial.final_step or 0) for m in with_decay.members])
    hint = with_decay.step_hint
    where = (
        f"at the last eval (step {final_step:.0f}, where the cosine has reached 0)"
        if final_step >= hint
        else f"at the last eval (step {final_step:.0f}, before the cosine reaches 0 at {hint})"
    )
    if math.isnan(final_gain):
        end = "it cannot be compared"
    elif _negligible(final_gain, reference):
        end = (
            f"within {percent(NEGLIGIBLE_FRACTION)} of the metric, i.e. nothing, as the "
            "paper found once the LR is annealed"
        )
    elif final_gain > 0:
        end = "a gain remains after annealing, unlike the paper's finding"
    else:
        end = "the averaged model is worse than the annealed raw weights"
    return (
        f"{workload}: on top of cosine decay, {with_decay.setting.short()}'s gain over the raw "
        f"weights is {fmt_gain(mean_gain)} on average over the run and "
        f"{fmt_gain(final_gain)} {where}: {end}."
    )


# ---- the page's setup notes


def constant_lr_text(analysis: StudyAnalysis) -> str:
    methods = sorted(
        {
            (s.run.submission, s.run.framework, s.run.constant_lr_method)
            for s in analysis.stats.values()
            if s.run.setting.schedule == "constant"
        }
    )
    if not methods:
        return "No constant-LR runs were made."
    texts = []
    for submission, framework, method in methods:
        if method == COSINE_SWITCH:
            how = f"the optimizer's own hyperparameter `{COSINE_SWITCH}=False`"
        else:
            how = (
                f"an **emulation**: the optimizer has no constant-schedule hyperparameter, so the "
                f"workload reported a step_hint {analysis.settings.constant_lr_stretch}x larger "
                "(the cosine then falls by less than 0.03% over the run), `warmup_factor` was "
                "scaled down by the same factor so the warmup keeps its length in steps, the "
                "averaging ν and L/β were given explicitly (their defaults depend on step_hint), "
                "and the run stopped at the real step_hint"
            )
        texts.append(f"{submission}/{framework}: {how}")
    return "Constant LR: " + "; ".join(texts) + "."


def trajectory_check_text(analysis: StudyAnalysis) -> str:
    worst: dict[str, float] = {}
    counted: dict[str, int] = {}
    for stats in analysis.stats.values():
        if math.isnan(stats.max_train_loss_diff):
            continue
        framework = stats.run.framework
        worst[framework] = max(worst.get(framework, 0.0), stats.max_train_loss_diff)
        counted[framework] = counted.get(framework, 0) + 1
    if not worst:
        return "No averaged run had a raw partner with logged training losses to compare."
    parts = [
        f"{framework}: largest |Δ training loss| {value:.3g} over {counted[framework]} averaged "
        "runs"
        for framework, value in sorted(worst.items())
    ]
    exact = all(v == 0.0 for v in worst.values())
    return (
        "Raw-trajectory check (training loss logged at steps 0–100 by each averaged run "
        "against its raw partner with the same seed): "
        + "; ".join(parts)
        + (
            ". The runs trained identical weights, so the partner's curve is exactly the raw "
            "weights' curve."
            if exact
            else ". Nonzero differences mean the averaged runs' raw trajectories drift from "
            "their partners' by that much (floating-point reassociation between compiled "
            "programs), so the raw curve is that of a numerically equivalent, not "
            "bit-identical, run."
        )
    )


def compute_text(analysis: StudyAnalysis) -> str:
    walls = [s.wall_seconds for s in analysis.stats.values() if s.wall_seconds is not None]
    text = (
        f"{len(analysis.stats)} runs finished"
        + (f", {len(analysis.missing)} missing" if analysis.missing else "")
        + f"; their training loops took {duration_text(sum(walls))} of wall time in total "
        "(summed over runs)."
    )
    sessions = analysis.sessions
    if sessions:
        elapsed = sum(float(s.get("elapsed_seconds") or 0.0) for s in sessions)
        loads = [
            "/".join(map(str, s[key]))
            for s in sessions
            for key in ("load_average_start", "load_average_end")
            if s.get(key)
        ]
        interrupted = sum(1 for s in sessions if s.get("interrupted"))
        text += (
            f" They were made in {len(sessions)} session(s) of the command taking "
            f"{duration_text(elapsed)} in all"
            + (f" ({interrupted} of them interrupted and resumed)" if interrupted else "")
            + f"; load averages (1/5/15 min) at their starts and ends: {', '.join(loads)} on "
            f"{os.cpu_count()} cores. Submission times scale with the load, steps do not."
        )
    return text
