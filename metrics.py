"""Training-dynamics metrics of the paper (Sec. 4), computed from one rollout batch.

train.py calls `step_metrics` at every step, which computes `rollout_metrics` and passes them
through one `RelativeToFirst` for the whole run. Choices the paper leaves open, made here:

- planning tokens are the completion tokens inside a strategic-gram occurrence (`planning_mask`);
  execution tokens are all other completion tokens (EOS included);
- perplexity uses the sampling-time log-probs (`old_logp`, at the sampling temperature), so it costs
  no extra forward pass;
- "relative to step 0" is a ratio for perplexity (as the paper defines it) and a *difference* for
  semantic entropy ("entropy change"): a difference stays defined when step 0 has no gram at all;
- a metric over an empty set (no planning tokens, no failures, ...) is *omitted* from the dict,
  never NaN; consumers use `.get`.
"""

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from cli import InputError
from data import read_json, read_text_lines
from grams import batch_gram_counts, find_gram_spans, semantic_entropy
from hicra import high_entropy_mask

CONTINUATION_WORDS = 3  # length k of the procedural n-gram that follows a strategic gram


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float | None:
    """Mean of `values` where `mask` is true; None when the mask is empty. values, mask: [B, C]."""
    count = int(mask.sum())
    return float(values[mask].sum()) / count if count else None


def perplexity(logp: torch.Tensor, mask: torch.Tensor) -> float | None:
    """Perplexity of a token set (Sec. 4): exp(mean NLL) = exp(-mean log pi(o_t)). logp, mask:
    [B, C]."""
    mean_logp = masked_mean(logp, mask)
    return None if mean_logp is None else math.exp(-mean_logp)


def conditional_entropy(texts: Sequence[str], grams: Sequence[str],
                        k: int = CONTINUATION_WORDS) -> float | None:
    """Conditional entropy of the procedural n-gram that follows a strategic gram (Sec. 4), in nats.

    For every strategic-gram occurrence g in the texts (overlapping occurrences merged into one
    span, the span's lower-cased words being g), Y is the tuple of the next k whitespace-separated
    words after it (fewer at the end of a text; none -> the occurrence is skipped). Then

        H(Y | G) = sum_g p(g) * H(Y | G = g),   p(g) = n_g / N,
        H(Y | G = g) = -sum_y p(y | g) log p(y | g),   p(y | g) = n_{g,y} / n_g,

    the plug-in estimate over the batch (a gram seen once contributes 0). None when no gram occurs.
    """
    continuations: dict[str, Counter] = defaultdict(Counter)
    for text in texts:
        for start, end in find_gram_spans(text, grams):
            following = tuple(text[end:].lower().split()[:k])
            if following:
                continuations[" ".join(text[start:end].lower().split())][following] += 1
    total = sum(sum(c.values()) for c in continuations.values())
    if not total:
        return None
    return sum(sum(c.values()) / total * semantic_entropy(c) for c in continuations.values())


def planning_entropy_overlap(planning: torch.Tensor, top: torch.Tensor) -> dict[str, float]:
    """Planning vs high-entropy ("fork") tokens (Sec. 4, Fig. 10). planning, top: bool [B, C].

    planning_in_top_entropy = |P & H| / |P|: share of planning tokens that are high-entropy;
    top_entropy_is_planning = |P & H| / |H|: share of high-entropy tokens that are planning tokens.
    """
    both = int((planning & top).sum())
    out = {}
    if planning.any():
        out["planning_in_top_entropy"] = both / int(planning.sum())
    if top.any():
        out["top_entropy_is_planning"] = both / int(top.sum())
    return out


def gradient_signal_share(token_advantages: torch.Tensor, old_logp: torch.Tensor,
                          selected: torch.Tensor, completion_mask: torch.Tensor,
                          per_sequence: bool) -> float | None:
    """Effective dose: the share of the policy-gradient signal that lands on the `selected` tokens.

    At the first update pass the ratio is 1 and the clipped surrogate's gradient at token t's logits
    is

        dL/dz_t = -(w_t / T) * A_t * (e_{y_t} - p_t),
        so   |dL/dz_t|_1 = (2 w_t / T) * |A_t| * (1 - p(y_t)),

    with p_t = pi_old(. | prefix), y_t the sampled token, A_t the shaped (per-token) advantage and
    w_t the loss normaliser's weight: 1 for token-mean and Dr. GRPO (batch constants), 1/|o_i| for
    the sequence mean (`per_sequence`). The share is sum_{t in S} |A_t| w_t (1 - p(y_t)) / sum_t
    |A_t| w_t (1 - p(y_t)). Why this measure and not the share of tokens: a token the policy already
    predicts with p ~ 1 gets almost no gradient, so amplifying it moves nothing. Why the L1 norm: it
    is exact from the sampler's own log-prob of the sampled token (no extra forward); the L2 norm
    |e_y - p| lies between (1 - p) and sqrt(2) (1 - p) (analysis/gradient_share.py measures it). The
    entropy bonus and KL term are left out: this is the policy-gradient signal only.
    token_advantages, old_logp, selected, completion_mask: [B, C]. None when no token carries signal
    (every group's rewards equal).
    """
    weights = completion_mask.float()  # [B, C]
    if per_sequence:
        weights = weights / completion_mask.sum(-1, keepdim=True).clamp(min=1)  # [B, C]
    # [B, C]: |A_t| w_t (1 - p(y_t))
    signal = token_advantages.abs() * weights * -torch.expm1(old_logp.float())
    total = float(signal.sum())
    return float(signal[selected.bool()].sum()) / total if total > 0 else None


def group_pass_at_k(correct: torch.Tensor, group_size: int) -> float:
    """Training pass@k with k = group size: fraction of groups with at least one correct completion.
    correct: [B]."""
    return float(correct.view(-1, group_size).any(dim=1).float().mean())


def zero_variance_fraction(correct: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose completions are all correct or all wrong: zero reward variance under
    a binary reward, hence zero advantage and no gradient (Sec. 3). correct: [B]."""
    groups = correct.view(-1, group_size)  # [B/G, G]
    return float((groups.all(dim=1) | ~groups.any(dim=1)).float().mean())


def error_type_metrics(error_types: Sequence[str | None]) -> dict[str, float]:
    """Error types over training (Sec. 4, Fig. 5): counts of "strategy" and "execution" failures and
    their rate over the batch (count / batch size). error_types: "strategy", "execution" or None
    (correct) per completion, e.g. the built-in world's classifier."""
    counts = Counter(error_types)
    n = len(error_types)
    return {
        "errors_strategy": float(counts["strategy"]),
        "errors_execution": float(counts["execution"]),
        "errors_strategy_rate": counts["strategy"] / n,
        "errors_execution_rate": counts["execution"] / n,
    }


def rollout_metrics(batch, planning_mask: torch.Tensor, correct: torch.Tensor, grams: Sequence[str],
                    top_entropy_q: float = 0.3) -> dict[str, float]:
    """All per-step metrics of one rollout.RolloutBatch (Sec. 4). Keys over an empty set are
    omitted.

    planning_mask: bool [B, C] (grams.batch_planning_mask); correct: bool [B].
    """
    completion = batch.completion_mask.bool()  # [B, C]
    planning = planning_mask.bool() & completion  # [B, C]
    execution = completion & ~planning  # [B, C]
    lengths = batch.completion_mask.sum(dim=1)  # [B]
    gram_counts = batch_gram_counts(batch.texts, grams)
    values = {
        "entropy_planning": masked_mean(batch.entropy, planning),
        "entropy_execution": masked_mean(batch.entropy, execution),
        "entropy_all": masked_mean(batch.entropy, completion),
        "ppl_planning": perplexity(batch.old_logp, planning),
        "ppl_execution": perplexity(batch.old_logp, execution),
        "semantic_entropy": semantic_entropy(gram_counts),
        "gram_occurrences": float(sum(gram_counts.values())),
        "conditional_entropy": conditional_entropy(batch.texts, grams),
        "planning_ratio": float(planning.sum()) / max(int(completion.sum()), 1),
        "length_mean": float(lengths.float().mean()),
        "length_max": float(lengths.max()),
        "accuracy": float(correct.float().mean()),
        "pass_at_k": group_pass_at_k(correct, batch.group_size),
        "zero_variance_frac": zero_variance_fraction(correct, batch.group_size),
        "truncation_rate": float(batch.truncated.float().mean()),
    }
    values.update(planning_entropy_overlap(planning, high_entropy_mask(batch.entropy, completion,
                                                                       top_entropy_q)))
    return {key: value for key, value in values.items() if value is not None}


def step_metrics(batch, problems: list, grams: Sequence[str], relative: "RelativeToFirst",
                 per_sequence_loss: bool = False, source_figures=None) -> dict[str, float]:
    """The figures of one training step's rollouts (train.StepBatch): reward, rollout_metrics
    relative to step 0, the figures of the data's own source (data.ProblemSource.batch_figures: the
    built-in world's error types and strategy metrics), the planning tokens' share of the
    policy-gradient signal, and the share of completion tokens (and of the signal) whose advantage
    --algo amplified. problems: one per completion; per_sequence_loss: --loss-agg
    seq-mean-token-mean."""
    correct = batch.rewards >= 1.0  # [B]
    texts = batch.rollout.texts
    record = {"reward": batch.rewards.mean().item(), "reward_errors": batch.reward_errors}
    record.update(relative(rollout_metrics(batch.rollout, batch.planning_mask, correct, grams)))
    if source_figures is not None:
        record.update(source_figures(problems, texts, correct.tolist()))
    rollout = batch.rollout
    selections = {"planning_signal_share": batch.planning_mask}
    if batch.amplified_mask is not None:
        completion = rollout.completion_mask.bool()  # [B, C]
        record["amplified_ratio"] = (float((batch.amplified_mask & completion).sum())
                                     / max(int(completion.sum()), 1))
        selections["amplified_signal_share"] = batch.amplified_mask
    for key, selected in selections.items():
        share = gradient_signal_share(batch.token_advantages, rollout.old_logp, selected,
                                      rollout.completion_mask, per_sequence_loss)
        if share is not None:
            record[key] = share
    return record


def is_eval_record(record: dict) -> bool:
    """Whether a metrics.jsonl record is a held-out evaluation (its keys start with "eval/") or a
    training step."""
    return any(key.startswith("eval/") for key in record)


def metrics_record(line: str, where: str) -> dict:
    """One line of a run's metrics.jsonl: a JSON object with an integer "step"; InputError naming
    `where` (FILE:LINE) otherwise (a line cut short reads as malformed JSON)."""
    record = read_json(line, where)  # its InputError says what is wrong with the JSON
    if (not isinstance(record, dict) or not isinstance(record.get("step"), int)
            or isinstance(record["step"], bool)):
        raise InputError(f"{where}: not a metrics record (edited by hand, or cut short?)")
    return record


def metrics_records(path: Path) -> list[dict]:
    """Every record of a metrics.jsonl file (train.py's, one per step or evaluation), blank lines
    skipped."""
    return [metrics_record(line, f"{path}:{number}")
            for number, line in enumerate(read_text_lines(path), 1) if line.strip()]


class RelativeToFirst:
    """Adds each metric relative to its first logged value (Sec. 4: "divided by its value at step
    0").

    `<key>_rel` = value / first value for perplexities; `semantic_entropy_change` = value - first
    value. The first values live in `self.first`; pass them back (`RelativeToFirst(first)`) when
    resuming.
    """

    RATIO_KEYS = ("ppl_planning", "ppl_execution")
    DIFFERENCE_KEYS = ("semantic_entropy",)

    def __init__(self, first: dict[str, float] | None = None):
        self.first = dict(first or {})

    def __call__(self, metrics: dict[str, float]) -> dict[str, float]:
        out = dict(metrics)
        for key in self.RATIO_KEYS + self.DIFFERENCE_KEYS:
            if key in metrics:
                self.first.setdefault(key, metrics[key])
        for key in self.RATIO_KEYS:
            if key in metrics:
                out[f"{key}_rel"] = metrics[key] / self.first[key]
        for key in self.DIFFERENCE_KEYS:
            if key in metrics:
                out[f"{key}_change"] = metrics[key] - self.first[key]
        return out


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of `values`: sample standard deviation / sqrt(n); 0 for fewer than
    2 values."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
