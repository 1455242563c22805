"""Train a causal LM with GRPO or HICRA on verifiable math problems.

    python train.py                                   # HICRA on the built-in world with the tiny model
    python train.py --model PATH_OR_ID --data gsm8k_train --algo grpo --max-new-tokens 512
    python train.py --config my_run.yaml --lr 1e-4    # settings from a file, a flag overriding one
    python train.py --resume runs/RUN                 # continue a run exactly where it stopped

One step (the loop in `train`):
  1. sample G = --group-size completions for each of --prompts-per-step problems (rollout.py);
  2. reward each completion with the verifier (reward.py);
  3. group-relative advantages, one per completion: A_i = r_i - mean(r_group) (grpo.group_advantages);
  4. per-token advantages by --algo (`shape_advantages`):
       grpo          A_i on every token (clip-higher GRPO, the paper's baseline)
       hicra         A_i + alpha * |A_i| on planning tokens (Sec. 3, hicra.hicra_advantages)
       entropy_reg   grpo plus an entropy bonus on all tokens (the paper's entropy-regularisation baseline)
       high_entropy  the HICRA amplification on the top-q entropy tokens instead (the paper's ablation)
       placebo       the HICRA amplification on placebo n-grams instead of the strategic grams: as many
                     n-grams as --grams holds, with the same lengths, drawn (seeded by --seed) from the
                     non-strategic text of a corpus (grams.placebo_grams_for), written to RUN_DIR/placebo_grams.txt;
       random_spans  the HICRA amplification on random spans matched in count and length to each completion's
                     planning tokens (hicra.matched_random_mask): the same dose, placed without regard to meaning;
       hicra_verl    the set the authors' VeRL code reportedly amplified (hicra.verl_recipe_mask, second-hand):
                     in groups with a completion whose A > 0, all planning tokens, plus the top --entropy-top-q
                     entropy tokens of the correct completions longer than their group's mean;
  5. the clipped surrogate over micro-batches, one optimizer step per --ppo-epochs pass (`policy_update`);
  6. log the step, evaluate on held-out problems every --eval-every steps, checkpoint every --save-every.

Departures from textbook GRPO, each a choice the paper leaves open (README, "Deliberate choices"):
mean-centred advantages without std scaling (as the paper writes them; --advantage std for the original),
clip-higher (eps_low 0.2, eps_high 0.28), token-mean loss and no KL (DAPO's defaults); the old log-probs are
the sampler's own, recorded from the logits each token was drawn from (rollout.py; under mixed precision the
first update pass's), so with one PPO epoch the ratio is 1 and the clip never acts (--ppo-epochs 2 brings it in).
Weights and AdamW state are float32; --dtype bfloat16 / float16 (the default on a GPU: bf16) is mixed precision,
forward and backward under autocast (precision.py).

Plumbing lives in named files: settings and flags in config.py, model loading in model_loading.py,
checkpoints and kill-safe resume in checkpoint.py, the run folder's ownership in run_folder.py,
metrics.jsonl, samples and trackers in runlog.py, exit codes in cli.py. Bad input exits with one line
`error: ...` on stderr and exit code 2, before anything is written (docs/failures.md lists every case).
"""

import os
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while torch and transformers load: exit 130 quietly, not an import's traceback
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))  # nothing written yet; no library can catch it

import math  # noqa: E402  (the handler above comes first)
import random  # noqa: E402
import shlex  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm import tqdm

import checkpoint
import grams as grams_lib
import run_folder
from cli import InputError, TrainingError, escape_unprintable_output, report, run_to_exit_code
from config import TrainConfig, record_changed_settings, saved_settings, write_config
from config import parse_config as parse_args
from data import Problem, load_problems
from eval import evaluate, prompt_format_from_args
from grading import describe_failure, score_completions
from grpo import aggregate_loss, clip_fractions, clipped_policy_loss, group_advantages, kl_k3
from hicra import amplified_mask, hicra_advantages
from metrics import step_metrics
from model_loading import choose_threads, load_policy
from precision import FLOAT32, MixedPrecision
from reward import load_reward
from run_folder import write_atomically
from rollout import (PromptFormat, RolloutBatch, activation_checkpointing, check_prompts_fit, completion_logprobs,
                     format_prompt, generate_rollouts, micro_batches)
from runlog import (PROGRESS_LEGEND, RunLog, check_installed, format_eval, print_summary, progress_figures,
                    record_environment, show_samples)


FAILED_REWARD_STEPS = 3  # steps in a row on which every grading failed: the reward is broken, not the model


@dataclass
class StepBatch:
    """One step's rollouts with everything the update needs."""

    rollout: RolloutBatch
    rewards: torch.Tensor  # [B]
    reward_errors: int  # completions whose grading failed (scored 0)
    token_advantages: torch.Tensor  # [B, C]
    planning_mask: torch.Tensor  # [B, C] bool
    amplified_mask: torch.Tensor | None  # [B, C] bool, tokens whose advantage --algo amplifies; None: no amplification
    entropy_coef: float  # weight of the entropy bonus in the loss (--algo entropy_reg), else 0
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


def shape_advantages(config: TrainConfig, advantages: torch.Tensor, rollout: RolloutBatch, planning_mask: torch.Tensor,
                     tokenizer, placebo: list[str] | None) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Step 4: per-token advantages [B, C] from per-completion advantages [B], by --algo.

    Returns (token advantages, the tokens amplified or None, the entropy bonus coefficient). HICRA and its
    controls differ only in which tokens get A + alpha * |A| (Sec. 3); entropy_reg adds a bonus to the loss.
    """
    selection = planning_mask  # [B, C] bool
    if config.algo == "placebo":
        selection = grams_lib.batch_planning_mask(tokenizer, rollout.completion_ids, rollout.completion_mask, placebo)
    amplified = amplified_mask(config.algo, advantages, selection, rollout.entropy, rollout.completion_mask,
                               config.group_size, config.entropy_top_q)  # [B, C] bool or None (grpo, entropy_reg)
    if amplified is None:
        token_advantages = advantages[:, None].expand_as(rollout.completion_mask)  # [B, C]: A_i on every token
    else:
        token_advantages = hicra_advantages(advantages, amplified, config.alpha)  # [B, C]
    entropy_coef = config.entropy_coef if config.algo == "entropy_reg" else 0.0
    return token_advantages, amplified, entropy_coef


def rollout_step(config: TrainConfig, model, ref_model, tokenizer, problems: list[Problem], grams: list[str], reward_fn,
                 prompt_format: PromptFormat = PromptFormat(), placebo: list[str] | None = None,
                 precision: MixedPrecision = FLOAT32) -> StepBatch:
    """Steps 1-4: sample, reward, group advantages, per-token shaping."""
    prompts = [format_prompt(tokenizer, p.problem, prompt_format) for p in problems]
    with precision.autocast():
        rollout = generate_rollouts(model, tokenizer, prompts, config.group_size, config.max_new_tokens,
                                    config.temperature, config.top_p)
    answers = [p.answer for p in problems for _ in range(config.group_size)]
    rewards, reward_errors = score_completions(reward_fn, rollout.texts, answers, config.reward_timeout)
    rewards = torch.tensor(rewards, dtype=torch.float32, device=rollout.completion_mask.device)  # [B]
    advantages = group_advantages(rewards, config.group_size, config.advantage)  # [B]
    planning_mask = grams_lib.batch_planning_mask(tokenizer, rollout.completion_ids, rollout.completion_mask, grams)
    ref_logp = None
    if ref_model is not None:
        with torch.no_grad(), precision.autocast():
            ref_logp, _ = completion_logprobs(ref_model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                              rollout.completion_mask, config.temperature, config.logprob_chunk)  # [B, C]
    token_advantages, amplified, entropy_coef = shape_advantages(config, advantages, rollout, planning_mask, tokenizer,
                                                                 placebo)
    return StepBatch(rollout, rewards, reward_errors, token_advantages, planning_mask, amplified, entropy_coef, ref_logp)


def micro_batch_loss(config: TrainConfig, model, batch: StepBatch, rows: torch.Tensor, first_pass: bool,
                     precision: MixedPrecision = FLOAT32) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of the micro-batch `rows` [b] (its share of the whole batch's loss, so the shares' gradients add
    up to the full-batch gradient) and its statistics, each already divided by --ppo-epochs.

    Per token: the clipped surrogate (grpo.clipped_policy_loss) + beta * KL - entropy_coef * entropy,
    normalised by --loss-agg over the whole batch. Under mixed precision the forward runs under autocast and
    the first pass's log-probs become pi_old (written into the rollout: the weights have not moved yet, and the
    sampler's cached decode rounds differently).
    """
    rollout, epochs = batch.rollout, config.ppo_epochs
    batch_tokens = rollout.completion_mask.sum().clamp(min=1)
    mask = rollout.completion_mask[rows]  # [b, C]
    with precision.autocast():
        logp, entropy = completion_logprobs(model, rollout.prompt_ids[rows], rollout.prompt_mask[rows],
                                            rollout.completion_ids[rows], mask, config.temperature,
                                            config.logprob_chunk)  # [b, C], [b, C] float32
    if precision.mixed and first_pass:
        rollout.old_logp[rows] = logp.detach()
    old_logp, advantages = rollout.old_logp[rows], batch.token_advantages[rows]  # [b, C], [b, C]
    per_token = clipped_policy_loss(logp, old_logp, advantages, config.eps_low, config.eps_high)  # [b, C]
    stats = {}
    if batch.ref_logp is not None:
        kl = kl_k3(logp, batch.ref_logp[rows])  # [b, C]
        per_token = per_token + config.beta * kl
        stats["kl"] = ((kl * mask).sum() / batch_tokens).item() / epochs
    if batch.entropy_coef:
        per_token = per_token - batch.entropy_coef * entropy  # [b, C]
    loss = aggregate_loss(per_token, mask, config.loss_agg, batch_tokens, len(rollout.texts), config.max_new_tokens)
    clipped = clip_fractions(logp, old_logp, advantages, mask, config.eps_low, config.eps_high)
    share = mask.sum() / batch_tokens / epochs  # of the batch's loss-carrying tokens, per epoch
    stats.update(loss=loss.item() / epochs, clip_low=(clipped.low * share).item(), clip_high=(clipped.high * share).item())
    return loss, stats


def policy_update(config: TrainConfig, model, optimizer, batch: StepBatch,
                  precision: MixedPrecision = FLOAT32) -> dict[str, float]:
    """Step 5: --ppo-epochs optimizer steps over the batch, gradients accumulated over micro-batches.

    An optimizer step whose loss or gradient norm is not finite is skipped (gradients dropped) and counted in
    "nonfinite_updates": one NaN would otherwise spread to every weight. float16's loss is scaled for the
    backward and its gradients unscaled before the clip (precision.py).
    """
    rollout = batch.rollout
    totals = {"loss": 0.0, "clip_low": 0.0, "clip_high": 0.0, "kl": 0.0, "grad_norm": 0.0, "nonfinite_updates": 0}
    row_groups = micro_batches(rollout.lengths, rollout.group_size, rollout.prompt_ids.shape[1], config.micro_batch_size,
                               config.micro_batch_tokens or 0, shared_prompts=not activation_checkpointing(model))
    model.train()
    for epoch in range(config.ppo_epochs):
        finite_loss = True
        for rows in row_groups:  # [b] row indices
            loss, stats = micro_batch_loss(config, model, batch, rows, epoch == 0, precision)
            precision.scaler.scale(loss).backward()
            finite_loss = finite_loss and math.isfinite(stats["loss"])
            for key, value in stats.items():
                totals[key] += value
        precision.scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                   config.grad_clip if config.grad_clip > 0 else float("inf"))
        totals["grad_norm"] += grad_norm.item() / config.ppo_epochs
        if finite_loss and math.isfinite(grad_norm.item()):
            optimizer_step(config, optimizer, batch, precision.scaler)
        else:
            totals["nonfinite_updates"] += 1
        precision.scaler.update()  # float16: a lower loss scale after an overflow (a no-op otherwise)
        optimizer.zero_grad(set_to_none=True)
    return totals


def set_learning_rate(optimizer, config: TrainConfig, step: int) -> float:
    """--lr, ramped up linearly over --warmup-steps: lr * min(1, (step + 1) / warmup). A function of the step and
    the flags alone, so a resumed run with another --lr or --weight-decay uses it from its first step on."""
    lr = config.lr * min(1.0, (step + 1) / max(config.warmup_steps, 1))
    for group in optimizer.param_groups:
        group.update(lr=lr, weight_decay=config.weight_decay)
    return lr


def optimizer_step(config: TrainConfig, optimizer, batch: StepBatch, scaler: torch.amp.GradScaler) -> None:
    """optimizer.step() (through the float16 loss scaler, which passes it on when disabled), with a step size the
    weights' dtype cannot hold (e.g. --lr 1e39 in float32) as a TrainingError."""
    try:
        scaler.step(optimizer)
    except RuntimeError as error:
        if "overflow" not in str(error):
            raise
        raise TrainingError(f"the update overflowed ({str(error).splitlines()[0]}); nothing of it was saved; "
                            f"likely cause: {nonfinite_causes(config, batch.rewards)}") from None


def nonfinite_causes(config: TrainConfig, rewards: torch.Tensor) -> str:
    """The likely causes of non-finite training, most specific first. rewards: [B]."""
    causes = []
    if not torch.isfinite(rewards).all():
        causes.append("the reward function returned NaN or inf")
    if config.dtype == "float16":
        causes.append("--dtype float16 overflowing (try --dtype bfloat16, which has float32's range)")
    causes.append(f"a learning rate too high (--lr {config.lr:g})")
    return "; ".join(causes)


def count_failed_rewards(config: TrainConfig, streak: int, step: int, batch: StepBatch, reward_fn,
                         problems: list[Problem]) -> int:
    """The count of steps in a row on which every grading failed (raised, timed out, returned no number);
    FAILED_REWARD_STEPS of them stop the run, naming the reward and what it did on the first completion."""
    streak = streak + 1 if batch.reward_errors == len(batch.rewards) else 0
    if streak >= FAILED_REWARD_STEPS:
        what = describe_failure(reward_fn, batch.rollout.texts[0], problems[0].answer, config.reward_timeout)
        raise TrainingError(f"--reward {config.reward}: every grading failed on {streak} steps in a row (to step "
                            f"{step}); on the first completion it {what}")
    return streak


def check_weights_finite(config: TrainConfig, model, step: int, rewards: torch.Tensor) -> None:
    """A run never saves non-finite weights: an update that leaves one inf or NaN stops it (TrainingError)."""
    if not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
        raise TrainingError(f"step {step}: the update made weights inf or NaN; they were not saved; likely cause: "
                            f"{nonfinite_causes(config, rewards)}")


def count_nonfinite(config: TrainConfig, streak: int, update: dict, step: int, rewards: torch.Tensor) -> int:
    """The count of skipped (non-finite) steps in a row after this one; --max-nonfinite-steps of them stop the run."""
    streak = streak + 1 if update["nonfinite_updates"] else 0
    if streak >= config.max_nonfinite_steps:
        raise TrainingError(f"{streak} steps in a row (to step {step}) had a non-finite loss or gradient norm and "
                            f"were skipped; likely cause: {nonfinite_causes(config, rewards)}")
    return streak


def held_out_evaluation(config: TrainConfig, model, tokenizer, problems: list[Problem], grams: list[str], run_dir: Path,
                        step: int, reward_fn, prompt_format, precision: MixedPrecision) -> dict:
    """Step 6: held-out pass@k after `step` updates (eval.evaluate); returns its record ("step", "eval/..." keys)."""
    tqdm.write(f"evaluation after {step} steps: {len(problems)} held-out problems x {config.eval_samples} "
               f"sample(s) at temperature {config.eval_temperature:g}; a few of them, planning tokens highlighted:")
    with precision.autocast():
        summary, records = evaluate(model, tokenizer, problems, samples=config.eval_samples,
                                    temperature=config.eval_temperature, max_new_tokens=config.max_new_tokens,
                                    batch_size=config.prompts_per_step * config.group_size, reward_fn=reward_fn,
                                    progress=False, prompt_format=prompt_format)
    show_samples(run_dir, step, records, grams)
    model.train()
    record = {"step": step, **{f"eval/{k}": v for k, v in summary.items() if isinstance(v, (int, float))}}
    tqdm.write(f"held-out after {step} steps: {format_eval(record)}")
    return record


def train(config: TrainConfig) -> Path:
    """Set up, then run the paper's step --steps times; returns the run directory."""
    run_dir, resuming = Path(config.out), bool(config.resume)
    run_folder.check_out(run_dir, resuming)
    config.threads, why = choose_threads(config.threads)  # recorded in config.json: a resume keeps the count
    torch.set_num_threads(config.threads)
    tqdm.write(f"threads: {config.threads} ({why})")
    precision = MixedPrecision(config.device, config.dtype)
    tqdm.write(f"precision: {precision.describe()}")
    seed_everything(config.seed)
    # Inputs first (data, grams, and the model of a new run): one that does not load changes nothing on disk.
    train_problems = load_problems(config.data, flag="--data")
    if len(train_problems) < config.prompts_per_step:
        tqdm.write(f"note: --data has {len(train_problems)} problems, fewer than --prompts-per-step "
                   f"{config.prompts_per_step}: each step holds some of them more than once")
    eval_problems = load_problems(config.eval_data, limit=config.eval_limit, flag="--eval-data") if config.eval_every \
        else []
    grams = grams_lib.load_grams(config.grams)
    placebo = None
    if config.algo == "placebo":
        placebo = grams_lib.placebo_grams_for(config.data, train_problems, grams, config.seed)
    reward_fn, prompt_format = load_reward(config.reward), prompt_format_from_args(config)
    check_installed(config.report_to)
    if not resuming:
        model, tokenizer, ref_model = load_policy(config, checkpoint=None)
        check_prompts_fit(model, tokenizer, [p.problem for p in train_problems + eval_problems], prompt_format,
                          config.max_new_tokens)
    with run_folder.claim(run_dir, resuming):  # one writer; a failed start leaves no folder behind
        if not resuming:
            write_config(run_dir, config)
        if placebo is not None:
            write_atomically(run_dir / "placebo_grams.txt", "".join(f"{g}\n" for g in placebo))
        latest = checkpoint.settle_checkpoints(run_dir) if resuming else None
        if resuming:
            if latest is None:
                print(f"--resume: {run_dir} has no complete checkpoint yet; starting it again from step 0", file=sys.stderr)
            model, tokenizer, ref_model = load_policy(config, latest)
            check_prompts_fit(model, tokenizer, [p.problem for p in train_problems + eval_problems], prompt_format,
                              config.max_new_tokens)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                      weight_decay=config.weight_decay)
        start_step, relative, nonfinite_streak = checkpoint.resume(run_dir, latest, optimizer, precision.scaler)
        if resuming:
            record_changed_settings(run_dir, config, start_step)
        log = RunLog(run_dir, config.report_to, saved_settings(config), purge_from=start_step + (latest is not None),
                     max_new_tokens=config.max_new_tokens)
        record_environment(run_dir, start_step, precision.device)
        if start_step >= config.steps:
            tqdm.write(f"{run_dir} has already trained {start_step} steps (--steps {config.steps}): nothing to do; "
                       "raise --steps to continue")
        world, failed_rewards = config.data.startswith("world"), 0

        tqdm.write(PROGRESS_LEGEND)
        bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps, desc=config.algo,
                   dynamic_ncols=True)
        for step in bar:
            if config.eval_every and step == 0:
                log.log(held_out_evaluation(config, model, tokenizer, eval_problems, grams, run_dir, 0, reward_fn,
                                            prompt_format, precision))
            started = time.time()
            # Steps 1-4: G completions per problem, their rewards, group advantages, per-token shaping by --algo.
            indices = prompts_for_step(len(train_problems), step, config.prompts_per_step, config.seed)
            problems = [train_problems[i] for i in indices]
            batch = rollout_step(config, model, ref_model, tokenizer, problems, grams, reward_fn, prompt_format, placebo,
                                 precision)
            rollout_seconds = time.time() - started
            # Step 5: the clipped surrogate, one optimizer step per PPO epoch.
            lr = set_learning_rate(optimizer, config, step)
            update = policy_update(config, model, optimizer, batch, precision)
            check_weights_finite(config, model, step, batch.rewards)
            # Step 6: log, evaluate, save.
            group_problems = [p for p in problems for _ in range(config.group_size)]
            record = {"step": step, **step_metrics(batch, group_problems, grams, world, relative,
                                                   config.loss_agg == "seq-mean-token-mean"), **update, "lr": lr,
                      "rollout_seconds": rollout_seconds, "step_seconds": time.time() - started}
            log.log(record)
            nonfinite_streak = count_nonfinite(config, nonfinite_streak, update, step, batch.rewards)
            failed_rewards = count_failed_rewards(config, failed_rewards, step, batch, reward_fn, group_problems)
            last_step = step == config.steps - 1
            if config.eval_every and (last_step or (step + 1) % config.eval_every == 0):
                log.log(held_out_evaluation(config, model, tokenizer, eval_problems, grams, run_dir, step + 1, reward_fn,
                                            prompt_format, precision))
            bar.set_postfix(progress_figures(record))
            if last_step or (config.save_every and (step + 1) % config.save_every == 0):
                checkpoint.save(run_dir, model, tokenizer, optimizer, precision.scaler, step, relative, nonfinite_streak,
                                config.keep_checkpoints)
        log.close()
    print_summary(run_dir)
    return run_dir


def main(argv: list[str] | None = None) -> None:
    """Parse, check and train; every failure ends in one `error: ...` line and an exit code (cli.run_to_exit_code)."""
    escape_unprintable_output()
    try:
        config = parse_args(argv)
    except InputError as error:
        sys.exit(report(error))
    run_dir = Path(config.out)

    def resume_hint() -> str | None:
        return f"python train.py --resume {shlex.quote(str(run_dir))}" if (run_dir / "metrics.jsonl").exists() else None

    run_to_exit_code(lambda: train(config), resume_hint)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" / "Writing model shards": not this run's news
    main()
