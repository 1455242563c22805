"""--algo hicra_verl's amplified set (hicra.verl_recipe_mask), rule by rule on a hand-built batch,
and the effective dose (metrics.gradient_signal_share) against autograd's gradient at the logits."""

import pytest
import torch

from grpo import aggregate_loss, clipped_policy_loss
from hicra import hicra_advantages, verl_recipe_mask
from metrics import gradient_signal_share

ALPHA = 0.2
G = 4
# Group 0: rewards 1, 1, 0, 0 -> A = +.5, +.5, -.5, -.5; lengths 2, 6, 4, 4 (mean 4): row 0 is a
# short correct completion, row 1 a long correct one, rows 2-3 wrong. Group 1: no completion has
# A > 0 (advantages given as with --advantage none and negative rewards), so nothing in it may be
# touched, planning tokens or not.
ADVANTAGES = torch.tensor([0.5, 0.5, -0.5, -0.5, -1.0, -1.0, -1.0, -1.0])  # [B]
LENGTHS = [2, 6, 4, 4, 6, 6, 6, 6]
T = 6
COMPLETION = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in LENGTHS])  # [B, T]
PLANNING = torch.zeros(8, T, dtype=torch.bool)
PLANNING[0, 0] = PLANNING[1, 1] = PLANNING[2, 0] = PLANNING[4, 0] = PLANNING[5, 2] = True
# Entropy: the high-entropy tokens are the last real token of every row (value 5), everything else
# 0.1; 8 of the 42 real tokens -> top_q = 8/42 picks exactly them.
ENTROPY = torch.full((8, T), 0.1)
for row, n in enumerate(LENGTHS):
    ENTROPY[row, n - 1] = 5.0
ENTROPY[0, 5] = 9.0  # padding with a huge entropy is never chosen
TOP_Q = 8 / 42


@pytest.fixture
def mask() -> torch.Tensor:
    return verl_recipe_mask(ADVANTAGES, PLANNING, ENTROPY, COMPLETION, G, TOP_Q)


def test_a_group_without_a_positive_advantage_is_untouched(mask):
    # its planning and high-entropy tokens stay as GRPO's
    assert PLANNING[4:].any() and not mask[4:].any()


def test_a_short_correct_completion_gets_only_its_planning_tokens(mask):
    assert torch.equal(mask[0], PLANNING[0])  # its high-entropy token (position 1) is left alone


def test_a_long_correct_completion_gets_its_high_entropy_tokens_too(mask):
    expected = PLANNING[1].clone()
    expected[5] = True  # its last token, above the entropy threshold
    assert torch.equal(mask[1], expected)


def test_a_wrong_completion_gets_its_planning_tokens_blamed_less(mask):
    # no high-entropy tokens
    assert torch.equal(mask[2], PLANNING[2]) and torch.equal(mask[3], PLANNING[3])
    shaped = hicra_advantages(ADVANTAGES, mask, ALPHA)  # [B, T]
    # A * (1 + alpha * sign(A)), A < 0
    assert shaped[2, 0].item() == pytest.approx(-0.5 * (1 - ALPHA))
    assert shaped[1, 5].item() == pytest.approx(0.5 * (1 + ALPHA))
    assert shaped[2, 1].item() == -0.5  # outside the set: A_i


def test_padding_is_never_chosen(mask):
    assert not (mask & ~COMPLETION.bool()).any()


def test_the_quoted_chained_indexing_changes_nothing():
    """The quote's `advantages[is_current_group][mask] *= ...`: the first boolean index copies the
    rows, the in-place multiply changes the copy, and the advantages stay GRPO's. Building the mask
    first fixes it."""
    token_advantages = ADVANTAGES[:, None].expand(8, T).clone()  # [B, T]
    before = token_advantages.clone()
    is_current_group = torch.tensor([True] * G + [False] * G)  # [B]
    group_mask = PLANNING[:G]  # [G, T]
    token_advantages[is_current_group][group_mask] *= 1 + ALPHA  # as quoted
    assert torch.equal(token_advantages, before)
    # [B, T]: one index, so *= writes in place
    rows_and_tokens = is_current_group[:, None] & PLANNING
    token_advantages[rows_and_tokens] *= 1 + ALPHA
    assert not torch.equal(token_advantages, before)


@pytest.mark.parametrize("loss_agg",
                         ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_gradient_signal_share_is_the_share_of_the_logit_gradient(loss_agg):
    """The share computed from the sampler's log-probs equals the share of sum_t |dL/dz_t|_1 that
    autograd finds at the logits, for the ratio-1 clipped surrogate under every loss normaliser."""
    generator = torch.Generator().manual_seed(0)
    temperature = 0.7
    logits = (3 * torch.randn(8, T, 11, generator=generator)).requires_grad_()  # [B, T, V]
    log_probs = (logits / temperature).log_softmax(-1)  # [B, T, V]
    tokens = torch.multinomial(log_probs.exp().view(-1, 11).detach(), 1,
                               generator=generator).view(8, T)  # [B, T]
    logp = log_probs.gather(-1, tokens[..., None]).squeeze(-1)  # [B, T]
    shaped = hicra_advantages(ADVANTAGES, PLANNING, ALPHA)  # [B, T]
    per_token = clipped_policy_loss(logp, logp.detach(), shaped, 0.2, 0.28)  # [B, T], ratio 1
    aggregate_loss(per_token, COMPLETION, loss_agg, COMPLETION.sum(), 8, T).backward()
    gradient = logits.grad.abs().sum(-1)  # [B, T]: |dL/dz_t|_1
    expected = float(gradient[PLANNING].sum() / gradient[COMPLETION.bool()].sum())
    share = gradient_signal_share(shaped, logp.detach(), PLANNING, COMPLETION,
                                  loss_agg == "seq-mean-token-mean")
    assert share == pytest.approx(expected, rel=1e-5)
    # not the token share
    assert share != pytest.approx(float(PLANNING.sum() / COMPLETION.sum()), rel=1e-2)


def test_no_signal_gives_no_share():
    assert gradient_signal_share(torch.zeros(8, T), torch.full((8, T), -1.0), PLANNING, COMPLETION,
                                 False) is None
