"""HICRA: Hierarchy-Aware Credit Assignment (Sec. 3), and the paper's high-entropy ablation.

GRPO gives every token of a completion the same advantage A_i. HICRA amplifies it on planning
tokens:

    A^H_{i,t} = A_i + alpha * |A_i|    if t is a planning token of completion i (t in S_i)
    A^H_{i,t} = A_i                    otherwise

so the planning tokens of a better-than-average completion get (1 + alpha) x its credit and those of
a worse-than-average completion get (1 - alpha) x its blame; groups whose rewards are all equal
(A = 0) are untouched. The paper uses alpha = 0.2. A^H then replaces A inside the clipped surrogate
(grpo.py).

The "high-entropy advantage" ablation (later version of the paper) applies the same amplification to
the top-q fraction of tokens by entropy instead of the planning tokens; `matched_random_mask`
applies it to random spans matched in count and length to the planning tokens (a dose-matched
control); `verl_recipe_mask` is the set the authors' VeRL code reportedly amplified (second-hand,
see its docstring).
"""

import math
from fractions import Fraction

import torch

PAPER_ALPHA = 0.2


def validate_alpha(alpha: float) -> float:
    """alpha must lie in [0, 1]: above 1 the blame on planning tokens of a failed completion flips
    sign."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {alpha}")
    return alpha


def validate_top_q(top_q: float) -> float:
    """q, the share of tokens the high-entropy selections take, must lie in (0, 1]."""
    if not 0.0 < top_q <= 1.0:
        raise ValueError(f"--entropy-top-q must be in (0, 1], got {top_q}")
    return top_q


def hicra_advantages(advantages: torch.Tensor, planning_mask: torch.Tensor,
                     alpha: float = PAPER_ALPHA) -> torch.Tensor:
    """A^H_{i,t} = A_i + alpha * |A_i| on planning tokens (t in S_i), A_i elsewhere (Sec. 3).

    advantages [B] (one per completion), planning_mask [B, T] bool -> per-token advantages [B, T].
    """
    validate_alpha(alpha)
    per_token = advantages[:, None].expand(planning_mask.shape)  # [B, T]
    return per_token + alpha * per_token.abs() * planning_mask.float()  # [B, T]


def exact_ceiling(fraction: float, n: int) -> int:
    """ceil(fraction * n) with `fraction` read as the decimal it prints as (str(0.28) = "0.28", the
    value a user typed): float arithmetic gives ceil(0.28 * 25) = ceil(7.000000000000001) = 8, one
    too many."""
    return math.ceil(Fraction(str(fraction)) * n)


def high_entropy_mask(entropy: torch.Tensor, completion_mask: torch.Tensor,
                      top_q: float) -> torch.Tensor:
    """The ceil(q * N) highest-entropy ("fork") tokens among the batch's N completion tokens, as a
    bool mask.

    entropy, completion_mask [B, T] -> bool [B, T]; padding is never selected, ties are broken
    arbitrarily. Used by the high-entropy ablation (Sec. 5) and by the Fig. 10 overlap metric
    (q = 0.3). The count is exact_ceiling(q, N): 0.28 of 25 tokens is 7, not the 8 float arithmetic
    gives.
    """
    validate_top_q(top_q)
    valid = completion_mask.bool().flatten()  # [B*T]
    count = exact_ceiling(top_q, int(valid.sum()))
    scores = entropy.flatten().masked_fill(~valid, -math.inf)  # [B*T]
    top = torch.zeros_like(valid)
    top[scores.topk(count).indices] = True
    return top.view(entropy.shape)  # [B, T]


def matched_random_mask(planning_mask: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """A dose-matched control for HICRA: per completion, as many spans as it has runs of planning
    tokens, each as long as its run, placed uniformly at random among the completion's tokens
    (torch's RNG).

    planning_mask, completion_mask [B, T] -> bool [B, T]. It amplifies about as many tokens as the
    strategic grams do (spans that land on each other cover fewer), chosen without regard to what
    they say: if HICRA works through *which* tokens it amplifies, it beats this control at the same
    alpha.
    """
    mask = torch.zeros_like(planning_mask, dtype=torch.bool)  # [B, T]
    lengths = completion_mask.sum(-1).long().tolist()  # [B]
    for row, (planning, length) in enumerate(zip(planning_mask.bool().tolist(), lengths)):
        run = 0
        for t in range(length + 1):  # one past the end closes a run that reaches it
            if t < length and planning[t]:
                run += 1
                continue
            if run:
                start = int(torch.randint(0, length - run + 1, ()))
                mask[row, start:start + run] = True
                run = 0
    return mask


def verl_recipe_mask(advantages: torch.Tensor, planning_mask: torch.Tensor, entropy: torch.Tensor,
                     completion_mask: torch.Tensor, group_size: int, top_q: float) -> torch.Tensor:
    """The tokens the authors' VeRL branch reportedly amplifies (--algo hicra_verl), not the paper's
    S_i.

    Source, second-hand: no official code is public; huggingface/trl pull request #4997 (closed)
    quotes the HICRA advantage estimator of `verl/trainer/ppo/ray_trainer.py`. As quoted:
      1. a threshold: the entropy at the top-q fraction of the batch's completion tokens (k = 0.3);
      2. only groups with at least one completion whose advantage is > 0 are touched;
      3. in such a group, a completion with A_i > 0 that is longer than the group's mean length gets
         its tokens above the entropy threshold amplified;
      4. plus the planning tokens of every completion in such a group (so a wrong one's are x
         (1 - alpha));
      5. on that union A <- A * (1 + alpha * sign(A)), which is A + alpha * |A| (hicra_advantages).
    Rule 1 is high_entropy_mask (exactly ceil(q N) tokens, ties broken arbitrarily). The quote
    writes rule 5 as `advantages[is_current_group][mask] *= ...`: the first boolean index returns a
    copy, so as quoted the update changes nothing (tests/test_verl_recipe_and_dose.py shows it);
    here the mask is built first and applied once.

    advantages [B]; planning_mask, entropy, completion_mask [B, T]; B = prompts x group_size -> bool
    [B, T].
    """
    real = completion_mask.bool()  # [B, T]
    grouped_advantages = advantages.view(-1, group_size)  # [N, G]
    touched = ((grouped_advantages > 0).any(dim=1, keepdim=True)
               .expand_as(grouped_advantages).reshape(-1))  # [B]
    lengths = completion_mask.sum(-1).float().view(-1, group_size)  # [N, G]
    longer = (lengths > lengths.mean(dim=1, keepdim=True)).reshape(-1)  # [B]
    long_and_right = touched & (advantages > 0) & longer  # [B]
    high_entropy = high_entropy_mask(entropy, completion_mask, top_q)  # [B, T]
    return real & ((touched[:, None] & planning_mask.bool())
                   | (long_and_right[:, None] & high_entropy))  # [B, T]


def amplified_mask(algo: str, advantages: torch.Tensor, planning_mask: torch.Tensor,
                   entropy: torch.Tensor | None, completion_mask: torch.Tensor, group_size: int,
                   top_q: float) -> torch.Tensor | None:
    """The tokens whose advantage --algo amplifies (bool [B, T]), or None for algorithms that
    amplify none.

    planning_mask [B, T]: the strategic grams' tokens (the placebo grams' for algo placebo); entropy
    [B, T] for high_entropy and hicra_verl; advantages [B] and group_size for hicra_verl.
    """
    if algo in ("hicra", "placebo"):
        return planning_mask
    if algo == "high_entropy":
        return high_entropy_mask(entropy, completion_mask, top_q)
    if algo == "random_spans":
        return matched_random_mask(planning_mask, completion_mask)
    if algo == "hicra_verl":
        return verl_recipe_mask(advantages, planning_mask, entropy, completion_mask,
                                group_size, top_q)
    return None


def token_advantages(algo: str, advantages: torch.Tensor, planning_mask: torch.Tensor,
                     entropy: torch.Tensor | None, completion_mask: torch.Tensor, group_size: int,
                     top_q: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token advantages [B, T] for --algo from per-completion advantages [B], and the tokens
    amplified (amplified_mask; None: A_i on every token). HICRA and its controls differ only in
    which tokens get A + alpha * |A| (Sec. 3, hicra_advantages). Arguments as amplified_mask's."""
    amplified = amplified_mask(algo, advantages, planning_mask, entropy, completion_mask,
                               group_size, top_q)  # [B, T] bool or None (grpo, entropy_reg)
    if amplified is None:  # A_i on every token
        return advantages[:, None].expand(completion_mask.shape), None  # [B, T]
    return hicra_advantages(advantages, amplified, alpha), amplified  # [B, T]
