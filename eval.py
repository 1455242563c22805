"""Evaluation: pass@1 averaged over K samples, pass@k, and a greedy pass.

    python eval.py --model RUN_DIR/checkpoint              # a train.py run's model, on the run's
                                                             held-out problems
    python eval.py --model PATH_OR_ID --benchmark math500 --samples 4 --temperature 0.6
    python eval.py --model RUN_DIR/checkpoint --benchmark aime24 --protocol paper
    python eval.py plot RUN_DIR [RUN_DIR ...]          (figures, see analysis/plots.py)

Choices, and where they come from:
- The paper's protocol (Sec. 5): pass@1 at temperature 0.6 averaged over K samples, K = 32 for
  AIME24/25 and 4 for AMC23 (`--protocol paper`), strict \\boxed{} grading (reward.boxed_reward).
  A greedy pass (temperature 0, one completion) runs beside it unless --no-greedy.
- pass@k for every k <= K uses the unbiased estimator of Chen et al. (2021), averaged over problems.
- Prompts are the training prompts (rollout.format_prompt: chat template, "reason step by step ...
  \\boxed{}" instruction), zero-shot by default; --instruction, --system-prompt and --few-shot
  change them as they do in train.py. Sampling is plain temperature/top-p
  (rollout.sample_next_token).
- Response length counts generated tokens, EOS included; `truncated` counts completions cut by
  --max-new-tokens, `no_box` those without a complete \\boxed{}, `timeouts` gradings that ran past
  reward.DEFAULT_TIMEOUT_S (scored wrong).
- The model loads through model_loading.load_model (HF folder, hub id or GGUF file).
- A train.py checkpoint (RUN_DIR/checkpoint or RUN_DIR/checkpoint-N) is evaluated as its run was:
  the run's held-out problems (--eval-data), prompt (--instruction, --system-prompt, --few-shot),
  reward and --max-new-tokens come from RUN_DIR/config.json unless given on the command line
  (`RUN_SETTINGS`).
"""

import os
import signal
import sys

# Ctrl-C while torch and transformers load: exit 130 quietly, not an import's traceback
if __name__ == "__main__":
    # nothing written yet; no library can catch it
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))

import argparse  # noqa: E402  (the handler above comes first)
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch
import transformers
from tqdm import tqdm

import cli
from cli import (AT_LEAST_ONE, FRACTION, NON_NEGATIVE, SEED, InputError, OneLineParser,
                 check_bounds, check_text, report)
from config import ModelFlags, PromptFlags, add_flags, read_settings
from data import Problem, check_data_model, load_problems
from grading import grade_batch
from metrics import standard_error
from machine import choose_threads
from model_loading import check_model_flags, load_model
from reward import REWARD_HELP, boxed_reward, extract_boxed, load_reward
from rollout import (PromptFormat, check_prompts_fit, format_prompt, generate_rollouts,
                     longest_prompt_tokens, prompt_format_from_args)
from run_folder import in_use, is_run, lock_holder, write_atomically, writing

# Sec. 5; any other benchmark keeps --samples
PAPER_SAMPLES = {"aime24": 32, "aime25": 32, "amc23": 4}
PAPER_TEMPERATURE = 0.6
DEFAULT_MAX_NEW_TOKENS = 1024  # --max-new-tokens for a model with the positions for it
CHECKPOINT_FOLDER = re.compile(r"checkpoint(-\d+)?")  # train.py's and TRL's checkpoint folder names
# eval.py's setting <- the train.py setting of the run a checkpoint belongs to (run_settings)
RUN_SETTINGS = {"benchmark": "eval_data", "instruction": "instruction",
                "system_prompt": "system_prompt", "few_shot": "few_shot", "reward": "reward",
                "max_new_tokens": "max_new_tokens"}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(
    model,
    tokenizer,
    problems: list[Problem],
    samples: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    reward_fn=boxed_reward,
    top_p: float = 1.0,
    progress: bool = True,
    ks: list[int] | None = None,
    prompt_format: PromptFormat = PromptFormat(),
) -> tuple[dict, list[dict]]:
    """Generate `samples` completions per problem, grade them, and summarise.

    Completions are generated `batch_size` at a time (the K samples of a problem may span batches).
    Returns (summary, records): summary as in `summarize` (pass@k for `ks`, default every k <=
    samples), one record per problem with its prompt, completions, extracted answers and
    correctness.
    """
    prompts = [format_prompt(tokenizer, p.problem, prompt_format) for p in problems]
    # problem index of each completion
    jobs = [i for i in range(len(problems)) for _ in range(samples)]
    records = [new_record(p, prompt) for p, prompt in zip(problems, prompts)]
    start = time.perf_counter()
    bar = tqdm(total=len(jobs), disable=not progress, desc=f"eval T={temperature:g}",
               unit="completion")
    for first in range(0, len(jobs), batch_size):
        chunk = jobs[first : first + batch_size]
        batch = generate_rollouts(
            model, tokenizer, [prompts[i] for i in chunk], 1, max_new_tokens, temperature, top_p,
            score=False
        )
        lengths, truncated = batch.lengths.tolist(), batch.truncated.tolist()
        graded = grade_batch(reward_fn, batch.texts, [records[i]["answer"] for i in chunk])
        for j, i in enumerate(chunk):
            add_completion(records[i], batch.texts[j], int(lengths[j]), truncated[j], graded[j])
        bar.update(len(chunk))
        bar.set_postfix(acc=f"{running_accuracy(records):.3f}",
                        len=f"{running_length(records):.0f}")
    bar.close()
    summary = summarize(records, samples, temperature, ks or list(range(1, samples + 1)))
    summary["wall_s"] = time.perf_counter() - start
    summary["s_per_problem"] = summary["wall_s"] / len(problems)
    return summary, records


def new_record(problem: Problem, prompt: str) -> dict:
    """An empty per-problem record; add_completion fills the lists."""
    return dict(
        problem=problem.problem, answer=problem.answer, prompt=prompt, completions=[], extracted=[],
        rewards=[], correct=[], lengths=[], truncated=[], failures=[],
    )


def add_completion(record: dict, text: str, length: int, truncated: bool,
                   graded: tuple[float, str | None]) -> None:
    """Append one completion and its grading (grading.grade's (reward, failure)) to its problem's
    record."""
    reward, failure = graded
    record["completions"].append(text)
    record["extracted"].append(extract_boxed(text))
    record["rewards"].append(reward)
    record["correct"].append(reward >= 1.0)
    record["lengths"].append(length)
    record["truncated"].append(truncated)
    record["failures"].append(failure)


def running_accuracy(records: list[dict]) -> float:
    """Share of the completions graded so far that are correct (for the progress bar)."""
    correct = [c for r in records for c in r["correct"]]
    return sum(correct) / max(len(correct), 1)


def running_length(records: list[dict]) -> float:
    """Mean length of the completions generated so far (for the progress bar)."""
    lengths = [n for r in records for n in r["lengths"]]
    return sum(lengths) / max(len(lengths), 1)


def summarize(records: list[dict], samples: int, temperature: float, ks: list[int]) -> dict:
    """pass@k (mean over problems of the unbiased estimate), the standard error of pass@1 over
    problems, length and failure counts."""
    counts = [sum(r["correct"]) for r in records]  # correct completions per problem
    summary = {"problems": len(records), "samples": samples, "temperature": temperature}
    for k in ks:
        summary[f"pass@{k}"] = sum(pass_at_k(samples, c, k) for c in counts) / len(records)
    summary["pass@1_se"] = standard_error([c / samples for c in counts])
    lengths = [n for r in records for n in r["lengths"]]
    summary["mean_length"] = sum(lengths) / len(lengths)
    summary["no_box"] = sum(e is None for r in records for e in r["extracted"])
    summary["truncated"] = sum(t for r in records for t in r["truncated"])
    summary["timeouts"] = sum(f == "timeout" for r in records for f in r["failures"])
    summary["grading_errors"] = sum(f in ("error", "invalid")
                                    for r in records for f in r["failures"])
    return summary


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The command line, flags grouped as model / benchmark / sampling / output;
    `suppress_defaults`: only the flags given appear in the parsed namespace."""
    parser = OneLineParser(
        description="Evaluate a model on a benchmark (pass@k and greedy). "
                    "`python eval.py plot RUN_DIR ...` draws figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_flags(parser, ModelFlags, overrides={
        "model": dict(default=None, required=True,
                      help="HF folder (e.g. RUN_DIR/checkpoint), hub id, or .gguf file"),
        "threads": dict(help="CPU threads for torch; 0 = one per core not kept busy by other "
                             "programs (chosen at start and printed)"),
    })
    add_flags(parser, PromptFlags)
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--benchmark", default=None,
                       help="benchmark name (see data.BENCHMARKS) or a .jsonl file; required "
                            "unless --model is a train.py run's checkpoint (its --eval-data)")
    bench.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems")
    bench.add_argument("--reward", default="boxed",
                       help=f"grader (boxed = strict, as the paper); {REWARD_HELP}")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--protocol", default=None, choices=["paper"],
                          help="paper: T=0.6 and K=32 (AIME), 4 (AMC23), else --samples")
    sampling.add_argument("--samples", type=int, default=4,
                          help="K, sampled completions per problem")
    sampling.add_argument("--temperature", type=float, default=PAPER_TEMPERATURE,
                          help="0 = greedy pass only (--samples ignored)")
    sampling.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    sampling.add_argument("--greedy", action=argparse.BooleanOptionalAction, default=True,
                          help="also run a greedy pass (one completion, temperature 0)")
    sampling.add_argument("--pass-k", default=None,
                          help="comma-separated k for pass@k (None: every k <= K)")
    sampling.add_argument("--max-new-tokens", type=int, default=None,
                          help=f"completion length limit (None: {DEFAULT_MAX_NEW_TOKENS}, or what "
                               "the model's positions leave after the longest prompt, if fewer)")
    sampling.add_argument("--batch-size", type=int, default=16,
                          help="completions generated per call")
    sampling.add_argument("--seed", type=int, default=0, help="sampling seed")
    output = parser.add_argument_group("output")
    output.add_argument("--out", default=None,
                        help="output folder (None: runs/eval-BENCHMARK-MODEL; MODEL is "
                             "RUN-checkpoint for RUN/checkpoint)")
    output.add_argument("--quiet", action="store_true", help="no progress bar")
    if suppress_defaults:
        cli.suppress_defaults(parser)
    return parser


EVAL_BOUNDS = {
    "limit": AT_LEAST_ONE, "samples": AT_LEAST_ONE, "max_new_tokens": AT_LEAST_ONE,
    "batch_size": AT_LEAST_ONE, "temperature": NON_NEGATIVE, "top_p": FRACTION, "seed": SEED,
}


def run_settings(model: str) -> dict:
    """The settings a train.py checkpoint's run evaluated with ({} for any other model):
    RUN_SETTINGS read from RUN_DIR/config.json beside RUN_DIR/checkpoint(-N), under eval.py's
    names."""
    folder = Path(model).expanduser()
    if not (CHECKPOINT_FOLDER.fullmatch(folder.name) and folder.is_dir() and is_run(folder.parent)):
        return {}  # TRL's output folder holds a config.json too: the model's, not a run's
    saved = read_settings(str(folder.parent / "config.json"), "--model")
    return {name: saved[setting] for name, setting in RUN_SETTINGS.items() if setting in saved}


def apply_run_settings(args: argparse.Namespace, argv: list[str]) -> None:
    """Fill the settings not given on the command line from the run of a train.py checkpoint
    (run_settings), saying which; a model that is not one needs --benchmark."""
    explicit = vars(build_parser(suppress_defaults=True).parse_args(argv))
    taken = {name: value for name, value in run_settings(args.model).items()
             if name not in explicit}
    for name, value in taken.items():
        setattr(args, name, value)
    if taken:
        print(f"from {Path(args.model).expanduser().parent / 'config.json'}: "
              + ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in taken.items()
                          if value is not None))
    if args.benchmark is None:
        raise InputError("--benchmark: required (a benchmark name or .jsonl file), unless --model "
                         "is a train.py run's checkpoint, whose held-out problems are then used")


def fitting_max_new_tokens(model, tokenizer, problems: list[str],
                           prompt_format: PromptFormat) -> int:
    """--max-new-tokens when not given: DEFAULT_MAX_NEW_TOKENS, or the positions the model has left
    after the longest prompt of all `problems` when that is fewer (the built-in world's model has
    256 positions)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if (positions is None or positions - longest_prompt_tokens(tokenizer, problems, prompt_format)
            >= DEFAULT_MAX_NEW_TOKENS):
        return DEFAULT_MAX_NEW_TOKENS
    return max(1, positions - longest_prompt_tokens(tokenizer, problems, prompt_format,
                                                    longest=len(problems)))


def check_args(args: argparse.Namespace) -> list[int]:
    """Apply --protocol, validate the numbers, and return the k of pass@k; raises InputError."""
    if args.protocol == "paper":
        args.samples = PAPER_SAMPLES.get(args.benchmark, args.samples)
        args.temperature = PAPER_TEMPERATURE
    check_bounds(args, EVAL_BOUNDS)
    check_text(args)
    check_model_flags(args)
    check_data_model(args.model, {"--benchmark": args.benchmark})
    try:
        ks = ([int(k) for k in args.pass_k.split(",")] if args.pass_k is not None
              else list(range(1, args.samples + 1)))
    except ValueError:
        raise InputError("--pass-k: expected comma-separated integers, "
                         f"got {args.pass_k!r}") from None
    bad = [k for k in ks if not 1 <= k <= args.samples]
    if bad:
        raise InputError(f"--pass-k: k must be between 1 and --samples ({args.samples}), got "
                         f"{bad[0]}")
    return ks


def default_out(args: argparse.Namespace) -> Path:
    """runs/eval-BENCHMARK-MODEL, from the names' last path components (a ".gguf" suffix dropped).

    A checkpoint folder (RUN/checkpoint, RUN/checkpoint-N) is named RUN-checkpoint(-N), so
    evaluating a second run does not overwrite the first's results; a hub id keeps its dots
    (Qwen2.5-0.5B-Instruct).
    """
    path = Path(args.model.rstrip("/")).expanduser()
    # "--model checkpoint" inside a run folder names the run
    path = path.resolve() if path.exists() else path
    model = Path(args.gguf_file).name if args.gguf_file else path.name
    if CHECKPOINT_FOLDER.fullmatch(model) and path.parent.name:
        model = f"{path.parent.name}-{model}"
    return Path("runs") / f"eval-{Path(args.benchmark).stem}-{model.removesuffix('.gguf')}"


def print_table(summary: dict) -> None:
    """One line per pass: pass@1, pass@K, length and the failure counts."""
    print(f"\n{summary['benchmark']}: {summary['problems']} problems, model {summary['model']}")
    print(f"{'pass':<16}{'K':>4}{'pass@1':>9}{'pass@K':>9}{'mean len':>10}"
          f"{'no box':>8}{'trunc':>7}{'timeout':>9}")
    for name, s in summary["passes"].items():
        k = s["samples"]
        print(f"{name:<16}{k:>4}{s['pass@1']:>9.3f}{s.get(f'pass@{k}', float('nan')):>9.3f}"
              f"{s['mean_length']:>10.1f}{s['no_box']:>8}{s['truncated']:>7}{s['timeouts']:>9}")


def run(args: argparse.Namespace) -> dict:
    """Evaluate per the parsed flags; writes OUT/results.jsonl and OUT/summary.json.

    Both are written at the end, under OUT/.lock, each to a fresh temporary name renamed over it
    (run_folder.write_atomically), so a failed or interrupted evaluation leaves an earlier one in
    OUT as it was, two evaluations never mix their lines, and a planted link is replaced, not
    written through.
    """
    ks = check_args(args)
    out = Path(args.out) if args.out else default_out(args)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise InputError(f"--out: {out} is a {'symbolic link' if out.is_symlink() else 'file'}, "
                         "not a folder")
    holder = lock_holder(out) if out.is_dir() else None
    if holder:  # a live train.py run, or another evaluation writing there
        raise in_use(out, "--out", holder)
    threads, why = choose_threads(args.threads)
    torch.set_num_threads(threads)
    print(f"threads: {threads} ({why})")
    problems = load_problems(args.benchmark, args.limit, args.seed, flag="--benchmark")
    reward_fn, prompt_format = load_reward(args.reward), prompt_format_from_args(args)
    model, tokenizer = load_model(args.model, args.dtype, args.device, args.gguf_file)
    if args.max_new_tokens is None:
        args.max_new_tokens = fitting_max_new_tokens(model, tokenizer,
                                                     [p.problem for p in problems], prompt_format)
    check_prompts_fit(model, tokenizer, [p.problem for p in problems], prompt_format,
                      args.max_new_tokens)
    passes = {}
    if args.temperature > 0:
        passes[f"sampled T={args.temperature:g}"] = (args.samples, args.temperature, ks)
    if args.greedy or args.temperature == 0:
        passes["greedy"] = (1, 0.0, [1])
    summary = dict(model=args.model, gguf_file=args.gguf_file, benchmark=args.benchmark,
                   problems=len(problems), max_new_tokens=args.max_new_tokens, top_p=args.top_p,
                   seed=args.seed, reward=args.reward, instruction=args.instruction,
                   system_prompt=args.system_prompt, few_shot=args.few_shot, passes={})
    lines = []
    for name, (samples, temperature, pass_ks) in passes.items():
        torch.manual_seed(args.seed)
        result, records = evaluate(model, tokenizer, problems, samples, temperature,
                                   args.max_new_tokens, args.batch_size, reward_fn, args.top_p,
                                   not args.quiet, pass_ks, prompt_format)
        summary["passes"][name] = result
        lines += [json.dumps({"pass": name, "index": index, **record}) + "\n"
                  for index, record in enumerate(records)]
    # only now: an evaluation that fails leaves nothing behind
    out.mkdir(parents=True, exist_ok=True)
    results, summary_path = out / "results.jsonl", out / "summary.json"
    # the pair written together, each file whole, never through a planted link
    with writing(out, "--out"):
        write_atomically(results, "".join(lines))
        write_atomically(summary_path, json.dumps(summary, indent=2) + "\n")
    print_table(summary)
    print(f"wrote {summary_path} and {results}")
    return summary


def main(argv: list[str]) -> int:
    """CLI entry: `plot RUN_DIR ...` goes to plots.main, anything else evaluates. Returns the exit
    code: 0, 2 bad input, 130 Ctrl-C (nothing is written: results are written whole at the end)."""
    signal.signal(signal.SIGINT, cli.stop_once)
    try:
        if argv[:1] == ["plot"]:
            if len(argv) < 2:
                raise InputError("plot: give at least one RUN_DIR")
            from analysis import plots  # matplotlib is only needed for figures

            plots.main(argv[1:])
        else:
            args = build_parser().parse_args(argv)
            apply_run_settings(args, argv)
            run(args)
    except InputError as error:
        return report(error)
    except FileNotFoundError as error:  # plots: a RUN_DIR without metrics.jsonl
        return report(InputError(str(error)))
    except KeyboardInterrupt:
        # a half-built progress bar's destructor: noise (cli.py)
        sys.unraisablehook = lambda unraisable: None
        print("\ninterrupted: nothing was written", file=sys.stderr)
        return 130
    # Python's own, for a caller that goes on
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return 0


if __name__ == "__main__":
    # "Loading weights": not the evaluation's news
    transformers.utils.logging.disable_progress_bar()
    sys.exit(main(sys.argv[1:]))
