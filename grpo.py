"""GRPO: group-relative advantages and the clipped policy loss.

Deliberate choices, and where they come from:
- Advantages are mean-centred within each group, A_i = R_i - mean_j R_j, with no division by the
  standard deviation: that is the form the HICRA paper writes (Sec. 3). The std-scaled form of the
  original GRPO and no baseline at all are options.
- The surrogate is PPO's clipped ratio with separate lower and upper clip ranges, eps_low = 0.2 and
  eps_high = 0.28 ("clip-higher", DAPO), the baseline the paper trains against. The clip acts on the
  ratio, never on the advantage.
- Loss aggregation defaults to the token mean over the whole batch (DAPO); the sequence mean of
  token means (original GRPO) and the constant normaliser B * max_new_tokens (Dr. GRPO) are options.
  The normaliser is always the whole rollout batch's, so summing micro-batch gradients gives the
  full-batch gradient exactly.
- No KL term by default (beta = 0, DAPO; the paper reports none), and then no reference model is
  loaded. When beta > 0 the penalty is the k3 estimator of KL(pi || pi_ref).
- An optional entropy bonus on all tokens is the paper's "entropy regularisation" baseline (Sec. 5).
"""

from dataclasses import dataclass

import torch

ADVANTAGE_MODES = ("center", "std", "none")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
STD_EPS = 1e-6  # keeps the std-scaled advantage finite for groups whose rewards are all equal


def group_advantages(rewards: torch.Tensor, group_size: int, mode: str = "center") -> torch.Tensor:
    """Group-relative advantage of each completion (Sec. 3): A_i = R(q, o_i) - (1/G) sum_j
    R(q, o_j).

    mode "center": the paper's form above; "std": divided by the group's std + eps (original GRPO);
    "none": A_i = R_i (plain REINFORCE, no baseline). rewards [B] with B = prompts x G -> advantages
    [B].
    """
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"advantage mode must be one of {ADVANTAGE_MODES}, got {mode!r}")
    if mode == "none":
        return rewards.clone()
    grouped = rewards.view(-1, group_size)  # [N, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # [N, G]
    if mode == "std":
        centred = centred / (grouped.std(dim=1, keepdim=True) + STD_EPS)  # [N, G]
    return centred.reshape(-1)  # [B]


@dataclass
class ClipStats:
    """Fractions of loss-carrying tokens whose ratio was clipped below 1 - eps_low / above 1 +
    eps_high."""

    low: torch.Tensor  # scalar
    high: torch.Tensor  # scalar


def clipped_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float,
    eps_high: float
) -> torch.Tensor:
    """Per-token clipped surrogate (PPO with clip-higher, DAPO), to be minimised:

        r_t = exp(logp_t - old_logp_t)
        loss_t = -min(r_t * A_t, clip(r_t, 1 - eps_low, 1 + eps_high) * A_t)

    logp, old_logp, advantages: [B, T] (advantages already per token, e.g. HICRA's) -> loss [B, T].
    At r = 1 d loss_t / d logp_t = -A_t; on the clipped side the gradient is 0.
    """
    ratio = torch.exp(logp - old_logp)  # [B, T]
    unclipped = ratio * advantages  # [B, T]
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages  # [B, T]
    return -torch.minimum(unclipped, clipped)  # [B, T]


def clip_fractions(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    eps_low: float, eps_high: float
) -> ClipStats:
    """How often the clip was active: ratio < 1 - eps_low with A < 0, ratio > 1 + eps_high with A >
    0."""
    ratio = torch.exp(logp - old_logp).detach()  # [B, T]
    low = ((ratio < 1 - eps_low) & (advantages < 0)).float()  # [B, T]
    high = ((ratio > 1 + eps_high) & (advantages > 0)).float()  # [B, T]
    tokens = mask.sum().clamp(min=1)
    return ClipStats(low=(low * mask).sum() / tokens, high=(high * mask).sum() / tokens)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref) per token (Schulman, 2020): exp(d) - d - 1 with d =
    ref_logp - logp.

    Unbiased for samples from pi and always >= 0. [B, T] -> [B, T].
    """
    delta = ref_logp - logp  # [B, T]
    return torch.exp(delta) - delta - 1


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    batch_tokens: float,
    batch_sequences: int,
    max_new_tokens: int,
) -> torch.Tensor:
    """Reduce a per-token loss [b, T] of one micro-batch to the scalar share of the full-batch loss.

    The normalisers are those of the whole rollout batch (batch_tokens loss-carrying tokens,
    batch_sequences completions), so micro-batch losses add up to:
      token-mean               sum_{i,t} l_it / sum_{i,t} m_it                            (DAPO)
      seq-mean-token-mean      (1/B) sum_i [ sum_t l_it / sum_t m_it ]                    (GRPO)
      seq-mean-token-sum-norm  sum_{i,t} l_it / (B * max_new_tokens)                      (Dr. GRPO)
    """
    masked = per_token_loss * mask  # [b, T]
    if mode == "token-mean":
        return masked.sum() / batch_tokens
    if mode == "seq-mean-token-mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / batch_sequences
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / (batch_sequences * max_new_tokens)
    raise ValueError(f"loss aggregation must be one of {AGGREGATIONS}, got {mode!r}")
