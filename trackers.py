"""Optional experiment trackers (`train.py --report-to tensorboard wandb`): a copy of metrics.jsonl for the
dashboards people already use. metrics.jsonl stays the source of truth; a tracker only mirrors its lines.

- tensorboard: `torch.utils.tensorboard.SummaryWriter` writing to RUN_DIR/tensorboard (offline; needs
  `pip install tensorboard`). Training keys are logged as `train/KEY`, held-out keys keep their `eval/`
  prefix; the global step is the record's "step". Events from step `purge_from` on are dropped when the
  writer opens (train.py: a resumed run's lines after its checkpoint, or all of them when it restarts).
- wandb: `wandb.init` with the run's flags as config, files under RUN_DIR/wandb (needs `pip install wandb`
  and a login, or WANDB_MODE=offline); the project is $WANDB_PROJECT, or "hicra".
Neither package is in requirements.txt; asking for a tracker that is not installed is a one-line error.
"""

import importlib.util
import os
from pathlib import Path

from data import InputError

TRACKERS = ("tensorboard", "wandb")  # --report-to names, each also the package it needs


def check_installed(names: list[str]) -> None:
    """InputError naming the flag for a requested tracker whose package is missing (checked before any work)."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise InputError(f"--report-to {name}: the {name} package is not installed (pip install {name})")


def scalars(record: dict) -> dict[str, float]:
    """The numeric values of a metrics record under their dashboard names (see the module docstring)."""
    return {
        key if key.startswith("eval/") else f"train/{key}": float(value)
        for key, value in record.items()
        if key != "step" and isinstance(value, (int, float))
    }


class TensorBoardTracker:
    """One SummaryWriter in RUN_DIR/tensorboard: add_scalar per key and record."""

    def __init__(self, run_dir: Path, purge_from: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_from)

    def log(self, record: dict) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One wandb run named after the run directory; wandb.log per record at the record's step."""

    def __init__(self, run_dir: Path, config: dict):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "hicra"), name=run_dir.name, dir=str(run_dir), config=config)

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def open_trackers(names: list[str], run_dir: Path, config: dict, purge_from: int) -> list:
    """The trackers of --report-to (each name once), opened on the run directory; TensorBoard drops its
    events from step `purge_from` on."""
    trackers = []
    for name in dict.fromkeys(names):
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(run_dir, purge_from))
        elif name == "wandb":
            trackers.append(WandbTracker(run_dir, config))
    return trackers
