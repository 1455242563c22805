"""The run folder's record of a run: RUN_DIR/metrics.jsonl, held-out samples, trackers, the console
summary.

- metrics.jsonl: one JSON line per training step and one per held-out evaluation (its "step" is the
  number of updates done, its keys start with "eval/"). It is the source of truth; trackers mirror
  it.
- environment.jsonl: one line per start or resume: CPU model and the instruction set torch's kernels
  use, threads, GPU, torch / transformers / Python versions (float results repeat only where these
  are the same).
- samples_stepNNNNN.html: a few held-out completions at each evaluation, planning tokens highlighted
  (also printed, coloured on a terminal).
- Trackers (`--report-to tensorboard wandb`), optional packages, neither in requirements.txt; asking
  for one that is not installed is a one-line error before any work.
  - tensorboard: `torch.utils.tensorboard.SummaryWriter` writing to RUN_DIR/tensorboard (offline).
    Training keys are logged as `train/KEY`, held-out keys keep their `eval/` prefix; the global
    step is the record's "step". Events from step `purge_from` on are dropped when the writer opens
    (a resumed run's lines after its checkpoint, or all of them when it restarts).
  - wandb: `wandb.init` with the run's settings as config, files under RUN_DIR/wandb (needs a login,
    or WANDB_MODE=offline); the project is $WANDB_PROJECT, or "hicra".
"""

import html
import importlib.util
import json
import os
import platform
import sys
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

import grams as grams_lib
from cli import InputError, use_colour, visible
from metrics import is_eval_record, metrics_records, standard_error
from run_folder import append_line, write_atomically

SAMPLES_SHOWN = 3  # completions printed (coloured) and written to HTML at each evaluation
METRICS = "metrics.jsonl"


class RunLog:
    """Appends the run's records to RUN_DIR/metrics.jsonl and mirrors them to the --report-to
    trackers."""

    def __init__(self, run_dir: Path, report_to: list[str], settings: dict, purge_from: int,
                 max_new_tokens: int):
        self.run_dir, self.max_new_tokens, self.truncation_noted = run_dir, max_new_tokens, False
        self.trackers = open_trackers(report_to, run_dir, settings, purge_from)

    def log(self, record: dict) -> None:
        """One line to metrics.jsonl, then to the trackers."""
        append_line(self.run_dir / METRICS, json.dumps(record))
        for tracker in self.trackers:
            tracker.log(record)
        # scored as written, but worth a word
        if record.get("truncation_rate") == 1.0 and not self.truncation_noted:
            tqdm.write(f"note: every completion of step {record['step']} hit "
                       f"--max-new-tokens {self.max_new_tokens} before an end-of-sequence token; "
                       "answers may be cut off")
            self.truncation_noted = True

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def format_eval(record: dict) -> str:
    """Held-out pass@1 with its standard error over problems, then pass@k for the other k."""
    others = [f"{k.removeprefix('eval/')} {v:.3f}" for k, v in record.items()
              if k.startswith("eval/pass@") and k not in ("eval/pass@1", "eval/pass@1_se")]
    se = record.get("eval/pass@1_se")
    return ", ".join([f"pass@1 {record['eval/pass@1']:.3f}"
                      + (f" ± {se:.3f} (s.e.)" if se is not None else ""), *others])


def show_samples(run_dir: Path, step: int, records: list[dict], grams: list[str]) -> None:
    """Print a few held-out completions with planning tokens coloured, and write them as HTML."""
    shown = [(visible(r["problem"]), visible(r["completions"][0]), r["correct"][0],
              visible(str(r["answer"])))
             for r in records[:SAMPLES_SHOWN]]
    blocks = []
    for problem, completion, correct, answer in shown:
        verdict = "correct" if correct else f"wrong (the answer is {answer})"
        spans = grams_lib.find_gram_spans(completion, grams)
        style = "ansi" if use_colour(sys.stdout) else "plain"
        tqdm.write(f"--- {verdict}: {problem}\n"
                   f"{grams_lib.highlight_planning(completion, spans, style)}")
        blocks.append(
            f"<h3>{html.escape(verdict)}</h3><p><b>{html.escape(problem)}</b></p>"
            f"<pre>{grams_lib.highlight_planning(completion, spans, 'html')}</pre>"
        )
    page = (
        f"<html><head><meta charset='utf-8'><title>step {step}</title>"
        f"<style>mark{{background:#ffd54f}}</style></head><body>"
        f"<h2>Held-out samples at step {step} (planning tokens highlighted)</h2>"
        f"{''.join(blocks)}</body></html>"
    )
    write_atomically(run_dir / f"samples_step{step:05d}.html", page)


ENVIRONMENT = "environment.jsonl"  # one line per start or resume of a run: where it ran


def environment(device: str) -> dict:
    """Where this process computes: float results, and so a run's per-seed figures, repeat only on
    the same CPU type (the instruction set torch's kernels use) and thread count, with the same
    library versions."""
    cpu = next((line.split(":", 1)[1].strip() for line in read_lines("/proc/cpuinfo")
                if line.startswith("model name")),
               platform.processor() or platform.machine())
    gpu = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "gpu": gpu, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def read_lines(path: str) -> list[str]:
    """The lines of a text file, [] where it cannot be read (/proc/cpuinfo off Linux)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return file.read().splitlines()
    except OSError:
        return []


def record_environment(run_dir: Path, step: int, device: str) -> None:
    """Append this process's environment to RUN_DIR/environment.jsonl, from `step` on, and print
    it."""
    where = environment(device)
    append_line(run_dir / ENVIRONMENT, json.dumps({"step": step, **where}))
    print(f"environment: {describe_environment(where)} (results repeat on the same CPU type, "
          "--threads and versions)")


def describe_environment(where: dict) -> str:
    """One line: CPU (instruction set), threads, GPU, versions."""
    gpu = f", {where['gpu']}" if where.get("gpu") else ""
    return (f"{where['cpu']} ({where['cpu_capability']}), {where['threads']} threads{gpu}; torch "
            f"{where['torch']}, transformers {where['transformers']}, Python {where['python']}")


# steps averaged at each end of the run in the summary: one step's figures are noisy
SUMMARY_WINDOW = 10
SUMMARY_KEYS = ("reward", "loss", "grad_norm", "length_mean", "planning_ratio", "semantic_entropy",
                "step_seconds")
PROGRESS_LEGEND = ("progress bar: reward = mean reward of the step's completions; "
                   "loss = the clipped-surrogate loss; gnorm = gradient norm before clipping; "
                   "plan = share of completion tokens that are planning tokens; "
                   "len = mean completion length in tokens")


def progress_figures(record: dict) -> dict[str, str]:
    """The figures of a step's record shown on the progress bar (PROGRESS_LEGEND says what they
    are)."""
    return dict(reward=f"{record['reward']:.2f}", loss=f"{record['loss']:+.4f}",
                gnorm=f"{record['grad_norm']:.3f}", plan=f"{record.get('planning_ratio', 0):.3f}",
                len=f"{record.get('length_mean', 0):.0f}")


def mean_and_error(values: list[float]) -> str:
    """'mean ± standard error' of a few values (the error left out for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:8.3f}        "
    return f"{mean:8.3f} ± {standard_error(values):5.3f}"


def print_summary(run_dir: Path) -> None:
    """One screen: the mean of the first and of the last SUMMARY_WINDOW steps (± standard error),
    and every held-out evaluation."""
    path = run_dir / METRICS
    if not path.exists():
        return
    records = metrics_records(path)
    evals = [r for r in records if is_eval_record(r)]
    steps = [r for r in records if not is_eval_record(r)]
    window = min(SUMMARY_WINDOW, len(steps))
    print(f"\nrun: {run_dir}  ({len(steps)} steps; mean ± standard error of the first and last "
          f"{window} steps)")
    for key in SUMMARY_KEYS:
        if steps and all(key in r for r in steps):
            first, last = [r[key] for r in steps[:window]], [r[key] for r in steps[-window:]]
            print(f"  {key:<18} first {mean_and_error(first)}   last {mean_and_error(last)}")
    for record in evals:
        print(f"  held-out after {record['step']:>4} steps: {format_eval(record)}")
    environments = [json.loads(line) for line in read_lines(str(run_dir / ENVIRONMENT)) if line]
    if environments:
        print(f"  ran on: {describe_environment(environments[-1])}"
              + (f" (and {len(environments) - 1} other start(s): {run_dir / ENVIRONMENT})"
                 if len(environments) > 1 else ""))
    print(f"  metrics: {path}\n  checkpoint: {run_dir / 'checkpoint'}")


# ---------------------------------------------------------------- trackers


TRACKERS = ("tensorboard", "wandb")  # --report-to names, each also the package it needs


def check_installed(names: list[str]) -> None:
    """InputError naming the flag for a requested tracker whose package is missing (checked before
    any work)."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise InputError(f"--report-to {name}: the {name} package is not installed "
                             f"(pip install {name})")


def scalars(record: dict) -> dict[str, float]:
    """The numeric values of a metrics record under their dashboard names (see the module
    docstring)."""
    return {
        key if key.startswith("eval/") else f"train/{key}": float(value)
        for key, value in record.items()
        if key != "step" and isinstance(value, (int, float))
    }


class TensorBoardTracker:
    """One SummaryWriter in RUN_DIR/tensorboard: add_scalar per key and record."""

    def __init__(self, run_dir: Path, purge_from: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_from)

    def log(self, record: dict) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One wandb run named after the run directory; wandb.log per record at the record's step."""

    def __init__(self, run_dir: Path, config: dict):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "hicra"), name=run_dir.name,
                              dir=str(run_dir), config=config)

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def open_trackers(names: list[str], run_dir: Path, config: dict, purge_from: int) -> list:
    """The trackers of --report-to (each name once), opened on the run directory; TensorBoard drops
    its events from step `purge_from` on."""
    trackers = []
    for name in dict.fromkeys(names):
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(run_dir, purge_from))
        elif name == "wandb":
            trackers.append(WandbTracker(run_dir, config))
    return trackers
