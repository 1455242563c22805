"""Train a causal LM with GRPO or HICRA on verifiable math problems.

    python train.py                                   # HICRA on the built-in world with the tiny model
    python train.py --model PATH_OR_ID --data gsm8k_train --algo grpo --max-new-tokens 512
    python train.py --resume runs/RUN                 # continue a run exactly where it stopped

One step: sample `--prompts-per-step` problems, roll out `--group-size` completions each, reward them,
turn rewards into group-relative advantages, shape them per token (`--algo`), then `--ppo-epochs` passes
over the batch, each one optimizer step whose gradient is accumulated over micro-batches. The old
log-probs come from one forward pass per rollout and are reused by every epoch (rollout.py).

--algo picks how the per-token advantage is built (grpo.py, hicra.py):
  grpo          A_i on every token (clip-higher GRPO, the paper's baseline)
  hicra         A_i + alpha * |A_i| on planning tokens (Sec. 3)
  entropy_reg   grpo plus an entropy bonus on all tokens (the paper's entropy-regularisation baseline)
  high_entropy  the HICRA amplification on the top-q entropy tokens instead (the paper's ablation)
  placebo       the HICRA amplification on placebo n-grams instead of the strategic grams ("placebo HICRA"):
                as many n-grams as --grams holds, with the same lengths, drawn (seeded by --seed) from the
                non-strategic text of a corpus (grams.placebo_grams). The corpus: on the built-in world,
                PLACEBO_CORPUS_SIZE reference traces (tasks.write_traces, seed 0); on other data, the
                training problems' `solution` field. Written to RUN_DIR/placebo_grams.txt.

Every step appends one JSON line to RUN_DIR/metrics.jsonl, and so does every held-out evaluation (its
"step" is the number of updates done, its keys start with "eval/"); `--report-to` mirrors those lines to
TensorBoard or wandb (trackers.py).

Checkpoints survive a kill at any instant. RUN_DIR/checkpoint/ is the newest one: a Hugging Face folder
(from_pretrained and eval.py load it) plus the trainer state (optimizer, scheduler, RNG) as safetensors and
JSON, never pickle, so resuming a downloaded run folder cannot run code. A checkpoint is written to
checkpoint.tmp/, every file fsync'ed, then complete.json is written last (the step and every file's size):
a folder without it is incomplete. The previous checkpoint is renamed to checkpoint-N/ (N = updates done)
and checkpoint.tmp/ to checkpoint/; all but the newest --keep-checkpoints are then deleted. --resume takes
the newest complete folder among these, finishes an interrupted rename, deletes incomplete leftovers and
drops the metrics lines logged after that checkpoint; with no complete checkpoint it starts at step 0.

A step whose loss or gradient norm is not finite is skipped (counted as `nonfinite_updates` in its
metrics line); --max-nonfinite-steps such steps in a row stop the run with an error, and so does an update
that leaves a weight non-finite: a run never saves non-finite weights.

Every flag is checked (TRAIN_BOUNDS, cli.py) before anything is written; bad input exits with one line
`error: ...` on stderr and exit code 2; a run that cannot go on (non-finite training) exits with one line
and exit code 1.
"""

import argparse
import dataclasses
import html
import importlib.util
import json
import math
import os
import random
import secrets
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import grams as grams_lib
from cli import (
    AT_LEAST_ONE, FRACTION, NON_NEGATIVE, POSITIVE, SEED, UNIT_INTERVAL, OneLineParser, check_bounds, report, use_colour,
)
from data import InputError, Problem, load_problems
from eval import add_model_flags, add_prompt_flags, check_model_flags, evaluate, load_model, prompt_format_from_args
from grpo import ADVANTAGE_MODES, AGGREGATIONS, aggregate_loss, clip_fractions, clipped_policy_loss, group_advantages, kl_k3
from hicra import PAPER_ALPHA, hicra_advantages, high_entropy_mask
from metrics import RelativeToFirst, rollout_metrics, strategy_metrics
from reward import REWARD_HELP, load_reward, score_completions
from rollout import PromptFormat, RolloutBatch, activation_checkpointing, completion_logprobs, format_prompt, generate_rollouts
from tasks import DEFAULT_MODEL_DIR
from trackers import TRACKERS, check_installed, open_trackers

ALGOS = ("grpo", "hicra", "entropy_reg", "high_entropy", "placebo")
PLACEBO_CORPUS_SIZE = 2000  # world reference traces the placebo n-grams are drawn from
SAMPLES_SHOWN = 3  # completions printed (coloured) and written to HTML at each evaluation
CHECKPOINT = "checkpoint"  # RUN_DIR/checkpoint: the newest complete checkpoint
COMPLETE_MARKER = "complete.json"  # written last into a checkpoint folder: {"step": ..., "files": {name: bytes}}
FAULT_ENV = "HICRA_FAULT"  # test hook (test_faults.py): "POINT:STEP" makes the process SIGKILL itself there


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite training); the message is one line."""


def fault_point(point: str, step: int) -> None:
    """Kill this process (SIGKILL, as a crash or an out-of-memory kill would) at `point` of `step` when
    HICRA_FAULT=point:step; does nothing when HICRA_FAULT is unset. test_faults.py resumes after each."""
    if os.environ.get(FAULT_ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        description="GRPO / HICRA training.", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL_DIR, help="HF model folder or hub id (from_pretrained)")
    add_model_flags(group)
    group.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    group.add_argument("--lora-rank", type=int, default=0, help="LoRA rank via peft; 0 trains all weights")
    group.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA scaling numerator (alpha / rank)")

    group = parser.add_argument_group("data")
    group.add_argument("--data", default="world_train", help="training problems: benchmark name or JSONL file")
    group.add_argument("--eval-data", default="world", help="held-out problems: benchmark name or JSONL file")
    group.add_argument("--eval-limit", type=int, default=500, help="held-out problems per evaluation (the first N)")
    group.add_argument("--reward", default="boxed", help=REWARD_HELP)

    add_prompt_flags(parser.add_argument_group("prompt"))

    group = parser.add_argument_group("sampling")
    group.add_argument("--prompts-per-step", type=int, default=16, help="problems sampled per step")
    group.add_argument("--group-size", type=int, default=8, help="completions per problem (G >= 2)")
    group.add_argument("--max-new-tokens", type=int, default=128, help="completion length limit")
    group.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    group.add_argument("--logprob-chunk", type=int, default=512,
                       help="completion tokens per fp32 vocabulary log-softmax chunk (bounds its memory)")

    group = parser.add_argument_group("algorithm")
    group.add_argument("--algo", default="hicra", choices=ALGOS, help="advantage shaping, see the module doc")
    group.add_argument("--alpha", type=float, default=PAPER_ALPHA, help="HICRA amplification, in [0, 1]")
    group.add_argument("--grams", default="world", help="strategic grams: preset (paper, world) or a file")
    group.add_argument("--advantage", default="center", choices=ADVANTAGE_MODES, help="group baseline form")
    group.add_argument("--eps-low", type=float, default=0.2, help="lower clip range: ratio >= 1 - eps_low")
    group.add_argument("--eps-high", type=float, default=0.28, help="upper clip range (clip-higher, DAPO)")
    group.add_argument("--beta", type=float, default=0.0, help="k3 KL coefficient; 0 loads no reference model")
    group.add_argument("--loss-agg", default="token-mean", choices=AGGREGATIONS, help="loss normaliser")
    group.add_argument("--entropy-coef", type=float, default=0.01, help="entropy bonus of --algo entropy_reg")
    group.add_argument("--entropy-top-q", type=float, default=0.3,
                       help="fraction of highest-entropy tokens amplified by --algo high_entropy (Fig. 10's 30%%)")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    group.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    group.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm; 0 = off")
    group.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up steps")
    group.add_argument("--ppo-epochs", type=int, default=1, help="optimizer steps (passes) per rollout batch")
    group.add_argument("--micro-batch-size", type=int, default=32, help="completions per forward/backward")
    group.add_argument("--micro-batch-tokens", type=int, default=0,
                       help="also cap the tokens a micro-batch's forward processes (each distinct prompt once + "
                            "rows x longest completion; rows kept with their group); 0 = no cap. Bounds activation "
                            "memory; the gradient is the same")
    group.add_argument("--steps", type=int, default=200, help="training steps (rollout + update)")
    group.add_argument("--max-nonfinite-steps", type=int, default=5,
                       help="stop after this many steps in a row skipped for a non-finite loss or gradient")
    group.add_argument("--seed", type=int, default=0, help="seed of prompts order, sampling and init")

    group = parser.add_argument_group("logging")
    group.add_argument("--out", default=None, help="run directory (default runs/ALGO-seedS-TIME-XXXXXX, XXXXXX random)")
    group.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps (and at 0 and the end); 0 = never")
    group.add_argument("--eval-samples", type=int, default=1, help="samples per held-out problem")
    group.add_argument("--eval-temperature", type=float, default=1.0, help="held-out sampling temperature; 0 = greedy")
    group.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end); 0 = end only")
    group.add_argument("--keep-checkpoints", type=int, default=1,
                       help="checkpoints kept: the newest in RUN_DIR/checkpoint, older ones in RUN_DIR/checkpoint-N")
    group.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this run from its checkpoint")
    group.add_argument("--report-to", nargs="+", default=[], choices=TRACKERS, metavar="TRACKER",
                       help=f"also log metrics to {' and/or '.join(TRACKERS)} (optional packages; metrics.jsonl is always written)")
    return parser


# Every numeric flag: finite and within its bound (cli.check_bounds), checked before anything is written.
TRAIN_BOUNDS = {
    "threads": NON_NEGATIVE,
    "lora_rank": NON_NEGATIVE,
    "lora_alpha": POSITIVE,
    "eval_limit": AT_LEAST_ONE,
    "prompts_per_step": AT_LEAST_ONE,
    "group_size": (">= 2 (group-relative advantages need a group)", lambda v: v >= 2),
    "max_new_tokens": AT_LEAST_ONE,
    "temperature": POSITIVE,
    "top_p": FRACTION,
    "logprob_chunk": AT_LEAST_ONE,
    "alpha": UNIT_INTERVAL,
    "eps_low": UNIT_INTERVAL,
    "eps_high": NON_NEGATIVE,
    "beta": NON_NEGATIVE,
    "entropy_coef": NON_NEGATIVE,
    "entropy_top_q": FRACTION,
    "lr": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "grad_clip": NON_NEGATIVE,
    "warmup_steps": NON_NEGATIVE,
    "ppo_epochs": AT_LEAST_ONE,
    "micro_batch_size": AT_LEAST_ONE,
    "micro_batch_tokens": NON_NEGATIVE,
    "steps": (">= 1 (to evaluate a model without training, use eval.py)", lambda v: v >= 1),
    "seed": SEED,
    "eval_every": NON_NEGATIVE,
    "eval_samples": AT_LEAST_ONE,
    "eval_temperature": NON_NEGATIVE,
    "save_every": NON_NEGATIVE,
    "keep_checkpoints": AT_LEAST_ONE,
    "max_nonfinite_steps": AT_LEAST_ONE,
}


def validate_args(args: argparse.Namespace) -> None:
    """Check every flag before anything loads or is written; raises InputError naming the flag."""
    check_bounds(args, TRAIN_BOUNDS)
    check_model_flags(args, training=True)
    if args.lora_rank > 0 and importlib.util.find_spec("peft") is None:
        raise InputError("--lora-rank: LoRA needs peft (pip install peft)")


MODEL_FLAGS = ("model", "gguf_file", "lora_rank", "lora_alpha")  # what is trained: fixed for the life of a run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; with --resume, the run's saved flags overridden by those given explicitly.

    Defaults first, so a run saved before a flag existed resumes with that flag's default.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume:
        config_path = Path(args.resume) / "config.json"
        if not config_path.is_file():
            raise InputError(f"--resume: {config_path} not found")
        try:
            saved = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise InputError(f"--resume: {config_path}: not a readable run config ({str(error).splitlines()[0]})") from None
        if not isinstance(saved, dict):
            raise InputError(f"--resume: {config_path}: not a readable run config (not a JSON object)")
        for action in parser._actions:  # a second parse that keeps only the flags given explicitly
            action.default = argparse.SUPPRESS
        explicit = vars(parser.parse_args(argv))
        if explicit.get("out", args.resume) != args.resume:
            raise InputError("--out: a resumed run stays in its folder; give --resume RUN_DIR alone")
        for key in MODEL_FLAGS:
            if key in explicit and explicit[key] != saved.get(key):
                flag = "--" + key.replace("_", "-")
                raise InputError(f"{flag}: this run was trained with {flag} {saved.get(key)}; a resumed run keeps "
                                 f"its {', '.join('--' + k.replace('_', '-') for k in MODEL_FLAGS)} (start a new run to change them)")
        args = argparse.Namespace(**{**vars(args), **saved, **explicit, "out": args.resume})
    elif args.out is None:
        args.out = f"runs/{args.algo}-seed{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    validate_args(args)
    return args


@dataclass
class StepBatch:
    """One step's rollouts with everything the update needs."""

    rollout: RolloutBatch
    rewards: torch.Tensor  # [B]
    token_advantages: torch.Tensor  # [B, C]
    planning_mask: torch.Tensor  # [B, C] bool
    amplified_mask: torch.Tensor | None  # [B, C] bool, tokens whose advantage --algo amplifies; None: no amplification
    ref_logp: torch.Tensor | None  # [B, C], only when beta > 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prompts_for_step(num_problems: int, step: int, per_step: int, seed: int) -> list[int]:
    """Problem indices of a step: epochs of seeded permutations, a pure function of (seed, step) for resume."""
    orders: dict[int, list[int]] = {}
    indices = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(position, num_problems)
        if epoch not in orders:
            orders[epoch] = list(range(num_problems))
            random.Random(seed * 1_000_003 + epoch).shuffle(orders[epoch])
        indices.append(orders[epoch][offset])
    return indices


def amplified_mask(args, tokenizer, rollout: RolloutBatch, planning_mask: torch.Tensor,
                   placebo: list[str] | None) -> torch.Tensor | None:
    """The tokens [B, C] whose advantage --algo amplifies: planning tokens (hicra), the top-q entropy tokens
    (high_entropy), placebo-gram tokens (placebo); None for grpo and entropy_reg."""
    if args.algo == "hicra":
        return planning_mask
    if args.algo == "high_entropy":
        return high_entropy_mask(rollout.entropy, rollout.completion_mask, args.entropy_top_q)  # [B, C]
    if args.algo == "placebo":
        return grams_lib.batch_planning_mask(tokenizer, rollout.completion_ids, rollout.completion_mask, placebo)
    return None


def token_advantages(advantages: torch.Tensor, completion_mask: torch.Tensor, amplified: torch.Tensor | None,
                     alpha: float) -> torch.Tensor:
    """Per-token advantages [B, C] from per-completion advantages [B]: HICRA's amplification on `amplified`."""
    if amplified is not None:
        return hicra_advantages(advantages, amplified, alpha)
    return advantages[:, None].expand_as(completion_mask)  # [B, C]


def placebo_corpus(args, train_problems: list[Problem]) -> list[str]:
    """The texts placebo n-grams are drawn from: world reference traces, or the training solutions."""
    if args.data.startswith("world"):
        from tasks import write_traces

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "traces.jsonl"
            write_traces(str(path), PLACEBO_CORPUS_SIZE, seed=0)
            return [json.loads(line)["solution"] for line in path.read_text(encoding="utf-8").splitlines()]
    texts = [p.meta["solution"] for p in train_problems if isinstance(p.meta.get("solution"), str)]
    if not texts:
        raise InputError(f"--algo placebo: {args.data} has no 'solution' field to draw placebo n-grams from")
    return texts


def placebo_gram_set(args, train_problems: list[Problem], grams: list[str]) -> list[str]:
    """grams.placebo_grams for this run (seeded by --seed); run() writes them to RUN_DIR/placebo_grams.txt."""
    corpus = placebo_corpus(args, train_problems)
    try:
        return grams_lib.placebo_grams(corpus, grams, args.seed)
    except ValueError as error:
        raise InputError(f"--algo placebo: {error}") from None


def micro_batches(
    lengths: torch.Tensor, group_size: int, prompt_width: int, max_rows: int, max_tokens: int, shared_prompts: bool = True
) -> list[torch.Tensor]:
    """Row indices of each micro-batch, at most `max_rows` rows each. lengths: [B] completion lengths, rows
    i*G .. i*G+G-1 sharing prompt i.

    Without a token cap (max_tokens 0) rows go in order of completion length, so a micro-batch pads little.
    With one, the tokens a micro-batch's forward processes stay within max_tokens: each distinct prompt once
    (`shared_prompts`: completion_logprobs encodes a prompt once for all its rows; once per row otherwise)
    plus rows x the longest completion. Rows are then taken group by group (groups in order of their longest
    completion, a group's rows by length), so a prompt is split over as few micro-batches as the cap allows;
    a row over the cap alone gets a micro-batch of its own.
    """
    if max_tokens:
        group_longest = lengths.view(-1, group_size).max(-1).values.tolist()  # [N], the longest row of each group
        order = sorted(range(len(lengths)), key=lambda r: (group_longest[r // group_size], r // group_size, int(lengths[r])))
    else:
        order = lengths.argsort(stable=True).tolist()

    def forward_tokens(rows: list[int]) -> int:
        prompts = len({row // group_size for row in rows}) if shared_prompts else len(rows)
        return prompts * prompt_width + len(rows) * max(int(lengths[row]) for row in rows)

    batches, current = [], []
    for row in order:
        if current and (len(current) == max_rows or (max_tokens and forward_tokens(current + [row]) > max_tokens)):
            batches.append(torch.tensor(current))
            current = []
        current.append(row)
    return batches + [torch.tensor(current)]


def policy_update(args, model, optimizer, batch: StepBatch) -> dict[str, float]:
    """--ppo-epochs optimizer steps over the batch, gradients accumulated over micro-batches.

    An optimizer step whose loss or gradient norm is not finite is skipped (gradients dropped) and
    counted in "nonfinite_updates": one NaN would otherwise spread to every weight.
    """
    rollout = batch.rollout
    size = rollout.completion_ids.shape[0]
    batch_tokens = rollout.completion_mask.sum().clamp(min=1)
    entropy_coef = args.entropy_coef if args.algo == "entropy_reg" else 0.0
    totals = {"loss": 0.0, "clip_low": 0.0, "clip_high": 0.0, "kl": 0.0, "grad_norm": 0.0, "nonfinite_updates": 0}
    # Micro-batches of rows of similar length: completion_logprobs drops the columns all rows pad.
    row_groups = micro_batches(
        rollout.completion_mask.sum(-1), rollout.group_size, rollout.prompt_ids.shape[1], args.micro_batch_size,
        args.micro_batch_tokens, shared_prompts=not activation_checkpointing(model),
    )
    model.train()
    for _ in range(args.ppo_epochs):
        finite_loss = True
        for rows in row_groups:  # [b] row indices
            mask = rollout.completion_mask[rows]  # [b, C]
            logp, entropy = completion_logprobs(
                model, rollout.prompt_ids[rows], rollout.prompt_mask[rows], rollout.completion_ids[rows], mask,
                args.temperature, args.logprob_chunk,
            )  # [b, C], [b, C]
            old_logp, advantages = rollout.old_logp[rows], batch.token_advantages[rows]
            per_token = clipped_policy_loss(logp, old_logp, advantages, args.eps_low, args.eps_high)  # [b, C]
            if batch.ref_logp is not None:
                kl = kl_k3(logp, batch.ref_logp[rows])  # [b, C]
                per_token = per_token + args.beta * kl
                totals["kl"] += ((kl * mask).sum() / batch_tokens).item() / args.ppo_epochs
            if entropy_coef:
                per_token = per_token - entropy_coef * entropy
            loss = aggregate_loss(per_token, mask, args.loss_agg, batch_tokens, size, args.max_new_tokens)
            loss.backward()
            clipped = clip_fractions(logp, old_logp, advantages, mask, args.eps_low, args.eps_high)
            share = mask.sum() / batch_tokens / args.ppo_epochs
            finite_loss = finite_loss and math.isfinite(loss.item())
            totals["loss"] += loss.item() / args.ppo_epochs
            totals["clip_low"] += (clipped.low * share).item()
            totals["clip_high"] += (clipped.high * share).item()
        max_norm = args.grad_clip if args.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
        totals["grad_norm"] += grad_norm.item() / args.ppo_epochs
        if finite_loss and math.isfinite(grad_norm.item()):
            try:
                optimizer.step()
            except RuntimeError as error:  # a step size the weights' dtype cannot hold, e.g. --lr 1e39 in float32
                if "overflow" not in str(error):
                    raise
                raise TrainingError(f"the update overflowed ({str(error).splitlines()[0]}); nothing of it was saved; "
                                    f"likely cause: {nonfinite_causes(args, batch.rewards)}") from None
        else:
            totals["nonfinite_updates"] += 1
        optimizer.zero_grad(set_to_none=True)
    return totals


def weights_finite(model) -> bool:
    """True when no trainable weight is inf or NaN."""
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters() if p.requires_grad]).all())


def nonfinite_causes(args, rewards: torch.Tensor) -> str:
    """The likely causes of non-finite training, most specific first. rewards: [B]."""
    causes = []
    if not torch.isfinite(rewards).all():
        causes.append("the reward function returned NaN or inf")
    if args.dtype in ("float16", "bfloat16") or (args.dtype == "auto" and torch.cuda.is_available()):
        causes.append(f"--dtype {args.dtype} overflowing (try --dtype float32)")
    causes.append(f"a learning rate too high (--lr {args.lr:g})")
    return "; ".join(causes)


def rollout_step(
    args, model, ref_model, tokenizer, problems: list[Problem], grams: list[str], reward_fn,
    prompt_format: PromptFormat = PromptFormat(), placebo: list[str] | None = None,
):
    """Sample, reward and shape advantages for one step; returns the batch and its reward bookkeeping."""
    prompts = [format_prompt(tokenizer, p.problem, prompt_format) for p in problems]
    rollout = generate_rollouts(
        model, tokenizer, prompts, args.group_size, args.max_new_tokens, args.temperature, args.top_p, args.logprob_chunk
    )
    group_problems = [p for p in problems for _ in range(args.group_size)]
    rewards, reward_errors = score_completions(reward_fn, rollout.texts, [p.answer for p in group_problems])
    rewards = torch.tensor(rewards, dtype=torch.float32, device=rollout.completion_mask.device)  # [B]
    advantages = group_advantages(rewards, args.group_size, args.advantage)  # [B]
    planning_mask = grams_lib.batch_planning_mask(tokenizer, rollout.completion_ids, rollout.completion_mask, grams)
    ref_logp = None
    if ref_model is not None:
        with torch.no_grad():
            ref_logp, _ = completion_logprobs(
                ref_model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask,
                args.temperature, args.logprob_chunk,
            )  # [B, C]
    amplified = amplified_mask(args, tokenizer, rollout, planning_mask, placebo)
    batch = StepBatch(
        rollout=rollout,
        rewards=rewards,
        token_advantages=token_advantages(advantages, rollout.completion_mask, amplified, args.alpha),
        planning_mask=planning_mask,
        amplified_mask=amplified,
        ref_logp=ref_logp,
    )
    return batch, group_problems, reward_errors


def world_error_types(args, problems: list[Problem], texts: list[str]) -> list[str | None] | None:
    """Strategy vs execution error of each completion, when training on the built-in world."""
    if not args.data.startswith("world"):
        return None
    from tasks import classify_error

    return [classify_error(problem, text) for problem, text in zip(problems, texts)]


NEVER_AN_ANSWER = "not a number"  # a boxed integer never equals it, so classify_error always sees a failure


def world_strategy_metrics(args, problems: list[Problem], texts: list[str], correct: list[bool]) -> dict[str, float]:
    """Share and execution accuracy of each strategy (metrics.strategy_metrics), on the built-in world.

    A completion's plan is sound iff the world's classifier would call its failure an execution error
    (tasks.classify_error asked with an answer no completion gives), so the set of sound strategies stays
    the world's own.
    """
    if not args.data.startswith("world"):
        return {}
    from tasks import STRATEGIES, classify_error, detect_strategy

    strategies = [detect_strategy(problem, text) for problem, text in zip(problems, texts)]
    sound = [classify_error(dataclasses.replace(problem, answer=NEVER_AN_ANSWER), text) == "execution"
             for problem, text in zip(problems, texts)]
    return strategy_metrics(strategies, sound, correct, STRATEGIES)


def show_samples(run_dir: Path, step: int, records: list[dict], grams: list[str]) -> None:
    """Print a few held-out completions with planning tokens coloured, and write them as HTML."""
    shown = [(r["problem"], r["completions"][0], r["correct"][0]) for r in records[:SAMPLES_SHOWN]]
    blocks = []
    for problem, completion, correct in shown:
        spans = grams_lib.find_gram_spans(completion, grams)
        style = "ansi" if use_colour(sys.stdout) else "plain"
        tqdm.write(f"--- {'correct' if correct else 'wrong'}: {problem}\n{grams_lib.highlight_planning(completion, spans, style)}")
        blocks.append(
            f"<h3>{'correct' if correct else 'wrong'}</h3><p><b>{html.escape(problem)}</b></p>"
            f"<pre>{grams_lib.highlight_planning(completion, spans, 'html')}</pre>"
        )
    page = (
        f"<html><head><meta charset='utf-8'><title>step {step}</title><style>mark{{background:#ffd54f}}</style>"
        f"</head><body><h2>Held-out samples at step {step} (planning tokens highlighted)</h2>{''.join(blocks)}</body></html>"
    )
    (run_dir / f"samples_step{step:05d}.html").write_text(page, encoding="utf-8")


def log_record(run_dir: Path, record: dict, trackers: list = ()) -> None:
    """Append one JSON line to RUN_DIR/metrics.jsonl, then mirror it to the --report-to trackers."""
    with open(run_dir / "metrics.jsonl", "a") as log:
        log.write(json.dumps(record) + "\n")
    for tracker in trackers:
        tracker.log(record)


def is_eval_record(record: dict) -> bool:
    return any(key.startswith("eval/") for key in record)


def run_evaluation(
    args, model, tokenizer, problems: list[Problem], grams: list[str], run_dir: Path, step: int, reward_fn,
    prompt_format: PromptFormat,
) -> dict:
    """Held-out evaluation after `step` updates; returns its metrics record ("step" and "eval/..." keys)."""
    summary, records = evaluate(
        model, tokenizer, problems, samples=args.eval_samples, temperature=args.eval_temperature,
        max_new_tokens=args.max_new_tokens, batch_size=args.prompts_per_step * args.group_size,
        reward_fn=reward_fn, progress=False, prompt_format=prompt_format,
    )
    show_samples(run_dir, step, records, grams)
    model.train()
    record = {"step": step, **{f"eval/{k}": v for k, v in summary.items() if isinstance(v, (int, float))}}
    tqdm.write(f"held-out after {step} steps: {format_eval(record)}")
    return record


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries (new names, renames), to disk; folders only where the OS allows."""
    if path.is_dir() and os.name == "nt":
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """checkpoint/, checkpoint-N/ and leftovers (checkpoint.tmp/, checkpoint.old/ of earlier versions)."""
    names = (CHECKPOINT, f"{CHECKPOINT}.tmp", f"{CHECKPOINT}.old")
    return sorted(
        p for p in run_dir.glob(f"{CHECKPOINT}*")
        if p.is_dir() and (p.name in names or p.name.removeprefix(f"{CHECKPOINT}-").isdigit())
    )


def checkpoint_step(folder: Path) -> int | None:
    """The last finished step of a complete checkpoint folder; None when it is incomplete (no readable marker)."""
    try:
        return int(json.loads((folder / COMPLETE_MARKER).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_trainer_state(folder: Path, optimizer, scheduler, step: int, relative: RelativeToFirst, nonfinite_streak: int) -> None:
    """Optimizer tensors and torch RNG states to trainer_state.safetensors, the rest to trainer_state.json."""
    optimizer_state = optimizer.state_dict()
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng/cuda/{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    for index, values in optimizer_state["state"].items():
        tensors.update({f"optimizer/{index}/{name}": value.contiguous().cpu() for name, value in values.items()})
    python_rng, numpy_rng = random.getstate(), np.random.get_state()
    state = {
        "step": step,
        "nonfinite_streak": nonfinite_streak,
        "relative_baseline": relative.first,
        "optimizer_param_groups": optimizer_state["param_groups"],
        "scheduler": scheduler.state_dict(),
        "rng_python": [python_rng[0], list(python_rng[1]), python_rng[2]],
        "rng_numpy": [numpy_rng[0], numpy_rng[1].tolist(), *numpy_rng[2:]],
    }
    save_file(tensors, folder / "trainer_state.safetensors")
    (folder / "trainer_state.json").write_text(json.dumps(state))


def write_complete_marker(folder: Path, step: int) -> None:
    """fsync every file of `folder`, then write complete.json (the step, every file's size) last."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fsync_path(path)
            files[path.relative_to(folder).as_posix()] = path.stat().st_size
    marker = folder / COMPLETE_MARKER
    marker.write_text(json.dumps({"step": step, "files": files}))
    fsync_path(marker)
    fsync_path(folder)


def save_checkpoint(run_dir: Path, model, tokenizer, optimizer, scheduler, step: int, relative: RelativeToFirst,
                    nonfinite_streak: int, keep: int) -> None:
    """Write checkpoint.tmp/ (complete.json last), make it checkpoint/, keep the newest `keep` checkpoints."""
    temp = run_dir / f"{CHECKPOINT}.tmp"
    shutil.rmtree(temp, ignore_errors=True)
    fault_point("save:start", step)
    model.save_pretrained(temp)
    fault_point("save:model", step)
    tokenizer.save_pretrained(temp)
    fault_point("save:tokenizer", step)
    write_trainer_state(temp, optimizer, scheduler, step, relative, nonfinite_streak)
    fault_point("save:state", step)
    write_complete_marker(temp, step)
    fault_point("save:marker", step)
    promote_checkpoint(run_dir, temp, step)
    prune_checkpoints(run_dir, keep)
    fault_point("save:pruned", step)


def promote_checkpoint(run_dir: Path, source: Path, step: int) -> None:
    """Rename the complete checkpoint `source` to checkpoint/; the one it replaces becomes checkpoint-N/."""
    final = run_dir / CHECKPOINT
    if final.exists():
        previous = checkpoint_step(final)
        if previous is None:
            shutil.rmtree(final)
        else:
            older = run_dir / f"{CHECKPOINT}-{previous + 1}"  # named by updates done, as HF Trainer does
            shutil.rmtree(older, ignore_errors=True)
            final.rename(older)
    fault_point("save:between_renames", step)
    source.rename(final)
    fsync_path(run_dir)
    fault_point("save:renamed", step)


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete the checkpoint-N/ folders beyond the newest `keep - 1` (checkpoint/ is the keep-th)."""
    steps = {p: checkpoint_step(p) for p in checkpoint_folders(run_dir) if p.name.removeprefix(f"{CHECKPOINT}-").isdigit()}
    newest_first = sorted(steps, key=lambda p: -1 if steps[p] is None else steps[p], reverse=True)
    for folder in newest_first[keep - 1:]:
        shutil.rmtree(folder)


def check_checkpoint_files(folder: Path) -> None:
    """One-line error naming the first file of a complete checkpoint that is missing or has changed size."""
    recorded = json.loads((folder / COMPLETE_MARKER).read_text())["files"]
    for name, size in recorded.items():
        path = folder / name
        found = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
        if found != f"{size} bytes":
            raise InputError(f"{path}: {found} where {COMPLETE_MARKER} records {size} bytes; the checkpoint is "
                             f"damaged (remove {folder} to resume from an older checkpoint or from step 0)")


def settle_checkpoints(run_dir: Path) -> Path | None:
    """On resume: make the newest complete checkpoint RUN_DIR/checkpoint and delete incomplete leftovers.

    Returns it, or None when the run has no complete checkpoint (it then starts again from step 0).
    A trainer_state.pt (the pickle format of earlier versions, or a planted file) is refused: unpickling
    a file can run any code, and run folders are shared.
    """
    folders = checkpoint_folders(run_dir)
    for folder in folders:
        if (folder / "trainer_state.pt").exists():
            raise InputError(f"{folder / 'trainer_state.pt'}: a pickle trainer state (an earlier version's format, or a "
                             "planted file) is not loaded, since unpickling can run code; start a new run")
    steps = {folder: checkpoint_step(folder) for folder in folders}
    complete = [folder for folder in folders if steps[folder] is not None]
    newest = max(complete, key=lambda f: (steps[f], f.name == CHECKPOINT), default=None)
    if newest is not None:
        check_checkpoint_files(newest)
    for folder in folders:
        if folder != newest and (steps[folder] is None or steps[folder] >= steps[newest]):
            shutil.rmtree(folder)
    if newest is None:
        return None
    if newest.name != CHECKPOINT:
        promote_checkpoint(run_dir, newest, steps[newest])
    return run_dir / CHECKPOINT


def restore_checkpoint(folder: Path, optimizer, scheduler) -> tuple[int, RelativeToFirst, int]:
    """Restore optimizer, scheduler and RNG state (no pickle: safetensors and JSON only).

    Returns the last finished step, the metric baseline and the count of non-finite steps in a row.
    """
    tensors_path, json_path = folder / "trainer_state.safetensors", folder / "trainer_state.json"
    try:
        tensors = load_file(tensors_path)
    except (SafetensorError, OSError) as error:
        raise InputError(f"{tensors_path}: not a readable safetensors file ({str(error).splitlines()[0]})") from None
    try:
        state = json.loads(json_path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{json_path}: not a readable trainer state ({str(error).splitlines()[0]})") from None
    try:
        per_parameter: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            if key.startswith("optimizer/"):
                _, index, name = key.split("/")
                per_parameter.setdefault(int(index), {})[name] = tensor
        groups = [{**group, "betas": tuple(group["betas"])} for group in state["optimizer_param_groups"]]  # JSON lists
        optimizer.load_state_dict({"state": per_parameter, "param_groups": groups})
        scheduler.load_state_dict(state["scheduler"])
        version, internal, gauss = state["rng_python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, *rest = state["rng_numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
        torch.set_rng_state(tensors["rng/torch"])
        cuda_states = [tensors[f"rng/cuda/{i}"] for i in range(sum(k.startswith("rng/cuda/") for k in tensors))]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
        return state["step"], RelativeToFirst(state["relative_baseline"]), state["nonfinite_streak"]
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        raise InputError(f"{folder}: trainer state does not fit this run ({str(error).splitlines()[0]})") from None


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after the checkpoint of step `last_step` (a run stopped between a log and a save).

    Kept: training records up to `last_step` and evaluations up to `last_step + 1` updates. A last line
    without its newline (torn by a crash mid-write) is dropped; the file is replaced whole, never half-written.
    """
    if path.exists():
        lines = path.read_text().split("\n")[:-1]  # complete lines only: each ends with "\n"
        records = [json.loads(line) for line in lines if line]
        kept = [r for r in records if r["step"] <= last_step + is_eval_record(r)]
        temp = path.with_name(path.name + ".tmp")
        temp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        temp.replace(path)


def load_policy(source: str, args, gguf_file: str | None):
    """load_model on the run's --dtype and --device (a source that does not load is an InputError)."""
    return load_model(source, args.dtype, args.device, gguf_file=gguf_file)


def prepare_model(args, checkpoint: Path | None):
    """Policy (optionally LoRA-wrapped, from the checkpoint when resuming), tokenizer, frozen reference."""
    if checkpoint is not None and args.lora_rank == 0:
        model, tokenizer = load_policy(str(checkpoint), args, gguf_file=None)
    else:
        model, tokenizer = load_policy(args.model, args, gguf_file=args.gguf_file)
    ref_model = None
    if args.beta > 0:
        ref_model, _ = load_policy(args.model, args, gguf_file=args.gguf_file)
        ref_model.requires_grad_(False).eval()
    if args.lora_rank > 0:
        from peft import LoraConfig, PeftModel, get_peft_model

        if checkpoint is not None:
            model = PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
        else:
            config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, target_modules="all-linear")
            model = get_peft_model(model, config)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model, tokenizer, ref_model


def write_config(run_dir: Path, args) -> None:
    """RUN_DIR/config.json: every flag but --resume (written whole or not at all)."""
    temp = run_dir / "config.json.tmp"
    temp.write_text(json.dumps({k: v for k, v in vars(args).items() if k != "resume"}, indent=2))
    temp.replace(run_dir / "config.json")


def run(args) -> Path:
    """The training loop; returns the run directory."""
    run_dir = Path(args.out)
    resuming = bool(args.resume)
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"--out: {run_dir} is a file, not a folder")
    if not resuming and ((run_dir / "metrics.jsonl").exists() or (run_dir / CHECKPOINT).exists()):
        raise InputError(f"--out: {run_dir} already holds a run; pass --resume {run_dir} or another --out")
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    # Inputs first (data, grams, and the model of a new run): one that does not load changes nothing on disk.
    train_problems = load_problems(args.data, flag="--data")
    if len(train_problems) < args.prompts_per_step:
        tqdm.write(f"note: --data has {len(train_problems)} problems, fewer than --prompts-per-step "
                   f"{args.prompts_per_step}: each step holds some of them more than once")
    eval_problems = load_problems(args.eval_data, limit=args.eval_limit, flag="--eval-data") if args.eval_every else []
    grams = grams_lib.load_grams(args.grams)
    placebo = placebo_gram_set(args, train_problems, grams) if args.algo == "placebo" else None
    reward_fn, prompt_format = load_reward(args.reward), prompt_format_from_args(args)
    check_installed(args.report_to)
    if not resuming:
        model, tokenizer, ref_model = prepare_model(args, checkpoint=None)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"--out: cannot create {run_dir}: {error.strerror}") from None
    if not resuming:
        write_config(run_dir, args)
    if placebo is not None:
        (run_dir / "placebo_grams.txt").write_text("".join(f"{g}\n" for g in placebo), encoding="utf-8")
    checkpoint = settle_checkpoints(run_dir) if resuming else None
    if resuming:
        if checkpoint is None:
            print(f"--resume: {run_dir} has no complete checkpoint yet; starting it again from step 0", file=sys.stderr)
        model, tokenizer, ref_model = prepare_model(args, checkpoint)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(args.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    relative = RelativeToFirst()
    start_step = nonfinite_streak = 0
    if checkpoint is not None:
        last_step, relative, nonfinite_streak = restore_checkpoint(checkpoint, optimizer, scheduler)
        start_step = last_step + 1
        truncate_metrics(run_dir / "metrics.jsonl", last_step)
    else:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a run restarted from step 0 logs every line again
    # metrics.jsonl now ends at the checkpoint's step (+1 for its evaluation), or is empty: drop later events
    purge_from = start_step + 1 if checkpoint is not None else 0
    trackers = open_trackers(args.report_to, run_dir, {k: v for k, v in vars(args).items() if k != "resume"}, purge_from)
    if start_step >= args.steps:
        tqdm.write(f"{run_dir} has already trained {start_step} steps (--steps {args.steps}): nothing to do; "
                   "raise --steps to continue")
    truncation_noted = False

    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc=args.algo, dynamic_ncols=True)
    for step in bar:
        if args.eval_every and step == 0:
            held_out = run_evaluation(args, model, tokenizer, eval_problems, grams, run_dir, step, reward_fn, prompt_format)
            log_record(run_dir, held_out, trackers)
        started = time.time()
        indices = prompts_for_step(len(train_problems), step, args.prompts_per_step, args.seed)
        batch, group_problems, reward_errors = rollout_step(
            args, model, ref_model, tokenizer, [train_problems[i] for i in indices], grams, reward_fn, prompt_format,
            placebo,
        )
        rollout_seconds = time.time() - started
        update = policy_update(args, model, optimizer, batch)
        scheduler.step()
        if not weights_finite(model):
            raise TrainingError(f"step {step}: the update made weights inf or NaN; they were not saved; likely cause: "
                                f"{nonfinite_causes(args, batch.rewards)}")
        fault_point("step:updated", step)
        nonfinite_streak = nonfinite_streak + 1 if update["nonfinite_updates"] else 0
        correct = batch.rewards >= 1.0  # [B]
        record = {"step": step, "reward": batch.rewards.mean().item(), "reward_errors": reward_errors}
        record.update(relative(rollout_metrics(
            batch.rollout, batch.planning_mask, correct, grams,
            error_types=world_error_types(args, group_problems, batch.rollout.texts),
        )))
        record.update(world_strategy_metrics(args, group_problems, batch.rollout.texts, correct.tolist()))
        if batch.amplified_mask is not None:
            completion = batch.rollout.completion_mask.bool()  # [B, C]
            record["amplified_ratio"] = float((batch.amplified_mask & completion).sum()) / max(int(completion.sum()), 1)
        record.update(update)
        record.update(lr=scheduler.get_last_lr()[0], rollout_seconds=rollout_seconds, step_seconds=time.time() - started)
        if record["truncation_rate"] == 1.0 and not truncation_noted:  # scored as written, but worth a word once
            tqdm.write(f"note: every completion of step {step} hit --max-new-tokens {args.max_new_tokens} before an "
                       "end-of-sequence token; answers may be cut off")
            truncation_noted = True
        last_step = step == args.steps - 1
        log_record(run_dir, record, trackers)
        fault_point("step:logged", step)
        if nonfinite_streak >= args.max_nonfinite_steps:
            raise TrainingError(f"{nonfinite_streak} steps in a row (to step {step}) had a non-finite loss or gradient "
                                f"norm and were skipped; likely cause: {nonfinite_causes(args, batch.rewards)}")
        if args.eval_every and (last_step or (step + 1) % args.eval_every == 0):
            held_out = run_evaluation(args, model, tokenizer, eval_problems, grams, run_dir, step + 1, reward_fn, prompt_format)
            log_record(run_dir, held_out, trackers)
            fault_point("eval:logged", step)
        bar.set_postfix(
            reward=f"{record['reward']:.2f}", acc=f"{record.get('accuracy', 0):.2f}",
            len=f"{record.get('length_mean', 0):.0f}", plan=f"{record.get('planning_ratio', 0):.3f}",
        )
        if last_step or (args.save_every and (step + 1) % args.save_every == 0):
            save_checkpoint(run_dir, model, tokenizer, optimizer, scheduler, step, relative, nonfinite_streak,
                            args.keep_checkpoints)
    for tracker in trackers:
        tracker.close()
    print_summary(run_dir)
    return run_dir


def format_eval(record: dict) -> str:
    return ", ".join(f"{k.removeprefix('eval/')}={v:.3f}" for k, v in record.items() if k.startswith("eval/") and "pass" in k)


def print_summary(run_dir: Path) -> None:
    """One screen: first vs last training figures and held-out accuracy."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    evals = [r for r in records if is_eval_record(r)]
    steps = [r for r in records if not is_eval_record(r)]
    print(f"\nrun: {run_dir}  ({len(steps)} steps)")
    for key in ("reward", "accuracy", "length_mean", "planning_ratio", "semantic_entropy", "step_seconds"):
        if steps and key in steps[0]:
            print(f"  {key:<18} first {steps[0][key]:8.3f}   last {steps[-1][key]:8.3f}")
    for record in evals:
        print(f"  held-out after {record['step']:>4} steps: {format_eval(record)}")
    print(f"  metrics: {path}\n  checkpoint: {run_dir / 'checkpoint'}")


def main(argv: list[str] | None = None) -> None:
    """Parse, check and train. Bad input: one `error: ...` line on stderr, exit code 2 (cli.report); a run that
    cannot go on (TrainingError): one line, exit code 1; Ctrl-C: how to resume, exit code 130."""
    try:
        args = parse_args(argv)
    except InputError as error:
        sys.exit(report(error))
    run_dir = Path(args.out)
    made_here = not run_dir.exists()
    try:
        run(args)
    except BaseException as error:
        if made_here and not (run_dir / "metrics.jsonl").exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # a failed start leaves no empty run folder behind
        elif isinstance(error, KeyboardInterrupt):
            print(f"\ninterrupted: continue with  python train.py --resume {run_dir}", file=sys.stderr)
            sys.exit(130)
        if isinstance(error, InputError):
            sys.exit(report(error))
        if isinstance(error, TrainingError):
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)
        raise


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
