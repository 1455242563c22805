"""Train a causal LM with GRPO or HICRA on verifiable math problems.

    python train.py                                   # HICRA on the built-in world with the
                                                        tiny model
    python train.py --model PATH_OR_ID --data gsm8k_train --algo grpo --max-new-tokens 512
    python train.py --config my_run.yaml --lr 1e-4    # settings from a file, a flag overriding one
    python train.py --resume runs/RUN                 # continue a run exactly where it stopped

One step (the loop in `train`):
  1. sample G = --group-size completions for each of --prompts-per-step problems (rollout.py);
  2. reward each completion with the verifier (reward.py);
  3. group-relative advantages, one per completion: A_i = r_i - mean(r_group)
     (grpo.group_advantages);
  4. per-token advantages by --algo (`shape_advantages`):
       grpo          A_i on every token (clip-higher GRPO, the paper's baseline)
       hicra         A_i + alpha * |A_i| on planning tokens (Sec. 3, hicra.hicra_advantages)
       entropy_reg   grpo plus an entropy bonus on all tokens (the paper's entropy-regularisation
                     baseline)
       high_entropy  the HICRA amplification on the top-q entropy tokens instead (the paper's
                     ablation)
       placebo       the HICRA amplification on placebo n-grams instead of the strategic grams: as
                     many n-grams as --grams holds, with the same lengths, drawn (seeded by --seed)
                     from the non-strategic text of a corpus (gram_sets.placebo.placebo_grams_for),
                     written to RUN_DIR/placebo_grams.txt;
       random_spans  the HICRA amplification on random spans matched in count and length to each
                     completion's planning tokens (hicra.matched_random_mask): the same dose, placed
                     without regard to meaning;
       hicra_verl    the set the authors' VeRL code reportedly amplified (hicra.verl_recipe_mask,
                     second-hand): in groups with a completion whose A > 0, all planning tokens,
                     plus the top --entropy-top-q entropy tokens of the correct completions longer
                     than their group's mean;
  5. the clipped surrogate over micro-batches, one optimizer step per --ppo-epochs pass
     (`policy_update`);
  6. log the step, evaluate on held-out problems every --eval-every steps, checkpoint every
     --save-every.

Departures from textbook GRPO, each a choice the paper leaves open (README, "Deliberate choices"):
mean-centred advantages without std scaling (as the paper writes them; --advantage std for the
original), clip-higher (eps_low 0.2, eps_high 0.28), token-mean loss and no KL (DAPO's defaults);
the old log-probs are the sampler's own, recorded from the logits each token was drawn from
(rollout.py; under mixed precision the first update pass's), so with one PPO epoch the ratio is 1
and the clip never acts (--ppo-epochs 2 brings it in).
Weights and AdamW state are float32; --dtype bfloat16 / float16 (the default on a GPU: bf16) is
mixed precision, forward and backward under autocast (precision.py).

Plumbing lives in named files: settings and flags in config.py, the run's set-up (new or resumed) in
training_run.py, the checks that stop a run in guards.py, model loading in model_loading.py, threads
and memory caps in machine.py, checkpoints and kill-safe resume in checkpoint.py, the run folder's
ownership in run_folder.py, metrics.jsonl, samples and trackers in runlog.py, exit codes in cli.py.
Bad input exits with one line `error: ...` on stderr and exit code 2, before anything is written
(docs/failures.md lists every case).
"""

import os
import signal
import sys

# Ctrl-C while torch and transformers load: exit 130 quietly, not an import's traceback
if __name__ == "__main__":
    # nothing written yet; no library can catch it
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))

import math  # noqa: E402  (the handler above comes first)
import random  # noqa: E402
import shlex  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

import grams as grams_lib
from cli import InputError, TrainingError, escape_unprintable_output, report, run_to_exit_code
from config import TrainConfig
from config import parse_config as parse_args
from data import Problem
from eval import evaluate
from grading import score_completions
from grpo import aggregate_loss, clip_fractions, clipped_policy_loss, group_advantages, kl_k3
from guards import check_weights_finite, nonfinite_causes
from hicra import token_advantages as hicra_token_advantages
from metrics import step_metrics
from precision import FLOAT32, MixedPrecision
from rollout import (PromptFormat, RolloutBatch, activation_checkpointing, completion_logprobs,
                     format_prompt, generate_rollouts, micro_batches)
from runlog import PROGRESS_LEGEND, format_eval, print_summary, progress_figures, show_samples
from training_run import TrainingRun, start_run


@dataclass
class StepBatch:
    """One step's rollouts with everything the update needs."""

    rollout: RolloutBatch
    rewards: torch.Tensor  # [B]
    reward_errors: int  # completions whose grading failed (scored 0)
    token_advantages: torch.Tensor  # [B, C]
    planning_mask: torch.Tensor  # [B, C] bool
    # [B, C] bool, tokens whose advantage --algo amplifies; None: no amplification
    amplified_mask: torch.Tensor | None
    entropy_coef: float  # weight of the entropy bonus in the loss (--algo entropy_reg), else 0
    ref_logp: torch.Tensor | None  # [B, C], only when beta > 0


def prompts_for_step(num_problems: int, step: int, per_step: int, seed: int) -> list[int]:
    """Problem indices of a step: epochs of seeded permutations, a pure function of (seed, step) for
    resume."""
    orders: dict[int, list[int]] = {}
    indices = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(position, num_problems)
        if epoch not in orders:
            orders[epoch] = list(range(num_problems))
            random.Random(seed * 1_000_003 + epoch).shuffle(orders[epoch])
        indices.append(orders[epoch][offset])
    return indices


def shape_advantages(config: TrainConfig, advantages: torch.Tensor, rollout: RolloutBatch,
                     planning_mask: torch.Tensor, tokenizer,
                     placebo: list[str] | None) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Step 4: per-token advantages [B, C] from per-completion advantages [B], by --algo.

    Returns (token advantages, the tokens amplified or None, the entropy bonus coefficient). HICRA
    and its controls differ only in which tokens get A + alpha * |A| (Sec. 3); entropy_reg adds a
    bonus to the loss.
    """
    selection = planning_mask  # [B, C] bool
    if config.algo == "placebo":
        selection = grams_lib.batch_planning_mask(tokenizer, rollout.completion_ids,
                                                  rollout.completion_mask, placebo)
    token_advantages, amplified = hicra_token_advantages(
        config.algo, advantages, selection, rollout.entropy, rollout.completion_mask,
        config.group_size, config.entropy_top_q, config.alpha)  # [B, C], [B, C] bool or None
    entropy_coef = config.entropy_coef if config.algo == "entropy_reg" else 0.0
    return token_advantages, amplified, entropy_coef


def rollout_step(config: TrainConfig, model, ref_model, tokenizer, problems: list[Problem],
                 grams: list[str], reward_fn, prompt_format: PromptFormat = PromptFormat(),
                 placebo: list[str] | None = None,
                 precision: MixedPrecision = FLOAT32) -> StepBatch:
    """Steps 1-4: sample, reward, group advantages, per-token shaping."""
    prompts = [format_prompt(tokenizer, p.problem, prompt_format) for p in problems]
    with precision.autocast():
        rollout = generate_rollouts(model, tokenizer, prompts, config.group_size,
                                    config.max_new_tokens, config.temperature, config.top_p)
    answers = [p.answer for p in problems for _ in range(config.group_size)]
    rewards, reward_errors = score_completions(reward_fn, rollout.texts, answers,
                                               config.reward_timeout)
    rewards = torch.tensor(rewards, dtype=torch.float32,
                           device=rollout.completion_mask.device)  # [B]
    advantages = group_advantages(rewards, config.group_size, config.advantage)  # [B]
    planning_mask = grams_lib.batch_planning_mask(tokenizer, rollout.completion_ids,
                                                  rollout.completion_mask, grams)
    ref_logp = None
    if ref_model is not None:
        with torch.no_grad(), precision.autocast():
            ref_logp, _ = completion_logprobs(ref_model, rollout.prompt_ids, rollout.prompt_mask,
                                              rollout.completion_ids, rollout.completion_mask,
                                              config.temperature, config.logprob_chunk)  # [B, C]
    token_advantages, amplified, entropy_coef = shape_advantages(config, advantages, rollout,
                                                                 planning_mask, tokenizer, placebo)
    return StepBatch(rollout, rewards, reward_errors, token_advantages, planning_mask, amplified,
                     entropy_coef, ref_logp)


def micro_batch_loss(config: TrainConfig, model, batch: StepBatch, rows: torch.Tensor,
                     refresh_old_logp: bool = False,
                     precision: MixedPrecision = FLOAT32) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of the micro-batch `rows` [b]: its share of the whole batch's loss, so the shares'
    gradients add up to the full-batch gradient, and its statistics (summed over micro-batches they
    are the batch's).

    Per token: the clipped surrogate (grpo.clipped_policy_loss) + beta * KL - entropy_coef *
    entropy, normalised by --loss-agg over the whole batch. `refresh_old_logp` (mixed precision,
    first pass): these log-probs become pi_old, written into the rollout (the weights have not moved
    yet, and the sampler's cached decode rounds differently).
    """
    rollout = batch.rollout
    batch_tokens = rollout.completion_mask.sum().clamp(min=1)
    mask = rollout.completion_mask[rows]  # [b, C]
    with precision.autocast():
        logp, entropy = completion_logprobs(model, rollout.prompt_ids[rows],
                                            rollout.prompt_mask[rows], rollout.completion_ids[rows],
                                            mask, config.temperature,
                                            config.logprob_chunk)  # [b, C], [b, C] float32
    if refresh_old_logp:
        rollout.old_logp[rows] = logp.detach()
    old_logp, advantages = rollout.old_logp[rows], batch.token_advantages[rows]  # [b, C], [b, C]
    per_token = clipped_policy_loss(logp, old_logp, advantages, config.eps_low,
                                    config.eps_high)  # [b, C]
    stats = {}
    if batch.ref_logp is not None:
        kl = kl_k3(logp, batch.ref_logp[rows])  # [b, C]
        per_token = per_token + config.beta * kl
        stats["kl"] = ((kl * mask).sum() / batch_tokens).item()
    if batch.entropy_coef:
        per_token = per_token - batch.entropy_coef * entropy  # [b, C]
    loss = aggregate_loss(per_token, mask, config.loss_agg, batch_tokens, len(rollout.texts),
                          config.max_new_tokens)
    clipped = clip_fractions(logp, old_logp, advantages, mask, config.eps_low, config.eps_high)
    share = mask.sum() / batch_tokens  # of the batch's loss-carrying tokens
    stats.update(loss=loss.item(), clip_low=(clipped.low * share).item(),
                 clip_high=(clipped.high * share).item())
    return loss, stats


def policy_update(config: TrainConfig, model, optimizer, batch: StepBatch,
                  precision: MixedPrecision = FLOAT32) -> dict[str, float]:
    """Step 5: --ppo-epochs optimizer steps over the batch, gradients accumulated over
    micro-batches; returns the statistics averaged over the epochs, and "nonfinite_updates", the
    optimizer steps skipped.

    An optimizer step whose loss or gradient norm is not finite is skipped (gradients dropped): one
    NaN would otherwise spread to every weight. float16's loss is scaled for the backward and its
    gradients unscaled before the clip (precision.py).
    """
    rollout, epochs = batch.rollout, config.ppo_epochs
    row_groups = micro_batches(rollout.lengths, rollout.group_size, rollout.prompt_ids.shape[1],
                               config.micro_batch_size, config.micro_batch_tokens or 0,
                               shared_prompts=not activation_checkpointing(model))
    totals = {"loss": 0.0, "clip_low": 0.0, "clip_high": 0.0, "kl": 0.0, "grad_norm": 0.0}
    skipped = 0
    model.train()
    for epoch in range(epochs):
        epoch_loss = 0.0
        for rows in row_groups:  # [b] row indices
            loss, stats = micro_batch_loss(config, model, batch, rows,
                                           precision.mixed and epoch == 0, precision)
            precision.scaler.scale(loss).backward()
            epoch_loss += stats["loss"]
            for key, value in stats.items():
                totals[key] += value / epochs
        precision.scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad],
            config.grad_clip if config.grad_clip > 0 else float("inf")).item()
        totals["grad_norm"] += grad_norm / epochs
        if math.isfinite(epoch_loss) and math.isfinite(grad_norm):
            optimizer_step(config, optimizer, batch, precision.scaler)
        else:
            skipped += 1
        # float16: a lower loss scale after an overflow (a no-op otherwise)
        precision.scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return {**totals, "nonfinite_updates": skipped}


def set_learning_rate(optimizer, config: TrainConfig, step: int) -> float:
    """--lr, ramped up linearly over --warmup-steps: lr * min(1, (step + 1) / warmup). A function of
    the step and the flags alone, so a resumed run with another --lr or --weight-decay uses it from
    its first step on."""
    lr = config.lr * min(1.0, (step + 1) / max(config.warmup_steps, 1))
    for group in optimizer.param_groups:
        group.update(lr=lr, weight_decay=config.weight_decay)
    return lr


def optimizer_step(config: TrainConfig, optimizer, batch: StepBatch,
                   scaler: torch.amp.GradScaler) -> None:
    """optimizer.step() (through the float16 loss scaler, which passes it on when disabled), with a
    step size the weights' dtype cannot hold (e.g. --lr 1e39 in float32) as a TrainingError."""
    try:
        scaler.step(optimizer)
    except RuntimeError as error:
        if "overflow" not in str(error):
            raise
        raise TrainingError(f"the update overflowed ({str(error).splitlines()[0]}); nothing of it "
                            "was saved; likely cause: "
                            f"{nonfinite_causes(config, batch.rewards)}") from None


def held_out_evaluation(run: TrainingRun, step: int) -> dict:
    """Step 6: held-out pass@k after `step` updates (eval.evaluate); returns its record ("step",
    "eval/..." keys)."""
    config, inputs = run.config, run.inputs
    tqdm.write(f"evaluation after {step} steps: {len(inputs.eval_problems)} held-out problems x "
               f"{config.eval_samples} sample(s) at temperature {config.eval_temperature:g}; a few "
               "of them, planning tokens highlighted:")
    with run.precision.autocast():
        summary, records = evaluate(run.model, run.tokenizer, inputs.eval_problems,
                                    samples=config.eval_samples,
                                    temperature=config.eval_temperature,
                                    max_new_tokens=config.max_new_tokens,
                                    batch_size=config.prompts_per_step * config.group_size,
                                    reward_fn=inputs.reward_fn, progress=False,
                                    prompt_format=inputs.prompt_format)
    show_samples(run.dir, step, records, inputs.grams)
    run.model.train()
    record = {"step": step, **{f"eval/{k}": v for k, v in summary.items()
                               if isinstance(v, (int, float))}}
    tqdm.write(f"held-out after {step} steps: {format_eval(record)}")
    return record


def step_problems(run: TrainingRun, step: int) -> list[Problem]:
    """Step 1's problems: --prompts-per-step of the training set, in prompts_for_step's order."""
    config, problems = run.config, run.inputs.train_problems
    return [problems[i] for i in prompts_for_step(len(problems), step, config.prompts_per_step,
                                                  config.seed)]


def step_figures(run: TrainingRun, batch: StepBatch, problems: list[Problem]) -> dict[str, float]:
    """metrics.step_metrics of a step's batch (each problem once per completion of its group)."""
    per_completion = [p for p in problems for _ in range(run.config.group_size)]
    return step_metrics(batch, per_completion, run.inputs.grams, run.relative,
                        run.config.loss_agg == "seq-mean-token-mean", run.inputs.source_figures)


def every(interval: int, step: int, last: bool) -> bool:
    """Whether an action done every `interval` steps (0: at the last step only) is due after
    `step`."""
    return last or bool(interval and (step + 1) % interval == 0)


def train(config: TrainConfig) -> Path:
    """Set up the run (training_run.start_run: new, or resumed), then run the paper's step until
    --steps."""
    with start_run(config) as run:
        inputs = run.inputs
        if config.eval_every and run.start_step == 0 and config.steps > 0:
            run.log.log(held_out_evaluation(run, 0))
        tqdm.write(PROGRESS_LEGEND)
        bar = tqdm(range(run.start_step, config.steps), initial=run.start_step, total=config.steps,
                   desc=config.algo, dynamic_ncols=True)
        for step in bar:
            started = time.time()
            # Steps 1-4: G completions per problem, their rewards, group advantages, per-token
            # shaping by --algo.
            problems = step_problems(run, step)
            batch = rollout_step(config, run.model, run.ref_model, run.tokenizer, problems,
                                 inputs.grams, inputs.reward_fn, inputs.prompt_format,
                                 inputs.placebo, run.precision)
            rollout_seconds = time.time() - started
            # Step 5: the clipped surrogate, one optimizer step per PPO epoch.
            lr = set_learning_rate(run.optimizer, config, step)
            update = policy_update(config, run.model, run.optimizer, batch, run.precision)
            check_weights_finite(config, run.model, step, batch.rewards)
            # Step 6: log, evaluate, save.
            record = {"step": step, **step_figures(run, batch, problems), **update, "lr": lr,
                      "rollout_seconds": rollout_seconds, "step_seconds": time.time() - started}
            run.log.log(record)
            run.guards.after_update(step, batch, update, inputs.reward_fn, problems)
            last = step == config.steps - 1
            if config.eval_every and every(config.eval_every, step, last):
                run.log.log(held_out_evaluation(run, step + 1))
            bar.set_postfix(progress_figures(record))
            if every(config.save_every, step, last):
                run.save(step)
    print_summary(run.dir)
    return run.dir


def main(argv: list[str] | None = None) -> None:
    """Parse, check and train; every failure ends in one `error: ...` line and an exit code
    (cli.run_to_exit_code)."""
    escape_unprintable_output()
    try:
        config = parse_args(argv)
    except InputError as error:
        sys.exit(report(error))
    run_dir = Path(config.out)

    def resume_hint() -> str | None:
        return (f"python train.py --resume {shlex.quote(str(run_dir))}"
                if (run_dir / "metrics.jsonl").exists() else None)

    run_to_exit_code(lambda: train(config), resume_hint)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # "Loading weights" / "Writing model shards": not this run's news
    transformers.utils.logging.disable_progress_bar()
    main()
