"""What the machine can give a run, chosen once at its start and printed (train.py, eval.py):

- `choose_threads`: torch's CPU threads, one per core that other programs do not keep busy
  (/proc/stat);
- `choose_micro_batch_tokens`: the cap on the tokens of one training forward when
  --micro-batch-tokens is not given, from the model's size and the memory still available
  (/proc/meminfo); `resolve_micro_batch_tokens` sets and prints it on a run's settings.
"""

import os
import time

import torch

BUSY_SAMPLE_S = 0.2  # how long choose_threads watches the machine


def cpus_busy_elsewhere(seconds: float = BUSY_SAMPLE_S) -> float | None:
    """How many CPUs other programs keep busy right now: (1 - idle share) x CPUs over `seconds`,
    read from /proc/stat while this process sleeps; None where there is no /proc/stat (not
    Linux)."""
    def times() -> list[int]:
        with open("/proc/stat") as stat:
            # the "cpu" line: all CPUs together
            return [int(field) for field in stat.readline().split()[1:]]

    try:
        before = times()
        time.sleep(seconds)
        after = times()
    except OSError:
        return None
    spent = [b - a for a, b in zip(before, after)]
    idle = spent[3] + (spent[4] if len(spent) > 4 else 0)  # idle + iowait
    return (os.cpu_count() or 1) * (1 - idle / max(sum(spent), 1))


def choose_threads(requested: int) -> tuple[int, str]:
    """The CPU threads for torch and why: `requested` when set (--threads N); else torch's own
    choice (one per core) minus the CPUs other programs keep busy, at least 1. On a busy machine
    more threads than free cores is a collapse, not a speed-up: with two busy loops on two cores, 2
    threads took 1.7x as long per step as 1 (benchmarks/bench_threads.py). One step's results differ
    in the last digits between thread counts, and training amplifies that over tens of steps, so
    train.py records the count it chose in config.json (and RUN_DIR/environment.jsonl) and a resumed
    run keeps it."""
    if requested:
        return requested, "--threads"
    cores = torch.get_num_threads()
    busy = cpus_busy_elsewhere()
    if busy is None:
        return cores, f"torch's choice for {cores} cores"
    threads = max(1, min(cores, round(cores - busy)))
    return threads, f"{cores} cores, {busy:.1f} busy with other programs; --threads N to choose"


# bytes: below this, capping a forward saves nothing worth its time
MIN_ACTIVATION_BUDGET = 256 * 2**20


def activation_bytes_per_token(model) -> int:
    """Estimated bytes a training forward keeps for the backward per token: per layer about 8
    hidden-wide vectors (norm inputs, q, k, v, attention output, residuals) and 4 MLP-wide ones
    (gate, up, activation, their product), in the weights' dtype. For SmolLM2-135M in float32 that
    is 30 x (8 x 576 + 4 x 1536) x 4 B = 1.29 MB, against 0.9-1.9 MiB per token of the cap measured
    (docs/speed.md, "Where the memory goes")."""
    config = (model.config.get_text_config() if hasattr(model.config, "get_text_config")
              else model.config)
    hidden = config.hidden_size
    mlp = getattr(config, "intermediate_size", None) or 4 * hidden
    parameter = next(model.parameters())
    return config.num_hidden_layers * (8 * hidden + 4 * mlp) * parameter.element_size()


def available_memory_bytes() -> int | None:
    """Memory the machine can still give (MemAvailable in /proc/meminfo); None where that cannot be
    read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def choose_micro_batch_tokens(model, micro_batch_size: int, max_new_tokens: int) -> tuple[int, str]:
    """The --micro-batch-tokens of a run that did not give one (0 = no cap), and why: no cap when a
    full micro-batch's activations (rows x --max-new-tokens, estimated by
    activation_bytes_per_token) fit the budget, and otherwise the tokens that fill it. The budget is
    the weights' bytes (at least MIN_ACTIVATION_BUDGET), and at most a quarter of the memory still
    available: the activations then stay no larger than the model, next to the weights, gradients
    and AdamW moments (4x the weights) that no cap can shrink. The gradient is the same either way;
    only the summation order, and so the last digits, differ."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    budget = max(weights, MIN_ACTIVATION_BUDGET)
    available = available_memory_bytes()
    if available is not None:
        budget = min(budget, available // 4)
    per_token = activation_bytes_per_token(model)
    full = micro_batch_size * max_new_tokens * per_token
    if full <= budget:
        return 0, (f"a full micro-batch's activations, about {full / 2**20:,.0f} MiB, fit the "
                   f"{budget / 2**20:,.0f} MiB budget; --micro-batch-tokens N to choose")
    cap = max(1, budget // per_token)
    return cap, (f"{per_token / 2**20:.2f} MiB of activations per token x {cap} = the "
                 f"{budget / 2**20:,.0f} MiB budget (the weights' size, at most a quarter of the "
                 "free memory); --micro-batch-tokens N to choose")


def resolve_micro_batch_tokens(config, model) -> None:
    """Set an unset `config.micro_batch_tokens` for `model` (choose_micro_batch_tokens) and print
    the choice; train.py keeps it in config.json, so a resumed run keeps the cap it started with."""
    if config.micro_batch_tokens is None:
        config.micro_batch_tokens, why = choose_micro_batch_tokens(model, config.micro_batch_size,
                                                                   config.max_new_tokens)
        print(f"micro-batch token cap: {config.micro_batch_tokens or 'none'} ({why})", flush=True)
