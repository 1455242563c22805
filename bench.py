"""Benchmark one training step (rollout + policy update) and print its time and peak memory.

    python bench.py                                   # the default run's configuration (tiny world model)
    python bench.py --repeats 3 --model PATH --data gsm8k_train --max-new-tokens 256 --group-size 8

Takes every train.py flag (same defaults) plus --repeats. Prints, per repeat, the seconds spent
generating, the seconds of the update (all PPO epochs), generated tokens per second, and at the end the
peak memory: CUDA max allocated on a GPU, max resident set size of the process on a CPU.
"""

import argparse
import resource
import sys
import time

import torch

import grams as grams_lib
from cli import report
from data import InputError, load_problems
from eval import prompt_format_from_args
from reward import load_reward
from train import parse_args, policy_update, prepare_model, prompts_for_step, rollout_step, seed_everything


def peak_memory_mib(device: str) -> float:
    """CUDA max allocated (GPU) or the process's max resident set size (CPU, Linux reports KiB)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def main(argv: list[str]) -> None:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--repeats", type=int, default=3, help="steps to time")
    bench_args, train_argv = own.parse_known_args(argv)
    try:
        args = parse_args(train_argv + ["--eval-every", "0"])
        seed_everything(args.seed)
        problems = load_problems(args.data, flag="--data")
        grams = grams_lib.load_grams(args.grams)
        reward_fn, prompt_format = load_reward(args.reward), prompt_format_from_args(args)
        model, tokenizer, ref_model = prepare_model(args, checkpoint=None)
    except InputError as error:
        sys.exit(report(error))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    device = str(next(model.parameters()).device)
    print(
        f"model {args.model} on {device} ({next(model.parameters()).dtype}), threads {torch.get_num_threads()}, "
        f"{args.prompts_per_step} prompts x {args.group_size} completions, max {args.max_new_tokens} new tokens, "
        f"micro-batch {args.micro_batch_size}, ppo epochs {args.ppo_epochs}, algo {args.algo}"
    )
    for step in range(bench_args.repeats):
        started = time.perf_counter()
        indices = prompts_for_step(len(problems), step, args.prompts_per_step, args.seed)
        batch, _, _ = rollout_step(
            args, model, ref_model, tokenizer, [problems[i] for i in indices], grams, reward_fn, prompt_format
        )
        rolled = time.perf_counter()
        policy_update(args, model, optimizer, batch)
        done = time.perf_counter()
        tokens = int(batch.rollout.completion_mask.sum())
        print(
            f"step {step}: rollout {rolled - started:6.2f} s ({tokens / (rolled - started):7.1f} tok/s, {tokens} tokens), "
            f"update {done - rolled:6.2f} s, total {done - started:6.2f} s"
        )
    print(f"peak memory: {peak_memory_mib(device):.0f} MiB")


if __name__ == "__main__":
    main(sys.argv[1:])
