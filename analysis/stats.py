"""Statistics over runs and over a run's steps (analysis/sweep.py, plots.py, compare.py,
dose_response.py): Student-t intervals over seeds, and Sec. 4's phases (the step at which a metric
makes most of its move)."""

import math
from collections.abc import Sequence


def mean_confidence_interval(values: Sequence[float],
                             level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval mean +- t_{(1+level)/2, n-1} * s / sqrt(n) of
    independent runs.

    A t interval, not a bootstrap: with 3-5 seeds a bootstrap's percentile interval is too narrow.
    One value gives (x, nan, nan); no value gives three nans.
    """
    from scipy.stats import t as student_t

    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = student_t.ppf((1 + level) / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


PHASE_FRACTION = 0.8  # a metric has "moved" once it made 80% of its total change
PHASE_WINDOW = 15  # centred moving-average window (steps) applied before locating that point
EXECUTION_PHASE_KEYS = ("exec_acc_sound", "ppl_execution_rel", "entropy_execution")
PLANNING_PHASE_KEYS = ("share_sound", "semantic_entropy")


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average (the window shrinks at both ends so every point keeps its place)."""
    half = window // 2
    return [sum(values[max(0, i - half): i + half + 1])
            / len(values[max(0, i - half): i + half + 1])
            for i in range(len(values))]


def step_of_fraction(steps: Sequence[float], values: Sequence[float],
                     fraction: float = PHASE_FRACTION, window: int = 1) -> float | None:
    """First step at which a curve has made `fraction` of its total change (Sec. 4's phases,
    measured).

    The curve is smoothed (centred moving average of `window` points); its total change is
    smoothed[-1] - smoothed[0]; the answer is the first step whose progress
    (smoothed[t] - smoothed[0]) / total reaches `fraction`. None for fewer than two points or no
    change.
    """
    if len(values) < 2:
        return None
    smoothed = moving_average(list(values), window)
    total = smoothed[-1] - smoothed[0]
    if total == 0:
        return None
    return next(s for s, v in zip(steps, smoothed) if (v - smoothed[0]) / total >= fraction)


def phase_summary(rows: Sequence[dict], window: int = PHASE_WINDOW,
                  fraction: float = PHASE_FRACTION) -> dict[str, float]:
    """Step at which each execution and planning metric reaches `fraction` of its total change.

    rows: the training records of one run (metrics.jsonl without evaluation lines). Keys
    `t80/<metric>` (named for the default fraction) for each of EXECUTION_PHASE_KEYS and
    PLANNING_PHASE_KEYS the run logged, plus `t80/execution` and `t80/planning`, the mean over each
    group. The paper's account (procedural consolidation, then strategic exploration) predicts
    t80/execution < t80/planning.
    """
    out: dict[str, float] = {}
    for group, keys in (("execution", EXECUTION_PHASE_KEYS), ("planning", PLANNING_PHASE_KEYS)):
        found = []
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            step = (step_of_fraction(*zip(*points), fraction=fraction, window=window)
                    if points else None)
            if step is not None:
                out[f"t80/{key}"] = float(step)
                found.append(step)
        if found:
            out[f"t80/{group}"] = sum(found) / len(found)
    return out
