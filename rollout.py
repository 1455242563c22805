"""Rollouts: sample G completions per prompt and score them under the sampling policy.

Choices, and the quirks that bite:
- Sampling is our own loop over the model's decoder (`sample_completions`), built for RL rollouts
  rather than `model.generate`: each distinct prompt is encoded once and its KV cache copied to its
  G completions; the KV cache is pre-allocated (transformers' `StaticLayer`s, read up to the filled
  slots) and the attention mask one boolean [B, 1, 1, L] tensor updated in place (nothing rebuilt
  per token); rows that produced an EOS are dropped from the batch and the cache (in bulk, whenever
  a quarter of the rows have finished), so finished completions stop costing. Its plain definition,
  `reference_sample_completions`, is `model.generate`; tests/test_sampler.py pins the two together.
  Prompts use the tokenizer's chat template when it has one, a plain template otherwise.
- Sampling is plain temperature sampling with optional top-p; top-k, repetition penalty and any
  other processor a model's `generation_config` may carry play no part, so the policy is what the
  flags say.
- The old log-probs and entropies are recorded by the sampler from the very logits each token was
  drawn from: log-softmax(logits / temperature), the temperature-scaled policy that was sampled; as
  in TRL and verl, the top-p truncation is not part of the log-prob. In float32 a fresh training
  forward reproduces them to ~1e-6 (ratio 1 at the first PPO epoch; tested), so no second forward
  pass is needed. Under bf16/fp16 autocast the cached decode and the full forward round differently
  (up to 0.12 in log-prob on the world model, median 0; measured on 8 problems x 4 completions);
  train.py then takes pi_old from its first pass's own forward instead (precision.py). The sampler
  runs without gradients: nothing it records carries a graph into the update.
- Positions are taken from the attention mask (cumsum - 1) as `generate` does, so left padding does
  not shift the rotary positions between sampling and training.
- The completion mask comes from the first EOS, never from the pad id: the EOS token carries loss,
  tokens after it do not, even when the pad id equals the EOS id.
- The vocabulary projection and fp32 log-softmax run only over the completion's real tokens (padding
  never meets the head), `chunk_size` tokens at a time and recomputed in the backward pass, so the
  largest vocabulary-sized tensor is [chunk_size, V] whatever the batch's rows and lengths.
"""

import signal
import threading
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint
from transformers import Cache, DynamicCache
from transformers.cache_utils import StaticLayer

from cli import InputError
from data import read_examples

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PLAIN_TEMPLATE = "Question: {content}\nAnswer:"
COMPACT_AT = 0.75  # the sampler drops finished rows once at most this share of its batch still runs


@dataclass
class RolloutBatch:
    """B = prompts x group_size completions; completion i*G .. i*G+G-1 share prompt i."""

    prompt_ids: torch.Tensor  # [B, P] long, left-padded
    prompt_mask: torch.Tensor  # [B, P] long, 1 = real prompt token
    completion_ids: torch.Tensor  # [B, C] long, right-padded with the pad id
    completion_mask: torch.Tensor  # [B, C] float, 1 = generated token (EOS included)
    old_logp: torch.Tensor | None  # [B, C] float, log pi_old(token) at sampling T, 0 where masked
    entropy: torch.Tensor | None  # [B, C] float, H(pi_old(. | prefix)) at sampling T, 0 if masked
    texts: list[str]  # decoded completions, special tokens skipped
    truncated: torch.Tensor  # [B] bool, stopped by max_new_tokens before any EOS
    group_size: int

    @property
    def lengths(self) -> torch.Tensor:
        """Completion lengths in tokens, EOS included: [B]."""
        return self.completion_mask.sum(-1)


@dataclass(frozen=True)
class PromptFormat:
    """How a problem becomes a prompt: the instruction after it, an optional system prompt, and
    few-shot examples, (problem, solution) pairs shown as earlier turns so the prompt can teach the
    answer format."""

    instruction: str = DEFAULT_INSTRUCTION
    system: str | None = None
    examples: tuple[tuple[str, str], ...] = ()


def prompt_format_from_args(args) -> PromptFormat:
    """The PromptFormat of the prompt flags (--instruction, --system-prompt, --few-shot); reads the
    --few-shot file (InputError on a bad file)."""
    examples = tuple(read_examples(args.few_shot)) if args.few_shot else ()
    return PromptFormat(instruction=args.instruction, system=args.system_prompt, examples=examples)


def format_prompt(tokenizer, problem: str, prompt_format: PromptFormat = PromptFormat()) -> str:
    """The prompt text for a problem: chat turns through the tokenizer's chat template, a plain
    template without one.

    Chat: [system], then per example a user turn (problem + instruction) and an assistant turn
    (solution), then the problem's user turn. Plain: [system line], one "Question: ...\nAnswer:
    solution" block per example, blank-line separated, then the problem's block ending in "Answer:".
    """
    questions = [
        problem_with_instruction(p, prompt_format.instruction) for p, _ in prompt_format.examples
    ]
    content = problem_with_instruction(problem, prompt_format.instruction)
    solutions = [s for _, s in prompt_format.examples]
    if tokenizer.chat_template:
        messages = (
            [{"role": "system", "content": prompt_format.system}] if prompt_format.system else []
        )
        for question, solution in zip(questions, solutions):
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": solution}]
        messages.append({"role": "user", "content": content})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    blocks = [prompt_format.system] if prompt_format.system else []
    blocks += [f"{PLAIN_TEMPLATE.format(content=q)} {s}" for q, s in zip(questions, solutions)]
    blocks.append(PLAIN_TEMPLATE.format(content=content))
    return "\n\n".join(blocks)


def problem_with_instruction(problem: str, instruction: str) -> str:
    """The user's text: the problem, then the instruction on its own line (nothing added when it is
    empty)."""
    return f"{problem}\n{instruction}" if instruction else problem


def pad_token_id(tokenizer) -> int:
    """The pad id; falls back to EOS (safe: masks come from EOS positions, not from the pad id)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation-config EOS
    ids."""
    ids = {tokenizer.eos_token_id}
    configured = model.generation_config.eos_token_id
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def encode_prompts(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask, [N, P]. A chat template already holds its special tokens."""
    add_special = not tokenizer.chat_template
    encoded = [tokenizer(p, add_special_tokens=add_special)["input_ids"] for p in prompts]
    width = max(len(ids) for ids in encoded)
    pad = pad_token_id(tokenizer)
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)  # [N, P]
    mask = torch.tensor(
        [[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device
    )  # [N, P]
    return ids, mask


def completion_mask_from_eos(
    completion_ids: torch.Tensor, eos_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of the tokens up to and including the first EOS, and which rows never produced one.

    completion_ids [B, C] -> (completion_mask [B, C] float, truncated [B] bool).
    """
    is_eos = torch.isin(
        completion_ids, torch.tensor(eos_ids, device=completion_ids.device)
    )  # [B, C]
    truncated = ~is_eos.any(-1)  # [B]
    width = completion_ids.shape[1]
    first_eos = torch.where(truncated, width - 1, is_eos.int().argmax(-1))  # [B]
    positions = torch.arange(width, device=completion_ids.device)  # [C]
    return (positions[None, :] <= first_eos[:, None]).float(), truncated  # [B, C], [B]


def _token_logp_and_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """log p(target) and H(p) for logits [..., V], targets [...]; p = softmax(logits / T), fp32."""
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)  # [..., V]
    token_logp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [...]
    entropy = -(log_probs.exp() * log_probs).sum(-1)  # [...]
    return token_logp, entropy


def _head_logp_and_entropy(
    hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, temperature: float
):
    """_token_logp_and_entropy of head(hidden) for hidden [n, H], targets [n]."""
    return _token_logp_and_entropy(head(hidden), targets, temperature)


def activation_checkpointing(model) -> bool:
    """Whether any layer recomputes its activations in the backward pass (HF gradient
    checkpointing)."""
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


def _states_before_tokens(
    model, prompt_ids, prompt_mask, completion_ids, completion_mask
) -> torch.Tensor:
    """Last hidden states before each completion token, [B, C, H], from one forward over prompt +
    completion."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [B, P+C]
    attention_mask = torch.cat(
        [prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1
    )  # [B, P+C]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, P+C]
    hidden = model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).last_hidden_state  # [B, P+C, H]
    prompt_len, completion_len = prompt_ids.shape[1], completion_ids.shape[1]
    return hidden[:, prompt_len - 1 : prompt_len + completion_len - 1]  # [B, C, H]


def _states_before_tokens_shared_prompts(
    model, prompt_ids, prompt_mask, completion_ids, completion_mask
) -> torch.Tensor:
    """As _states_before_tokens, with each distinct prompt encoded once for all the rows that share
    it.

    The G completions of a group share their prompt: its keys/values are computed once, copied to
    each of its rows as the cache the completion attends to, and gradients flow back through the
    copies. Same result as one forward per row (up to float rounding), for ~1/G of the prompt's
    cost.
    """
    prompt_len = prompt_ids.shape[1]
    prompts, prompt_of_row = torch.unique(
        torch.cat([prompt_ids, prompt_mask], dim=1), dim=0, return_inverse=True
    )  # [U, 2P], [B]
    unique_ids, unique_mask = prompts[:, :prompt_len], prompts[:, prompt_len:]  # [U, P] each
    decoder = model.get_decoder()
    cache = DynamicCache(config=model.config)
    prompt_hidden = decoder(
        input_ids=unique_ids, attention_mask=unique_mask,
        position_ids=(unique_mask.cumsum(-1) - 1).clamp(min=0), cache=cache, use_cache=True,
    ).last_hidden_state  # [U, P, H]
    cache.reorder_cache(prompt_of_row)  # [B, ...] per layer
    attention_mask = torch.cat(
        [prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1
    )  # [B, P+C]
    positions = prompt_mask.sum(-1, keepdim=True) + torch.arange(
        completion_ids.shape[1], device=prompt_ids.device
    )  # [B, C]
    completion_hidden = decoder(
        input_ids=completion_ids, attention_mask=attention_mask, position_ids=positions,
        cache=cache, use_cache=True,
    ).last_hidden_state  # [B, C, H]
    return torch.cat(
        [prompt_hidden[prompt_of_row, -1:], completion_hidden[:, :-1]], dim=1
    )  # [B, C, H]


def reference_completion_logprobs(
    model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain definition of `completion_logprobs`: one full forward, the whole vocabulary at
    every position.

    log pi(y_t | x, y_<t) = log_softmax(z_t / T)[y_t] and H_t = -sum_v p_v log p_v, p =
    softmax(z_t / T), z_t the logits at the position before completion token y_t. Same arguments and
    outputs as `completion_logprobs` (logp, entropy [B, C], zero where completion_mask is 0; greedy
    scored at T = 1), which is the fast path, pinned to this one by a test.
    """
    temperature = temperature if temperature > 0 else 1.0  # greedy decoding is scored at T = 1
    attention_mask = torch.cat(
        [prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1
    )  # [B, P+C]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, P+C], padding shifts none
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [B, P+C]
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).logits  # [B, P+C, V]
    logits = logits[:, prompt_ids.shape[1] - 1 : -1]  # [B, C, V], the logits before each token
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)  # [B, C, V]
    logp = log_probs.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)  # [B, C]
    entropy = -(log_probs.exp() * log_probs).sum(-1)  # [B, C]
    real = completion_mask.bool()  # [B, C]
    return torch.where(real, logp, 0.0), torch.where(real, entropy, 0.0)


def completion_logprobs(
    model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float,
    chunk_size: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies of the completion under `model` at `temperature`.

    prompt_ids/prompt_mask [B, P], completion_ids/completion_mask [B, C] -> (logp [B, C], entropy
    [B, C]), both zero where completion_mask is 0. Differentiable when grad is enabled. The head and
    log-softmax see `chunk_size` real completion tokens at a time. Assumes the usual `logits =
    lm_head(last_hidden_state)` of Llama/Qwen/Mistral-style causal LMs. The plain definition:
    `reference_completion_logprobs`.
    """
    temperature = temperature if temperature > 0 else 1.0  # greedy decoding is scored at T = 1
    full_width = completion_ids.shape[1]
    # Columns that are padding in every row change nothing but cost compute: drop them, pad the
    # outputs back.
    first_prompt_column = int(prompt_mask.any(0).int().argmax())  # left padding shared by all rows
    width = max(int(completion_mask.sum(-1).max()), 1)  # the longest completion
    prompt_ids, prompt_mask = (
        prompt_ids[:, first_prompt_column:], prompt_mask[:, first_prompt_column:]
    )  # [B, P'] each
    completion_ids, completion_mask = (
        completion_ids[:, :width], completion_mask[:, :width]
    )  # [B, C'] each
    recomputing = activation_checkpointing(model) and torch.is_grad_enabled()  # no KV cache then
    states_before = _states_before_tokens if recomputing else _states_before_tokens_shared_prompts
    hidden = states_before(
        model, prompt_ids, prompt_mask, completion_ids, completion_mask
    )  # [B, C', H]
    real = completion_mask.bool()  # [B, C']
    states, targets = hidden[real], completion_ids[real]  # [N, H], [N]: the real tokens only
    head = model.get_output_embeddings()
    logps, entropies = [], []
    for start in range(0, max(len(targets), 1), chunk_size):  # one (empty) chunk when N = 0
        chunk = slice(start, start + chunk_size)
        if torch.is_grad_enabled():
            logp, entropy = checkpoint(
                _head_logp_and_entropy, states[chunk], head, targets[chunk], temperature,
                use_reentrant=False,
            )  # [n], [n]
        else:
            logp, entropy = _head_logp_and_entropy(states[chunk], head, targets[chunk], temperature)
        logps.append(logp)
        entropies.append(entropy)
    padding = (0, full_width - width)  # back to the caller's width, zeros in the dropped columns
    empty = torch.zeros(real.shape, device=hidden.device)  # [B, C']
    logp = torch.nn.functional.pad(empty.masked_scatter(real, torch.cat(logps)), padding)  # [B, C]
    entropy = torch.nn.functional.pad(
        empty.masked_scatter(real, torch.cat(entropies)), padding
    )  # [B, C]
    return logp, entropy


def micro_batches(
    lengths: torch.Tensor, group_size: int, prompt_width: int, max_rows: int, max_tokens: int,
    shared_prompts: bool = True,
) -> list[torch.Tensor]:
    """Row indices of each micro-batch, at most `max_rows` rows each. lengths: [B] completion
    lengths, rows i*G .. i*G+G-1 sharing prompt i.

    Without a token cap (max_tokens 0) rows go in order of completion length, so a micro-batch pads
    little. With one, the tokens a micro-batch's forward processes stay within max_tokens: each
    distinct prompt once (`shared_prompts`: completion_logprobs encodes a prompt once for all its
    rows; once per row otherwise) plus rows x the longest completion. Rows are then taken group by
    group (groups in order of their longest completion, a group's rows by length), so a prompt is
    split over as few micro-batches as the cap allows; a row over the cap alone gets a micro-batch
    of its own.
    """
    if max_tokens:
        # [N], the longest row of each group:
        group_longest = lengths.view(-1, group_size).max(-1).values.tolist()
        order = sorted(
            range(len(lengths)),
            key=lambda r: (group_longest[r // group_size], r // group_size, int(lengths[r])),
        )
    else:
        order = lengths.argsort(stable=True).tolist()

    def forward_tokens(rows: list[int]) -> int:
        prompts = len({row // group_size for row in rows}) if shared_prompts else len(rows)
        return prompts * prompt_width + len(rows) * max(int(lengths[row]) for row in rows)

    batches, current = [], []
    for row in order:
        if current and (
            len(current) == max_rows
            or (max_tokens and forward_tokens(current + [row]) > max_tokens)
        ):
            batches.append(torch.tensor(current))
            current = []
        current.append(row)
    return batches + [torch.tensor(current)]


def sample_next_token(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row from logits [b, V]: argmax when temperature is 0, else a draw from
    softmax(logits / T) restricted to the top-p nucleus (the fewest most likely tokens holding mass
    >= top_p)."""
    if temperature <= 0:
        return logits.argmax(-1)  # [b]
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [b, V]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # [b, V]
        # [b, V], the mass before the token already reaches p:
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = torch.zeros_like(probs).scatter(
            -1, order, sorted_probs.masked_fill(outside, 0.0)
        )  # [b, V]
    return torch.multinomial(probs, num_samples=1).squeeze(-1)  # [b]


class FilledStaticLayer(StaticLayer):
    """A pre-allocated KV-cache layer (transformers' StaticLayer) whose attention reads only the
    slots filled so far: the empty tail of the buffer would cost memory traffic at every decoding
    step."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)  # [b, h, L, d]
        filled = int(self.cumulative_length)
        return keys[:, :, :filled], values[:, :, :filled]


def full_attention_only(model) -> bool:
    """True when every layer attends to the whole prefix (no sliding window): the sampler's mask
    assumes it."""
    config = model.config.get_text_config(decoder=True)
    return all(
        kind == "full_attention"
        for kind in getattr(config, "layer_types", None) or ["full_attention"]
    )


@dataclass
class DecodingRows:
    """The sampler's rows still generating, b of its B = N*G, and what decoding them needs.

    Updated in place, one step at a time (`_decode_step`); `_drop_finished_rows` shrinks b.
    """

    cache: Cache  # keys/values per layer, [b, heads, L, d], L = P + max_new_tokens slots
    key_mask: torch.Tensor  # [b, L] bool, the slots it attends to: its prompt, then its tokens
    next_position: torch.Tensor  # [b] long, the rotary position of the row's next token
    rows: torch.Tensor  # [b] long, the row's index in the sampler's output [B, C]
    running: torch.Tensor  # [b] bool, no EOS yet


def _prefill_prompts(decoder, cache: Cache, prompt_ids, prompt_mask, max_new_tokens: int):
    """Encode each distinct prompt [N, P] once, writing its keys/values into `cache`.

    Returns (hidden [N, H], the last position's state; key_mask [N, P + max_new_tokens] bool, True
    at the real prompt tokens; next_position [N], the first new token's position). A left-padding
    query attends to itself alone: with no key at all, some attention kernels return NaN.
    """
    num_prompts, prompt_len = prompt_ids.shape
    device = prompt_ids.device
    new_slots = torch.zeros(num_prompts, max_new_tokens, dtype=torch.bool, device=device)
    key_mask = torch.cat([prompt_mask.bool(), new_slots], dim=1)  # [N, L]
    causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=device).tril()  # [P, P]
    diagonal = torch.eye(prompt_len, dtype=torch.bool, device=device)  # [P, P]
    prefill_mask = (causal & key_mask[:, None, :prompt_len]) | diagonal  # [N, P, P]
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # [N, P]
    hidden = decoder(
        input_ids=prompt_ids, attention_mask=prefill_mask[:, None], position_ids=positions,
        cache=cache, use_cache=True,
    ).last_hidden_state[:, -1]  # [N, H]
    return hidden, key_mask, positions[:, -1] + 1


def _start_decoding(model, prompt_ids, prompt_mask, group_size: int, max_new_tokens: int):
    """Prefill the prompts [N, P] into a pre-allocated cache, then copy every prompt's cache, state,
    mask and position to its G completions (row i*G + g is completion g of prompt i).

    Returns (hidden [B, H], the state the first token is drawn from; the B rows, all running).
    """
    num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    cache_len = prompt_ids.shape[1] + max_new_tokens
    cache = Cache(layers=[FilledStaticLayer(max_cache_len=cache_len) for _ in range(num_layers)])
    hidden, key_mask, next_position = _prefill_prompts(
        model.get_decoder(), cache, prompt_ids, prompt_mask, max_new_tokens
    )  # [N, H], [N, L], [N]
    copies = torch.arange(len(prompt_ids), device=prompt_ids.device).repeat_interleave(group_size)
    cache.reorder_cache(copies)  # [B, ...] per layer
    num_rows = len(copies)
    batch = DecodingRows(
        cache=cache, key_mask=key_mask[copies], next_position=next_position[copies],
        rows=torch.arange(num_rows, device=prompt_ids.device),
        running=torch.ones(num_rows, dtype=torch.bool, device=prompt_ids.device),
    )  # [B] rows
    return hidden[copies], batch


def _sample_step(head, hidden: torch.Tensor, temperature: float, top_p: float):
    """The next token of each row from its last hidden state [b, H], with its log-prob and entropy
    under the distribution it was drawn from, log-softmax(logits / T) (T = 1 for greedy), before
    top-p. Returns (token, logp, entropy), [b] each."""
    logits = head(hidden).float()  # [b, V]
    token = sample_next_token(logits, temperature, top_p)  # [b]
    token_logp, token_entropy = _token_logp_and_entropy(
        logits, token, temperature if temperature > 0 else 1.0
    )  # [b], [b]
    return token, token_logp, token_entropy


def _drop_finished_rows(batch: DecodingRows, token: torch.Tensor) -> torch.Tensor:
    """Remove the rows that produced an EOS from `batch` and its cache (in place); returns the kept
    rows' tokens, token [b] -> [b']. Each drop copies the cache, hence done in bulk."""
    keep = batch.running.nonzero().squeeze(-1)  # [b']
    batch.cache.reorder_cache(keep)
    batch.rows, batch.running = batch.rows[keep], batch.running[keep]  # [b'] each
    batch.key_mask, batch.next_position = batch.key_mask[keep], batch.next_position[keep]
    return token[keep]


def _decode_step(decoder, batch: DecodingRows, token: torch.Tensor, slot: int) -> torch.Tensor:
    """Feed each row its last token [b], written to cache slot `slot` (P + step); returns the hidden
    state it yields, [b, H]. The rows' mask and positions advance in place."""
    batch.key_mask[:, slot] = True
    hidden = decoder(
        input_ids=token[:, None], attention_mask=batch.key_mask[:, None, None, : slot + 1],
        position_ids=batch.next_position[:, None], cache=batch.cache, use_cache=True,
    ).last_hidden_state[:, -1]  # [b, H]
    batch.next_position += 1
    return hidden


@torch.no_grad()
def sample_completions(
    model, prompt_ids, prompt_mask, group_size: int, max_new_tokens: int, temperature: float,
    top_p: float, eos_ids: list[int], pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample `group_size` completions of each left-padded prompt [N, P].

    Returns (completion_ids, logp, entropy), each [N*G, C]: row i*G + g is completion g of prompt i,
    C <= max_new_tokens the step at which the last row stopped; after a row's first EOS its ids are
    `pad_id` and its logp and entropy 0. logp and entropy are those of the distribution each token
    was drawn from, log-softmax(logits / T) (T = 1 for greedy), before top-p. Positions are (prompt
    mask cumsum - 1), then one more per generated token, as in `completion_logprobs`. The plain
    definition: `reference_sample_completions`.
    """
    if not full_attention_only(model):
        raise ValueError(
            "sample_completions supports full-attention models only (no sliding-window layers)"
        )
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    prompt_len, device = prompt_ids.shape[1], prompt_ids.device
    hidden, batch = _start_decoding(model, prompt_ids, prompt_mask, group_size, max_new_tokens)
    shape = (len(batch.rows), max_new_tokens)  # [B, C]
    completion_ids = torch.full(shape, pad_id, dtype=torch.long, device=device)  # [B, C]
    logp, entropy = torch.zeros(shape, device=device), torch.zeros(shape, device=device)  # [B, C]
    eos = torch.tensor(eos_ids, device=device)
    for step in range(max_new_tokens):
        token, token_logp, token_entropy = _sample_step(head, hidden, temperature, top_p)  # [b]
        completion_ids[batch.rows, step] = token.masked_fill(~batch.running, pad_id)
        logp[batch.rows, step] = token_logp * batch.running
        entropy[batch.rows, step] = token_entropy * batch.running
        batch.running &= ~torch.isin(token, eos)
        if not batch.running.any() or step == max_new_tokens - 1:
            break
        if batch.running.sum() <= COMPACT_AT * len(batch.rows):
            token = _drop_finished_rows(batch, token)  # [b']
        hidden = _decode_step(decoder, batch, token, prompt_len + step)  # [b, H]
    return completion_ids[:, : step + 1], logp[:, : step + 1], entropy[:, : step + 1]


@torch.no_grad()
def reference_sample_completions(
    model, prompt_ids, prompt_mask, group_size: int, max_new_tokens: int, temperature: float,
    top_p: float, eos_ids: list[int], pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plain definition of `sample_completions`: Hugging Face's `model.generate` over the G
    copies of each prompt, scored from the raw logits it returns.

    logp_t = log_softmax(z_t / T)[y_t] and H_t = -sum_v p_v log p_v, p = softmax(z_t / T), T = 1 for
    greedy, zero after a row's first EOS. Same arguments and outputs as `sample_completions`, the
    fast path, pinned to this one by tests/test_sampler.py: greedy, token for token; sampling, for
    the same seed, as long as the fast path drops no finished row (from then on it draws random
    numbers for fewer rows than generate does). generate takes what its arguments leave unset from
    the model's generation_config: top-k is turned off here; a model whose config adds another
    processor (repetition penalty, min-p, ...) would be sampled differently by this one.
    """
    sampling = (dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
                if temperature > 0 else dict(do_sample=False))
    output = model.generate(
        input_ids=prompt_ids.repeat_interleave(group_size, dim=0),  # [B, P]
        attention_mask=prompt_mask.repeat_interleave(group_size, dim=0),  # [B, P]
        max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id,
        output_logits=True, return_dict_in_generate=True, **sampling,
    )
    completion_ids = output.sequences[:, prompt_ids.shape[1] :]  # [B, C]
    logits = torch.stack(output.logits, dim=1).float()  # [B, C, V], before any processor
    log_probs = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)
    logp = log_probs.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)  # [B, C]
    entropy = -(log_probs.exp() * log_probs).sum(-1)  # [B, C]
    real = completion_mask_from_eos(completion_ids, eos_ids)[0].bool()  # [B, C], to the first EOS
    return completion_ids, torch.where(real, logp, 0.0), torch.where(real, entropy, 0.0)


@torch.no_grad()
def check_context(model, prompt_tokens: int, max_new_tokens: int) -> None:
    """InputError when the longest prompt plus the completion would run past the model's positions:
    the sampler's cache is allocated for prompt + max_new_tokens (a huge --max-new-tokens would ask
    for terabytes)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and prompt_tokens + max_new_tokens > positions:
        raise InputError(f"--max-new-tokens: a prompt of {prompt_tokens} tokens plus "
                         f"{max_new_tokens} new tokens exceeds the model's {positions} positions; "
                         "lower --max-new-tokens or shorten the problems")


TEMPLATE_DEADLINE_S = 10.0  # a chat template rendering 16 prompts slower than this is refused


class TemplateTimeout(Exception):
    """The chat template ran past TEMPLATE_DEADLINE_S."""


def formatted_with_deadline(
    tokenizer, problems: list[str], prompt_format: PromptFormat
) -> list[str]:
    """format_prompt of each problem; InputError (naming --model, whose tokenizer holds the
    template) for a chat template that fails (a Jinja error, raise_exception) or runs past
    TEMPLATE_DEADLINE_S (a runaway loop). The deadline is a SIGALRM timer, so it holds on the main
    thread only (elsewhere the prompts are formatted without one)."""
    on_main_thread = threading.current_thread() is threading.main_thread()

    def give_up(signum, frame):
        raise TemplateTimeout

    previous = signal.signal(signal.SIGALRM, give_up) if on_main_thread else None
    try:
        if on_main_thread:
            signal.setitimer(signal.ITIMER_REAL, TEMPLATE_DEADLINE_S)
        return [format_prompt(tokenizer, problem, prompt_format) for problem in problems]
    except TemplateTimeout:
        raise InputError(f"--model: its chat template ran over {TEMPLATE_DEADLINE_S:g} s on "
                         f"{len(problems)} prompts; a template must not loop for long") from None
    except Exception as error:  # jinja2.TemplateError, or what its raise_exception raises
        message = str(error).splitlines()[0][:160] if str(error).strip() else ""
        raise InputError("--model: its chat template fails on a prompt: "
                         f"{type(error).__name__}: {message}") from None
    finally:
        if on_main_thread:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def longest_prompt_tokens(
    tokenizer, problems: list[str], prompt_format: PromptFormat, longest: int = 16
) -> int:
    """Tokens in the longest formatted prompt among the `longest` problems (by characters) of a data
    set."""
    candidates = sorted(problems, key=len, reverse=True)[:longest]
    prompts = formatted_with_deadline(tokenizer, candidates, prompt_format)
    return max(
        (len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]), default=0
    )


def check_prompts_fit(model, tokenizer, problems: list[str], prompt_format: PromptFormat,
                      max_new_tokens: int, longest: int = 16) -> None:
    """check_context for the `longest` problems (by characters) of a data set, before any sampling:
    cheap, and it catches a problem far too long for the model or a huge --max-new-tokens, and a
    chat template that fails or loops. (generate_rollouts checks every batch exactly.)"""
    check_context(
        model, longest_prompt_tokens(tokenizer, problems, prompt_format, longest), max_new_tokens
    )


def generate_rollouts(
    model,
    tokenizer,
    prompts: list[str],
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    score: bool = True,
) -> RolloutBatch:
    """Sample `group_size` completions for each prompt text in one batch; temperature 0 = greedy.

    With score=False (evaluation) the scoring pass is skipped and old_logp / entropy are None.
    """
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)  # [N, P]
    check_context(model, prompt_ids.shape[1], max_new_tokens)
    eos_ids = eos_token_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    completion_ids, sampled_logp, sampled_entropy = sample_completions(
        model, prompt_ids, prompt_mask, group_size, max_new_tokens, temperature, top_p, eos_ids,
        pad_token_id(tokenizer),
    )  # [B, C] each
    prompt_ids = prompt_ids.repeat_interleave(group_size, dim=0)  # [B, P]
    prompt_mask = prompt_mask.repeat_interleave(group_size, dim=0)  # [B, P]
    completion_mask, truncated = completion_mask_from_eos(completion_ids, eos_ids)  # [B, C], [B]
    old_logp, entropy = (sampled_logp, sampled_entropy) if score else (None, None)
    model.train(was_training)
    lengths = completion_mask.sum(-1).tolist()  # B completion lengths, EOS included
    texts = tokenizer.batch_decode(
        [ids[: int(n)] for ids, n in zip(completion_ids.tolist(), lengths)],
        skip_special_tokens=True,
    )
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        old_logp=old_logp,
        entropy=entropy,
        texts=texts,
        truncated=truncated,
        group_size=group_size,
    )
