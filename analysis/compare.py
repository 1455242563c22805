"""Paired comparisons of arms run in different sweeps, with one Bonferroni rule over all of them.

    python -m analysis.compare --arm grpo=runs/verl_v2/grpo \
        --arm hicra_verl=runs/verl_v2/hicra_verl \
        --arm control=runs/verl_v2_control/high_entropy-entropy_top_q0.013 --seeds 0 1 2 3 4 5 6 7 \
        --pairs hicra_verl-grpo control-grpo hicra_verl-control

analysis.sweep pairs an arm with its baseline at the same flag values, within one sweep. This pairs
any two arms by seed: an arm is LABEL=PREFIX, its runs PREFIX-seedN (a sweep's run folders). For
each arm it prints the mean [95% t interval] of final held-out pass@1 and its AUC
(analysis.sweep.run_outcome), of the share of tokens amplified, of the effective dose (their share
of the policy-gradient signal) and of the planning tokens' share of the signal, and for each pair
A-B the paired difference with its 95% interval and the interval adjusted by Bonferroni over every
interval of the table (pairs x metrics; analysis.power.bonferroni_interval).
"""

import argparse
from pathlib import Path

from analysis.power import bonferroni_interval
from analysis.sweep import Job, read_records, run_finished, run_outcome
from cli import InputError, OneLineParser
from cli import report as report_error
from analysis.stats import mean_confidence_interval

METRICS = ("final", "auc")


def arm_values(prefix: str, seeds: list[int], target: float) -> dict[int, dict]:
    """seed -> run_outcome values of the finished runs PREFIX-seedN."""
    folder, name = Path(prefix).parent, Path(prefix).name
    values = {}
    for seed in seeds:
        run_dir = folder / f"{name}-seed{seed}"
        if run_finished(run_dir):
            values[seed] = run_outcome(Job(name, seed), read_records(run_dir), target).values
    return values


def arm_cell(runs: dict[int, dict], metric: str) -> str:
    """mean [95% t interval] of a metric over an arm's runs, "(k/n)" when only k of its n runs
    logged it."""
    values = [v[metric] for v in runs.values() if v[metric] is not None]
    if not values:
        return "—"
    mean, low, high = mean_confidence_interval(values)
    text = f"{mean:.3f} [{low:.3f}, {high:.3f}]" if len(values) > 1 else f"{mean:.3f}"
    return text + (f" ({len(values)}/{len(runs)})" if len(values) < len(runs) else "")


def main(argv: list[str] | None = None) -> str:
    parser = OneLineParser(description=__doc__.splitlines()[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arm", action="append", required=True, metavar="LABEL=PREFIX",
                        help="an arm's runs")
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="seeds to pair")
    parser.add_argument("--pairs", nargs="+", required=True, metavar="A-B",
                        help="differences to report")
    parser.add_argument("--target", type=float, default=0.55, help="as analysis.sweep --target")
    args = parser.parse_args(argv)
    try:
        arms = {}
        for item in args.arm:
            label, _, prefix = item.partition("=")
            if not label or not prefix:
                raise InputError(f"--arm {item!r}: expected LABEL=PREFIX")
            arms[label] = arm_values(prefix, args.seeds, args.target)
            if len(arms[label]) < 2:
                raise InputError(f"--arm {item}: {len(arms[label])} finished run(s) "
                                 "among the seeds; need 2")
        pairs = [pair.split("-", 1) for pair in args.pairs]
        for pair, text in zip(pairs, args.pairs):
            if len(pair) != 2 or not all(label in arms for label in pair):
                raise InputError(f"--pairs {text!r}: expected A-B with A and B "
                                 f"among {', '.join(arms)}")
    except InputError as error:
        raise SystemExit(report_error(error)) from None
    lines = ["| arm | seeds | final pass@1 | AUC of pass@1 | amplified tokens | effective dose "
             "| planning tokens' signal |",
             "|---|---|---|---|---|---|---|"]
    for label, runs in arms.items():
        cells = [arm_cell(runs, metric)
                 for metric in ("final", "auc", "amplified", "amplified_signal", "planning_signal")]
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
    comparisons = len(pairs) * len(METRICS)
    lines += ["", "| difference | metric | pairs | mean [95% t interval] "
                  f"| Bonferroni over {comparisons} |",
              "|---|---|---|---|---|"]
    for a, b in pairs:
        for metric in METRICS:
            common = sorted(set(arms[a]) & set(arms[b]))
            differences = [arms[a][s][metric] - arms[b][s][metric] for s in common]
            mean, low, high = mean_confidence_interval(differences)
            adjusted = bonferroni_interval(mean, low, high, len(differences), comparisons)
            lines.append(f"| {a} - {b} | {metric} | {len(differences)} | "
                         f"{mean:+.3f} [{low:+.3f}, {high:+.3f}] "
                         f"| [{adjusted[0]:+.3f}, {adjusted[1]:+.3f}] |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
