"""Benchmark training steps through TRL's GRPOTrainer (hicra_trl.py), as bench.py does for train.py.

    python -m benchmarks.bench_trl --repeats 2 --model PATH --data gsm8k_train --reward gsm8k \
        --grams paper

Takes every train_trl.py flag (same defaults) plus --repeats (steps to time). A step is TRL's
optimizer step, which with train_trl.py's mapping (--ppo-epochs 1) is one rollout batch: generation,
the entropy forward, rewards, advantages, forward/backward over the batch, optimizer step. Prints
each step's wall time and, at the end, the peak memory (bench.peak_memory_mib: CUDA max allocated,
or the process's max RSS). Nothing is saved.
"""

import argparse
import sys
import tempfile
import time

import torch
from transformers import TrainerCallback

from benchmarks.bench import peak_memory_mib
from cli import InputError
from scale_out.train_trl import build_parser, build_trainer


class StepTimer(TrainerCallback):
    """Prints the wall time of every optimizer step (from the end of the previous one, or from the
    start)."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        # own line: tqdm shares it
        print(f"\nstep {state.global_step - 1}: total {now - self.last:6.2f} s", flush=True)
        self.last = now


def main(argv: list[str]) -> None:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--repeats", type=int, default=3, help="steps to time")
    bench_args, train_argv = own.parse_known_args(argv)
    with tempfile.TemporaryDirectory() as out:
        args = build_parser().parse_args(
            [*train_argv, "--steps", str(bench_args.repeats), "--save-every", str(10**9),
             "--out", out]
        )
        try:
            trainer = build_trainer(args, callbacks=[StepTimer()])
        except InputError as error:
            sys.exit(f"error: {error}")
        device = str(trainer.accelerator.device)
        print(
            f"TRL GRPOTrainer: model {args.model} on {device} "
            f"({next(trainer.model.parameters()).dtype}), "
            f"threads {torch.get_num_threads()}, "
            f"{args.prompts_per_step} prompts x {args.group_size} completions, "
            f"max {args.max_new_tokens} new tokens, micro-batch {args.micro_batch_size}, "
            f"algo {args.algo}"
        )
        trainer.train()
    print(f"peak memory: {peak_memory_mib(device):.0f} MiB")


if __name__ == "__main__":
    main(sys.argv[1:])
