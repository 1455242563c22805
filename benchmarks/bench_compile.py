"""torch.compile of the world model's decoder inside our sampler, against eager: is the compile time paid back?

    python -m benchmarks.bench_compile                      # 5 sampling calls each, one thread
    python -m benchmarks.bench_compile --calls 8 --threads 2

One sampling call is one default step's rollout (16 problems x 8 completions, <= 128 new tokens, temperature
1, rollout.generate_rollouts). The compiled side wraps the decoder the sampler calls (`model.get_decoder()`)
in `torch.compile(dynamic=True)`; calls alternate compiled / eager with the same seed and problems, so both
sides generate the same tokens. Prints each call's seconds and tokens; the compiled side's first call holds
its compile time. Our sampler's shapes change every decode step (the KV cache fills, finished rows leave),
which is what dynamic=True is for; torch's recompile limit warns when it still recompiles per shape.
"""

import argparse
import copy
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollout import format_prompt, generate_rollouts
from world import tasks

PROMPTS, GROUP, MAX_NEW = 16, 8, 128  # train.py's defaults


def sample(model, tokenizer, prompts: list[str], seed: int) -> tuple[float, int]:
    """(seconds, completion tokens) of one default step's rollout."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    batch = generate_rollouts(model, tokenizer, prompts, group_size=GROUP, max_new_tokens=MAX_NEW, temperature=1.0)
    return time.perf_counter() - started, int(batch.lengths.sum())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5, help="sampling calls per side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(tasks.DEFAULT_MODEL_DIR)
    eager = AutoModelForCausalLM.from_pretrained(tasks.DEFAULT_MODEL_DIR).eval()
    compiled = copy.deepcopy(eager)
    decoder = torch.compile(compiled.get_decoder(), dynamic=True)
    compiled.get_decoder = lambda: decoder  # what rollout.generate_rollouts calls for each decode step
    problems = tasks.world_problems("train", PROMPTS * args.calls, seed=0)
    times = {"compiled": [], "eager": []}
    for call in range(args.calls):
        prompts = [format_prompt(tokenizer, p.problem) for p in problems[PROMPTS * call:PROMPTS * (call + 1)]]
        for name, model in (("compiled", compiled), ("eager", eager)):
            seconds, tokens = sample(model, tokenizer, prompts, seed=call)
            times[name].append(seconds)
            print(f"call {call} {name:>8}: {seconds:6.2f} s, {tokens} tokens", flush=True)
    later = {name: statistics.median(values[1:]) for name, values in times.items() if len(values) > 1}
    if later:
        print(f"median of calls 1-{args.calls - 1}: compiled {later['compiled']:.2f} s, eager {later['eager']:.2f} s; "
              f"compiled's first call {times['compiled'][0]:.1f} s (eager's {times['eager'][0]:.2f} s)")


if __name__ == "__main__":
    main()
