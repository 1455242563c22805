"""The paper's equations, each pinned on a hand-computed example: read it beside the paper and the
table "The paper's equations, and where they are" of README.md. Each test name starts with test_eq_
and then names the quantity it checks:

- test_eq_group_advantage_*: Sec. 3, A_i = R(q, o_i) - (1/G) sum_j R(q, o_j)
  (grpo.group_advantages).
- test_eq_hicra_*: Sec. 3, A^H_{i,t} = A_i + alpha * |A_i| on planning tokens t in S_i, A_i
  elsewhere (hicra.hicra_advantages); at alpha = 0 a whole run is GRPO's, bit for bit.
- test_eq_high_entropy_mask_*, test_eq_random_spans_*: what the controls amplify instead: the
  ceil(q * N) highest-entropy tokens (Sec. 5's ablation, hicra.high_entropy_mask), and random
  spans of the planning spans' count and lengths (our dose-matched control,
  hicra.matched_random_mask).
- test_eq_clipped_surrogate_*: Sec. 3 / DAPO, -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)
  with r = pi / pi_old (grpo.clipped_policy_loss, grpo.clip_fractions).
- test_eq_loss_aggregation_*: token-mean, seq-mean-token-mean and Dr. GRPO's constant
  normaliser, always the whole batch's (grpo.aggregate_loss).
- test_eq_kl_k3_*: k3 = exp(d) - d - 1, d = log pi_ref - log pi (grpo.kl_k3).
- test_eq_completion_*, test_eq_importance_ratio_*, test_eq_token_logprob_*,
  test_eq_policy_gradient_*: the completion o_i (its tokens up to the first EOS), the token
  log-prob log pi(y_t | x, y_<t) = log_softmax(z_t / T)[y_t] (rollout.completion_logprobs, pinned
  to the plain rollout.reference_completion_logprobs), and one gradient step of the objective.
- test_eq_gram_*, test_eq_planning_mask_*: Sec. 2.1, strategic-gram occurrences in the text and
  the planning tokens S_i that overlap them (grams.find_gram_spans, grams.planning_token_mask).
- test_eq_semantic_entropy_*: Sec. 4, H = -sum_g p_g log p_g over gram occurrences
  (grams.semantic_entropy).

Every other test (train.py runs, checkpoints, bad input, sampling and batching machinery, model
loading) is under tests/, in a file named for what it tests.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import rollout as rollout_lib
import train
from conftest import build_model, build_sentencepiece_tokenizer
from grams import (
    batch_planning_mask, find_gram_spans, gram_occurrences, incremental_char_spans,
    overlapping_tokens, planning_token_mask, semantic_entropy,
)
from grpo import aggregate_loss, clip_fractions, clipped_policy_loss, group_advantages, kl_k3
from hicra import high_entropy_mask, hicra_advantages, matched_random_mask
from rollout import (
    completion_logprobs, completion_mask_from_eos, encode_prompts, format_prompt, generate_rollouts,
    reference_completion_logprobs,
)

# ---------------------------------------------------------------- group advantages (Sec. 3)


def test_eq_group_advantage_is_reward_minus_group_mean():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    advantages = group_advantages(rewards, group_size=4)
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.25, 0.25, -0.75, 0.25])
    assert torch.allclose(advantages, expected)


def test_eq_group_advantage_std_mode_divides_by_the_group_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    std = torch.tensor([1.0, 0.0, 0.0, 0.0]).std()  # unbiased, as torch.std
    advantages = group_advantages(rewards, group_size=4, mode="std")
    assert torch.allclose(advantages, torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-6))


def test_eq_group_advantage_of_equal_rewards_is_zero_and_without_baseline_is_the_reward():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    for mode in ("center", "std"):
        assert torch.equal(group_advantages(rewards, group_size=3, mode=mode), torch.zeros(6))
    assert torch.equal(group_advantages(rewards, group_size=3, mode="none"), rewards)


# ---------------------------------------------------------------- HICRA: A + alpha |A| (Sec. 3)


def test_eq_hicra_a_plus_alpha_abs_a_amplifies_credit_on_planning_tokens_of_successes():
    advantages = torch.tensor([0.5])
    planning = torch.tensor([[True, False, True]])
    shaped = hicra_advantages(advantages, planning, alpha=0.2)
    assert torch.allclose(shaped, torch.tensor([[0.6, 0.5, 0.6]]))  # 1.2x on planning tokens


def test_eq_hicra_a_plus_alpha_abs_a_dampens_blame_on_planning_tokens_of_failures():
    advantages = torch.tensor([-0.5])
    planning = torch.tensor([[True, False, True]])
    shaped = hicra_advantages(advantages, planning, alpha=0.2)
    assert torch.allclose(shaped, torch.tensor([[-0.4, -0.5, -0.4]]))  # 0.8x on planning tokens


def test_eq_hicra_a_plus_alpha_abs_a_leaves_zero_advantage_and_execution_tokens_untouched():
    advantages = torch.tensor([0.0, 0.3])
    planning = torch.tensor([[True, True], [False, False]])
    shaped = hicra_advantages(advantages, planning, alpha=0.2)
    assert torch.equal(shaped, torch.tensor([[0.0, 0.0], [0.3, 0.3]]))


def test_eq_hicra_at_alpha_zero_is_grpo_bit_for_bit(tmp_path):
    """A^HICRA = A + 0 * |A| = A (Eq. 8 at alpha 0): `--algo hicra --alpha 0` is the `--algo grpo`
    run, step for step and weight for weight; at alpha 0.2 the same run ends elsewhere (so the
    comparison can fail)."""
    common = ["--steps", "2", "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens",
              "96", "--eval-every", "0", "--threads", "1", "--seed", "3"]
    algos = [("grpo", ["--algo", "grpo"]), ("alpha0", ["--algo", "hicra", "--alpha", "0"]),
             ("alpha0.2", ["--algo", "hicra", "--alpha", "0.2"])]
    runs = {name: train.train(train.parse_args([*common, *flags, "--out", str(tmp_path / name)]))
            for name, flags in algos}

    def steps(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items()
                 if not k.endswith("_seconds") and not k.startswith("amplified_")}
                for line in lines]

    def weights(run_dir):
        return load_file(run_dir / "checkpoint" / "model.safetensors")

    assert steps(runs["alpha0"]) == steps(runs["grpo"])
    # some group had a reward spread: an update
    assert any(step["grad_norm"] > 0 for step in steps(runs["grpo"]))
    grpo, alpha0, alpha02 = (weights(runs[name]) for name in ("grpo", "alpha0", "alpha0.2"))
    assert all(torch.equal(grpo[name], alpha0[name]) for name in grpo)
    assert not all(torch.equal(grpo[name], alpha02[name]) for name in grpo)


# ---------------------------------------------------------------- what the controls amplify


def test_eq_high_entropy_mask_is_the_top_q_fraction_of_valid_tokens_only():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 5.0], [0.3, 0.8, 0.2, 0.4]])
    valid = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # the 5.0 is padding
    mask = high_entropy_mask(entropy, valid, top_q=2 / 7)
    assert mask.tolist() == [[False, True, False, False], [False, True, False, False]]


@pytest.mark.parametrize(
    "top_q, n, count",
    [(0.28, 25, 7), (0.07, 100, 7), (0.14, 50, 7), (0.56, 25, 14), (0.3, 10, 3), (0.5, 3, 2),
     (1.0, 13, 13)],
)
def test_eq_high_entropy_mask_selects_the_exact_ceiling_of_the_decimal_q_times_n(top_q, n, count):
    """0.28 * 25 is 7.000000000000001 in floating point; the mask must still select ceil(7) = 7
    tokens."""
    entropy = torch.arange(n, dtype=torch.float).unsqueeze(0)  # [1, N]
    mask = high_entropy_mask(entropy, torch.ones(1, n), top_q)
    assert int(mask.sum()) == count


def test_eq_random_spans_have_the_planning_spans_count_and_lengths():
    planning = torch.tensor([[1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
                             [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    completion = torch.tensor([[1.0] * 12, [1.0] * 9 + [0.0] * 3])
    torch.manual_seed(0)
    draws = [matched_random_mask(planning, completion) for _ in range(200)]
    for mask in draws:
        assert not (mask & ~completion.bool()).any()  # inside each completion
        # one span of 3 in row 1
        assert mask[1].sum() == 3 and mask[1].int().diff().abs().sum() <= 2
        # spans of 2 and 1 in row 0 (fewer tokens when they land on each other)
        assert 2 <= mask[0].sum() <= 3
    starts = {int(mask[1].int().argmax()) for mask in draws}
    assert starts == set(range(7))  # every start that fits, no preference for where the grams were
    torch.manual_seed(0)
    assert torch.equal(matched_random_mask(planning, completion), draws[0])  # seeded by torch's RNG


# -------------------------------------------------- clipped surrogate, clip-higher (Sec. 3, DAPO)


def test_eq_clipped_surrogate_gradient_at_ratio_one_is_minus_advantage():
    advantages = torch.tensor([[1.5, -0.5, 0.0]])
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    loss = clipped_policy_loss(logp, logp.detach(), advantages, eps_low=0.2, eps_high=0.28)
    loss.sum().backward()
    assert torch.allclose(logp.grad, -advantages)


def test_eq_clipped_surrogate_has_zero_gradient_outside_one_minus_eps_low_one_plus_eps_high():
    old_logp = torch.zeros(1, 2)
    # ratio 1.5 > 1 + eps_high with A > 0, ratio 0.5 < 1 - eps_low with A < 0: both clipped
    logp = torch.log(torch.tensor([[1.5, 0.5]])).requires_grad_(True)
    advantages = torch.tensor([[1.0, -1.0]])
    clipped_policy_loss(logp, old_logp, advantages, eps_low=0.2, eps_high=0.28).sum().backward()
    assert torch.equal(logp.grad, torch.zeros(1, 2))
    stats = clip_fractions(logp, old_logp, advantages, torch.ones(1, 2), 0.2, 0.28)
    assert (stats.low.item(), stats.high.item()) == (0.5, 0.5)


def test_eq_clipped_surrogate_min_keeps_the_gradient_on_the_unclipped_side():
    # ratio 1.5 with A < 0: the min picks the unclipped term, gradient -A * ratio
    logp = torch.log(torch.tensor([[1.5]])).requires_grad_(True)
    clipped_policy_loss(logp, torch.zeros(1, 1), torch.tensor([[-1.0]]), 0.2, 0.28).sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[1.5]]))


# ---------------------------------------------------------------- loss aggregation and KL k3


def test_eq_loss_aggregation_uses_each_modes_documented_normaliser():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    kwargs = dict(batch_tokens=4.0, batch_sequences=2, max_new_tokens=10)
    def aggregated(mode):
        return aggregate_loss(loss, mask, mode, **kwargs).item()

    assert aggregated("token-mean") == pytest.approx(10 / 4)
    assert aggregated("seq-mean-token-mean") == pytest.approx((2 + 4) / 2)
    assert aggregated("seq-mean-token-sum-norm") == pytest.approx(10 / 20)


def test_eq_loss_aggregation_of_micro_batches_adds_up_to_the_full_batch_loss():
    loss, mask = torch.rand(4, 5), (torch.rand(4, 5) > 0.3).float()
    kwargs = dict(batch_tokens=mask.sum(), batch_sequences=4, max_new_tokens=5)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        whole = aggregate_loss(loss, mask, mode, **kwargs)
        parts = (aggregate_loss(loss[:2], mask[:2], mode, **kwargs)
                 + aggregate_loss(loss[2:], mask[2:], mode, **kwargs))
        assert torch.allclose(whole, parts)


def test_eq_loss_aggregation_gives_masked_tokens_no_loss():
    loss = torch.tensor([[1.0, 2.0, 1e6]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert aggregate_loss(loss, mask, "token-mean", 2.0, 1, 3).item() == pytest.approx(1.5)


def test_eq_kl_k3_is_zero_at_equal_policies_and_positive_otherwise():
    logp = torch.tensor([[-1.0, -2.0]])
    assert torch.equal(kl_k3(logp, logp), torch.zeros(1, 2))
    assert (kl_k3(logp, logp + torch.tensor([[0.5, -0.5]])) > 0).all()


# ------------------------------------------------------- the completion and its token log-probs


def test_eq_completion_runs_to_the_first_eos_inclusive_and_excludes_what_follows():
    eos, pad = 1, 1  # pad == eos must still leave the EOS carrying loss
    ids = torch.tensor([[5, 6, eos, pad, pad], [5, eos, 7, eos, pad], [5, 6, 7, 8, 9]])
    mask, truncated = completion_mask_from_eos(ids, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_eq_importance_ratio_is_one_on_a_fresh_training_forward(tokenizer, architecture,
                                                                 temperature):
    model = build_model(tokenizer, architecture)
    prompts = [format_prompt(tokenizer, "What is 2 + 2?"),
               format_prompt(tokenizer, "Add 12 and 30, then check.")]
    torch.manual_seed(0)
    batch = generate_rollouts(model, tokenizer, prompts, group_size=3, max_new_tokens=12,
                              temperature=temperature)
    assert batch.completion_ids.shape[0] == 6 and len(batch.texts) == 6
    model.train()
    logp, entropy = completion_logprobs(
        model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask,
        temperature, chunk_size=5,
    )
    assert torch.allclose(torch.exp(logp - batch.old_logp), torch.ones_like(logp), atol=1e-5)
    assert torch.allclose(entropy, batch.entropy, atol=1e-5)
    assert (batch.old_logp[batch.completion_mask == 0] == 0).all()


def test_eq_token_logprob_is_log_softmax_of_the_logits_over_t_at_the_sampled_token(tokenizer,
                                                                                     model):
    """The recorded log-probs equal log_softmax(generate's logits / T) at the sampled tokens."""
    prompts = [format_prompt(tokenizer, "Sum 3 and 4."),
               format_prompt(tokenizer, "A much longer question here?")]
    torch.manual_seed(1)
    batch = generate_rollouts(model, tokenizer, prompts, group_size=2, max_new_tokens=8,
                              temperature=0.7)
    torch.manual_seed(1)
    output = model.generate(
        input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask, do_sample=True,
        temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=8, output_logits=True,
        return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
    )
    logits = torch.stack(output.logits, dim=1).float() / 0.7  # [B, C, V]
    sampled = output.sequences[:, batch.prompt_ids.shape[1] :]  # [B, C]
    expected = torch.log_softmax(logits, -1).gather(-1, sampled.unsqueeze(-1)).squeeze(-1)  # [B, C]
    expected = expected * batch.completion_mask
    completion = batch.completion_mask.long()
    assert torch.equal(sampled * completion, batch.completion_ids * completion)
    assert torch.allclose(expected, batch.old_logp, atol=1e-5)


def ragged_batch(tokenizer, group_size=2):
    """A batch that sets every speed-up of completion_logprobs to work: prompts of three
    lengths, left-padded, plus one padding column in every row (trimmed); G rows share each prompt
    (one cached prompt per group); completions of 1 to 7 tokens right-padded to 9 (trimmed to 7)."""
    questions = ["What is 2 + 2?", "Add 12 and 30, then check the sum twice.", "Sum 3 and 4."]
    prompts = [format_prompt(tokenizer, q) for q in questions]
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, "cpu")  # [N, P]
    pad = tokenizer.pad_token_id
    prompt_ids = torch.nn.functional.pad(prompt_ids, (1, 0), value=pad)  # [N, P+1]
    prompt_mask = torch.nn.functional.pad(prompt_mask, (1, 0))  # [N, P+1]
    lengths = torch.tensor([5, 2, 7, 1, 3, 6])  # [B]
    completion_mask = (torch.arange(9)[None, :] < lengths[:, None]).float()  # [B, 9]
    sampled = torch.randint(4, len(tokenizer), completion_mask.shape,
                            generator=torch.Generator().manual_seed(0))
    completion_ids = sampled.masked_fill(completion_mask == 0, pad)  # [B, 9]
    return (prompt_ids.repeat_interleave(group_size, 0),
            prompt_mask.repeat_interleave(group_size, 0), completion_ids, completion_mask)


@pytest.mark.parametrize("temperature", [0.7, 0.0])
def test_eq_token_logprob_fast_path_equals_the_plain_definition(tokenizer, model, temperature):
    args = ragged_batch(tokenizer)
    with torch.no_grad():
        fast = completion_logprobs(model, *args, temperature, chunk_size=3)
        plain = reference_completion_logprobs(model, *args, temperature)
    for a, b in zip(fast, plain):  # logp, entropy
        assert a.shape == b.shape == args[3].shape
        assert torch.allclose(a, b, rtol=0, atol=1e-5) and (a[args[3] == 0] == 0).all()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_eq_token_logprob_fast_path_gradients_equal_the_plain_definitions(tokenizer, model,
                                                                          checkpointing):
    """The same loss backpropagated through the fast path (shared prompt cache, or one forward per
    row when layers recompute their activations) and through the plain definition gives the same
    parameter gradients."""
    if checkpointing:
        model.activation_checkpointing_enable()
        model.train()  # HF layers recompute only in training mode
    # which branch the fast path takes
    assert rollout_lib.activation_checkpointing(model) == checkpointing
    args = ragged_batch(tokenizer)
    generator = torch.Generator().manual_seed(1)
    weights = torch.randn(2, *args[3].shape, generator=generator)  # [2, B, C]
    results = []
    for scores in (lambda: completion_logprobs(model, *args, 0.7, chunk_size=3),
                   lambda: reference_completion_logprobs(model, *args, 0.7)):
        model.zero_grad()
        logp, entropy = scores()  # [B, C] each
        ((logp * weights[0] + entropy * weights[1]) * args[3]).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((logp.detach(), entropy.detach(), grads))
    (fast_logp, fast_entropy, fast_grads), (logp, entropy, grads) = results
    assert torch.allclose(fast_logp, logp, rtol=0, atol=1e-5)
    assert torch.allclose(fast_entropy, entropy, rtol=0, atol=1e-5)
    assert all(g.abs().max() > 0 for g in grads)  # every parameter is reached
    assert all(torch.allclose(a, b, rtol=0, atol=1e-5 * b.abs().max())
               for a, b in zip(fast_grads, grads))


def test_eq_policy_gradient_step_raises_logprob_of_rewarded_completions(tokenizer, model):
    prompts = [format_prompt(tokenizer, "What is 2 + 2?")]
    torch.manual_seed(0)
    batch = generate_rollouts(model, tokenizer, prompts, group_size=4, max_new_tokens=10,
                              temperature=1.0)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    advantages = group_advantages(rewards, group_size=4)[:, None].expand_as(batch.completion_mask)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    def token_logp():
        logp, _ = completion_logprobs(
            model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
            batch.completion_mask, 1.0,
        )
        return logp  # [B, C]

    before = token_logp().detach().sum(-1)  # [B]
    per_token = clipped_policy_loss(token_logp(), batch.old_logp, advantages, 0.2, 0.28)
    tokens = batch.completion_mask.sum()
    aggregate_loss(per_token, batch.completion_mask, "token-mean", tokens, 4, 10).backward()
    optimizer.step()
    gain = token_logp().detach().sum(-1) - before  # [B]
    assert gain[rewards == 1].mean() > gain[rewards == 0].mean()
    assert (gain[rewards == 1] > 0).all() and (gain[rewards == 0] < 0).all()


# -------------------------------------------------- strategic grams and planning tokens (Sec. 2.1)


def test_eq_gram_occurrences_respect_word_boundaries_and_merge_overlaps():
    grams = ["so", "but wait", "wait", "let me check"]
    text = "Also, BUT WAIT: let me   check.\nSo 2 + 2 = 4."
    spans = find_gram_spans(text, grams)
    assert [text[s:e] for s, e in spans] == ["BUT WAIT", "let me   check", "So"]
    assert gram_occurrences(text, grams) == ["but wait", "let me check", "so"]


@pytest.mark.parametrize("text_apostrophe", ["'", "\u2019", "\u2018", "\u02bc"])
@pytest.mark.parametrize("gram_apostrophe", ["'", "\u2019"])
def test_eq_gram_apostrophes_match_typographic_ones_in_both_directions(text_apostrophe,
                                                                       gram_apostrophe):
    """A model writes "let’s" (U+2019) as often as "let's"; both are the gram, and the span indexes
    the original text."""
    text = f"Hmm. Let{text_apostrophe}s try again"
    assert find_gram_spans(text, [f"let{gram_apostrophe}s try"]) == [(5, 14)]
    assert gram_occurrences(text, [f"let{gram_apostrophe}s try", "try"]) == ["let's try"]


def test_eq_planning_mask_marks_a_gram_written_with_a_typographic_apostrophe(tokenizer):
    text = "we get 5. Let\u2019s try again."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    mask = planning_token_mask(tokenizer, ids, ["let's try"])
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]).strip() == "Let\u2019s try"


@pytest.mark.parametrize(
    "text",
    ["we get 5. Let me check: 5 + 0 = 5.", "we get 5.let me check, 5 + 0 = 5.",
     "we get 5. LET ME CHECK. 5 + 0 = 5."],
)
def test_eq_planning_mask_on_bpe_tokens_marks_the_gram_and_not_its_neighbours(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    mask = planning_token_mask(tokenizer, ids, ["let me check"])
    tokens = tokenizer.convert_ids_to_tokens(ids)
    marked = "".join(t for t, m in zip(tokens, mask) if m).replace("Ġ", " ").strip().lower()
    assert marked == "let me check"
    first = mask.nonzero().min().item()
    last = mask.nonzero().max().item()
    # "." before and ":" / "," / "." after stay execution
    assert not mask[first - 1] and not mask[last + 1]


def test_eq_planning_mask_holds_on_a_non_canonical_tokenisation(tokenizer):
    """Sampled ids need not be the canonical encoding of their text; offsets then come from
    decoding."""
    pieces = ["we", " ", "l", "et", " me", " check", " now"]
    ids = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(p)[0]) for p in pieces]
    mask = planning_token_mask(tokenizer, ids, ["let me check"])
    assert mask.tolist() == [False, False, True, True, True, True, False]


def test_eq_planning_mask_leaves_a_bare_leading_space_marker_execution_on_both_paths():
    """SentencePiece prepends "▁" to the text; alone as a token it adds no character, so it is not
    part of "so"."""
    tokenizer = build_sentencepiece_tokenizer()
    text = "so wait, we stop."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[:3] == ["▁", "so", "▁wait"]
    assert tokenizer.decode(ids) == text
    spans = incremental_char_spans(tokenizer, ids)
    incremental = overlapping_tokens(spans, find_gram_spans(text, ["so"]))
    expected = [False, True] + [False] * (len(ids) - 2)
    assert planning_token_mask(tokenizer, ids, ["so"]).tolist() == incremental == expected


def prefix_decoding_spans(tokenizer, ids):
    """The definition the linear fallback must reproduce: token i spans
    [len(decode(ids[:i])), len(decode(ids[:i+1])))."""
    lengths = [len(tokenizer.decode(ids[:i], skip_special_tokens=False))
               for i in range(len(ids) + 1)]
    return list(zip(lengths[:-1], lengths[1:]))


def test_eq_planning_mask_token_spans_equal_prefix_decoding(tokenizer):
    words = ["we", " get", " 5", ".", " Let", " me", " check", ":", " 5", " +", " 0", " =", " 5",
             "."] * 30
    ids = [i for w in words for i in tokenizer(w, add_special_tokens=False)["input_ids"]]
    ids = [i for t in ids
           for i in (tokenizer.convert_tokens_to_ids(list(tokenizer.convert_ids_to_tokens(t)))
                     if t % 3 == 0 else [t])]
    # really non-canonical
    assert ids != tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"]
    assert incremental_char_spans(tokenizer, ids) == prefix_decoding_spans(tokenizer, ids)


def test_eq_planning_mask_gives_a_split_character_to_the_token_that_completes_it(tokenizer):
    # byte-level tokens of the two UTF-8 bytes of "é"
    byte_tokens = tokenizer.convert_tokens_to_ids(["Ã", "©"])
    ok = tokenizer(" ok", add_special_tokens=False)["input_ids"]
    ids = tokenizer("caf", add_special_tokens=False)["input_ids"] + byte_tokens + ok
    text = tokenizer.decode(ids)
    spans = incremental_char_spans(tokenizer, ids)
    first_byte = len(ids) - len(byte_tokens) - len(ok)
    assert text.startswith("café ok") and spans[-1][1] == len(text)
    assert spans[first_byte][0] == spans[first_byte][1] == 3 and spans[first_byte + 1] == (3, 4)


def test_eq_planning_mask_of_a_batch_ignores_padding(tokenizer):
    ids = tokenizer("so we stop", add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id
    completion_ids = torch.tensor([ids + [pad, pad]])
    completion_mask = torch.tensor([[1.0] * len(ids) + [0.0, 0.0]])
    mask = batch_planning_mask(tokenizer, completion_ids, completion_mask, ["so"])
    assert torch.equal(mask[0, : len(ids)], planning_token_mask(tokenizer, ids, ["so"]))
    # "... stop" and the padding are execution
    assert mask[0, 0] and not mask[0, len(ids) - 2 :].any()


# ---------------------------------------------------------------- semantic entropy (Sec. 4)


def test_eq_semantic_entropy_is_minus_sum_p_log_p_of_known_counts():
    expected = -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))
    assert semantic_entropy([1, 1, 2]) == pytest.approx(expected)
    assert semantic_entropy({"a": 3}) == 0.0
    assert math.copysign(1.0, semantic_entropy({"a": 3})) == 1.0  # not -0.0
    assert semantic_entropy([]) == 0.0
