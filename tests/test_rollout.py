"""rollout.py's machinery under the log-prob equation: nucleus sampling, and the two speed-ups of
completion_logprobs (the vocabulary head a chunk of real tokens at a time, a group's prompt encoded
once). test_hicra.py pins the fast path's values and gradients to the plain definition."""

import torch

import rollout as rollout_lib
from rollout import completion_logprobs, format_prompt, generate_rollouts, sample_next_token


def two_prompts(tokenizer) -> list[str]:
    return [format_prompt(tokenizer, "What is 2 + 2?"),
            format_prompt(tokenizer, "Add 12 and 30, then check.")]


def test_top_p_samples_only_the_nucleus_in_proportion():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)  # [b, V]
    torch.manual_seed(0)
    counts = torch.bincount(sample_next_token(logits, temperature=1.0, top_p=0.8), minlength=4)
    assert counts[2:].sum() == 0  # 0.5 + 0.3 already reach 0.8
    assert abs(counts[0] / counts[:2].sum() - 0.5 / 0.8) < 0.03
    full = torch.bincount(sample_next_token(logits, temperature=1.0, top_p=1.0), minlength=4)
    assert (full > 0).all()
    assert (sample_next_token(logits, temperature=0.0, top_p=0.8) == 0).all()


def test_vocabulary_head_sees_only_real_completion_tokens_a_chunk_at_a_time(tokenizer, model):
    torch.manual_seed(0)
    batch = generate_rollouts(model, tokenizer, two_prompts(tokenizer), group_size=3,
                              max_new_tokens=12, temperature=1.0)
    mask = batch.completion_mask.clone()
    mask[0, 4:], mask[2, 1:] = 0, 0  # rows that stopped early: their padding must not meet the head
    head_rows = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda _m, inputs, _o: head_rows.append(inputs[0].shape[:-1]))
    args = (model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, mask, 1.0)
    with torch.no_grad():
        chunked = completion_logprobs(*args, chunk_size=7)
        whole = completion_logprobs(*args, chunk_size=10_000)
    hook.remove()
    real = int(mask.sum())
    # [n, H] rows, never [B, C, H]
    assert [len(shape) for shape in head_rows] == [1] * len(head_rows)
    assert sum(shape[0] for shape in head_rows[:-1]) == real
    assert max(shape[0] for shape in head_rows[:-1]) == 7
    assert head_rows[-1][0] == real
    for a, b in zip(chunked, whole):
        assert torch.allclose(a, b, atol=1e-6) and (a[mask == 0] == 0).all()


def test_prompt_shared_by_a_group_is_encoded_once_with_the_same_logprobs_and_gradients(tokenizer,
                                                                                      model):
    torch.manual_seed(0)
    batch = generate_rollouts(model, tokenizer, two_prompts(tokenizer), group_size=3,
                              max_new_tokens=12, temperature=1.0)
    args = (model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    results = []
    for states in (rollout_lib._states_before_tokens,
                   rollout_lib._states_before_tokens_shared_prompts):
        model.zero_grad()
        hidden = states(*args)  # [B, C, H]
        (hidden * batch.completion_mask[..., None]).square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((hidden * batch.completion_mask[..., None], grads))
    (plain, plain_grads), (shared, shared_grads) = results
    assert torch.allclose(plain, shared, atol=1e-5)
    assert len(plain_grads) == len(shared_grads) > 0
    assert all((a - b).norm() <= 1e-4 * a.norm() + 1e-7 for a, b in zip(plain_grads, shared_grads))
