"""Rollouts: sample G completions per prompt and score them under the sampling policy.

Choices, and the quirks that bite:
- One batched `model.generate` call for all prompts x G completions, with the KV cache and left-padded
  prompts. Prompts use the tokenizer's chat template when it has one, a plain template otherwise.
- Sampling is plain temperature sampling with optional top-p; top-k, repetition penalty and any other
  processor a model's `generation_config` may carry are switched off, so the policy is what the flags say.
- The old log-probs are taken by *one* extra forward pass after generation, not from `generate`'s scores:
  the training forward then reproduces them exactly (ratio 1 at the first PPO epoch). They are
  log-softmax(logits / temperature), the temperature-scaled policy that was sampled; as in TRL and verl,
  the top-p truncation is not part of the log-prob.
- Positions are taken from the attention mask (cumsum - 1) as `generate` does, so left padding does not
  shift the rotary positions between sampling and training.
- The completion mask comes from the first EOS, never from the pad id: the EOS token carries loss, tokens
  after it do not, even when the pad id equals the EOS id.
- The vocabulary projection and fp32 log-softmax run over `chunk_size` positions at a time (recomputed in
  the backward pass), so no [B, T, V] fp32 tensor is ever materialised.
"""

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint
from transformers import GenerationConfig

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PLAIN_TEMPLATE = "Question: {content}\nAnswer:"


@dataclass
class RolloutBatch:
    """B = prompts x group_size completions; completion i*G .. i*G+G-1 share prompt i."""

    prompt_ids: torch.Tensor  # [B, P] long, left-padded
    prompt_mask: torch.Tensor  # [B, P] long, 1 = real prompt token
    completion_ids: torch.Tensor  # [B, C] long, right-padded with the pad id
    completion_mask: torch.Tensor  # [B, C] float, 1 = generated token (EOS included)
    old_logp: torch.Tensor  # [B, C] float, log pi_old(token) at the sampling temperature, 0 where masked
    entropy: torch.Tensor  # [B, C] float, H(pi_old(. | prefix)) at the sampling temperature, 0 where masked
    texts: list[str]  # decoded completions, special tokens skipped
    truncated: torch.Tensor  # [B] bool, stopped by max_new_tokens before any EOS
    group_size: int

    @property
    def lengths(self) -> torch.Tensor:
        """Completion lengths in tokens, EOS included: [B]."""
        return self.completion_mask.sum(-1)


@dataclass(frozen=True)
class PromptFormat:
    """How a problem becomes a prompt: the instruction after it, an optional system prompt, and few-shot
    examples, (problem, solution) pairs shown as earlier turns so the prompt can teach the answer format."""

    instruction: str = DEFAULT_INSTRUCTION
    system: str | None = None
    examples: tuple[tuple[str, str], ...] = ()


def format_prompt(tokenizer, problem: str, prompt_format: PromptFormat = PromptFormat()) -> str:
    """The prompt text for a problem: chat turns through the tokenizer's chat template, a plain template without one.

    Chat: [system], then per example a user turn (problem + instruction) and an assistant turn (solution),
    then the problem's user turn. Plain: [system line], one "Question: ...\nAnswer: solution" block per
    example, blank-line separated, then the problem's block ending in "Answer:".
    """
    questions = [problem_with_instruction(p, prompt_format.instruction) for p, _ in prompt_format.examples]
    content = problem_with_instruction(problem, prompt_format.instruction)
    solutions = [s for _, s in prompt_format.examples]
    if tokenizer.chat_template:
        messages = [{"role": "system", "content": prompt_format.system}] if prompt_format.system else []
        for question, solution in zip(questions, solutions):
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": solution}]
        messages.append({"role": "user", "content": content})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    blocks = [prompt_format.system] if prompt_format.system else []
    blocks += [f"{PLAIN_TEMPLATE.format(content=q)} {s}" for q, s in zip(questions, solutions)]
    blocks.append(PLAIN_TEMPLATE.format(content=content))
    return "\n\n".join(blocks)


def problem_with_instruction(problem: str, instruction: str) -> str:
    """The user's text: the problem, then the instruction on its own line (nothing added when it is empty)."""
    return f"{problem}\n{instruction}" if instruction else problem


def pad_token_id(tokenizer) -> int:
    """The pad id; falls back to EOS (safe: masks come from EOS positions, not from the pad id)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation-config EOS ids."""
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
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)  # [N, P]
    return ids, mask


def completion_mask_from_eos(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of the tokens up to and including the first EOS, and which rows never produced one.

    completion_ids [B, C] -> (completion_mask [B, C] float, truncated [B] bool).
    """
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))  # [B, C]
    truncated = ~is_eos.any(-1)  # [B]
    width = completion_ids.shape[1]
    first_eos = torch.where(truncated, width - 1, is_eos.int().argmax(-1))  # [B]
    positions = torch.arange(width, device=completion_ids.device)  # [C]
    return (positions[None, :] <= first_eos[:, None]).float(), truncated  # [B, C], [B]


def _token_logp_and_entropy(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, temperature: float):
    """log p(target) and H(p) for hidden [B, c, H], targets [B, c], p = softmax(head(hidden) / T) in fp32."""
    logits = head(hidden).float() / temperature  # [B, c, V]
    log_probs = torch.log_softmax(logits, dim=-1)  # [B, c, V]
    token_logp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, c]
    entropy = -(log_probs.exp() * log_probs).sum(-1)  # [B, c]
    return token_logp, entropy


def completion_logprobs(
    model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float, chunk_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies of the completion under `model` at `temperature`.

    prompt_ids/prompt_mask [B, P], completion_ids/completion_mask [B, C] -> (logp [B, C], entropy [B, C]),
    both zero where completion_mask is 0. Differentiable when grad is enabled. Assumes the usual
    `logits = lm_head(last_hidden_state)` of Llama/Qwen/Mistral-style causal LMs.
    """
    temperature = temperature if temperature > 0 else 1.0  # greedy decoding is scored at T = 1
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [B, P+C]
    attention_mask = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1)  # [B, P+C]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, P+C]
    hidden = model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).last_hidden_state  # [B, P+C, H]
    prompt_len, completion_len = prompt_ids.shape[1], completion_ids.shape[1]
    hidden = hidden[:, prompt_len - 1 : prompt_len + completion_len - 1]  # [B, C, H], state before each token
    head = model.get_output_embeddings()
    logps, entropies = [], []
    for start in range(0, completion_len, chunk_size):
        chunk = slice(start, start + chunk_size)
        if torch.is_grad_enabled():
            logp, entropy = checkpoint(
                _token_logp_and_entropy, hidden[:, chunk], head, completion_ids[:, chunk], temperature, use_reentrant=False
            )
        else:
            logp, entropy = _token_logp_and_entropy(hidden[:, chunk], head, completion_ids[:, chunk], temperature)
        logps.append(logp)
        entropies.append(entropy)
    mask = completion_mask.float()
    return torch.cat(logps, dim=1) * mask, torch.cat(entropies, dim=1) * mask  # [B, C], [B, C]


def sampling_config(tokenizer, eos_ids: list[int], max_new_tokens: int, temperature: float, top_p: float) -> GenerationConfig:
    """A generation config that is exactly the flags: temperature (0 = greedy) and top-p, nothing else."""
    common = dict(max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_token_id(tokenizer))
    common.update(repetition_penalty=1.0, no_repeat_ngram_size=0)
    if temperature <= 0:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, min_p=None, typical_p=1.0, **common)


@torch.no_grad()
def generate_rollouts(
    model,
    tokenizer,
    prompts: list[str],
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    chunk_size: int = 64,
) -> RolloutBatch:
    """Sample `group_size` completions for each prompt text in one batched call; temperature 0 = greedy."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)  # [N, P]
    prompt_ids = prompt_ids.repeat_interleave(group_size, dim=0)  # [B, P]
    prompt_mask = prompt_mask.repeat_interleave(group_size, dim=0)  # [B, P]
    eos_ids = eos_token_ids(model, tokenizer)
    config = sampling_config(tokenizer, eos_ids, max_new_tokens, temperature, top_p)
    was_training = model.training
    model.eval()
    sequences = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
    completion_ids = sequences[:, prompt_ids.shape[1] :]  # [B, C]
    completion_mask, truncated = completion_mask_from_eos(completion_ids, eos_ids)  # [B, C], [B]
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad_token_id(tokenizer))  # [B, C]
    old_logp, entropy = completion_logprobs(
        model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature, chunk_size
    )  # [B, C], [B, C]
    model.train(was_training)
    texts = [
        tokenizer.decode(ids[: int(n)], skip_special_tokens=True)
        for ids, n in zip(completion_ids.tolist(), completion_mask.sum(-1).tolist())
    ]
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
