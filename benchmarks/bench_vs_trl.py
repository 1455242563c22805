"""Our training step against TRL's GRPOTrainer on the same configuration, alternating, in one run.

    /work/venv-trl/bin/python -m benchmarks.bench_vs_trl \
        --model PATH  # needs trl installed (own venv is fine)
    python -m benchmarks.bench_vs_trl --model PATH --rounds 2 --steps 3 --threads 2
    python -m benchmarks.bench_vs_trl --model PATH --prompts additions     # short prompts

The configuration (both sides): --model, the prompts in order (`--prompts gsm8k`: gsm8k_train with
our default instruction; `--prompts additions`: "What is 59 + 63? Put the answer in \boxed{}."
two-digit additions, seeded, no instruction added), the chat template with the same user turn
(rollout.format_prompt), 8 prompts x 4 completions, <= 64 new tokens, temperature 1, no
top-k / top-p, GRPO with clip-higher (0.2 / 0.28), token-mean loss, no KL, lr 1e-6 (AdamW,
constant), grad clip 1, one optimizer step per rollout batch over micro-batches of 32, float32. Each
side runs in its own child process (so each peak RSS is its own), `--rounds` times, TRL first then
ours; a child's first step is a warm-up and is not timed. Prints every timed step, the medians,
their ratio (ours / TRL) and each side's peak RSS.
"""

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS, GROUP, MAX_NEW, LR, MICRO_BATCH = 8, 4, 64, 1e-6, 32
RECORD = "bench-record "  # prefix of the lines a child reports to the parent
# the short prompts: no instruction after them
ADDITIONS = "What is {a} + {b}? Put the answer in \\boxed{{}}."


def write_prompts(kind: str, count: int) -> tuple[str, str]:
    """(--data, --instruction) of the prompt set `kind`: "gsm8k" is gsm8k_train and our default
    instruction; "additions" is `count` two-digit additions (seed 0) written to a fresh temporary
    additions.jsonl, with no instruction."""
    from rollout import DEFAULT_INSTRUCTION

    if kind == "gsm8k":
        return "gsm8k_train", DEFAULT_INSTRUCTION
    rng = random.Random(0)
    pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(count)]
    path = Path(tempfile.mkdtemp()) / "additions.jsonl"
    path.write_text("".join(json.dumps({"problem": ADDITIONS.format(a=a, b=b),
                                        "answer": str(a + b)}) + "\n"
                            for a, b in pairs))
    return str(path), ""


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def run_ours(model: str, prompts: str, steps: int, threads: int, micro_batch_tokens: int | None,
             logprob_chunk: int) -> None:
    """Our train.py step (rollout_step + policy_update) with the shared configuration."""
    import torch

    import grams as grams_lib
    from data import load_problems
    from reward import REWARDS
    from machine import resolve_micro_batch_tokens
    from model_loading import load_policy
    from rollout import prompt_format_from_args
    from train import parse_args, policy_update, prompts_for_step, rollout_step

    torch.manual_seed(0)
    data, instruction = write_prompts(prompts, PROMPTS * steps)
    args = parse_args([
        "--model", model, "--data", data, "--instruction", instruction, "--reward", "gsm8k",
        "--grams", "paper",
        "--algo", "grpo",
        "--prompts-per-step", str(PROMPTS), "--group-size", str(GROUP),
        "--max-new-tokens", str(MAX_NEW),
        "--lr", str(LR), "--micro-batch-size", str(MICRO_BATCH), "--dtype", "float32",
        "--threads", str(threads),
        "--eval-every", "0", "--logprob-chunk", str(logprob_chunk),
        *(["--micro-batch-tokens", str(micro_batch_tokens)]
          if micro_batch_tokens is not None else []),
    ])
    torch.set_num_threads(threads)
    problems, grams = load_problems(args.data), grams_lib.load_grams(args.grams)
    model_, tokenizer, _ = load_policy(args, checkpoint=None)
    resolve_micro_batch_tokens(args, model_)
    optimizer = torch.optim.AdamW(model_.parameters(), lr=args.lr, weight_decay=0.0)
    prompt_format = prompt_format_from_args(args)
    for step in range(steps):
        started = time.perf_counter()
        indices = prompts_for_step(len(problems), step, args.prompts_per_step, args.seed)
        batch = rollout_step(args, model_, None, tokenizer, [problems[i] for i in indices], grams,
                             REWARDS["gsm8k"], prompt_format)
        policy_update(args, model_, optimizer, batch)
        print(RECORD, json.dumps({"step": step, "seconds": time.perf_counter() - started,
                                  "tokens": int(batch.rollout.lengths.sum())}), flush=True)


def run_trl(model: str, prompts: str, steps: int, threads: int, micro_batch_tokens: int,
            logprob_chunk: int) -> None:
    """TRL's GRPOTrainer with the shared configuration (micro_batch_tokens and logprob_chunk are
    ours only, unused here)."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from data import load_problems
    from reward import REWARDS
    from rollout import problem_with_instruction

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    data, instruction = write_prompts(prompts, PROMPTS * steps)
    problems = load_problems(data)[: PROMPTS * steps]
    dataset = Dataset.from_list([
        {"prompt": [{"role": "user", "content": problem_with_instruction(p.problem, instruction)}],
         "answer": p.answer}
        for p in problems
    ])

    def reward(completions, answer, **_):
        return [REWARDS["gsm8k"](c[0]["content"], a) for c, a in zip(completions, answer)]

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.started

        # after on_step_end, with the step's lengths
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                tokens = round(logs["completions/mean_length"] * PROMPTS * GROUP)
                print(RECORD, json.dumps({"step": state.global_step - 1, "seconds": self.seconds,
                                          "tokens": tokens}),
                      flush=True)

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, use_cpu=True, bf16=False, seed=0, max_steps=steps, report_to=[],
            save_strategy="no", logging_steps=1, per_device_train_batch_size=MICRO_BATCH,
            gradient_accumulation_steps=1, num_generations=GROUP,
            generation_batch_size=PROMPTS * GROUP, max_completion_length=MAX_NEW, temperature=1.0,
            top_p=1.0, top_k=0, learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
            max_grad_norm=1.0, beta=0.0, num_iterations=1, loss_type="dapo", epsilon=0.2,
            epsilon_high=0.28, shuffle_dataset=False,
        )
        tokenizer = AutoTokenizer.from_pretrained(model)
        trainer = GRPOTrainer(
            model=model, reward_funcs=reward, args=config, train_dataset=dataset,
            processing_class=tokenizer, callbacks=[StepTimer()],
        )
        trainer.train()


def child(kind: str, args: argparse.Namespace) -> tuple[list[float], float]:
    """Run one side in a fresh process; its timed step seconds and generated tokens (first step
    dropped each) and peak RSS in MiB."""
    command = [
        sys.executable, "-m", "benchmarks.bench_vs_trl", "--child", kind, "--model", args.model,
        "--prompts", args.prompts,
        "--steps", str(args.steps),
        "--threads", str(args.threads), "--logprob-chunk", str(args.logprob_chunk),
        *(["--micro-batch-tokens", str(args.micro_batch_tokens)]
          if args.micro_batch_tokens is not None else []),
    ]
    result = subprocess.run(command, capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent)
    if result.returncode != 0:
        sys.exit(f"error: the {kind} child failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line.removeprefix(RECORD)) for line in result.stdout.splitlines()
               if line.startswith(RECORD)]
    steps = [r for r in records if "seconds" in r][1:]
    for line in result.stdout.splitlines():
        # printed by machine.resolve_micro_batch_tokens when it chose the cap
        if line.startswith("micro-batch token cap:"):
            print(f"  our {line}")
    return ([r["seconds"] for r in steps], [r["tokens"] for r in steps],
            next(r["peak_rss_mib"] for r in records if "peak_rss_mib" in r))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="HF model folder (SmolLM2-135M-Instruct in the README)")
    parser.add_argument("--prompts", choices=["gsm8k", "additions"], default="gsm8k",
                        help="gsm8k_train problems with our instruction, "
                             "or short two-digit additions with none")
    parser.add_argument("--rounds", type=int, default=2,
                        help="TRL-then-ours rounds, each side in a fresh process")
    parser.add_argument("--steps", type=int, default=2,
                        help="steps per child; the first is a warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    parser.add_argument("--micro-batch-tokens", type=int, default=None,
                        help="our --micro-batch-tokens (activation memory cap; same gradient); "
                             "0 = rows only; unset: train.py's automatic choice")
    parser.add_argument("--logprob-chunk", type=int, default=512,
                        help="our --logprob-chunk "
                             "(tokens per vocabulary log-softmax chunk; same result)")
    parser.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run = run_ours if args.child == "ours" else run_trl
        run(args.model, args.prompts, args.steps, args.threads, args.micro_batch_tokens,
            args.logprob_chunk)
        print(RECORD, json.dumps({"peak_rss_mib": peak_rss_mib()}), flush=True)
        return
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step of each child is a warm-up)")
    seconds = {"trl": [], "ours": []}
    peak = {"trl": 0.0, "ours": 0.0}
    for round_ in range(args.rounds):
        for kind in ("trl", "ours"):
            steps, tokens, rss = child(kind, args)
            seconds[kind] += steps
            peak[kind] = max(peak[kind], rss)
            print(f"round {round_} {kind:>4}: steps {', '.join(f'{s:.2f}' for s in steps)} s, "
                  f"generated tokens {', '.join(map(str, tokens))}, peak RSS {rss:.0f} MiB",
                  flush=True)
    trl, ours = statistics.median(seconds["trl"]), statistics.median(seconds["ours"])
    print(f"median step: TRL {trl:.2f} s (peak RSS {peak['trl']:.0f} MiB), "
          f"ours {ours:.2f} s (peak RSS {peak['ours']:.0f} MiB)")
    print(f"ratio ours / TRL: {ours / trl:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
