"""Time the default training step of two checkouts of this repository, alternating, in one process.

    git worktree add /tmp/before COMMIT
    python -m benchmarks.bench_compare --before /tmp/before --after . --threads 1 --steps 6

Each checkout's train.py builds its own model (--seed 0) and optimizer; then step s of A, step s of
B, step s+1 of A, ... (rollout_step + policy_update with train.py's defaults: 16 prompts x 8
completions of the built-in world, <= 96 new tokens). Prints the medians of the wall and CPU seconds
of a step and of its rollout, and the before/after ratios. On a shared machine the CPU-time ratio is
the steadier figure.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

def load_checkout(path: str, checkouts: list[str]):
    """The train, reward, data and grams modules of the checkout at `path`, imported afresh: every
    module loaded from one of the `checkouts` before is dropped first, so the two share none."""
    roots = [Path(checkout).resolve() for checkout in checkouts]
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and any(Path(file).resolve().is_relative_to(root) for root in roots):
            del sys.modules[name]
    sys.path.insert(0, path)
    import data
    import grams
    import reward
    import train

    sys.path.pop(0)
    return train, reward, data, grams


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--before", required=True, help="checkout A (a git worktree)")
    parser.add_argument("--after", default=".", help="checkout B")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--steps", type=int, default=6, help="steps per checkout")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sides = {}
    for label, path in (("before", args.before), ("after", args.after)):
        train, reward, data, grams = load_checkout(path, [args.before, args.after])
        train_args = train.parse_args(["--eval-every", "0", "--threads", str(args.threads)])
        torch.manual_seed(0)
        # before / after the split
        load = getattr(train, "prepare_model", None) or sys.modules["model_loading"].load_policy
        model, tokenizer, _ = load(train_args, None)
        optimizer = torch.optim.AdamW(model.parameters(), lr=train_args.lr)
        problems, gram_list = (data.load_problems(train_args.data),
                               grams.load_grams(train_args.grams))
        sides[label] = (train, reward, train_args, model, tokenizer, optimizer, problems,
                        gram_list, [])
    for step in range(args.steps):
        for label, (train, reward, train_args, model, tokenizer, optimizer, problems, gram_list,
                    times) in sides.items():
            indices = train.prompts_for_step(len(problems), step, train_args.prompts_per_step, 0)
            torch.manual_seed(step)
            wall, cpu = time.perf_counter(), time.process_time()
            batch = train.rollout_step(
                train_args, model, None, tokenizer, [problems[i] for i in indices], gram_list,
                reward.REWARDS[train_args.reward]
            )
            # older checkouts return (batch, problems, errors)
            batch = batch[0] if isinstance(batch, tuple) else batch
            rollout_wall, rollout_cpu = time.perf_counter() - wall, time.process_time() - cpu
            train.policy_update(train_args, model, optimizer, batch)
            times.append((time.perf_counter() - wall, time.process_time() - cpu, rollout_wall,
                          rollout_cpu))
    medians = {}
    for label, side in sides.items():
        times = side[-1]
        medians[label] = [statistics.median(t[i] for t in times) for i in range(4)]
        step_wall, step_cpu, rollout_wall, rollout_cpu = medians[label]
        print(f"{label:>6}: step {step_wall:.3f} s wall, {step_cpu:.3f} s CPU; "
              f"rollout {rollout_wall:.3f} s wall, {rollout_cpu:.3f} s CPU")
    before, after = medians["before"], medians["after"]
    print(f"before / after: step wall {before[0] / after[0]:.2f}x, "
          f"step CPU {before[1] / after[1]:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
