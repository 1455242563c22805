"""Where one decode step of the sampler goes: HF's modules, matmul attention, or plain torch ops.

Three ways to run the step: HF's Llama modules with torch's SDPA (what rollout.sample_completions
runs), the same modules with the single query's attention as two batched matmuls
(`single_query_attention`), and the same arithmetic in plain torch ops over the same weights,
without the modules (the world model by default).

    python -m benchmarks.bench_decode_overhead  # 128 rows, 64 tokens already cached, one thread
    python -m benchmarks.bench_decode_overhead --rows 16 --threads 2

The last two sides are measurements, not code paths of train.py: they bound what another attention
kernel and "fewer Python-level calls per token" could gain in the sampler. All sides start from the
same state: `--rows` random sequences of `--prompt` + `--filled` tokens encoded into a pre-allocated
KV cache. Each call decodes one more token for every row and attends to every filled slot, as the
sampler's decoder call does (our FilledStaticLayer cache, a boolean mask); the cache is rewound
after each call, so all calls do the same work. The other sides must reproduce SDPA's hidden state
(the largest differences are printed). Calls alternate in blocks; prints the median microseconds per
call of each side.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM, Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from rollout import FilledStaticLayer
from world import tasks

MATMUL_ATTENTION = "sdpa_single_query_matmul"  # registered below: single_query_attention


def single_query_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling=None, **kwargs):
    """HF's SDPA attention, except for one query position, where softmax(q k^T * scale + mask) v is
    two batched matmuls. query [b, heads, 1, d], key/value [b, kv_heads, L, d], attention_mask
    [b, 1, 1, L] boolean (True = attend) or None. Returns ([b, 1, heads, d], None) as HF's attention
    functions do; the heads of a key/value group share its keys without a copy."""
    if query.shape[2] != 1 or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim)  # [b, kv_heads, group, d]
    # [b, kv_heads, group, L]
    scores = grouped @ key.transpose(-1, -2) * (dim**-0.5 if scaling is None else scaling)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    # [b, kv_heads, group, L]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    return (weights @ value).reshape(rows, 1, heads, dim), None  # [b, 1, heads, d]


AttentionInterface.register(MATMUL_ATTENTION, single_query_attention)
AttentionMaskInterface.register(MATMUL_ATTENTION, sdpa_mask)


def rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """LlamaRMSNorm in float32: weight * x / sqrt(mean(x^2) + eps) over the last dimension."""
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of x [b, heads, 1, d] (the halves rotated, as HF's Llama does)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


@torch.no_grad()
def plain_decode(model, token: torch.Tensor, position: torch.Tensor, keys: list, values: list,
                 filled: int):
    """One decode step of a Llama decoder in plain torch ops. token, position [b]; keys/values per
    layer [b, kv_heads, L, d] with `filled` slots in use, the new token's written at slot `filled`.
    Returns the final hidden state [b, H]."""
    inner, config = model.model, model.config
    rows, heads, kv_heads, d = (token.shape[0], config.num_attention_heads,
                                config.num_key_value_heads, config.head_dim)
    x = inner.embed_tokens(token)  # [b, H]
    cos, sin = inner.rotary_emb(x, position[:, None])  # [b, 1, d] each
    cos, sin = cos[:, None], sin[:, None]  # [b, 1, 1, d]
    for layer, layer_keys, layer_values in zip(inner.layers, keys, values):
        attention, mlp = layer.self_attn, layer.mlp
        h = rms_norm(x, layer.input_layernorm)  # [b, H]
        # [b, heads, 1, d]
        q = rotate(F.linear(h, attention.q_proj.weight).view(rows, heads, 1, d), cos, sin)
        layer_keys[:, :, filled] = rotate(
            F.linear(h, attention.k_proj.weight).view(rows, kv_heads, 1, d), cos, sin)[:, :, 0]
        layer_values[:, :, filled] = F.linear(h, attention.v_proj.weight).view(rows, kv_heads, d)
        out, _ = single_query_attention(attention, q, layer_keys[:, :, : filled + 1],
                                        layer_values[:, :, : filled + 1],
                                        None, scaling=attention.scaling)  # [b, 1, heads, d]
        x = x + F.linear(out.reshape(rows, heads * d), attention.o_proj.weight)
        h = rms_norm(x, layer.post_attention_layernorm)
        x = x + F.linear((mlp.act_fn(F.linear(h, mlp.gate_proj.weight))
                          * F.linear(h, mlp.up_proj.weight)),
                         mlp.down_proj.weight)
    return rms_norm(x, inner.norm)  # [b, H]


def median_microseconds(call, calls: int) -> float:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=tasks.DEFAULT_MODEL_DIR, help="a Llama model folder")
    parser.add_argument("--rows", type=int, default=128, help="rows decoding at once (16 x 8)")
    parser.add_argument("--prompt", type=int, default=48, help="prompt tokens per row")
    parser.add_argument("--filled", type=int, default=64, help="completion tokens in the cache")
    parser.add_argument("--calls", type=int, default=50, help="calls per block")
    parser.add_argument("--blocks", type=int, default=10, help="blocks per side, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    config, decoder = model.config, model.get_decoder()
    length = args.prompt + args.filled  # slots in use before each call
    cache = Cache(layers=[FilledStaticLayer(max_cache_len=length + 1)
                          for _ in range(config.num_hidden_layers)])
    with torch.no_grad():
        decoder(input_ids=torch.randint(4, config.vocab_size, (args.rows, length)), cache=cache,
                use_cache=True)
    # [b, kv_heads, L + 1, d] each: the plain side's copy
    keys = [layer.keys.clone() for layer in cache.layers]
    values = [layer.values.clone() for layer in cache.layers]
    token = torch.randint(4, config.vocab_size, (args.rows,))  # [b]
    position = torch.full((args.rows,), length)  # [b]
    mask = torch.ones(args.rows, 1, 1, length + 1, dtype=torch.bool)  # [b, 1, 1, L + 1]

    @torch.no_grad()
    def hf_decode() -> torch.Tensor:
        for layer in cache.layers:
            layer.cumulative_length.fill_(length)  # rewind: every call writes slot `length`
        return decoder(input_ids=token[:, None], attention_mask=mask,
                       position_ids=position[:, None], cache=cache,
                       use_cache=True).last_hidden_state[:, -1]  # [b, H]

    def hf_matmul_attention() -> torch.Tensor:
        model.set_attn_implementation(MATMUL_ATTENTION)
        try:
            return hf_decode()
        finally:
            model.set_attn_implementation("sdpa")

    def plain() -> torch.Tensor:
        return plain_decode(model, token, position, keys, values, length)

    sides = {"HF modules, SDPA": hf_decode, "HF modules, matmul attention": hf_matmul_attention,
             "plain ops": plain}
    reference = hf_decode()
    differences = {name: (side() - reference).abs().max().item() for name, side in sides.items()}
    times = {name: [] for name in sides}
    for _ in range(args.blocks):
        for name, side in sides.items():
            times[name].append(median_microseconds(side, args.calls))
    print(f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {args.rows} rows, "
          f"{length} cached tokens, {torch.get_num_threads()} thread(s); "
          "median microseconds per decode call (largest hidden-state difference "
          "to SDPA's):")
    slowest = statistics.median(times["HF modules, SDPA"])
    for name, values in times.items():
        print(f"  {name:>32}: {statistics.median(values):7.0f} us "
              f"({slowest / statistics.median(values):.2f}x; "
              f"difference {differences[name]:.1e})")


if __name__ == "__main__":
    main()
