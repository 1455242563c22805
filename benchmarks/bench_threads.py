"""Step time of the default run idle and on a busy machine, per thread setting; or the whole run.

    python -m benchmarks.bench_threads             # idle, then one busy loop per core beside it
    python -m benchmarks.bench_threads --full-run  # also `python train.py` end to end, idle

Each setting runs `python train.py --steps N --eval-every 0` in a fresh process (the default run's
16 x 8 completions per step) and reports the median of its step_seconds (the first step dropped: it
warms the caches up) and the tokens it generated. "Loaded" starts one `while True: pass` process per
CPU core first, as another program would. Settings: the thread count train.py picks by default
(`--threads 0`), one thread, and all cores with OpenMP's passive wait policy (idle threads sleep
instead of spinning). The settings alternate within each round, so a drift of the machine hits all
of them alike.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parent.parent
SETTINGS = {  # name -> (extra train.py flags, extra environment)
    "default": ([], {}),
    "threads 1": (["--threads", "1"], {}),
    f"threads {os.cpu_count()}, passive wait": (["--threads", str(os.cpu_count())],
                                                {"OMP_WAIT_POLICY": "PASSIVE"}),
}


def timed_run(flags: list[str], env: dict, steps: int) -> tuple[float, int, float]:
    """(median step seconds without the first step, completion tokens generated, wall seconds) of
    one run."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
        command = [sys.executable, str(ROOT / "train.py"), "--steps", str(steps),
                   "--eval-every", "0", *flags, "--out", str(out)]
        started = time.perf_counter()
        subprocess.run(command, cwd=ROOT, env={**os.environ, **env}, check=True,
                       capture_output=True)
        wall = time.perf_counter() - started
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["step_seconds"] for r in records[1:]]
    # 16 prompts x 8 completions per step
    tokens = sum(round(r["length_mean"] * 128) for r in records)
    return statistics.median(seconds), tokens, wall


def busy_loops(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=6,
                        help="steps per run (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of every setting")
    parser.add_argument("--full-run", action="store_true",
                        help="also time `python train.py` end to end, idle")
    args = parser.parse_args(argv)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
    results: dict[tuple[str, str], list[tuple[float, int]]] = {}
    for load in ("idle", "loaded"):
        loops = busy_loops(os.cpu_count()) if load == "loaded" else []
        try:
            for _ in range(args.rounds):
                for name, (flags, env) in SETTINGS.items():
                    median, tokens, _ = timed_run(flags, env, args.steps)
                    results.setdefault((load, name), []).append((median, tokens))
        finally:
            for loop in loops:
                loop.kill()
    print(f"\n{'setting':<28}{'idle s/step':>12}{'loaded s/step':>15}{'loaded / idle':>15}"
          "   tokens per run")
    for name in SETTINGS:
        idle = statistics.median(m for m, _ in results[("idle", name)])
        loaded = statistics.median(m for m, _ in results[("loaded", name)])
        tokens = "/".join(str(t) for _, t in results[("idle", name)] + results[("loaded", name)])
        print(f"{name:<28}{idle:>12.3f}{loaded:>15.3f}{loaded / idle:>14.2f}x   {tokens}")
    one = statistics.median(m for m, _ in results[("loaded", "threads 1")])
    for name in SETTINGS:
        loaded = statistics.median(m for m, _ in results[("loaded", name)])
        print(f"loaded, {name} / threads 1: {loaded / one:.2f}x")
    if args.full_run:
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            subprocess.run([sys.executable, str(ROOT / "train.py"),
                            "--out", str(Path(folder) / "run")],
                           cwd=ROOT, check=True, capture_output=True)
            print(f"\nthe default run (`python train.py`, 200 steps, "
                  f"5 evaluations of 500 problems), idle: "
                  f"{time.perf_counter() - started:.1f} s wall")


if __name__ == "__main__":
    main(sys.argv[1:])
