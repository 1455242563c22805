"""Sweeps: a grid of algorithms x seeds x flag values, run in parallel, aggregated with confidence
intervals.

    python -m analysis.sweep --algos grpo hicra --seeds 0 1 2 --out runs/sweep --workers 2 \
        -- --eval-samples 4
    python -m analysis.sweep --algos grpo hicra --seeds 0 1 2 --set lr=1e-4,2e-4,4e-4 \
        --out runs/lr --workers 2
    python -m analysis.sweep --algos grpo hicra --seeds 0 1 2 --out runs/sweep \
        --report-only  # tables and figures only

Everything after `--` goes to every `train.py` run. Each run is one process with one thread
(`--threads 1`), in RUN_DIR = OUT/ALGO[-FLAGVALUE...]-seedS, its output in RUN_DIR.log beside it. A
run is finished when its metrics.jsonl holds the last training step and, with evaluation on, the
evaluation after it; runs start seed by seed (all arms of the first seed first, so a sweep stopped
early holds whole seeds); finished runs are skipped, an unfinished one continues from its checkpoint
(`train.py --resume`) or, without one, starts over. Then the report (OUT/results.md, results.json,
fig6_sweep.png, strategy_shift.png on the built-in world, phases_ARM.png, also copied to
--report DIR) gives for each arm (algorithm and flag values), over its seeds, the mean and 95%
Student-t interval of these pre-declared metrics:

- final:  held-out pass@1 after the last step (`eval/pass@1`: train.py's --eval-samples samples per
          problem);
- auc:    area under the held-out pass@1 curve over steps, divided by the steps (mean accuracy over
          training);
- steps_to_target: steps until held-out pass@1 first reaches --target (linear between evaluations);
          runs that never reach it are left out of the mean and counted ("k/n reached");
- t80/execution, t80/planning: stats.phase_summary, the step at which execution metrics
          (sound-strategy execution accuracy, execution perplexity and entropy) and planning metrics
          (sound-strategy share, semantic entropy) reach 80% of their total change (built-in world);

with, for information, run means over steps of the share of completion tokens whose advantage was
amplified (`amplified_ratio`), of the policy-gradient signal on the amplified tokens
(`amplified_signal_share`, the effective dose: metrics.gradient_signal_share) and on the planning
tokens (`planning_signal_share`, every arm, GRPO included), and the seconds of training steps and
evaluations;

and, for every arm against the --baseline algorithm with the same flag values, the paired difference
(arm - baseline) over their common seeds with its t interval. With --set, it also compares each
algorithm at its best flag value (highest mean final pass@1: a choice made on the same seeds,
equally optimistic for every algorithm).
"""

import argparse
import filecmp
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cli import InputError, OneLineParser, flag_name
from cli import report as report_error
from config import saved_settings
from data import read_json
from analysis.stats import mean_confidence_interval, phase_summary
from metrics import is_eval_record, metrics_records
from run_folder import open_for_append, write_atomically
from runlog import ENVIRONMENT, describe_environment

EVAL_KEY = "eval/pass@1"
OUTCOMES = ("final", "auc", "steps_to_target", "t80/execution", "t80/planning")
# shown per arm, not compared: the share of tokens amplified, the shares of the policy-gradient
# signal on the amplified and on the planning tokens (the effective dose,
# metrics.gradient_signal_share), run time
INFORMATIVE = ("amplified", "amplified_signal", "planning_signal", "seconds")
# INFORMATIVE name -> per-step metrics key
SIGNAL_KEYS = {"amplified": "amplified_ratio", "amplified_signal": "amplified_signal_share",
               "planning_signal": "planning_signal_share"}
TRAIN_SCRIPT = Path(__file__).parent.parent / "train.py"


@dataclass(frozen=True)
class Job:
    """One run of the grid: an algorithm, a seed and the swept flag values."""

    algo: str
    seed: int
    settings: tuple[tuple[str, str], ...] = ()  # ((flag name without dashes, value), ...)

    @property
    def arm(self) -> str:
        return "-".join([self.algo, *(f"{name}{value}" for name, value in self.settings)])

    def run_dir(self, out: Path) -> Path:
        return out / f"{self.arm}-seed{self.seed}"

    def log(self, out: Path) -> Path:
        """The run's console output, beside its run folder (which holds only what train.py
        writes)."""
        return out / f"{self.arm}-seed{self.seed}.log"

    def flags(self) -> list[str]:
        return ["--algo", self.algo, "--seed", str(self.seed),
                *(item for name, value in self.settings
                  for item in (f"--{name.replace('_', '-')}", value))]


@dataclass
class Outcome:
    """The pre-declared metrics of one finished run."""

    job: Job
    values: dict[str, float | None] = field(default_factory=dict)


def parse_settings(items: list[str]) -> list[tuple[tuple[str, str], ...]]:
    """['lr=1e-4,2e-4', 'alpha=0.2'] -> the grid of combinations, each ((name, value), ...)."""
    axes = []
    for item in items:
        name, _, values = item.partition("=")
        if not name or not values:
            raise InputError(f"--set {item!r}: expected FLAG=V1,V2,... (e.g. lr=1e-4,2e-4)")
        axes.append([(name.lstrip("-"), v) for v in values.split(",") if v])
    return [tuple(combo) for combo in itertools.product(*axes)]


def read_records(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl records (none before its first step); a corrupt line is an InputError
    naming it."""
    path = run_dir / "metrics.jsonl"
    return metrics_records(path) if path.is_file() else []


def read_config(run_dir: Path) -> dict:
    """A run's config.json; one that is not a JSON object of settings is an InputError naming it."""
    path = run_dir / "config.json"
    settings = read_json(path.read_text(encoding="utf-8", errors="replace"), str(path))
    if not isinstance(settings, dict) or not isinstance(settings.get("steps"), int):
        raise InputError(f"{path}: not a train.py run config; remove that run folder")
    return settings


def run_finished(run_dir: Path) -> bool:
    """Whether the run logged its last training step and, with evaluation on, the evaluation after
    it."""
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        return False
    config = read_config(run_dir)
    records = read_records(run_dir)
    steps = config["steps"]
    trained = any(not is_eval_record(r) and r["step"] == steps - 1 for r in records)
    evaluated = (not config.get("eval_every")
                 or any(is_eval_record(r) and r["step"] == steps for r in records))
    return trained and evaluated


def job_flags(job: Job, train_flags: list[str]) -> list[str]:
    """The train.py flags of a job's run: the sweep's, the job's own, one thread."""
    return [*train_flags, *job.flags(), "--threads", "1"]


def same_folder_contents(first: str, second: str) -> bool:
    """Whether two model folders hold the same files byte for byte (the default model of two
    checkouts of this code lives at two paths)."""
    a, b = Path(first), Path(second)
    if not (a.is_dir() and b.is_dir()):
        return False
    names = sorted(p.name for p in a.iterdir() if p.is_file())
    return names == sorted(p.name for p in b.iterdir() if p.is_file()) and \
        filecmp.cmpfiles(a, b, names, shallow=False)[0] == names


def check_jobs(jobs: list[Job], out: Path, train_flags: list[str]) -> None:
    """Before any run starts: every job's flags pass train.py's checks, and a run folder already
    there was made with the flags this sweep asks for (else the report would quote flags its runs
    did not use)."""
    import train  # the same checks train.py makes, one line each

    for job in jobs:
        wanted = train.parse_args([*job_flags(job, train_flags), "--out", str(job.run_dir(out))])
        config_path = job.run_dir(out) / "config.json"
        if not config_path.is_file():
            continue
        saved = read_config(job.run_dir(out))
        differ = [key for key, value in saved_settings(wanted).items()
                  if key in saved and saved[key] != value
                  # None: chosen by the run at its start
                  and key not in ("out", "threads") and value is not None
                  and not (key == "model" and same_folder_contents(saved[key], value))]
        if differ:
            key = differ[0]
            raise InputError(f"--out: {job.run_dir(out)} was made with "
                             f"{flag_name(key)} {saved[key]}, this sweep asks "
                             f"for {getattr(wanted, key)}; use another --out or remove that run")


def launch(job: Job, out: Path, train_flags: list[str]) -> tuple[Job, int, float]:
    """Run (or continue) one job in its own process with one thread; returns (job, exit code,
    seconds)."""
    run_dir = job.run_dir(out)
    # train.py resumes from the newest complete checkpoint, or from step 0
    if (run_dir / "config.json").is_file():
        command = [sys.executable, str(TRAIN_SCRIPT), "--resume", str(run_dir)]
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        command = [sys.executable, str(TRAIN_SCRIPT), *job_flags(job, train_flags),
                   "--out", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    started = time.time()
    with open_for_append(job.log(out)) as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    return job, code, time.time() - started


def run_grid(jobs: list[Job], out: Path, train_flags: list[str], workers: int) -> list[Job]:
    """Run the unfinished jobs, `workers` at a time; returns the jobs that failed."""
    todo = [job for job in jobs if not run_finished(job.run_dir(out))]
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} already finished, {len(todo)} to run, "
          f"{workers} at a time")
    failed = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for job, code, seconds in pool.map(lambda j: launch(j, out, train_flags), todo):
            ok = code == 0 and run_finished(job.run_dir(out))
            print(f"  {'done  ' if ok else 'FAILED'} {job.run_dir(out).name}  {seconds:.0f} s"
                  + ("" if ok else f"  (exit {code}; see {job.log(out)})"), flush=True)
            if not ok:
                failed.append(job)
    return failed


def steps_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """First step at which (step, accuracy) points reach `target`, linear between points; None if
    never."""
    if curve[0][1] >= target:
        return curve[0][0]
    for (s0, a0), (s1, a1) in zip(curve, curve[1:]):
        if a1 >= target:  # a0 < target <= a1
            return s0 + (target - a0) / (a1 - a0) * (s1 - s0)
    return None


def run_outcome(job: Job, records: list[dict], target: float) -> Outcome:
    """The pre-declared metrics of one run from its metrics.jsonl records."""
    curve = sorted((r["step"], r[EVAL_KEY]) for r in records if EVAL_KEY in r)
    values: dict[str, float | None] = dict.fromkeys(OUTCOMES)
    if curve:
        values["final"] = curve[-1][1]
        values["steps_to_target"] = steps_to_reach(curve, target)
    if len(curve) >= 2:
        area = sum((s1 - s0) * (a0 + a1) / 2 for (s0, a0), (s1, a1) in zip(curve, curve[1:]))
        values["auc"] = area / (curve[-1][0] - curve[0][0])
    phases = phase_summary([r for r in records if not is_eval_record(r)])
    values["t80/execution"] = phases.get("t80/execution")
    values["t80/planning"] = phases.get("t80/planning")
    for name, key in SIGNAL_KEYS.items():  # run means over the steps that logged them
        logged = [r[key] for r in records if key in r]
        values[name] = sum(logged) / len(logged) if logged else None
    values["seconds"] = sum(r.get("step_seconds", 0.0) + r.get("eval/wall_s", 0.0)
                            for r in records)
    return Outcome(job, values)


def collect(jobs: list[Job], out: Path, target: float) -> list[Outcome]:
    """Outcomes of the finished runs (unfinished ones are skipped, and said so)."""
    outcomes = []
    for job in jobs:
        run_dir = job.run_dir(out)
        if run_finished(run_dir):
            outcomes.append(run_outcome(job, read_records(run_dir), target))
        else:
            print(f"  skipped (not finished): {run_dir}")
    return outcomes


def environments(jobs: list[Job], out: Path) -> list[str]:
    """The distinct environments the sweep's runs ran in (each run's environment.jsonl), with their
    run counts.
    Per-seed values repeat only in the same environment; the spread over seeds is what carries
    over."""
    counts: dict[str, int] = {}
    for job in jobs:
        path = job.run_dir(out) / ENVIRONMENT
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        for where in ({describe_environment(json.loads(line)) for line in lines if line.strip()}
                      or {"not recorded"}):
            counts[where] = counts.get(where, 0) + 1
    return [f"{where}: {count} run(s)" for where, count in counts.items()]


def summarize(values: list[float | None]) -> dict:
    """Mean and 95% t interval of the values that exist; n = how many."""
    present = [v for v in values if v is not None]
    mean, low, high = mean_confidence_interval(present)
    return {"n": len(present), "of": len(values), "mean": mean, "low": low, "high": high}


def arm_table(outcomes: list[Outcome]) -> dict[str, dict]:
    """arm -> {"algo", "settings", "seeds", metric -> summary}."""
    arms: dict[str, dict] = {}
    for outcome in outcomes:
        arm = arms.setdefault(outcome.job.arm, {"algo": outcome.job.algo,
                                                "settings": dict(outcome.job.settings),
                                                "seeds": [], "runs": []})
        arm["seeds"].append(outcome.job.seed)
        arm["runs"].append(outcome.values)
    for arm in arms.values():
        for metric in (*OUTCOMES, *INFORMATIVE):
            arm[metric] = summarize([run[metric] for run in arm["runs"]])
    return arms


def paired_difference(a: list[Outcome], b: list[Outcome], metric: str) -> dict:
    """Mean and 95% t interval of (a - b) over the seeds both have a value for."""
    by_seed = {o.job.seed: o.values[metric] for o in b if o.values[metric] is not None}
    diffs = {o.job.seed: o.values[metric] - by_seed[o.job.seed] for o in a
             if o.values[metric] is not None and o.job.seed in by_seed}
    mean, low, high = mean_confidence_interval(list(diffs.values()))
    return {"n": len(diffs), "seeds": sorted(diffs), "mean": mean, "low": low, "high": high}


def paired_comparisons(outcomes: list[Outcome], baseline: str) -> list[dict]:
    """Every arm against the baseline algorithm at the same flag values, paired by seed."""
    by_arm: dict[tuple, list[Outcome]] = {}
    for outcome in outcomes:
        by_arm.setdefault((outcome.job.algo, outcome.job.settings), []).append(outcome)
    rows = []
    for (algo, settings), members in by_arm.items():
        partner = by_arm.get((baseline, settings))
        if algo != baseline and partner:
            rows.append({"arm": members[0].job.arm, "baseline": partner[0].job.arm,
                         **{metric: paired_difference(members, partner, metric)
                            for metric in OUTCOMES}})
    return rows


def best_settings(outcomes: list[Outcome], arms: dict[str, dict], baseline: str) -> list[dict]:
    """Each algorithm at its flag values of highest mean final pass@1, paired against the baseline's
    best."""
    best: dict[str, str] = {}
    for name, arm in arms.items():
        mean = arm["final"]["mean"]
        if not math.isnan(mean) and (arm["algo"] not in best
                                     or mean > arms[best[arm["algo"]]]["final"]["mean"]):
            best[arm["algo"]] = name
    if baseline not in best:
        return []
    members = {name: [o for o in outcomes if o.job.arm == name] for name in best.values()}
    return [{"arm": name, "baseline": best[baseline],
             **{metric: paired_difference(members[name], members[best[baseline]], metric)
                for metric in OUTCOMES}}
            for algo, name in best.items() if algo != baseline]


def cell(summary: dict, digits: int = 3) -> str:
    """'mean [low, high]' (n/of when some runs have no value)."""
    if summary["n"] == 0:
        return f"— (0/{summary['of']})" if "of" in summary else "—"
    text = f"{summary['mean']:.{digits}f}"
    if not math.isnan(summary["low"]):
        text += f" [{summary['low']:.{digits}f}, {summary['high']:.{digits}f}]"
    if "of" in summary and summary["n"] < summary["of"]:
        text += f" ({summary['n']}/{summary['of']})"
    return text


METRIC_TITLES = {"final": "final pass@1", "auc": "AUC of pass@1",
                 "steps_to_target": "steps to {target}",
                 "t80/execution": "t80 execution", "t80/planning": "t80 planning"}
DIGITS = {"final": 3, "auc": 3, "steps_to_target": 0, "t80/execution": 0, "t80/planning": 0}


def markdown_report(arms: dict[str, dict], paired: list[dict], best: list[dict], target: float,
                    header: str) -> str:
    """The results as Markdown tables."""
    titles = [METRIC_TITLES[m].format(target=target) for m in OUTCOMES]
    lines = [header, "", "Per arm: mean [95% Student-t interval] over seeds; (k/n): only k of n "
             "runs have a value (steps to target: runs that reached it).", "",
             "| arm | seeds | " + " | ".join(titles) + " | amplified tokens | amplified signal "
             "| planning signal | s per run (steps + evals) |",
             "|---|---|" + "---|" * (len(OUTCOMES) + 4)]
    for name, arm in arms.items():
        seeds = ",".join(map(str, sorted(arm["seeds"])))
        lines.append(f"| {name} | {seeds} | "
                     + " | ".join(cell(arm[m], DIGITS[m]) for m in OUTCOMES)
                     + f" | {cell(arm['amplified'])} | {cell(arm['amplified_signal'])} "
                       f"| {cell(arm['planning_signal'])}"
                     + f" | {arm['seconds']['mean']:.0f} |")
    for title, rows in (("Paired differences, arm - baseline at the same flag values, "
                         "over common seeds", paired),
                        ("Each algorithm at its best flag value (by mean final pass@1), "
                         "paired against the baseline's best", best)):
        if rows:
            lines += ["", f"{title}: mean [95% t interval] (pairs).", "",
                      "| arm - baseline | " + " | ".join(titles) + " |",
                      "|---|" + "---|" * len(OUTCOMES)]
            for row in rows:
                cells = [f"{cell(row[m], DIGITS[m])} ({row[m]['n']})" for m in OUTCOMES]
                lines.append(f"| {row['arm']} - {row['baseline']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_figures(outcomes: list[Outcome], out: Path) -> list[Path]:
    """Fig. 6 with 95% t bands per arm; on the built-in world the strategy shift of every arm in one
    figure and one phase figure per arm."""
    from analysis import plots

    runs = []
    for outcome in outcomes:
        run = plots.load_run(str(outcome.job.run_dir(out)))
        run.algo = outcome.job.arm  # plots group runs by this label
        runs.append(run)
    written = [plots.fig6_comparison(runs, out, band="ci", name="fig6_sweep.png")] if runs else []
    if plots.has_key(runs, "share_sound"):
        written.append(plots.fig_strategy_shift(runs, out, band="ci", name="strategy_shift.png"))
    for arm in sorted({run.algo for run in runs}):
        members = [run for run in runs if run.algo == arm]
        if plots.has_key(members, "share_sound"):
            written.append(plots.fig_phases(members, out, name=f"phases_{arm}.png"))
    return written


def report(jobs: list[Job], out: Path, target: float, baseline: str, header: str,
           copy_to: Path | None) -> str:
    """Aggregate the finished runs; write results.md, results.json and the figures; returns the
    Markdown."""
    outcomes = collect(jobs, out, target)
    arms = arm_table(outcomes)
    paired = paired_comparisons(outcomes, baseline)
    best = best_settings(outcomes, arms, baseline) if any(job.settings for job in jobs) else []
    header += ("\n\nRan on (per-seed values repeat only on the same CPU type, threads and "
               "versions):\n" + "".join(f"\n- {line}" for line in environments(jobs, out)))
    text = markdown_report(arms, paired, best, target, header)
    write_atomically(out / "results.md", text)
    write_atomically(out / "results.json",
                     json.dumps({"arms": arms, "paired": paired, "best": best}, indent=1))
    written = [out / "results.md", out / "results.json", *write_figures(outcomes, out)]
    if copy_to is not None:
        copy_to.mkdir(parents=True, exist_ok=True)
        for path in written:
            write_atomically(copy_to / path.name, path.read_bytes())
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        description="Run a grid of train.py runs in parallel and aggregate them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--algos", nargs="+", default=["grpo", "hicra"],
                        help="train.py --algo values")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="train.py --seed values")
    parser.add_argument("--set", action="append", default=[], metavar="FLAG=V1,V2",
                        help="sweep a train.py flag over values "
                             "(repeatable: the grid is their product)")
    parser.add_argument("--out", required=True,
                        help="sweep folder (one run directory per job inside)")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--target", type=float, default=0.6,
                        help="held-out pass@1 for steps_to_target")
    parser.add_argument("--baseline", default="grpo",
                        help="algorithm the paired differences subtract")
    parser.add_argument("--report", default=None, metavar="DIR",
                        help="also copy results and figures here")
    parser.add_argument("--report-only", action="store_true",
                        help="aggregate finished runs, start none")
    parser.add_argument("train_flags", nargs=argparse.REMAINDER,
                        help="after --: flags for every train.py run")
    return parser


def main(argv: list[str] | None = None) -> str:
    """Check every job, run the unfinished ones, report. Bad input: one `error: ...` line,
    exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    train_flags = args.train_flags[1:] if args.train_flags[:1] == ["--"] else args.train_flags
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    out = Path(args.out)
    try:
        for flag, values in (("--seeds", args.seeds), ("--algos", args.algos)):
            repeated = sorted({value for value in values if values.count(value) > 1}, key=str)
            if repeated:
                raise InputError(f"{flag}: {repeated[0]} is given twice; "
                                 "a run counted twice would make up an interval")
        # seed-major order: a sweep stopped early still holds whole seeds of every arm
        jobs = [Job(algo, seed, settings) for seed in args.seeds
                for settings in parse_settings(args.set) for algo in args.algos]
        if args.report and Path(args.report).exists() and not Path(args.report).is_dir():
            raise InputError(f"--report: {args.report} is a file, "
                             "not a folder for the results and figures")
        check_jobs(jobs, out, train_flags)
    except InputError as error:
        sys.exit(report_error(error))
    out.mkdir(parents=True, exist_ok=True)
    started, load_before = time.time(), os.getloadavg()[0]
    try:  # a run folder damaged or booby-trapped (a link planted as a log) while the sweep runs
        failed = [] if args.report_only else run_grid(jobs, out, train_flags, args.workers)
    except InputError as error:
        sys.exit(report_error(error))
    header = (f"# Sweep {out.name}\n\n"
              f"`python -m analysis.sweep {' '.join(argv if argv is not None else sys.argv[1:])}`")
    if not args.report_only:
        header += (f"\n\nThis invocation: {time.time() - started:.0f} s wall "
                   f"on {os.cpu_count()} CPUs, 1-minute load average {load_before:.1f} "
                   f"at the start and {os.getloadavg()[0]:.1f} at the end.")
    try:
        text = report(jobs, out, args.target, args.baseline, header,
                      Path(args.report) if args.report else None)
    except InputError as error:  # a run's metrics.jsonl or config.json damaged after it finished
        sys.exit(report_error(error))
    print(text)
    if failed:
        sys.exit(f"error: {len(failed)} run(s) failed: "
                 + ", ".join(j.run_dir(out).name for j in failed))
    return text


if __name__ == "__main__":
    main()
