"""torch.compile of the world model's decoder in our sampler, against eager: is compiling paid back?

    python -m benchmarks.bench_compile                      # 5 sampling calls each, one thread
    python -m benchmarks.bench_compile --calls 8 --threads 2
    python -m benchmarks.bench_compile --shapes static # the compiled side decodes with fixed shapes

One sampling call is one default step's rollout (16 problems x 8 completions, <= 128 new tokens,
temperature 1, rollout.generate_rollouts). The compiled side wraps the decoder the sampler calls
(`model.get_decoder()`) in `torch.compile(dynamic=True)`; calls alternate compiled / eager with the
same seed and problems, so both sides generate the same tokens. Prints each call's seconds and
tokens; the compiled side's first call holds its compile time. Our sampler's shapes change every
decode step (the KV cache fills, finished rows leave), which is what dynamic=True is for; torch's
recompile limit warns when it still recompiles per shape.

`--shapes static` makes the compiled side's decode steps all one shape, the precondition for
compiling once: `static_sample` keeps every row to the end (a finished row's tokens are padding and
cost as much as a running one's), reads the whole pre-allocated cache with a full-length mask, and
compiles the decoder with dynamic=False. The eager side is still the real sampler; a third side, the
static loop without compiling, shows what the fixed shapes cost by themselves. Same seed, so a side
generates the same tokens as the others up to float rounding (the counts are printed).
"""

import argparse
import copy
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Cache
from transformers.cache_utils import StaticLayer

from rollout import (_token_logp_and_entropy, encode_prompts, eos_token_ids, format_prompt,
                     generate_rollouts, pad_token_id, sample_next_token)
from world import tasks

PROMPTS, GROUP, MAX_NEW = 16, 8, 128  # train.py's defaults
# static_sample rounds its cache length up to a multiple of this, so prompts of other widths do not
# each compile the decoder again
CACHE_BUCKET = 64


def sample(model, tokenizer, prompts: list[str], seed: int) -> tuple[float, int]:
    """(seconds, completion tokens) of one default step's rollout."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    batch = generate_rollouts(model, tokenizer, prompts, group_size=GROUP, max_new_tokens=MAX_NEW,
                              temperature=1.0)
    return time.perf_counter() - started, int(batch.lengths.sum())


@torch.no_grad()
def static_sample(model, decoder, tokenizer, prompts: list[str], seed: int) -> tuple[float, int]:
    """(seconds, completion tokens) of one default step's rollout decoded with fixed shapes:
    rollout.sample_completions' prefill and sampling, with every row kept to the end, the whole
    cache read, and `decoder` (compiled or not) for the decode steps."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, "cpu")  # [N, P]
    rows_per_prompt, (num_prompts, prompt_len) = GROUP, prompt_ids.shape
    # one cache length for most batches
    length = -(-(prompt_len + MAX_NEW) // CACHE_BUCKET) * CACHE_BUCKET
    cache = Cache(layers=[StaticLayer(max_cache_len=length)
                          for _ in range(model.config.num_hidden_layers)])
    key_mask = torch.cat([prompt_mask.bool(),
                          torch.zeros(num_prompts, length - prompt_len, dtype=torch.bool)],
                         dim=1)  # [N, L]
    causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool).tril()  # [P, P]
    # [N, P, L]: the cache's empty tail
    prefill_mask = torch.zeros(num_prompts, prompt_len, length, dtype=torch.bool)
    prefill_mask[:, :, :prompt_len] = ((causal & key_mask[:, None, :prompt_len])
                                       | torch.eye(prompt_len, dtype=torch.bool))
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # [N, P]
    hidden = model.get_decoder()(input_ids=prompt_ids, attention_mask=prefill_mask[:, None],
                                 position_ids=positions,
                                 cache=cache, use_cache=True).last_hidden_state[:, -1]  # [N, H]
    copies = torch.arange(num_prompts).repeat_interleave(rows_per_prompt)  # [B]
    cache.reorder_cache(copies)
    # [B, H] [B, L] [B, 1]
    hidden, key_mask, next_position = hidden[copies], key_mask[copies], positions[copies, -1:] + 1
    eos, head = torch.tensor(eos_token_ids(model, tokenizer)), model.get_output_embeddings()
    running, lengths = (torch.ones(len(copies), dtype=torch.bool),
                        torch.zeros(len(copies), dtype=torch.long))  # [B]
    for step in range(MAX_NEW):
        logits = head(hidden).float()  # [B, V]
        token = sample_next_token(logits, 1.0, 1.0)  # [B]
        _token_logp_and_entropy(logits, token, 1.0)  # as the sampler records them
        lengths += running
        running &= ~torch.isin(token, eos)
        if not running.any() or step == MAX_NEW - 1:
            break
        key_mask[:, prompt_len + step] = True
        token = token.masked_fill(~running, pad_token_id(tokenizer))
        hidden = decoder(input_ids=token[:, None], attention_mask=key_mask[:, None, None, :],
                         position_ids=next_position,
                         cache=cache, use_cache=True).last_hidden_state[:, -1]  # [B, H]
        next_position = next_position + 1
    return time.perf_counter() - started, int(lengths.sum())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--calls", type=int, default=5, help="sampling calls per side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--shapes", choices=["dynamic", "static"], default="dynamic",
                        help="the compiled side: our sampler (shapes change every step) "
                             "or static_sample (fixed shapes)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(tasks.DEFAULT_MODEL_DIR)
    eager = AutoModelForCausalLM.from_pretrained(tasks.DEFAULT_MODEL_DIR).eval()
    if args.shapes == "dynamic":
        compiled = copy.deepcopy(eager)
        decoder = torch.compile(compiled.get_decoder(), dynamic=True)
        # what rollout.generate_rollouts calls for each decode step
        compiled.get_decoder = lambda: decoder
        sides = {"compiled": lambda prompts, seed: sample(compiled, tokenizer, prompts, seed),
                 "eager": lambda prompts, seed: sample(eager, tokenizer, prompts, seed)}
    else:
        decoder = torch.compile(eager.get_decoder(), dynamic=False)
        sides = {"compiled": lambda prompts, seed: static_sample(eager, decoder, tokenizer,
                                                                 prompts, seed),
                 "eager": lambda prompts, seed: sample(eager, tokenizer, prompts, seed),
                 "static eager": lambda prompts, seed: static_sample(eager, eager.get_decoder(),
                                                                     tokenizer, prompts, seed)}
    problems = tasks.world_problems("train", PROMPTS * args.calls, seed=0)
    times = {name: [] for name in sides}
    for call in range(args.calls):
        prompts = [format_prompt(tokenizer, p.problem)
                   for p in problems[PROMPTS * call:PROMPTS * (call + 1)]]
        for name, side in sides.items():
            seconds, tokens = side(prompts, call)
            times[name].append(seconds)
            print(f"call {call} {name:>12}: {seconds:6.2f} s, {tokens} tokens", flush=True)
    later = {name: statistics.median(values[1:]) for name, values in times.items()
             if len(values) > 1}
    if later:
        print(f"median of calls 1-{args.calls - 1}: "
              + ", ".join(f"{name} {value:.2f} s" for name, value in later.items())
              + f"; compiled's first call {times['compiled'][0]:.1f} s "
                f"(eager's {times['eager'][0]:.2f} s)")


if __name__ == "__main__":
    main()
