"""The checks that stop a training run which cannot go on, each ending it in one line
(cli.TrainingError):

- weights that became inf or NaN are never saved (`check_weights_finite`);
- --max-nonfinite-steps optimizer passes in a row skipped for a non-finite loss or gradient norm;
- FAILED_REWARD_STEPS steps in a row on which every grading failed: the reward is broken, not the
  model.
Each names the likely cause (`nonfinite_causes`). train.py calls `Guards.after_update` once a step.
"""

import torch

from cli import TrainingError
from grading import describe_failure

# steps in a row on which every grading failed: the reward is broken, not the model
FAILED_REWARD_STEPS = 3


def nonfinite_causes(config, rewards: torch.Tensor) -> str:
    """The likely causes of non-finite training, most specific first. rewards: [B]."""
    causes = []
    if not torch.isfinite(rewards).all():
        causes.append("the reward function returned NaN or inf")
    if config.dtype == "float16":
        causes.append("--dtype float16 overflowing (try --dtype bfloat16, which has float32's "
                      "range)")
    causes.append(f"a learning rate too high (--lr {config.lr:g})")
    return "; ".join(causes)


def check_weights_finite(config, model, step: int, rewards: torch.Tensor) -> None:
    """A run never saves non-finite weights: an update that leaves one inf or NaN stops it
    (TrainingError)."""
    if not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
        raise TrainingError(f"step {step}: the update made weights inf or NaN; they were not "
                            f"saved; likely cause: {nonfinite_causes(config, rewards)}")


class Guards:
    """The two streaks a run watches: skipped (non-finite) updates, kept in checkpoints so a resumed
    run counts on, and steps whose every grading failed."""

    def __init__(self, config, nonfinite_streak: int = 0):
        self.config, self.nonfinite_streak, self.failed_reward_streak = config, nonfinite_streak, 0

    def after_update(self, step: int, batch, update: dict, reward_fn, problems: list) -> None:
        """Count this step into both streaks; TrainingError when one reaches its limit. batch:
        train.StepBatch; update: train.policy_update's totals; problems: the step's problems (the
        first one's answer goes into the message)."""
        config = self.config
        self.nonfinite_streak = self.nonfinite_streak + 1 if update["nonfinite_updates"] else 0
        if self.nonfinite_streak >= config.max_nonfinite_steps:
            raise TrainingError(f"{self.nonfinite_streak} steps in a row (to step {step}) had a "
                                f"non-finite loss or gradient norm and were skipped; likely cause: "
                                f"{nonfinite_causes(config, batch.rewards)}")
        every_grading_failed = batch.reward_errors == len(batch.rewards)
        self.failed_reward_streak = self.failed_reward_streak + 1 if every_grading_failed else 0
        if self.failed_reward_streak >= FAILED_REWARD_STEPS:
            what = describe_failure(reward_fn, batch.rollout.texts[0], problems[0].answer,
                                    config.reward_timeout)
            raise TrainingError(f"--reward {config.reward}: every grading failed on "
                                f"{self.failed_reward_streak} steps in a row (to step {step}); on "
                                f"the first completion it {what}")
