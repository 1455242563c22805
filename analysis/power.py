"""How many seeds a paired comparison needs, and what one interval means among several.

    python -m analysis.power --delta 0.017 --sd 0.026 --seeds 8 12 22
    python -m analysis.power --sd 0.026 --seeds 8  # the difference 8 seeds detect with 80% power
    python -m analysis.power --interval 0.023 0.002 0.043 --seeds 5 --comparisons 8

The experiments compare two arms run with the same seeds by the paired t interval of their
difference.
- Power: with n pairs whose differences have standard deviation sd, the two-sided level-(1 - a) t
  test of "no difference" rejects when |t| > t_{1-a/2, n-1}; if the true difference is delta, t
  follows a noncentral t distribution with n - 1 degrees of freedom and noncentrality
  delta / (sd / sqrt(n)) (`paired_power`).
- Several comparisons on one page: the rule the experiment pages apply in both worlds is
  Bonferroni's. Among k comparisons an interval "excludes zero" only if the level-(1 - 0.05/k)
  interval does (`bonferroni_interval`); an unadjusted 95% interval that excludes zero is reported
  as such, and as not surviving the adjustment when it does not.
"""

import argparse
import math

from scipy import stats

from cli import OneLineParser


def paired_power(delta: float, sd: float, pairs: int, level: float = 0.95) -> float:
    """P(the two-sided paired t test at `level` rejects 0) when the mean difference is `delta`:
    P(|T| > t_crit), T ~ noncentral t(df = n - 1, nc = delta sqrt(n) / sd),
    t_crit = t_{(1+level)/2, n-1}."""
    df, noncentrality = pairs - 1, delta * math.sqrt(pairs) / sd
    critical = stats.t.ppf((1 + level) / 2, df)
    return float(stats.nct.sf(critical, df, noncentrality)
                 + stats.nct.cdf(-critical, df, noncentrality))


def pairs_for_power(delta: float, sd: float, power: float = 0.8, level: float = 0.95) -> int:
    """The fewest pairs (seeds) whose paired_power reaches `power`."""
    pairs = 2
    while paired_power(delta, sd, pairs, level) < power:
        pairs += 1
    return pairs


def detectable_difference(sd: float, pairs: int, power: float = 0.8, level: float = 0.95) -> float:
    """The smallest true difference the paired test detects with probability `power` (bisection on
    paired_power)."""
    low, high = 0.0, 20 * sd
    for _ in range(60):
        middle = (low + high) / 2
        low, high = ((middle, high) if paired_power(middle, sd, pairs, level) < power
                     else (low, middle))
    return high


def bonferroni_interval(mean: float, low: float, high: float, pairs: int,
                        comparisons: int) -> tuple[float, float]:
    """The level-(1 - 0.05/k) t interval from a 95% one over n pairs: the same standard error
    (half-width / t_{0.975, n-1}) times t_{1 - 0.025/k, n-1}."""
    df = pairs - 1
    standard_error = (high - low) / 2 / stats.t.ppf(0.975, df)
    half_width = standard_error * stats.t.ppf(1 - 0.025 / comparisons, df)
    return mean - half_width, mean + half_width


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(description=__doc__.splitlines()[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--delta", type=float, help="true paired difference to detect")
    parser.add_argument("--sd", type=float, help="standard deviation of the paired differences")
    parser.add_argument("--seeds", type=int, nargs="+", default=[8], help="numbers of paired seeds")
    parser.add_argument("--interval", type=float, nargs=3, metavar=("MEAN", "LOW", "HIGH"),
                        help="a 95%% paired t interval to adjust (over the first --seeds value)")
    parser.add_argument("--comparisons", type=int, default=1,
                        help="comparisons on the page (Bonferroni)")
    args = parser.parse_args(argv)
    if min(args.seeds) < 2 or args.comparisons < 1:
        parser.error("--seeds must be >= 2 and --comparisons >= 1")
    if args.sd is not None and not args.sd > 0:
        parser.error("--sd must be > 0")
    if args.delta is None and args.sd is not None:
        for pairs in args.seeds:
            print(f"sd {args.sd:.3f}, {pairs} seeds: 80% power for a difference of "
                  f"{detectable_difference(args.sd, pairs):.3f}")
    if args.delta is not None:
        if args.sd is None:
            parser.error("--delta needs --sd")
        for pairs in args.seeds:
            print(f"delta {args.delta:+.3f}, sd {args.sd:.3f}, {pairs} seeds: "
                  f"power {paired_power(args.delta, args.sd, pairs):.2f}")
        print(f"80% power needs {pairs_for_power(args.delta, args.sd)} seeds")
    if args.interval is not None:
        low, high = bonferroni_interval(*args.interval, args.seeds[0], args.comparisons)
        print(f"{args.interval[0]:+.3f} [{args.interval[1]:.3f}, {args.interval[2]:.3f}] "
              f"over {args.seeds[0]} seeds, "
              f"Bonferroni over {args.comparisons}: [{low:.3f}, {high:.3f}]")


if __name__ == "__main__":
    main()
