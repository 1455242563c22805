"""Tests of the core: advantages, HICRA, the clipped loss, rollout log-probs, masks, one update, train.py end to end."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import checkpoint
import rollout as rollout_lib
import train
from conftest import build_model, build_sentencepiece_tokenizer, build_tokenizer
from grams import (
    batch_planning_mask, find_gram_spans, gram_occurrences, incremental_char_spans, overlapping_tokens, planning_token_mask,
    semantic_entropy,
)
from grpo import aggregate_loss, clip_fractions, clipped_policy_loss, group_advantages, kl_k3
from hicra import high_entropy_mask, hicra_advantages, matched_random_mask, validate_alpha
from rollout import (
    completion_logprobs, completion_mask_from_eos, encode_prompts, format_prompt, generate_rollouts,
    reference_completion_logprobs, sample_next_token,
)

# ---------------------------------------------------------------- group advantages (Sec. 3)


def test_group_advantages_are_mean_centred_per_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    advantages = group_advantages(rewards, group_size=4)
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.25, 0.25, -0.75, 0.25])
    assert torch.allclose(advantages, expected)


def test_std_scaled_advantages_divide_by_group_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    std = torch.tensor([1.0, 0.0, 0.0, 0.0]).std()  # unbiased, as torch.std
    advantages = group_advantages(rewards, group_size=4, mode="std")
    assert torch.allclose(advantages, torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-6))


def test_all_equal_rewards_give_zero_advantage_in_every_mode():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    for mode in ("center", "std"):
        assert torch.equal(group_advantages(rewards, group_size=3, mode=mode), torch.zeros(6))
    assert torch.equal(group_advantages(rewards, group_size=3, mode="none"), rewards)


# ---------------------------------------------------------------- HICRA (Sec. 3)


def test_hicra_amplifies_credit_on_planning_tokens_of_successful_completions():
    advantages = torch.tensor([0.5])
    planning = torch.tensor([[True, False, True]])
    shaped = hicra_advantages(advantages, planning, alpha=0.2)
    assert torch.allclose(shaped, torch.tensor([[0.6, 0.5, 0.6]]))  # 1.2x on planning tokens


def test_hicra_dampens_blame_on_failed_planning_tokens():
    advantages = torch.tensor([-0.5])
    planning = torch.tensor([[True, False, True]])
    shaped = hicra_advantages(advantages, planning, alpha=0.2)
    assert torch.allclose(shaped, torch.tensor([[-0.4, -0.5, -0.4]]))  # 0.8x on planning tokens


def test_hicra_leaves_zero_advantage_and_execution_tokens_untouched():
    advantages = torch.tensor([0.0, 0.3])
    planning = torch.tensor([[True, True], [False, False]])
    assert torch.equal(hicra_advantages(advantages, planning, alpha=0.2), torch.tensor([[0.0, 0.0], [0.3, 0.3]]))


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_outside_unit_interval_is_rejected(alpha):
    with pytest.raises(ValueError, match="--alpha"):
        validate_alpha(alpha)


def test_high_entropy_mask_selects_top_fraction_of_valid_tokens_only():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 5.0], [0.3, 0.8, 0.2, 0.4]])
    valid = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # the 5.0 is padding
    mask = high_entropy_mask(entropy, valid, top_q=2 / 7)
    assert mask.tolist() == [[False, True, False, False], [False, True, False, False]]


@pytest.mark.parametrize(
    "top_q, n, count",
    [(0.28, 25, 7), (0.07, 100, 7), (0.14, 50, 7), (0.56, 25, 14), (0.3, 10, 3), (0.5, 3, 2), (1.0, 13, 13)],
)
def test_high_entropy_mask_selects_the_exact_ceiling_of_the_decimal_q_times_n(top_q, n, count):
    """0.28 * 25 is 7.000000000000001 in floating point; the mask must still select ceil(7) = 7 tokens."""
    entropy = torch.arange(n, dtype=torch.float).unsqueeze(0)  # [1, N]
    mask = high_entropy_mask(entropy, torch.ones(1, n), top_q)
    assert int(mask.sum()) == count


# ---------------------------------------------------------------- clipped surrogate and aggregation


def test_clipped_loss_gradient_at_ratio_one_is_minus_advantage():
    advantages = torch.tensor([[1.5, -0.5, 0.0]])
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    loss = clipped_policy_loss(logp, logp.detach(), advantages, eps_low=0.2, eps_high=0.28)
    loss.sum().backward()
    assert torch.allclose(logp.grad, -advantages)


def test_clipped_loss_has_zero_gradient_outside_the_clip_range():
    old_logp = torch.zeros(1, 2)
    # ratio 1.5 > 1 + eps_high with A > 0, ratio 0.5 < 1 - eps_low with A < 0: both clipped
    logp = torch.log(torch.tensor([[1.5, 0.5]])).requires_grad_(True)
    advantages = torch.tensor([[1.0, -1.0]])
    clipped_policy_loss(logp, old_logp, advantages, eps_low=0.2, eps_high=0.28).sum().backward()
    assert torch.equal(logp.grad, torch.zeros(1, 2))
    stats = clip_fractions(logp, old_logp, advantages, torch.ones(1, 2), 0.2, 0.28)
    assert (stats.low.item(), stats.high.item()) == (0.5, 0.5)


def test_clipped_loss_keeps_gradient_on_the_unclipped_side():
    # ratio 1.5 with A < 0: the min picks the unclipped term, gradient -A * ratio
    logp = torch.log(torch.tensor([[1.5]])).requires_grad_(True)
    clipped_policy_loss(logp, torch.zeros(1, 1), torch.tensor([[-1.0]]), 0.2, 0.28).sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[1.5]]))


def test_each_aggregation_uses_its_documented_normaliser():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    kwargs = dict(batch_tokens=4.0, batch_sequences=2, max_new_tokens=10)
    assert aggregate_loss(loss, mask, "token-mean", **kwargs).item() == pytest.approx(10 / 4)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean", **kwargs).item() == pytest.approx((2 + 4) / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm", **kwargs).item() == pytest.approx(10 / 20)


def test_micro_batch_losses_add_up_to_the_full_batch_loss():
    loss, mask = torch.rand(4, 5), (torch.rand(4, 5) > 0.3).float()
    kwargs = dict(batch_tokens=mask.sum(), batch_sequences=4, max_new_tokens=5)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        whole = aggregate_loss(loss, mask, mode, **kwargs)
        parts = aggregate_loss(loss[:2], mask[:2], mode, **kwargs) + aggregate_loss(loss[2:], mask[2:], mode, **kwargs)
        assert torch.allclose(whole, parts)


def test_masked_tokens_carry_no_loss():
    loss = torch.tensor([[1.0, 2.0, 1e6]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert aggregate_loss(loss, mask, "token-mean", 2.0, 1, 3).item() == pytest.approx(1.5)


def test_k3_kl_is_zero_at_equal_policies_and_positive_otherwise():
    logp = torch.tensor([[-1.0, -2.0]])
    assert torch.equal(kl_k3(logp, logp), torch.zeros(1, 2))
    assert (kl_k3(logp, logp + torch.tensor([[0.5, -0.5]])) > 0).all()


# ---------------------------------------------------------------- rollouts


def test_completion_mask_includes_first_eos_and_excludes_what_follows():
    eos, pad = 1, 1  # pad == eos must still leave the EOS carrying loss
    ids = torch.tensor([[5, 6, eos, pad, pad], [5, eos, 7, eos, pad], [5, 6, 7, 8, 9]])
    mask, truncated = completion_mask_from_eos(ids, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_top_p_samples_only_the_nucleus_in_proportion():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)  # [b, V]
    torch.manual_seed(0)
    counts = torch.bincount(sample_next_token(logits, temperature=1.0, top_p=0.8), minlength=4)
    assert counts[2:].sum() == 0  # 0.5 + 0.3 already reach 0.8
    assert abs(counts[0] / counts[:2].sum() - 0.5 / 0.8) < 0.03
    assert (torch.bincount(sample_next_token(logits, temperature=1.0, top_p=1.0), minlength=4) > 0).all()
    assert (sample_next_token(logits, temperature=0.0, top_p=0.8) == 0).all()


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_match_a_fresh_training_forward(tokenizer, architecture, temperature):
    model = build_model(tokenizer, architecture)
    prompts = [format_prompt(tokenizer, "What is 2 + 2?"), format_prompt(tokenizer, "Add 12 and 30, then check.")]
    torch.manual_seed(0)
    batch = generate_rollouts(model, tokenizer, prompts, group_size=3, max_new_tokens=12, temperature=temperature)
    assert batch.completion_ids.shape[0] == 6 and len(batch.texts) == 6
    model.train()
    logp, entropy = completion_logprobs(
        model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask, temperature, chunk_size=5
    )
    assert torch.allclose(torch.exp(logp - batch.old_logp), torch.ones_like(logp), atol=1e-5)
    assert torch.allclose(entropy, batch.entropy, atol=1e-5)
    assert (batch.old_logp[batch.completion_mask == 0] == 0).all()


def test_vocabulary_head_sees_only_real_completion_tokens_a_chunk_at_a_time(tokenizer, model):
    prompts = [format_prompt(tokenizer, "What is 2 + 2?"), format_prompt(tokenizer, "Add 12 and 30, then check.")]
    torch.manual_seed(0)
    batch = generate_rollouts(model, tokenizer, prompts, group_size=3, max_new_tokens=12, temperature=1.0)
    mask = batch.completion_mask.clone()
    mask[0, 4:], mask[2, 1:] = 0, 0  # rows that stopped early: their padding must not meet the head
    head_rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda _m, inputs, _o: head_rows.append(inputs[0].shape[:-1]))
    args = (model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, mask, 1.0)
    with torch.no_grad():
        chunked = completion_logprobs(*args, chunk_size=7)
        whole = completion_logprobs(*args, chunk_size=10_000)
    hook.remove()
    real = int(mask.sum())
    assert [len(shape) for shape in head_rows] == [1] * len(head_rows)  # [n, H] rows, never [B, C, H]
    assert sum(shape[0] for shape in head_rows[:-1]) == real and max(shape[0] for shape in head_rows[:-1]) == 7
    assert head_rows[-1][0] == real
    for a, b in zip(chunked, whole):
        assert torch.allclose(a, b, atol=1e-6) and (a[mask == 0] == 0).all()


def test_prompt_shared_by_a_group_is_encoded_once_with_the_same_logprobs_and_gradients(tokenizer, model):
    prompts = [format_prompt(tokenizer, "What is 2 + 2?"), format_prompt(tokenizer, "Add 12 and 30, then check.")]
    torch.manual_seed(0)
    batch = generate_rollouts(model, tokenizer, prompts, group_size=3, max_new_tokens=12, temperature=1.0)
    args = (model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    results = []
    for states in (rollout_lib._states_before_tokens, rollout_lib._states_before_tokens_shared_prompts):
        model.zero_grad()
        hidden = states(*args)  # [B, C, H]
        (hidden * batch.completion_mask[..., None]).square().sum().backward()
        results.append((hidden * batch.completion_mask[..., None], [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (plain, plain_grads), (shared, shared_grads) = results
    assert torch.allclose(plain, shared, atol=1e-5)
    assert len(plain_grads) == len(shared_grads) > 0
    assert all((a - b).norm() <= 1e-4 * a.norm() + 1e-7 for a, b in zip(plain_grads, shared_grads))


def ragged_batch(tokenizer, group_size=2):
    """A batch that sets every speed-up of completion_logprobs to work: prompts of three lengths, left-padded,
    plus one padding column in every row (trimmed); G rows share each prompt (one cached prompt per group);
    completions of 1 to 7 tokens right-padded to 9 (trimmed to 7)."""
    questions = ["What is 2 + 2?", "Add 12 and 30, then check the sum twice.", "Sum 3 and 4."]
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [format_prompt(tokenizer, q) for q in questions], "cpu")  # [N, P]
    prompt_ids = torch.nn.functional.pad(prompt_ids, (1, 0), value=tokenizer.pad_token_id)  # [N, P+1]
    prompt_mask = torch.nn.functional.pad(prompt_mask, (1, 0))  # [N, P+1]
    lengths = torch.tensor([5, 2, 7, 1, 3, 6])  # [B]
    completion_mask = (torch.arange(9)[None, :] < lengths[:, None]).float()  # [B, 9]
    sampled = torch.randint(4, len(tokenizer), completion_mask.shape, generator=torch.Generator().manual_seed(0))
    completion_ids = sampled.masked_fill(completion_mask == 0, tokenizer.pad_token_id)  # [B, 9]
    return (prompt_ids.repeat_interleave(group_size, 0), prompt_mask.repeat_interleave(group_size, 0),
            completion_ids, completion_mask)


@pytest.mark.parametrize("temperature", [0.7, 0.0])
def test_completion_logprobs_equal_the_plain_definition(tokenizer, model, temperature):
    args = ragged_batch(tokenizer)
    with torch.no_grad():
        fast = completion_logprobs(model, *args, temperature, chunk_size=3)
        plain = reference_completion_logprobs(model, *args, temperature)
    for a, b in zip(fast, plain):  # logp, entropy
        assert a.shape == b.shape == args[3].shape
        assert torch.allclose(a, b, rtol=0, atol=1e-5) and (a[args[3] == 0] == 0).all()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_completion_logprobs_gradients_equal_those_of_the_plain_definition(tokenizer, model, checkpointing):
    """The same loss backpropagated through the fast path (shared prompt cache, or one forward per row when
    layers recompute their activations) and through the plain definition gives the same parameter gradients."""
    if checkpointing:
        model.activation_checkpointing_enable()
        model.train()  # HF layers recompute only in training mode
    assert rollout_lib.activation_checkpointing(model) == checkpointing  # which branch the fast path takes
    args = ragged_batch(tokenizer)
    weights = torch.randn(2, *args[3].shape, generator=torch.Generator().manual_seed(1))  # [2, B, C]
    results = []
    for scores in (lambda: completion_logprobs(model, *args, 0.7, chunk_size=3),
                   lambda: reference_completion_logprobs(model, *args, 0.7)):
        model.zero_grad()
        logp, entropy = scores()  # [B, C] each
        ((logp * weights[0] + entropy * weights[1]) * args[3]).sum().backward()
        results.append((logp.detach(), entropy.detach(), [p.grad.clone() for p in model.parameters()]))
    (fast_logp, fast_entropy, fast_grads), (logp, entropy, grads) = results
    assert torch.allclose(fast_logp, logp, rtol=0, atol=1e-5) and torch.allclose(fast_entropy, entropy, rtol=0, atol=1e-5)
    assert all(g.abs().max() > 0 for g in grads)  # every parameter is reached
    assert all(torch.allclose(a, b, rtol=0, atol=1e-5 * b.abs().max()) for a, b in zip(fast_grads, grads))


def test_rollout_logprobs_are_those_generate_sampled_from(tokenizer, model):
    """The recorded log-probs equal log_softmax(generate's logits / T) at the sampled tokens."""
    prompts = [format_prompt(tokenizer, "Sum 3 and 4."), format_prompt(tokenizer, "A much longer question here?")]
    torch.manual_seed(1)
    batch = generate_rollouts(model, tokenizer, prompts, group_size=2, max_new_tokens=8, temperature=0.7)
    torch.manual_seed(1)
    output = model.generate(
        input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask, do_sample=True, temperature=0.7, top_k=0,
        top_p=1.0, max_new_tokens=8, output_logits=True, return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    logits = torch.stack(output.logits, dim=1).float() / 0.7  # [B, C, V]
    sampled = output.sequences[:, batch.prompt_ids.shape[1] :]  # [B, C]
    expected = torch.log_softmax(logits, -1).gather(-1, sampled.unsqueeze(-1)).squeeze(-1) * batch.completion_mask
    assert torch.equal(sampled * batch.completion_mask.long(), batch.completion_ids * batch.completion_mask.long())
    assert torch.allclose(expected, batch.old_logp, atol=1e-5)


def test_one_optimizer_step_raises_logprob_of_rewarded_completions(tokenizer, model):
    prompts = [format_prompt(tokenizer, "What is 2 + 2?")]
    torch.manual_seed(0)
    batch = generate_rollouts(model, tokenizer, prompts, group_size=4, max_new_tokens=10, temperature=1.0)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    advantages = group_advantages(rewards, group_size=4)[:, None].expand_as(batch.completion_mask)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    def token_logp():
        logp, _ = completion_logprobs(
            model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask, 1.0
        )
        return logp  # [B, C]

    before = token_logp().detach().sum(-1)  # [B]
    per_token = clipped_policy_loss(token_logp(), batch.old_logp, advantages, 0.2, 0.28)
    aggregate_loss(per_token, batch.completion_mask, "token-mean", batch.completion_mask.sum(), 4, 10).backward()
    optimizer.step()
    gain = token_logp().detach().sum(-1) - before  # [B]
    assert gain[rewards == 1].mean() > gain[rewards == 0].mean()
    assert (gain[rewards == 1] > 0).all() and (gain[rewards == 0] < 0).all()


# ---------------------------------------------------------------- strategic grams and the planning mask


def test_gram_spans_respect_word_boundaries_and_merge_overlaps():
    grams = ["so", "but wait", "wait", "let me check"]
    text = "Also, BUT WAIT: let me   check.\nSo 2 + 2 = 4."
    spans = find_gram_spans(text, grams)
    assert [text[s:e] for s, e in spans] == ["BUT WAIT", "let me   check", "So"]
    assert gram_occurrences(text, grams) == ["but wait", "let me check", "so"]


@pytest.mark.parametrize("text_apostrophe", ["'", "\u2019", "\u2018", "\u02bc"])
@pytest.mark.parametrize("gram_apostrophe", ["'", "\u2019"])
def test_gram_apostrophes_match_typographic_ones_in_both_directions(text_apostrophe, gram_apostrophe):
    """A model writes "let’s" (U+2019) as often as "let's"; both are the gram, and the span indexes the original text."""
    text = f"Hmm. Let{text_apostrophe}s try again"
    assert find_gram_spans(text, [f"let{gram_apostrophe}s try"]) == [(5, 14)]
    assert gram_occurrences(text, [f"let{gram_apostrophe}s try", "try"]) == ["let's try"]


def test_planning_mask_marks_a_gram_written_with_a_typographic_apostrophe(tokenizer):
    text = "we get 5. Let\u2019s try again."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    mask = planning_token_mask(tokenizer, ids, ["let's try"])
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]).strip() == "Let\u2019s try"


@pytest.mark.parametrize(
    "text", ["we get 5. Let me check: 5 + 0 = 5.", "we get 5.let me check, 5 + 0 = 5.", "we get 5. LET ME CHECK. 5 + 0 = 5."]
)
def test_planning_mask_on_bpe_tokens_marks_the_gram_and_not_its_neighbours(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    mask = planning_token_mask(tokenizer, ids, ["let me check"])
    tokens = tokenizer.convert_ids_to_tokens(ids)
    marked = "".join(t for t, m in zip(tokens, mask) if m).replace("Ġ", " ").strip().lower()
    assert marked == "let me check"
    first = mask.nonzero().min().item()
    last = mask.nonzero().max().item()
    assert not mask[first - 1] and not mask[last + 1]  # "." before and ":" / "," / "." after stay execution


def test_planning_mask_handles_a_non_canonical_tokenisation(tokenizer):
    """Sampled ids need not be the canonical encoding of their text; offsets then come from decoding."""
    pieces = ["we", " ", "l", "et", " me", " check", " now"]
    ids = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(p)[0]) for p in pieces]
    mask = planning_token_mask(tokenizer, ids, ["let me check"])
    assert mask.tolist() == [False, False, True, True, True, True, False]


def test_a_bare_leading_space_marker_is_execution_on_both_mask_paths():
    """SentencePiece prepends "▁" to the text; alone as a token it adds no character, so it is not part of "so"."""
    tokenizer = build_sentencepiece_tokenizer()
    text = "so wait, we stop."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[:3] == ["▁", "so", "▁wait"] and tokenizer.decode(ids) == text
    incremental = overlapping_tokens(incremental_char_spans(tokenizer, ids), find_gram_spans(text, ["so"]))
    assert planning_token_mask(tokenizer, ids, ["so"]).tolist() == incremental == [False, True] + [False] * (len(ids) - 2)


def prefix_decoding_spans(tokenizer, ids):
    """The definition the linear fallback must reproduce: token i spans [len(decode(ids[:i])), len(decode(ids[:i+1])))."""
    lengths = [len(tokenizer.decode(ids[:i], skip_special_tokens=False)) for i in range(len(ids) + 1)]
    return list(zip(lengths[:-1], lengths[1:]))


def test_incremental_char_spans_equal_prefix_decoding(tokenizer):
    words = ["we", " get", " 5", ".", " Let", " me", " check", ":", " 5", " +", " 0", " =", " 5", "."] * 30
    ids = [i for w in words for i in tokenizer(w, add_special_tokens=False)["input_ids"]]
    ids = [i for t in ids for i in (tokenizer.convert_tokens_to_ids(list(tokenizer.convert_ids_to_tokens(t))) if t % 3 == 0 else [t])]
    assert ids != tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"]  # really non-canonical
    assert incremental_char_spans(tokenizer, ids) == prefix_decoding_spans(tokenizer, ids)


def test_incremental_char_spans_give_a_split_character_to_the_token_that_completes_it(tokenizer):
    byte_tokens = tokenizer.convert_tokens_to_ids(["Ã", "©"])  # byte-level tokens of the two UTF-8 bytes of "é"
    ids = tokenizer("caf", add_special_tokens=False)["input_ids"] + byte_tokens + tokenizer(" ok", add_special_tokens=False)["input_ids"]
    text = tokenizer.decode(ids)
    spans = incremental_char_spans(tokenizer, ids)
    first_byte = len(ids) - len(byte_tokens) - len(tokenizer(" ok", add_special_tokens=False)["input_ids"])
    assert text.startswith("café ok") and spans[-1][1] == len(text)
    assert spans[first_byte][0] == spans[first_byte][1] == 3 and spans[first_byte + 1] == (3, 4)


def test_batch_planning_mask_ignores_padding(tokenizer):
    ids = tokenizer("so we stop", add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id
    completion_ids = torch.tensor([ids + [pad, pad]])
    completion_mask = torch.tensor([[1.0] * len(ids) + [0.0, 0.0]])
    mask = batch_planning_mask(tokenizer, completion_ids, completion_mask, ["so"])
    assert torch.equal(mask[0, : len(ids)], planning_token_mask(tokenizer, ids, ["so"]))
    assert mask[0, 0] and not mask[0, len(ids) - 2 :].any()  # "... stop" and the padding are execution


def test_semantic_entropy_of_known_counts():
    assert semantic_entropy([1, 1, 2]) == pytest.approx(-(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5)))
    assert semantic_entropy({"a": 3}) == 0.0 and math.copysign(1.0, semantic_entropy({"a": 3})) == 1.0  # not -0.0
    assert semantic_entropy([]) == 0.0


# ---------------------------------------------------------------- train.py end to end


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama and its tokenizer saved as an HF folder, plus a 4-problem JSONL file."""
    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer()
    build_model(tokenizer).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    rows = [{"problem": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(2, 2), (3, 4), (12, 30), (5, 6)]]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def tiny_args(folder, out, *extra):
    return [
        "--model", str(folder / "model"), "--data", str(folder / "train.jsonl"), "--eval-data", str(folder / "train.jsonl"),
        "--grams", "paper", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "6",
        "--micro-batch-size", "3", "--eval-every", "0", "--out", str(out), *extra,
    ]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_logs_every_step_and_saves_a_loadable_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(tiny_model_dir, out, "--steps", "2", "--algo", "entropy_reg", "--ppo-epochs", "2", "--beta", "0.1"))
    records = read_metrics(out)
    assert [r["step"] for r in records] == [0, 1]
    assert not any(k.startswith("eval/") for r in records for k in r)  # --eval-every 0
    for key in ("reward", "loss", "clip_low", "clip_high", "kl", "grad_norm", "planning_ratio", "entropy_all"):
        assert key in records[0], key
    trained = AutoModelForCausalLM.from_pretrained(out / "checkpoint").state_dict()
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir / "model").state_dict()
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)  # the entropy bonus moved the weights


def test_resume_continues_exactly_where_the_run_stopped(tiny_model_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(tiny_args(tiny_model_dir, straight, "--steps", "3", "--seed", "3"))
    train.main(tiny_args(tiny_model_dir, resumed, "--steps", "2", "--seed", "3"))
    train.main(["--resume", str(resumed), "--steps", "3"])
    assert read_metrics(straight)[2]["loss"] == read_metrics(resumed)[2]["loss"]
    assert [r["step"] for r in read_metrics(resumed)] == [0, 1, 2]
    weights = [AutoModelForCausalLM.from_pretrained(d / "checkpoint").state_dict() for d in (straight, resumed)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_each_start_of_a_run_records_where_it_ran(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(tiny_args(tiny_model_dir, out, "--steps", "1", "--threads", "1"))
    train.main(["--resume", str(out), "--steps", "2"])
    lines = [json.loads(line) for line in (out / "environment.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1] and all(line["threads"] == 1 for line in lines)
    assert lines[0]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert lines[0]["torch"] == torch.__version__ and lines[0]["cpu"]
    assert "ran on: " in capsys.readouterr().out


@pytest.mark.parametrize("algo", ["grpo", "hicra", "high_entropy"])
def test_every_algo_runs_a_step(tiny_model_dir, tmp_path, algo):
    train.main(tiny_args(tiny_model_dir, tmp_path / algo, "--steps", "1", "--algo", algo))
    assert len(read_metrics(tmp_path / algo)) == 1


def test_placebo_amplifies_the_placebo_grams_it_draws_from_the_solutions(tiny_model_dir, tmp_path, capsys):
    rows = [{"problem": f"What is {a} + {b}?", "answer": str(a + b),
             "solution": f"Let me check: {a} plus {b} gives {a + b}, so the answer is {a + b}."}
            for a, b in [(2, 2), (3, 4), (12, 30), (5, 6)]]
    data, grams = tmp_path / "solved.jsonl", tmp_path / "grams.txt"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    grams.write_text("let me check\nso the answer is\n")
    out = tmp_path / "placebo"
    train.main([*tiny_args(tiny_model_dir, out, "--steps", "1", "--algo", "placebo"), "--data", str(data),
                "--grams", str(grams)])
    placebo = (out / "placebo_grams.txt").read_text().split("\n")[:-1]
    assert sorted(len(g.split()) for g in placebo) == [3, 4]
    assert all(" plus " in f" {g} " or " gives " in f" {g} " for g in placebo)  # only non-strategic text
    assert "amplified_ratio" in read_metrics(out)[0]
    with pytest.raises(SystemExit):
        train.main(tiny_args(tiny_model_dir, tmp_path / "nosolution", "--steps", "1", "--algo", "placebo"))
    error = capsys.readouterr().err
    assert "--algo placebo: " in error and "has no 'solution' field" in error


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--alpha", "1.5"], "--alpha: must be in [0, 1]"),
        (["--group-size", "1"], "--group-size: must be >= 2"),
        (["--algo", "ppo"], "invalid choice: 'ppo'"),
        (["--model", "no/such/model_dir"], "--model: no/such/model_dir: no such folder"),
        (["--data", "missing.jsonl"], "missing.jsonl"),
        (["--grams", "nope.txt"], "--grams: 'nope.txt'"),
    ],
)
def test_bad_input_is_a_one_line_error(tiny_model_dir, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as stop:
        train.main(tiny_args(tiny_model_dir, tmp_path / "run", "--steps", "1", *flags))
    text = str(stop.value.code) if isinstance(stop.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert message in text and "\n" not in text.strip()


def test_malformed_data_line_names_file_and_line(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "oops"\n')
    with pytest.raises(SystemExit) as stop:
        train.main(tiny_args(tiny_model_dir, tmp_path / "run", "--steps", "1", "--data", str(bad)))
    assert stop.value.code == 2 and f"--data: {bad}:2" in capsys.readouterr().err


def test_lora_run_with_gradient_checkpointing_saves_and_resumes(tiny_model_dir, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    flags = ["--lora-rank", "4", "--gradient-checkpointing", "--algo", "entropy_reg", "--seed", "1"]
    train.main(tiny_args(tiny_model_dir, out, "--steps", "1", *flags))
    assert (out / "checkpoint" / "adapter_config.json").is_file()
    train.main(["--resume", str(out), "--steps", "2"])
    assert [r["step"] for r in read_metrics(out)] == [0, 1]


def test_prompt_order_visits_every_problem_once_per_epoch_and_is_a_function_of_seed_and_step():
    first_epoch = [i for step in range(4) for i in train.prompts_for_step(12, step, 3, seed=5)]
    assert sorted(first_epoch) == list(range(12))
    assert train.prompts_for_step(12, 6, 3, seed=5) == train.prompts_for_step(12, 6, 3, seed=5)
    assert train.prompts_for_step(12, 0, 12, seed=5) != train.prompts_for_step(12, 0, 12, seed=6)


def test_evaluations_are_logged_as_their_own_lines_and_survive_resume(tiny_model_dir, tmp_path):
    out = tmp_path / "evals"
    flags = ["--eval-every", "1", "--eval-limit", "2", "--save-every", "1"]
    train.main(tiny_args(tiny_model_dir, out, "--steps", "1", *flags))
    train.main(["--resume", str(out), "--steps", "2"])
    records = read_metrics(out)
    evals = [r["step"] for r in records if "eval/pass@1" in r]
    steps = [r["step"] for r in records if "reward" in r]
    assert evals == [0, 1, 2] and steps == [0, 1]  # held-out after 0, 1 and 2 updates
    assert sorted(p.name for p in out.glob("samples_step*.html")) == [f"samples_step0000{i}.html" for i in range(3)]
    checkpoint.truncate_metrics(out / "metrics.jsonl", last_step=0)
    assert [(r["step"], "reward" in r) for r in read_metrics(out)] == [(0, False), (0, True), (1, False)]


def test_micro_batches_cover_every_row_once_within_both_caps():
    lengths = torch.tensor([5, 1, 3, 9, 2, 7, 30, 4])  # two rows per prompt: groups (0, 1), (2, 3), ...
    for shared in (True, False):
        for max_rows, max_tokens in [(3, 0), (8, 40), (2, 25), (8, 60)]:
            batches = rollout_lib.micro_batches(lengths, 2, 10, max_rows, max_tokens, shared_prompts=shared)
            assert sorted(torch.cat(batches).tolist()) == list(range(len(lengths)))
            for rows in batches:
                prompts = len({r // 2 for r in rows.tolist()}) if shared else len(rows)
                assert len(rows) <= max_rows
                assert len(rows) == 1 or not max_tokens or prompts * 10 + len(rows) * lengths[rows].max() <= max_tokens
    assert rollout_lib.micro_batches(lengths, 2, 10, 8, 0)[0].tolist() == lengths.argsort(stable=True).tolist()


def smollm2_shaped_model():
    """SmolLM2-135M's shape (30 layers, 576 wide, MLP 1536, 49,152 tokens), built without memory on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    with torch.device("meta"):
        return LlamaForCausalLM(shape)


def test_automatic_micro_batch_token_cap_bounds_activations_by_the_weights_size(monkeypatch):
    import model_loading

    monkeypatch.setattr(model_loading, "available_memory_bytes", lambda: 24 * 2**30)
    smol = smollm2_shaped_model()
    per_token = model_loading.activation_bytes_per_token(smol)
    assert per_token == 30 * (8 * 576 + 4 * 1536) * 4  # 1.29 MB; 0.9-1.9 MiB measured (docs/speed.md)
    weights = sum(p.numel() * 4 for p in smol.parameters())
    cap, why = model_loading.choose_micro_batch_tokens(smol, micro_batch_size=32, max_new_tokens=64)
    assert cap * per_token <= weights < (cap + 1) * per_token and 400 < cap < 430, why
    tiny = AutoModelForCausalLM.from_pretrained(train.TrainConfig().model)  # the world's model: not capped
    assert model_loading.choose_micro_batch_tokens(tiny, 32, 128)[0] == 0
    monkeypatch.setattr(model_loading, "available_memory_bytes", lambda: 400 * 2**20)  # a quarter: 100 MiB
    assert model_loading.choose_micro_batch_tokens(smol, 32, 64)[0] == 100 * 2**20 // per_token


@pytest.mark.parametrize("flag, expected", [([], 0), (["--micro-batch-tokens", "0"], 0),
                                            (["--micro-batch-tokens", "768"], 768)])
def test_load_policy_resolves_an_unset_micro_batch_token_cap_once_and_keeps_a_given_one(flag, expected):
    import model_loading

    config = train.parse_args(flag)
    assert config.micro_batch_tokens == (expected if flag else None)
    model_loading.load_policy(config, checkpoint=None)
    assert config.micro_batch_tokens == expected  # the world's model needs no cap; a given cap is kept


def test_token_capped_micro_batches_keep_a_group_together_and_count_its_prompt_once():
    lengths = torch.tensor([4, 6, 5, 3, 20, 2, 6, 6])  # four prompts of width 50, two rows each
    batches = [rows.tolist() for rows in rollout_lib.micro_batches(lengths, 2, 50, 8, 120)]
    # groups in order of their longest row: (2, 3) 5, (0, 1) 6, (6, 7) 6, (4, 5) 20; adding row 1 would cost
    # 2 prompts x 50 + 4 rows x 6 = 124 > 120, while rows 1, 6, 7 cost 2 x 50 + 3 x 6 = 118
    assert batches == [[3, 2, 0], [1, 6, 7], [5, 4]]
    unshared = [rows.tolist() for rows in rollout_lib.micro_batches(lengths, 2, 50, 8, 120, shared_prompts=False)]
    assert unshared == [[3, 2], [0, 1], [6, 7], [5], [4]]  # every row pays its own prompt: 2 x (50 + 6) = 112




def test_matched_random_spans_have_the_planning_spans_count_and_lengths():
    planning = torch.tensor([[1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    completion = torch.tensor([[1.0] * 12, [1.0] * 9 + [0.0] * 3])
    torch.manual_seed(0)
    draws = [matched_random_mask(planning, completion) for _ in range(200)]
    for mask in draws:
        assert not (mask & ~completion.bool()).any()  # inside each completion
        assert mask[1].sum() == 3 and mask[1].int().diff().abs().sum() <= 2  # one span of 3 in row 1
        assert 2 <= mask[0].sum() <= 3  # spans of 2 and 1 in row 0 (fewer tokens when they land on each other)
    starts = {int(mask[1].int().argmax()) for mask in draws}
    assert starts == set(range(7))  # every start that fits, no preference for where the grams were
    torch.manual_seed(0)
    assert torch.equal(matched_random_mask(planning, completion), draws[0])  # seeded by torch's RNG


def test_alpha_zero_is_grpo_bit_for_bit(tmp_path):
    """A^HICRA = A + 0 * |A| = A (Eq. 8 at alpha 0): `--algo hicra --alpha 0` is the `--algo grpo` run, step for
    step and weight for weight; at alpha 0.2 the same run ends elsewhere (so the comparison can fail)."""
    common = ["--steps", "2", "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "96",
              "--eval-every", "0", "--threads", "1", "--seed", "3"]
    runs = {name: train.train(train.parse_args([*common, *flags, "--out", str(tmp_path / name)]))
            for name, flags in [("grpo", ["--algo", "grpo"]), ("alpha0", ["--algo", "hicra", "--alpha", "0"]),
                                ("alpha0.2", ["--algo", "hicra", "--alpha", "0.2"])]}

    def steps(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("_seconds") and not k.startswith("amplified_")}
                for line in lines]

    def weights(run_dir):
        return load_file(run_dir / "checkpoint" / "model.safetensors")

    assert steps(runs["alpha0"]) == steps(runs["grpo"])
    assert any(step["grad_norm"] > 0 for step in steps(runs["grpo"]))  # some group had a reward spread: an update
    grpo, alpha0, alpha02 = (weights(runs[name]) for name in ("grpo", "alpha0", "alpha0.2"))
    assert all(torch.equal(grpo[name], alpha0[name]) for name in grpo)
    assert not all(torch.equal(grpo[name], alpha02[name]) for name in grpo)
