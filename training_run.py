"""A training run set up for train.py's loop, new or resumed, in one call (`start_run`).

Order matters, so that bad input changes nothing on disk: the inputs (problems, grams, reward, and a
new run's model) load and are checked before RUN_DIR is claimed (run_folder.claim: one writer); a
resumed run settles its checkpoints under the claim, then loads the newest (checkpoint.py). What the
loop reads is one `TrainingRun`: the model and optimizer, the inputs, the log, the guards and the
first step to run.
"""

import contextlib
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import run_folder
from config import TrainConfig, record_changed_settings, saved_settings, write_config
from data import Problem, load_problems, source_of
from gram_sets.placebo import placebo_grams_for
from grams import load_grams
from guards import Guards
from machine import choose_threads, resolve_micro_batch_tokens
from metrics import RelativeToFirst
from model_loading import load_policy
from precision import MixedPrecision
from reward import load_reward
from rollout import PromptFormat, check_prompts_fit, prompt_format_from_args
from run_folder import write_atomically
from runlog import RunLog, check_installed, record_environment


@dataclass
class Inputs:
    """What a run reads besides its model, loaded and checked before anything is written."""

    train_problems: list[Problem]
    eval_problems: list[Problem]  # empty when --eval-every 0
    grams: list[str]  # the strategic grams (--grams)
    placebo: list[str] | None  # --algo placebo's grams, else None
    reward_fn: Callable
    prompt_format: PromptFormat
    # figures of --data's problem source (data.ProblemSource.batch_figures)
    source_figures: Callable | None


@dataclass
class TrainingRun:
    """Everything train.py's loop reads: set up once by `start_run`."""

    config: TrainConfig
    dir: Path
    inputs: Inputs
    precision: MixedPrecision
    model: torch.nn.Module
    tokenizer: object
    ref_model: torch.nn.Module | None  # the frozen reference, only when --beta > 0
    optimizer: torch.optim.Optimizer
    log: RunLog
    relative: RelativeToFirst  # metrics relative to their step-0 value
    guards: Guards
    start_step: int

    def save(self, step: int) -> None:
        """The checkpoint after `step` (checkpoint.save: written whole, then renamed into place)."""
        checkpoint.save(self.dir, self.model, self.tokenizer, self.optimizer, self.precision.scaler,
                        step, self.relative, self.guards.nonfinite_streak,
                        self.config.keep_checkpoints)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_inputs(config: TrainConfig) -> Inputs:
    """The run's problems, grams, placebo grams, reward and prompt format; InputError for any that
    does not load."""
    train_problems = load_problems(config.data, flag="--data")
    if len(train_problems) < config.prompts_per_step:
        tqdm.write(f"note: --data has {len(train_problems)} problems, fewer than "
                   f"--prompts-per-step {config.prompts_per_step}: each step holds some of them "
                   "more than once")
    eval_problems = (load_problems(config.eval_data, limit=config.eval_limit, flag="--eval-data")
                     if config.eval_every else [])
    grams = load_grams(config.grams)
    placebo = (placebo_grams_for(config.data, train_problems, grams, config.seed)
               if config.algo == "placebo" else None)
    reward_fn, prompt_format = load_reward(config.reward), prompt_format_from_args(config)
    check_installed(config.report_to)
    source = source_of(config.data)
    return Inputs(train_problems, eval_problems, grams, placebo, reward_fn, prompt_format,
                  source.batch_figures if source else None)


def load_checked_policy(config: TrainConfig, latest: Path | None, inputs: Inputs):
    """(model, tokenizer, reference) of model_loading.load_policy, its micro-batch token cap chosen
    when unset (machine.resolve_micro_batch_tokens), and every prompt checked to fit its
    positions."""
    model, tokenizer, ref_model = load_policy(config, latest)
    resolve_micro_batch_tokens(config, model)
    problems = [p.problem for p in inputs.train_problems + inputs.eval_problems]
    check_prompts_fit(model, tokenizer, problems, inputs.prompt_format, config.max_new_tokens)
    return model, tokenizer, ref_model


def newest_checkpoint(run_dir: Path) -> Path | None:
    """A resumed run's newest complete checkpoint (checkpoint.settle_checkpoints), or None: it
    starts again."""
    latest = checkpoint.settle_checkpoints(run_dir)
    if latest is None:
        print(f"--resume: {run_dir} has no complete checkpoint yet; starting it again from step 0",
              file=sys.stderr)
    return latest


@contextlib.contextmanager
def start_run(config: TrainConfig) -> Iterator[TrainingRun]:
    """Set up the run of `config` (new, or --resume from its newest checkpoint) under the claim on
    its folder; leaving closes the log and releases the folder."""
    run_dir, resuming = Path(config.out), bool(config.resume)
    run_folder.check_out(run_dir, resuming)
    # recorded in config.json: a resume keeps the count
    config.threads, why = choose_threads(config.threads)
    torch.set_num_threads(config.threads)
    tqdm.write(f"threads: {config.threads} ({why})")
    precision = MixedPrecision(config.device, config.dtype)
    tqdm.write(f"precision: {precision.describe()}")
    seed_everything(config.seed)
    inputs = load_inputs(config)
    # a model that fails writes nothing
    policy = None if resuming else load_checked_policy(config, None, inputs)
    with run_folder.claim(run_dir, resuming):  # one writer; a failed start leaves no folder behind
        if not resuming:
            write_config(run_dir, config)
        if inputs.placebo is not None:
            write_atomically(run_dir / "placebo_grams.txt",
                             "".join(f"{g}\n" for g in inputs.placebo))
        latest = newest_checkpoint(run_dir) if resuming else None
        model, tokenizer, ref_model = policy or load_checked_policy(config, latest, inputs)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=config.lr, weight_decay=config.weight_decay)
        start_step, relative, nonfinite_streak = checkpoint.resume(run_dir, latest, optimizer,
                                                                   precision.scaler)
        if resuming:
            record_changed_settings(run_dir, config, start_step)
        # TensorBoard keeps what the checkpoint covers: its step's record and the evaluation logged
        # after it
        first_unsaved_step = start_step + 1 if latest is not None else 0
        log = RunLog(run_dir, config.report_to, saved_settings(config), first_unsaved_step,
                     config.max_new_tokens)
        record_environment(run_dir, start_step, precision.device)
        if start_step >= config.steps:
            tqdm.write(f"{run_dir} has already trained {start_step} steps "
                       f"(--steps {config.steps}): nothing to do; raise --steps to continue")
        yield TrainingRun(config, run_dir, inputs, precision, model, tokenizer, ref_model,
                          optimizer, log, relative, Guards(config, nonfinite_streak), start_step)
        log.close()
