"""Figures of the paper's training dynamics from run directories
(`python eval.py plot RUN_DIR ...`).

Each RUN_DIR holds metrics.jsonl (one JSON object per step, keys from metrics.rollout_metrics,
train.py and "eval/..." on evaluation steps) and config.json ("algo", "seed"). PNGs go into the
first RUN_DIR:

- fig3_dynamics.png            Fig. 3, first run: relative perplexity, token entropy (planning vs
                               execution), semantic vs conditional entropy, accuracy and length;
- fig6_comparison.png          Fig. 6/7, several runs: semantic entropy, validation accuracy, token
                               entropy, training pass@k; runs sharing an algo are drawn as their
                               mean with a min-max band (sweep.py: a 95% Student-t band,
                               fig6_sweep.png);
- fig5_error_types.png         Fig. 5, runs that logged error types (built-in world);
- fig10_planning_vs_entropy.png Fig. 10: overlap of planning and top-30% entropy tokens;
- fig_strategy_shift.png       runs compared on the built-in world: share of completions following a
                               sound strategy, and held-out accuracy;
- fig_phases.png               the two phases, measured (built-in world): share and execution
                               accuracy of each strategy, and the progress of execution vs planning
                               metrics toward their total change with the step where each reaches
                               80% (stats.phase_summary).

Curves are smoothed with a trailing moving average over the last SMOOTH_STEPS steps, the same window
for every run in every figure (so two runs with the same first steps draw them the same), with the
raw values drawn faintly behind; held-out evaluations, logged every --eval-every steps, are drawn as
logged. Bands of probabilities (accuracies, pass@k) are clipped to [0, 1], and the figure says so. A
panel whose keys no run logged shows a note instead of a curve.
"""

import io
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D


from data import read_json
from run_folder import write_atomically
from analysis.stats import (EXECUTION_PHASE_KEYS, PHASE_FRACTION, PHASE_WINDOW, PLANNING_PHASE_KEYS,
                            mean_confidence_interval, moving_average, phase_summary)
from metrics import metrics_records

matplotlib.use("Agg")  # files only, no display

# moving-average window, in training steps (the default run's 200 steps: 5% of them)
SMOOTH_STEPS = 10
DPI = 100
RAW_ALPHA = 0.25  # opacity of the raw (unsmoothed) curve behind the smoothed one
# first one a run logged is used
EVAL_ACCURACY_KEYS = ("eval/accuracy", "eval/pass@1", "eval/pass_at_1")


@dataclass
class Run:
    """One training run: its label parts and its logged rows (one dict per logged step)."""

    path: Path
    algo: str
    seed: int | str
    rows: list[dict]

    @property
    def label(self) -> str:
        return f"{self.algo} (seed {self.seed})"


def load_run(run_dir: str) -> Run:
    """Read RUN_DIR/metrics.jsonl and RUN_DIR/config.json (missing config -> algo = directory
    name)."""
    path = Path(run_dir)
    metrics_file = path / "metrics.jsonl"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{metrics_file} does not exist")
    rows = metrics_records(metrics_file)
    config_file = path / "config.json"
    config = (read_json(config_file.read_text(encoding="utf-8"), str(config_file))
              if config_file.is_file() else {})
    return Run(path, str(config.get("algo", path.name)), config.get("seed", "?"), rows)


def series(run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows that logged a finite number for `key`."""
    points = [(row["step"], row[key]) for row in run.rows
              if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
    steps, values = zip(*points) if points else ((), ())
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def smooth(steps: np.ndarray, values: np.ndarray, window: int = SMOOTH_STEPS) -> np.ndarray:
    """Trailing moving average over steps: at step s, the mean of the values logged at steps in
    (s - window, s].
    steps [N] increasing, values [N] -> [N]."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    # [N], first point inside each window
    starts = np.searchsorted(steps, steps - window, side="right")
    ends = np.arange(1, len(values) + 1)
    return (sums[ends] - sums[starts]) / (ends - starts)


def plot_curve(ax, steps: np.ndarray, values: np.ndarray, label: str, color,
               linestyle: str = "-") -> None:
    """The smoothed curve, with the raw values faintly behind it."""
    ax.plot(steps, values, color=color, alpha=RAW_ALPHA, linewidth=0.8, linestyle=linestyle)
    ax.plot(steps, smooth(steps, values), color=color, linewidth=1.6, linestyle=linestyle,
            label=label)


def note_missing(ax, keys: list[str]) -> None:
    """Replace an empty panel's content by a note naming the keys that no run logged."""
    ax.text(0.5, 0.5, "not logged:\n" + "\n".join(keys), ha="center", va="center",
            transform=ax.transAxes, fontsize=9, color="gray")


def plot_keys(ax, run: Run, curves: list[tuple[str, str]], title: str, ylabel: str = "") -> None:
    """Panel with one curve per (key, label) of one run; a note when none was logged."""
    drawn = False
    for i, (key, label) in enumerate(curves):
        steps, values = series(run, key)
        if len(steps):
            plot_curve(ax, steps, values, label, f"C{i}")
            drawn = True
    finish_panel(ax, title, ylabel, drawn, [key for key, _ in curves])


def finish_panel(ax, title: str, ylabel: str, drawn: bool, keys: list[str]) -> None:
    """Title, labels and legend, or the missing-keys note."""
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if drawn:
        ax.legend(fontsize=8)
    else:
        note_missing(ax, keys)


def plot_twin(ax, run: Run, left: tuple[str, str], right: tuple[str, str], title: str) -> None:
    """Panel with two keys on separate y axes (left axis C0, right axis C1)."""
    twin = ax.twinx()
    drawn = []
    for axis, (key, label), color in ((ax, left, "C0"), (twin, right, "C1")):
        steps, values = series(run, key)
        if len(steps):
            plot_curve(axis, steps, values, label, color)
            axis.set_ylabel(label, color=color)
            drawn.append(axis)
    if drawn:
        handles = [h for axis in drawn for h in axis.get_legend_handles_labels()[0]]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    if twin not in drawn:
        twin.set_axis_off()
    if not drawn:
        note_missing(ax, [left[0], right[0]])


def eval_accuracy_key(runs: list[Run]) -> str:
    """The validation-accuracy key the runs logged (first of EVAL_ACCURACY_KEYS found, else any
    "eval/...acc")."""
    logged = {key for run in runs for row in run.rows for key in row}
    found = [key for key in EVAL_ACCURACY_KEYS if key in logged]
    found += sorted(key for key in logged if key.startswith("eval/") and "acc" in key)
    return found[0] if found else EVAL_ACCURACY_KEYS[0]


def fig3_dynamics(run: Run, out: Path) -> Path:
    """Fig. 3: the two phases of RL training in one run."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    plot_keys(axes[0, 0], run,
              [("ppl_planning_rel", "planning"), ("ppl_execution_rel", "execution")],
              "relative perplexity (÷ step 0)", "perplexity / perplexity at step 0")
    plot_keys(axes[0, 1], run, [("entropy_planning", "planning"),
                                ("entropy_execution", "execution"),
                                ("entropy_all", "all tokens")], "token entropy", "nats")
    plot_twin(axes[1, 0], run, ("semantic_entropy", "semantic entropy of SGs"),
              ("conditional_entropy", "conditional entropy after SGs"),
              "semantic vs conditional entropy (nats)")
    plot_twin(axes[1, 1], run, ("accuracy", "training accuracy"),
              ("length_mean", "mean length (tokens)"), "accuracy and response length")
    fig.suptitle(f"Training dynamics — {run.label}  ({run.path.name})")
    return save(fig, out / "fig3_dynamics.png")


def aligned(runs: list[Run], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed curves of `key` at the steps every run logged: (steps [S], values [R, S])."""
    curves = [series(run, key) for run in runs]
    common = sorted(set.intersection(*(set(steps.tolist()) for steps, _ in curves)))
    values = [smooth(s, v)[np.isin(s, common)] for s, v in curves]
    return np.asarray(common), np.asarray(values).reshape(len(runs), len(common))


def is_probability(key: str) -> bool:
    """Whether a logged key is a probability (an accuracy, a pass@k, a share), whose band must stay
    inside [0, 1]."""
    return (key in ("accuracy", "pass_at_k", "reward", "planning_ratio")
            or key.startswith(("share_", "exec_acc_"))
            or key.startswith("eval/pass@") and not key.endswith("_se"))


def band_limits(values: np.ndarray, band: str,
                probability: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper band over runs at each step: "minmax", or "ci" (95% Student-t interval),
    clipped to [0, 1] for a probability (a t interval over few seeds runs past it).
    values [R, S]."""
    if band == "minmax":
        return values.min(axis=0), values.max(axis=0)
    intervals = [mean_confidence_interval(column.tolist()) for column in values.T]
    low, high = np.array([i[1] for i in intervals]), np.array([i[2] for i in intervals])
    return (np.clip(low, 0, 1), np.clip(high, 0, 1)) if probability else (low, high)


def plot_groups(ax, runs: list[Run], key: str, title: str, ylabel: str = "",
                band: str = "minmax") -> None:
    """One colour per algo: a single run as its own curve, several runs as mean with a band
    (band_limits)."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.algo].append(run)
    drawn = False
    for i, (algo, members) in enumerate(groups.items()):
        color = f"C{i}"
        logged = [run for run in members if len(series(run, key)[0])]
        if len(logged) == 1:
            plot_curve(ax, *series(logged[0], key), logged[0].label, color)
        elif logged:
            steps, values = aligned(logged, key)
            ax.plot(steps, values.mean(axis=0), color=color, linewidth=1.6,
                    label=f"{algo} (mean of {len(logged)})")
            ax.fill_between(steps, *band_limits(values, band, is_probability(key)), color=color,
                            alpha=0.2)
        drawn = drawn or bool(logged)
    finish_panel(ax, title, ylabel, drawn, [key])


def fig6_comparison(runs: list[Run], out: Path, band: str = "minmax",
                    name: str = "fig6_comparison.png") -> Path:
    """Fig. 6/7: methods compared on semantic entropy, validation accuracy, token entropy, training
    pass@k.

    band: "minmax" over seeds, or "ci" (95% Student-t interval of the mean over seeds).
    """
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    accuracy_key = eval_accuracy_key(runs)
    plot_groups(axes[0, 0], runs, "semantic_entropy", "semantic entropy of strategic grams",
                "nats", band)
    plot_groups(axes[0, 1], runs, accuracy_key, f"validation accuracy ({accuracy_key})", band=band)
    plot_groups(axes[1, 0], runs, "entropy_all", "token entropy (all tokens)", "nats", band)
    plot_groups(axes[1, 1], runs, "pass_at_k", "training pass@k (k = group size)", band=band)
    what = ("95% t interval of the mean over seeds, clipped to [0, 1] for probabilities"
            if band == "ci" else "min-max over seeds")
    fig.suptitle(f"Comparison of runs\nband: {what}; "
                 f"curves: mean over the last {SMOOTH_STEPS} steps", fontsize=10)
    return save(fig, out / name)


def fig_strategy_shift(runs: list[Run], out: Path, band: str = "minmax",
                       name: str = "fig_strategy_shift.png") -> Path:
    """The built-in world's strategy shift, algorithms compared: the share of completions that
    follow a sound strategy (planning), and held-out pass@1 (the outcome), one colour per algorithm
    (a band over seeds when several)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    plot_groups(axes[0], runs, "share_sound", "completions that follow a sound strategy",
                "share", band)
    plot_groups(axes[1], runs, eval_accuracy_key(runs),
                f"held-out accuracy ({eval_accuracy_key(runs)})", band=band)
    what = ("95% t interval of the mean over seeds, clipped to [0, 1]" if band == "ci"
            else "min-max over seeds")
    fig.suptitle(f"The strategy shift\nband: {what}; "
                 f"curves: mean over the last {SMOOTH_STEPS} steps", fontsize=10)
    return save(fig, out / name)


def progress(values: np.ndarray) -> np.ndarray:
    """A curve smoothed as stats.phase_summary smooths it, rescaled to its total change: 0 at the
    first point, 1 at the last."""
    smoothed = np.asarray(moving_average(values.tolist(), PHASE_WINDOW))
    total = smoothed[-1] - smoothed[0]
    return (smoothed - smoothed[0]) / total if total else np.zeros_like(smoothed)


def fig_phases(runs: list[Run], out: Path, name: str = "fig_phases.png") -> Path:
    """The two phases, measured on the built-in world (runs of one arm; curves are means over runs).

    Left: share of each strategy; middle: execution accuracy under each strategy
    (correct / completions that follow it), both smoothed as every curve here; right: progress of
    each execution and planning metric toward its total change, with the mean step at which each
    group reaches PHASE_FRACTION of it (stats.phase_summary, per run).
    """
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    logged = sorted({key for run in runs for row in run.rows for key in row})
    for ax, prefix, title in ((axes[0], "share_", "share of completions per strategy"),
                              (axes[1], "exec_acc_", "execution accuracy per strategy")):
        keys = [key for key in logged if key.startswith(prefix)]
        for i, key in enumerate(keys):
            present = [run for run in runs if len(series(run, key)[0])]
            if present:
                steps, values = aligned(present, key)  # smoothed per run
                ax.plot(steps, values.mean(axis=0), color=f"C{i}", label=key.removeprefix(prefix))
        finish_panel(ax, title, "fraction", bool(ax.lines), [prefix + "..."])
    ax = axes[2]
    for i, key in enumerate(EXECUTION_PHASE_KEYS + PLANNING_PHASE_KEYS):
        present = [run for run in runs if len(series(run, key)[0])]
        if present:
            steps, _ = aligned(present, key)
            curves = [progress(series(run, key)[1])[np.isin(series(run, key)[0], steps)]
                      for run in present]
            style = "-" if key in EXECUTION_PHASE_KEYS else "--"
            ax.plot(steps, np.mean(curves, axis=0), color=f"C{i}", linestyle=style, label=key)
    summaries = [phase_summary(run.rows) for run in runs]
    for group, color in (("execution", "black"), ("planning", "gray")):
        found = [s[f"t80/{group}"] for s in summaries if f"t80/{group}" in s]
        if found:
            ax.axvline(float(np.mean(found)), color=color,
                       linestyle="-" if group == "execution" else "--",
                       label=f"{group}: {PHASE_FRACTION:.0%} of change "
                             f"at step {np.mean(found):.0f}")
    ax.axhline(PHASE_FRACTION, color="lightgray", linewidth=0.8)
    finish_panel(ax, "share of total change (solid: execution, dashed: planning)",
                 "fraction of change", bool(ax.lines),
                 list(EXECUTION_PHASE_KEYS + PLANNING_PHASE_KEYS))
    fig.suptitle(f"Phases — {runs[0].algo} ({len(runs)} run{'s' if len(runs) > 1 else ''})")
    return save(fig, out / name)


def run_and_style_legend(ax, runs: list[Run], styles: dict[str, str]) -> None:
    """Compact legend: one colour entry per run (C0, C1, ...) and one line-style entry per
    quantity."""
    handles = [Line2D([], [], color=f"C{i}", label=run.label) for i, run in enumerate(runs)]
    handles += [Line2D([], [], color="black", linestyle=style, label=what)
                for what, style in styles.items()]
    ax.legend(handles=handles, fontsize=8)


def fig5_error_types(runs: list[Run], out: Path) -> Path:
    """Fig. 5: strategy (planning) vs execution errors per batch over training, and strategy's
    share."""
    runs = [run for run in runs if has_key([run], "errors_strategy")]
    fig, (counts_ax, share_ax) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"strategy errors": "-", "execution errors": "--"}
    for i, run in enumerate(runs):
        for key, style in zip(("errors_strategy", "errors_execution"), styles.values()):
            steps, values = series(run, key)
            if len(steps):
                plot_curve(counts_ax, steps, values, run.label, f"C{i}", style)
        steps, strategy = series(run, "errors_strategy")
        execution = series(run, "errors_execution")[1]
        failures = strategy + execution
        if len(steps) and len(execution) == len(steps) and failures.any():
            keep = failures > 0
            plot_curve(share_ax, steps[keep], strategy[keep] / failures[keep], run.label, f"C{i}")
    finish_panel(counts_ax, "errors per batch", "count", bool(counts_ax.lines),
                 ["errors_strategy", "errors_execution"])
    finish_panel(share_ax, "strategy errors / all errors", "share", bool(share_ax.lines),
                 ["errors_strategy"])
    if counts_ax.lines:
        run_and_style_legend(counts_ax, runs, styles)
    return save(fig, out / "fig5_error_types.png")


def fig10_planning_vs_entropy(runs: list[Run], out: Path) -> Path:
    """Fig. 10: planning tokens vs top-30% entropy ("fork") tokens over training."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"planning tokens that are in the top-30% entropy": "-",
              "top-30% entropy tokens that are planning": "--"}
    for i, run in enumerate(runs):
        for key, style in zip(("planning_in_top_entropy", "top_entropy_is_planning"),
                              styles.values()):
            steps, values = series(run, key)
            if len(steps):
                plot_curve(ax, steps, values, run.label, f"C{i}", style)
    finish_panel(ax, "planning vs high-entropy tokens", "fraction", bool(ax.lines),
                 ["planning_in_top_entropy", "top_entropy_is_planning"])
    if ax.lines:
        run_and_style_legend(ax, runs, styles)
    ax.set_ylim(0, 1)
    return save(fig, out / "fig10_planning_vs_entropy.png")


def save(fig, path: Path) -> Path:
    """Write `fig` to `path` as a small PNG and free it, whole and never through a planted link
    (run_folder.write_atomically)."""
    fig.tight_layout()
    image = io.BytesIO()
    try:
        fig.savefig(image, dpi=DPI, format="png")
    finally:
        plt.close(fig)
    write_atomically(path, image.getvalue())
    return path


def has_key(runs: list[Run], key: str) -> bool:
    """Whether any run logged `key` at any step."""
    return any(key in row for run in runs for row in run.rows)


def main(run_dirs: list[str]) -> list[Path]:
    """Write the figures for `run_dirs` into the first one; returns (and prints) the written
    paths."""
    runs = [load_run(run_dir) for run_dir in run_dirs]
    out = runs[0].path
    written = [fig3_dynamics(runs[0], out), fig10_planning_vs_entropy(runs, out)]
    if len(runs) > 1:
        written.append(fig6_comparison(runs, out))
    if has_key(runs, "errors_strategy"):
        written.append(fig5_error_types(runs, out))
    if has_key(runs[:1], "share_sound"):
        written.append(fig_phases(runs[:1], out))
    if len(runs) > 1 and has_key(runs, "share_sound"):
        written.append(fig_strategy_shift(runs, out))
    for path in written:
        print(f"wrote {path}")
    return written
