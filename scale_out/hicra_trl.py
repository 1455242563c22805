"""HICRA inside TRL's GRPOTrainer: our per-token advantages on an engine that scales out.

train.py is the readable single-device reference. This file makes the same algorithm a drop-in for
TRL's `GRPOTrainer` (accelerate, DeepSpeed ZeRO, FSDP, PEFT, vLLM generation), replacing only what
HICRA changes: the advantage. TRL computes one advantage A_i per completion; `HicraGRPOTrainer`
turns it into per-token advantages [B, C] with *our* functions, so both paths share one definition:

  grpo          A_i on every token
  hicra         hicra.hicra_advantages: A_i + alpha * |A_i| on planning tokens
                (grams.planning_token_mask)
  high_entropy  the same amplification on the top-q entropy tokens (hicra.high_entropy_mask)
  placebo       hicra with a gram file of non-strategic n-grams in place of the strategic grams
  random_spans  the amplification on random spans matched to the planning tokens
                (hicra.matched_random_mask)
  hicra_verl    the set the authors' VeRL code reportedly amplified (hicra.verl_recipe_mask)
The choice of tokens is hicra.amplified_mask, the function train.py calls.

`HicraGRPOConfig` defaults are those of train.py: mean-centred advantages without std scaling
(scale_rewards="none" is our --advantage center), clip-higher (epsilon 0.2 / epsilon_high 0.28),
token-mean loss (loss_type "dapo"), no KL (beta 0). LOSS_TYPES maps our --loss-agg names to TRL's
loss types; the cross-check in tests/test_hicra_trl.py pins TRL's loss and gradient to
grpo.clipped_policy_loss + aggregate_loss.

Supported TRL: 1.16.x (tested with 1.16.0; requirements-trl.txt pins it). The subclass leans on
private parts of GRPOTrainer, checked against the 1.16.0 source:
- `_generate_and_score_completions` returns a dict with "completion_ids", "completion_mask"
  (right-padded, [B, C]) and "advantages" ([B], this process's slice of the group-relative
  advantages); we replace the last by a [B, C] tensor;
- `_compute_loss` unsqueezes `advantages` only when it is 1-D (`if advantages.dim() == 1`), so a
  [B, C] tensor flows unchanged into the clipped surrogate, the clip-ratio metrics and every
  loss_type's aggregation; the buffer split / shuffle between generation and loss index dim 0 only;
- `_get_per_token_logps_and_entropies(..., compute_entropy=True)` returns (logps, entropies,
  aux_loss);
- `self._metrics[mode][name]` lists are averaged by `log()` and reach every `report_to` backend.
Private methods may change in any TRL release: after upgrading, run
`pytest tests/test_hicra_trl.py`.

Departures from train.py, all TRL's:
- the std-scaled advantage (--advantage std, scale_rewards="group") divides by std + 1e-4,
  not + 1e-6;
- with use_vllm, TRL's importance-sampling correction between vLLM and the trainer's log-probs is
  on;
- high_entropy and hicra_verl pick the top-q tokens among this process's completions, not the whole
  global batch, and hicra_verl's groups are consecutive runs of num_generations completions of this
  process's slice (so its completions per process must be a multiple of num_generations);
- text-only models (the entropy forward below passes no image inputs).

Cost: planning/execution entropy (and the high_entropy mask) need the sampling policy's per-token
entropy, one extra no-grad forward over the generation batch, as train.py's old-log-prob pass;
`entropy_metrics=False` skips it unless the algo needs it (high_entropy, hicra_verl).
"""

from collections import Counter
from dataclasses import dataclass, field

import torch
from accelerate.utils import gather_object
from trl import GRPOConfig, GRPOTrainer

import grams as grams_lib
from cli import InputError
from hicra import PAPER_ALPHA, validate_alpha, validate_top_q
from hicra import token_advantages as hicra_token_advantages

ALGOS = ("grpo", "hicra", "high_entropy", "placebo", "random_spans", "hicra_verl")
ENTROPY_ALGOS = ("high_entropy", "hicra_verl")  # need the sampling policy's per-token entropy
LOSS_TYPES = {"token-mean": "dapo", "seq-mean-token-mean": "grpo",
              "seq-mean-token-sum-norm": "dr_grpo"}
ADVANTAGE_SCALES = {"center": "none", "std": "group"}  # our --advantage -> TRL's scale_rewards


@dataclass
class HicraGRPOConfig(GRPOConfig):
    """GRPOConfig plus the HICRA settings; TRL defaults changed to train.py's (see module
    docstring)."""

    algo: str = field(default="hicra", metadata={"help": f"advantage shaping, one of {ALGOS}"})
    hicra_alpha: float = field(
        default=PAPER_ALPHA, metadata={"help": "HICRA amplification alpha, in [0, 1]"}
    )
    grams: str = field(
        default="paper",
        metadata={"help": "strategic grams: preset (paper, world) or a file, one gram per line; "
                          "for algo=placebo a file of non-strategic n-grams"},
    )
    entropy_top_q: float = field(
        default=0.3,
        metadata={"help": "fraction of highest-entropy tokens: amplified by high_entropy, "
                          "hicra_verl's threshold"},
    )
    entropy_metrics: bool = field(
        default=True, metadata={"help": "log planning/execution entropy "
                                        "(one extra no-grad forward per generation)"}
    )
    scale_rewards: str = field(
        default="none", metadata={"help": "none = A_i = R_i - group mean (the paper's)"}
    )
    epsilon_high: float | None = field(
        default=0.28, metadata={"help": "upper clip range (clip-higher, DAPO)"}
    )

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise InputError(f"--algo must be one of {ALGOS}, got {self.algo!r}")
        try:
            validate_alpha(self.hicra_alpha)
            validate_top_q(self.entropy_top_q)
        except ValueError as error:
            raise InputError(str(error)) from None
        if self.algo == "placebo" and self.grams in grams_lib.preset_grams():
            raise InputError("--grams: algo placebo needs a file of non-strategic grams, "
                             f"not the preset {self.grams!r}")
        # a missing or empty gram file fails here, before any model is loaded
        grams_lib.load_grams(self.grams)
        super().__post_init__()


def token_advantages(
    algo: str, advantages: torch.Tensor, planning_mask: torch.Tensor, completion_mask: torch.Tensor,
    entropy: torch.Tensor | None, alpha: float, top_q: float, group_size: int,
) -> torch.Tensor:
    """Per-token advantages [B, C] for `algo` from per-completion advantages [B]
    (hicra.token_advantages, as train.shape_advantages).

    planning_mask: bool [B, C] (the placebo grams' mask for algo placebo); entropy [B, C], for
    high_entropy and hicra_verl.
    """
    if algo == "hicra_verl" and len(advantages) % group_size:
        raise ValueError(f"hicra_verl needs whole groups: {len(advantages)} completions on this "
                         f"process is not a multiple of num_generations = {group_size}")
    shaped, amplified = hicra_token_advantages(algo, advantages, planning_mask, entropy,
                                               completion_mask, group_size, top_q, alpha)
    # [B, C]; A_i on every token is a view of `advantages`: given its own memory, TRL writes in it
    return shaped.clone() if amplified is None else shaped


class HicraGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose advantages are per token, shaped by `args.algo`; logs our rollout metrics.

    Takes GRPOTrainer's arguments; `args` must be a HicraGRPOConfig.
    """

    def __init__(self, *pargs, **kwargs):
        super().__init__(*pargs, **kwargs)
        if not isinstance(self.args, HicraGRPOConfig):
            raise TypeError("HicraGRPOTrainer needs args=HicraGRPOConfig(...), "
                            f"got {type(self.args).__name__}")
        self.grams = grams_lib.load_grams(self.args.grams)
        self.tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        # [B, C], [B, C]
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        loss_mask = (completion_mask * output["tool_mask"] if "tool_mask" in output
                     else completion_mask)  # [B, C]
        planning = grams_lib.batch_planning_mask(self.tokenizer, completion_ids, completion_mask,
                                                 self.grams)  # [B, C]
        needs_entropy = self.args.entropy_metrics or self.args.algo in ENTROPY_ALGOS
        entropy = self._sampling_entropy(output) if needs_entropy else None  # [B, C]
        output["advantages"] = token_advantages(
            self.args.algo, output["advantages"], planning, loss_mask, entropy,
            self.args.hicra_alpha, self.args.entropy_top_q, self.num_generations,
        )  # [B, C]
        self._log_rollout_metrics(completion_ids, loss_mask, planning, entropy)
        return output

    @torch.no_grad()
    def _sampling_entropy(self, output: dict) -> torch.Tensor:
        """Entropy H(pi(. | prefix)) at the sampling temperature of each completion position:
        [B, C]."""
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)  # [B, P+C]
        # [B, P+C]
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        chunk = (self.args.per_device_train_batch_size if self.model.training
                 else self.args.per_device_eval_batch_size)
        _, entropy, _ = self._get_per_token_logps_and_entropies(
            self.model, input_ids, attention_mask, output["completion_ids"].shape[1],
            batch_size=chunk, compute_entropy=True,
        )
        return entropy.float()  # [B, C]

    def _log_rollout_metrics(self, completion_ids, loss_mask, planning, entropy) -> None:
        """Planning-token ratio, semantic entropy of the grams, planning / execution entropy
        (metrics.py's definitions), over all processes' completions, into TRL's metrics (hence every
        report_to backend). A metric over an empty set is not logged."""
        mode = "train" if self.model.training else "eval"
        completion = loss_mask.bool()  # [B, C]
        planning = planning & completion  # [B, C]
        execution = completion & ~planning  # [B, C]
        sums = [planning.sum(), completion.sum()]
        if entropy is not None:
            sums += [(entropy * planning).sum(), (entropy * execution).sum(), execution.sum()]
        totals = self.accelerator.reduce(torch.stack(sums).float(), reduction="sum").tolist()
        values = {"hicra/planning_ratio": totals[0] / totals[1] if totals[1] else None}
        if entropy is not None:
            values["hicra/entropy_planning"] = totals[2] / totals[0] if totals[0] else None
            values["hicra/entropy_execution"] = totals[3] / totals[4] if totals[4] else None
        lengths = completion.sum(-1).tolist()  # [B]
        texts = [self.tokenizer.decode(ids[:n], skip_special_tokens=True)
                 for ids, n in zip(completion_ids.tolist(), lengths)]
        counts = sum(gather_object([grams_lib.batch_gram_counts(texts, self.grams)]), Counter())
        values["hicra/semantic_entropy"] = grams_lib.semantic_entropy(counts)
        values["hicra/gram_occurrences"] = float(sum(counts.values()))
        for name, value in values.items():
            if value is not None:
                self._metrics[mode][name].append(value)
