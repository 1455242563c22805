"""Benchmark one training step (rollout + policy update) and print its throughput, time and peak
memory.

    python -m benchmarks.bench  # the default run's configuration (tiny world model)
    python -m benchmarks.bench --repeats 3 --model PATH --data gsm8k_train --max-new-tokens 256 \
        --group-size 8

Takes every train.py flag (same defaults) plus --repeats. Prints, per repeat: the rollout's seconds
and generated tokens per second, the update's seconds (all PPO epochs) and trained completion tokens
per second, the step time, and the fraction of the step's FLOP floor reached at this machine's
matmul peak. At the end: the median step and the peak memory (CUDA max allocated on a GPU, max RSS
of the process on a CPU). On a CPU it also prints where the memory goes: the resident set after
loading the model, and for each step the highest resident set seen while sampling and while updating
(optimizer step included), read from /proc/self/statm every few milliseconds by a background thread.
Step 0 starts without gradients or AdamW moments (they appear in its update), so its sampling peak
is the sampler's own; from step 1 on the AdamW moments are held throughout, and freed memory the
allocator keeps for reuse counts as resident.

FLOP floor: 2 N FLOPs per token for every token the sampler must read or write (each distinct prompt
once, each generated token once), plus 2 N per token per forward and 4 N per token per backward of
every PPO epoch over the same tokens; N = the parameters a token meets in matmuls (all but the input
embedding). Attention scores are left out (small at these lengths), so the fraction is an upper
bound on efficiency. The matmul peak is measured in the same run: the best of a few fp32 (or the
model dtype) 2048^3 matmuls.
"""

import argparse
import os
import resource
import statistics
import sys
import threading
import time
from contextlib import contextmanager

import torch

import grams as grams_lib
from cli import InputError, report
from data import load_problems
from rollout import prompt_format_from_args
from reward import load_reward
from machine import resolve_micro_batch_tokens
from model_loading import load_policy
from precision import MixedPrecision
from train import parse_args, policy_update, prompts_for_step, rollout_step
from training_run import seed_everything


def peak_memory_mib(device: str) -> float:
    """CUDA max allocated (GPU) or the process's max resident set size (CPU, Linux reports KiB)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def resident_mib() -> float:
    """The process's current resident set size (Linux /proc/self/statm), MiB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PhaseMemory:
    """Highest resident set per named phase, sampled every `interval_s` by a thread (CPU, Linux)
    that runs while the `with` block does: leaving it stops and joins the thread, so the process is
    single-threaded again (a test that forks after `bench.main` needs that)."""

    def __init__(self, interval_s: float = 0.002):
        # "between": outside any tracked block
        self.interval_s, self.phase, self.peaks = interval_s, "between", {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "PhaseMemory":
        self.thread.start()
        return self

    def __exit__(self, *exception) -> None:
        self.stopped.set()
        self.thread.join()

    def _poll(self) -> None:
        while not self.stopped.wait(self.interval_s):
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), resident_mib())

    @contextmanager
    def track(self, phase: str):
        """Attribute the resident set to `phase` while the block runs (and one last reading at its
        end)."""
        self.phase = phase
        try:
            yield
        finally:
            self.peaks[phase] = max(self.peaks.get(phase, 0.0), resident_mib())
            self.phase = "between"


def matmul_peak_flops(device: str, dtype: torch.dtype, size: int = 2048, tries: int = 5) -> float:
    """FLOP/s of the best of `tries` size^3 matmuls (after one warm-up) on this device and dtype."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(tries + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def matmul_params(model) -> int:
    """Parameters a token meets in matmuls: all but the input embedding (counted again when tied to
    the head)."""
    embedding = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not embedding) + (
        embedding.numel() if model.get_output_embeddings().weight is embedding else 0
    )


def step_flop_floor(rollout, params: int, ppo_epochs: int) -> float:
    """FLOPs the step cannot avoid (see the module doc): sampling 2N per distinct-prompt and
    generated token, update 6N per distinct-prompt and completion token per epoch."""
    # each distinct prompt once
    prompt_tokens = rollout.prompt_mask[:: rollout.group_size].sum().item()
    completion_tokens = rollout.completion_mask.sum().item()
    tokens = prompt_tokens + completion_tokens
    return 2 * params * tokens + ppo_epochs * 6 * params * tokens


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
        model, tokenizer, ref_model = load_policy(args, checkpoint=None)
        resolve_micro_batch_tokens(args, model)
        precision = MixedPrecision(args.device, args.dtype)
    except InputError as error:
        sys.exit(report(error))
    loaded_mib = resident_mib()
    memory = PhaseMemory()
    if args.threads:
        torch.set_num_threads(args.threads)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    parameter = next(model.parameters())
    device = str(parameter.device)
    peak = matmul_peak_flops(device, parameter.dtype)
    params = matmul_params(model)
    print(
        f"model {args.model} on {device} ({parameter.dtype}), threads {torch.get_num_threads()}, "
        f"{args.prompts_per_step} prompts x {args.group_size} completions, "
        f"max {args.max_new_tokens} new tokens, "
        f"micro-batch {args.micro_batch_size} rows, {args.micro_batch_tokens or 'no'} token cap, "
        f"ppo epochs {args.ppo_epochs}, algo {args.algo}; "
        f"{params / 1e6:.2f}M matmul params; matmul peak {peak / 1e9:.1f} GFLOP/s"
    )
    step_seconds = []
    with memory:
        for step in range(bench_args.repeats):
            started = time.perf_counter()
            indices = prompts_for_step(len(problems), step, args.prompts_per_step, args.seed)
            with memory.track(f"sampling {step}"):
                batch = rollout_step(args, model, ref_model, tokenizer,
                                     [problems[i] for i in indices], grams, reward_fn,
                                     prompt_format, precision=precision)
            rolled = time.perf_counter()
            with memory.track(f"update {step}"):
                policy_update(args, model, optimizer, batch, precision)
            done = time.perf_counter()
            tokens = int(batch.rollout.completion_mask.sum())
            floor = step_flop_floor(batch.rollout, params, args.ppo_epochs)
            step_seconds.append(done - started)
            print(
                f"step {step}: rollout {rolled - started:6.2f} s "
                f"({tokens / (rolled - started):7.1f} tok/s, {tokens} tokens), "
                f"update {done - rolled:6.2f} s "
                f"({args.ppo_epochs * tokens / (done - rolled):7.1f} tok/s), "
                f"total {done - started:6.2f} s, "
                f"{floor / (done - started) / peak:6.1%} of the FLOP floor at peak"
                + ("" if device.startswith("cuda")
                   else f"; resident set at most {memory.peaks[f'sampling {step}']:.0f} MiB "
                        f"sampling, {memory.peaks[f'update {step}']:.0f} MiB updating")
            )
    print(f"median step {statistics.median(step_seconds):.2f} s; "
          f"peak memory: {peak_memory_mib(device):.0f} MiB")
    if not device.startswith("cuda"):
        trainable = sum(p.numel() * p.element_size() for p in model.parameters()
                        if p.requires_grad) / 2**20
        print(
            f"resident set after loading: {loaded_mib:.0f} MiB; "
            f"trainable weights {trainable:.0f} MiB, their "
            f"gradients {trainable:.0f} MiB, AdamW's two moments {2 * trainable:.0f} MiB"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
