"""Dose-response of HICRA's alpha, and the dose-matched control, from finished sweep runs.

    python -m analysis.dose_response --runs runs/alpha runs/dose runs/base \
        --report docs/experiments/dose

Reads every run folder under the given sweep folders (and, with --stored, the grpo and hicra arms of
an earlier sweep's results.json) (analysis/sweep.py's layout: ALGO[-alphaA]-seedS), takes `grpo` as
alpha = 0 and `hicra` at its --alpha, and reports per alpha, with 95% t intervals over seeds:
held-out pass@1 after the last step (final) and its area under the curve (AUC, sweep.run_outcome),
and the means of the last 10 training steps of semantic entropy, the sound-strategy share and the
execution accuracy of sound strategies. The trend test is paired across seeds: each seed's
least-squares slope of final (and AUC) on alpha, over the alphas that seed has, and the t interval
of those slopes; a monotone effect of alpha shows as an interval that excludes 0. `random_spans`
(same alpha as the HICRA arm it is paired with) is compared with HICRA at that alpha, paired by
seed.
"""

import argparse
import json
import re
import sys
from pathlib import Path

from analysis.plots import save
from analysis.sweep import Job, read_records, run_finished, run_outcome
from cli import OneLineParser
from analysis.stats import mean_confidence_interval
from metrics import is_eval_record
from run_folder import write_atomically

LAST_STEPS = 10  # training steps averaged for the end-of-run dynamics metrics
DYNAMICS = ("semantic_entropy", "share_sound", "exec_acc_sound")
RUN_NAME = re.compile(r"^(?P<algo>[a-z_]+?)(-alpha(?P<alpha>[0-9.]+))?-seed(?P<seed>\d+)$")


def read_runs(folders: list[Path], target: float) -> list[dict]:
    """One dict per finished run: algo, alpha, seed, final, auc and the DYNAMICS means."""
    runs = []
    for folder in folders:
        for run_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            match = RUN_NAME.match(run_dir.name)
            if not match or not run_finished(run_dir):
                continue
            config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
            records = read_records(run_dir)
            outcome = run_outcome(Job(config["algo"], config["seed"]), records, target).values
            steps = [r for r in records if not is_eval_record(r)][-LAST_STEPS:]
            alpha = 0.0 if config["algo"] == "grpo" else float(config["alpha"])
            runs.append({"algo": config["algo"], "alpha": alpha, "seed": config["seed"],
                         "final": outcome["final"], "auc": outcome["auc"], "run": str(run_dir),
                         **{k: sum(r.get(k, 0.0) for r in steps) / len(steps) for k in DYNAMICS}})
    return runs


def read_stored(path: Path, default_alpha: float) -> list[dict]:
    """The grpo and hicra runs of an earlier sweep's results.json (final and AUC per seed; the
    dynamics metrics are not stored there, so they are None)."""
    arms = json.loads(path.read_text(encoding="utf-8"))["arms"]
    runs = []
    for arm in arms.values():
        if arm["algo"] not in ("grpo", "hicra"):
            continue
        alpha = 0.0 if arm["algo"] == "grpo" else float(arm["settings"].get("alpha", default_alpha))
        for seed, values in zip(arm["seeds"], arm["runs"]):
            runs.append({"algo": arm["algo"], "alpha": alpha, "seed": seed,
                         "final": values["final"], "auc": values["auc"], "run": str(path),
                         **dict.fromkeys(DYNAMICS)})
    return runs


def interval(values: list[float | None]) -> dict:
    """Mean and 95% t interval of the values that exist."""
    present = [v for v in values if v is not None]
    mean, low, high = mean_confidence_interval(present)
    return {"n": len(present), "mean": mean, "low": low, "high": high}


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y on x."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)


def seed_slopes(curve: list[dict], metric: str, max_alpha: float = float("inf")) -> dict:
    """The t interval of each seed's least-squares slope of `metric` on alpha, over its alphas
    <= max_alpha (seeds with fewer than two such alphas left out)."""
    by_seed = {}
    for r in curve:
        if r["alpha"] <= max_alpha:
            by_seed.setdefault(r["seed"], []).append((r["alpha"], r[metric]))
    return interval([slope(points) for points in by_seed.values()
                     if len({x for x, _ in points}) >= 2])


def analyse(runs: list[dict], slope_up_to: float | None = None) -> dict:
    """Per-alpha intervals, the per-seed slope test (also over alphas <= slope_up_to when given),
    and the control's paired difference."""
    curve = [r for r in runs if r["algo"] in ("grpo", "hicra")]
    alphas = sorted({r["alpha"] for r in curve})
    per_alpha = {a: {m: interval([r[m] for r in curve if r["alpha"] == a])
                     for m in ("final", "auc", *DYNAMICS)}
                 for a in alphas}
    slopes = {metric: seed_slopes(curve, metric) for metric in ("final", "auc")}
    if slope_up_to is not None:
        slopes.update({f"{metric}_up_to": seed_slopes(curve, metric, slope_up_to)
                       for metric in ("final", "auc")},
                      up_to=slope_up_to)
    control = {}
    for r in (r for r in runs if r["algo"] == "random_spans"):
        partner = next((h for h in curve if h["algo"] == "hicra" and h["alpha"] == r["alpha"]
                        and h["seed"] == r["seed"]),
                       None)
        if partner:
            for metric in ("final", "auc", *DYNAMICS):
                if partner[metric] is not None and r[metric] is not None:
                    control.setdefault(metric, []).append(partner[metric] - r[metric])
    versus_grpo = {}
    for alpha in alphas[1:]:
        for metric in ("final", "auc"):
            base = {r["seed"]: r[metric] for r in curve if r["alpha"] == alphas[0]}
            diffs = [r[metric] - base[r["seed"]] for r in curve
                     if r["alpha"] == alpha and r["seed"] in base]
            versus_grpo.setdefault(alpha, {})[metric] = interval(diffs)
    controls = [r for r in runs if r["algo"] == "random_spans"]
    return {"per_alpha": per_alpha, "slopes": slopes, "versus_alpha_0": versus_grpo,
            "hicra_minus_random_spans": {m: interval(v) for m, v in control.items()},
            "random_spans": {m: interval([r[m] for r in controls])
                             for m in ("final", "auc", *DYNAMICS)},
            "runs": runs}


def cell(summary: dict, digits: int = 3) -> str:
    if summary["n"] == 0:
        return "not stored"
    if summary["n"] < 2:
        return f"{summary['mean']:.{digits}f} (n={summary['n']})"
    return (f"{summary['mean']:.{digits}f} "
            f"[{summary['low']:.{digits}f}, {summary['high']:.{digits}f}]")


def markdown(result: dict) -> str:
    lines = ["| alpha | seeds | final pass@1 | AUC | semantic entropy | sound share "
             "| sound exec. acc. |",
             "|---|---|---|---|---|---|---|"]
    for alpha, row in result["per_alpha"].items():
        lines.append(f"| {alpha:g} | {row['final']['n']} | "
                     + " | ".join(cell(row[m]) for m in ("final", "auc", *DYNAMICS))
                     + " |")
    if result["random_spans"]["final"]["n"]:
        row = result["random_spans"]
        lines.append("| random spans (0.2) | " + f"{row['final']['n']} | "
                     + " | ".join(cell(row[m]) for m in ("final", "auc", *DYNAMICS)) + " |")
    lines += ["", "Paired by seed, minus alpha 0 (GRPO): " + "; ".join(
        f"alpha {a:g}: final {cell(d['final'])}, AUC {cell(d['auc'])}"
        for a, d in result["versus_alpha_0"].items()) + ".",
        "", "Per-seed slope on alpha (pass@1 per unit alpha), mean [95% t interval over seeds]: "
              f"final {cell(result['slopes']['final'])}, AUC {cell(result['slopes']['auc'])}."]
    if "up_to" in result["slopes"]:
        slopes = result["slopes"]
        lines.append(f"The same over alpha <= {slopes['up_to']:g}: "
                     f"final {cell(slopes['final_up_to'])}, "
                     f"AUC {cell(slopes['auc_up_to'])}.")
    if result["hicra_minus_random_spans"]:
        diff = result["hicra_minus_random_spans"]
        share = f", sound share {cell(diff['share_sound'])}" if "share_sound" in diff else ""
        lines.append("HICRA (0.2) minus random spans (0.2), paired by seed: "
                     f"final {cell(diff['final'])}, AUC "
                     f"{cell(diff['auc'])}{share}.")
    return "\n".join(lines) + "\n"


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    alphas = list(result["per_alpha"])
    for ax, metric, title in zip(axes, ("final", "auc", "share_sound"),
                                 ("held-out pass@1 after 200 steps", "AUC of held-out pass@1",
                                  "sound-strategy share")):
        xs = [a for a in alphas if result["per_alpha"][a][metric]["n"]]
        rows = [result["per_alpha"][a][metric] for a in xs]
        ax.plot(xs, [r["mean"] for r in rows], "o-", color="C0", label="HICRA (alpha 0 = GRPO)")
        ax.fill_between(xs, [r["low"] for r in rows], [r["high"] for r in rows], color="C0",
                        alpha=0.2)
        control = result["random_spans"][metric]
        if control["n"]:
            ax.errorbar([0.2], [control["mean"]], yerr=[[control["mean"] - control["low"]],
                                                        [control["high"] - control["mean"]]],
                        fmt="s", color="C3", capsize=4, label="random spans, same dose")
        ax.set_xlabel("alpha")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    save(fig, path)


def main(argv: list[str]) -> None:
    parser = OneLineParser(description=__doc__.splitlines()[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True,
                        help="sweep folders (analysis/sweep.py --out)")
    parser.add_argument("--stored", nargs="*", default=[], metavar="RESULTS_JSON",
                        help="earlier sweeps' results.json whose grpo / hicra arms join the curve "
                             "(final and AUC only)")
    parser.add_argument("--target", type=float, default=0.55,
                        help="as sweep.py --target (unused here but kept equal)")
    parser.add_argument("--report", required=True,
                        help="folder for results.md, results.json, dose_response.png")
    parser.add_argument("--slope-up-to", type=float, metavar="ALPHA",
                        help="also test the slope over the alphas up to this one "
                             "(e.g. below a dose that collapses)")
    args = parser.parse_args(argv)
    for folder in args.runs:
        if not Path(folder).is_dir():
            parser.error(f"--runs: {folder} is not a folder (a sweep's --out)")
    stored = [run for path in args.stored for run in read_stored(Path(path), default_alpha=0.2)]
    result = analyse(read_runs([Path(f) for f in args.runs], args.target) + stored,
                     args.slope_up_to)
    report = Path(args.report)
    report.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    write_atomically(report / "results.md", text)
    keyed = {key: {str(k): v for k, v in result[key].items()}
             for key in ("per_alpha", "versus_alpha_0")}
    write_atomically(report / "results.json", json.dumps({**result, **keyed}, indent=2))
    figure(result, report / "dose_response.png")
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
