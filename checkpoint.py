"""Checkpoints and resume: a run survives a kill at any instant and resumes bit for bit.

RUN_DIR/checkpoint/ is the newest checkpoint: a Hugging Face folder (from_pretrained and eval.py
load it) plus the trainer state (optimizer, RNG states, the metric baseline, the non-finite streak)
as safetensors and JSON, never pickle, so resuming a downloaded run folder cannot run code.

Writing one (`save`): a fresh checkpoint.tmp-XXXX/ is written, every file fsync'ed, then
complete.json is written last (the step and every file's size): a folder without it is incomplete.
The previous checkpoint is renamed to checkpoint-N/ (N = updates done) and checkpoint.tmp-XXXX/ to
checkpoint/; all but the newest --keep-checkpoints are then deleted.

Resuming (`settle_checkpoints`, `resume`): the newest complete folder among these is taken, an
interrupted rename finished, incomplete leftovers deleted, and the metrics lines logged after that
checkpoint dropped; with no complete checkpoint the run starts again from step 0.

tests/test_faults.py kills a run between any two of these writes (and around each metrics line) and
checks that the resumed run logs exactly what an uninterrupted one does.
"""

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cli import InputError
from metrics import RelativeToFirst, is_eval_record, metrics_record
from run_folder import write_atomically

CHECKPOINT = "checkpoint"  # RUN_DIR/checkpoint: the newest complete checkpoint
# written last into a checkpoint folder: {"step": ..., "files": {name: bytes}}
COMPLETE_MARKER = "complete.json"
def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries (new names, renames), to disk; folders only where the OS
    allows."""
    if path.is_dir() and os.name == "nt":
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """checkpoint/, checkpoint-N/ and leftovers (checkpoint.tmp-XXXX/ being written, and
    checkpoint.tmp/, checkpoint.old/ of earlier versions). Symbolic links are never among them
    (run_folder.refuse_links)."""
    names = (CHECKPOINT, f"{CHECKPOINT}.tmp", f"{CHECKPOINT}.old")
    return sorted(
        p for p in run_dir.glob(f"{CHECKPOINT}*")
        if p.is_dir() and not p.is_symlink()
        and (p.name in names or p.name.startswith(f"{CHECKPOINT}.tmp-")
             or p.name.removeprefix(f"{CHECKPOINT}-").isdigit())
    )


def checkpoint_step(folder: Path) -> int | None:
    """The last finished step of a complete checkpoint folder; None when it is incomplete (no
    readable marker)."""
    try:
        return int(json.loads((folder / COMPLETE_MARKER).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_trainer_state(folder: Path, optimizer, scaler, step: int, relative: RelativeToFirst,
                        nonfinite_streak: int) -> None:
    """Optimizer tensors and torch RNG states to trainer_state.safetensors, the rest (the float16
    loss scaler's scale among it) to trainer_state.json."""
    optimizer_state = optimizer.state_dict()
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng/cuda/{i}": state
                        for i, state in enumerate(torch.cuda.get_rng_state_all())})
    for index, values in optimizer_state["state"].items():
        tensors.update({f"optimizer/{index}/{name}": value.contiguous().cpu()
                        for name, value in values.items()})
    python_rng, numpy_rng = random.getstate(), np.random.get_state()
    state = {
        "step": step,
        "nonfinite_streak": nonfinite_streak,
        "relative_baseline": relative.first,
        "optimizer_param_groups": optimizer_state["param_groups"],
        "grad_scaler": scaler.state_dict(),  # {} unless --dtype float16
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


def save(run_dir: Path, model, tokenizer, optimizer, scaler, step: int, relative: RelativeToFirst,
         nonfinite_streak: int, keep: int) -> None:
    """Write a fresh checkpoint.tmp-XXXX/ (complete.json last), make it checkpoint/, keep the newest
    `keep`."""
    # new and ours: no planted link inside
    temp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f"{CHECKPOINT}.tmp-"))
    temp.chmod(0o755)
    try:
        model.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        write_trainer_state(temp, optimizer, scaler, step, relative, nonfinite_streak)
        write_complete_marker(temp, step)
    # disk full, no permission: the older checkpoints stand
    except (OSError, SafetensorError) as error:
        shutil.rmtree(temp, ignore_errors=True)
        reason = (error.strerror if isinstance(error, OSError) and error.strerror
                  else str(error).splitlines()[0])
        raise OSError(f"{run_dir}: the checkpoint of step {step} could not be written "
                      f"({reason})") from None
    promote_checkpoint(run_dir, temp)
    prune_checkpoints(run_dir, keep)


def promote_checkpoint(run_dir: Path, source: Path) -> None:
    """Rename the complete checkpoint `source` to checkpoint/; the one it replaces becomes
    checkpoint-N/."""
    final = run_dir / CHECKPOINT
    if final.exists():
        previous = checkpoint_step(final)
        if previous is None:
            shutil.rmtree(final)
        else:
            # named by updates done, as HF Trainer does
            older = run_dir / f"{CHECKPOINT}-{previous + 1}"
            shutil.rmtree(older, ignore_errors=True)
            final.rename(older)
    source.rename(final)
    fsync_path(run_dir)


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete the checkpoint-N/ folders beyond the newest `keep - 1` (checkpoint/ is the
    keep-th)."""
    steps = {p: checkpoint_step(p) for p in checkpoint_folders(run_dir)
             if p.name.removeprefix(f"{CHECKPOINT}-").isdigit()}
    newest_first = sorted(steps, key=lambda p: -1 if steps[p] is None else steps[p], reverse=True)
    for folder in newest_first[keep - 1:]:
        shutil.rmtree(folder)


def marked_step(folder: Path) -> int | None:
    """The step of a checkpoint folder's complete.json on resume; None when there is none (a save
    killed before its marker: a leftover, deleted). A marker that exists but does not read as one
    (emptied, edited, truncated) is damage, not a leftover: InputError, and nothing is deleted."""
    marker = folder / COMPLETE_MARKER
    if not marker.exists():
        return None
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        problem = ("not readable JSON "
                   f"({str(error).splitlines()[0] if str(error) else type(error).__name__})")
    else:
        files = record.get("files") if isinstance(record, dict) else None
        step = record.get("step") if isinstance(record, dict) else None
        if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
            problem = f"its step is {step!r}, not a step number"
        elif not (isinstance(files, dict)
                  and all(isinstance(size, int) for size in files.values())):
            problem = "its files are not a mapping of names to sizes"
        else:
            return step
    raise InputError(f"{marker}: {problem}; the checkpoint is damaged and --resume deletes "
                     f"nothing. Remove {folder} to resume from an older checkpoint "
                     "(or from step 0), or start a new run with another --out")


def check_checkpoint_files(folder: Path) -> None:
    """One-line error naming the first file of a complete checkpoint that is missing or has changed
    size."""
    recorded = json.loads((folder / COMPLETE_MARKER).read_text())["files"]
    for name, size in recorded.items():
        path = folder / name
        found = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
        if found != f"{size} bytes":
            raise InputError(f"{path}: {found} where {COMPLETE_MARKER} records {size} bytes; the "
                             f"checkpoint is damaged (remove {folder} to resume from an older "
                             "checkpoint or from step 0)")


def settle_checkpoints(run_dir: Path) -> Path | None:
    """On resume: make the newest complete checkpoint RUN_DIR/checkpoint and delete incomplete
    leftovers.

    Returns it, or None when the run has no complete checkpoint (it then starts again from step 0).
    A trainer_state.pt (the pickle format of earlier versions, or a planted file) is refused:
    unpickling a file can run any code, and run folders are shared.
    """
    folders = checkpoint_folders(run_dir)
    for folder in folders:
        if (folder / "trainer_state.pt").exists():
            raise InputError(f"{folder / 'trainer_state.pt'}: a pickle trainer state (an earlier "
                             "version's format, or a planted file) is not loaded, since unpickling "
                             "can run code; start a new run")
    steps = {folder: marked_step(folder) for folder in folders}
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
        promote_checkpoint(run_dir, newest)
    return run_dir / CHECKPOINT


OPTIMIZER_SWITCHES = ("amsgrad", "maximize", "capturable", "differentiable", "fused", "foreach")


def check_optimizer_state(optimizer, per_parameter: dict[int, dict[str, torch.Tensor]],
                          groups: list[dict]) -> None:
    """ValueError unless a saved AdamW state fits `optimizer` (this run's, over this model's
    parameters): the same parameter groups and switches (amsgrad, ...), and for every parameter the
    fresh optimizer's state names with tensors of the parameter's shape. torch's load_state_dict
    checks none of it; the first step would fail, or train with moments that belong to other
    weights."""
    fresh = optimizer.state_dict()["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in fresh]:
        raise ValueError(f"parameter groups of {[len(g['params']) for g in groups]} parameters, "
                         f"this model's optimizer has {[len(g['params']) for g in fresh]}")
    for saved, own in zip(groups, fresh):
        for switch in OPTIMIZER_SWITCHES:
            if saved.get(switch) != own.get(switch):
                raise ValueError(f"AdamW {switch} {saved.get(switch)!r}, this run's optimizer has "
                                 f"{own.get(switch)!r}")
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    moments = {"exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if fresh[0].get("amsgrad") else set())
    for index, values in per_parameter.items():
        if not 0 <= index < len(parameters):
            raise ValueError(f"optimizer state for parameter {index}, this model has "
                             f"{len(parameters)}")
        if set(values) != moments | {"step"}:
            raise ValueError(f"optimizer state of parameter {index} holds {sorted(values)}, not "
                             f"{sorted(moments | {'step'})}")
        for name in moments:
            if values[name].shape != parameters[index].shape:
                raise ValueError(f"optimizer {name} of parameter {index} has shape "
                                 f"{list(values[name].shape)}, the parameter "
                                 f"{list(parameters[index].shape)}")


def restore_checkpoint(folder: Path, optimizer, scaler) -> tuple[int, RelativeToFirst, int]:
    """Restore optimizer, loss-scaler and RNG state (no pickle: safetensors and JSON only).

    Returns the last finished step, the metric baseline and the count of non-finite steps in a row.
    """
    tensors_path, json_path = folder / "trainer_state.safetensors", folder / "trainer_state.json"
    try:
        tensors = load_file(tensors_path)
    except (SafetensorError, OSError) as error:
        raise InputError(f"{tensors_path}: not a readable safetensors file "
                         f"({str(error).splitlines()[0]})") from None
    try:
        state = json.loads(json_path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{json_path}: not a readable trainer state "
                         f"({str(error).splitlines()[0]})") from None
    try:
        per_parameter: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            if key.startswith("optimizer/"):
                _, index, name = key.split("/")
                per_parameter.setdefault(int(index), {})[name] = tensor
        groups = [{**group, "betas": tuple(group["betas"])}  # JSON lists
                  for group in state["optimizer_param_groups"]]
        check_optimizer_state(optimizer, per_parameter, groups)
        optimizer.load_state_dict({"state": per_parameter, "param_groups": groups})
        # a float16 run's scale (absent before float16 trained)
        if state.get("grad_scaler") and scaler.is_enabled():
            scaler.load_state_dict(state["grad_scaler"])
        version, internal, gauss = state["rng_python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, *rest = state["rng_numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
        torch.set_rng_state(tensors["rng/torch"])
        cuda_states = [tensors[f"rng/cuda/{i}"]
                       for i in range(sum(k.startswith("rng/cuda/") for k in tensors))]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
        return state["step"], RelativeToFirst(state["relative_baseline"]), state["nonfinite_streak"]
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        raise InputError(f"{folder}: trainer state does not fit this run's model "
                         f"({str(error).splitlines()[0]}); nothing was changed") from None


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after the checkpoint of step `last_step` (a run stopped between a log and a
    save).

    Kept: training records up to `last_step` and evaluations up to `last_step + 1` updates. A last
    line without its newline (torn by a crash mid-write) is dropped; the file is replaced whole,
    never half-written.
    """
    if path.exists():
        # complete lines only: each ends with "\n"
        lines = path.read_text(encoding="utf-8").split("\n")[:-1]
        records = [metrics_record(line, f"{path}:{number}")
                   for number, line in enumerate(lines, 1) if line]
        kept = [r for r in records if r["step"] <= last_step + is_eval_record(r)]
        write_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))


def resume(run_dir: Path, checkpoint: Path | None, optimizer,
           scaler) -> tuple[int, RelativeToFirst, int]:
    """Restore the run's state from `checkpoint` (None: a run starting at step 0) and cut
    metrics.jsonl to it.

    Returns the first step to run, the metric baseline and the count of non-finite steps in a row.
    """
    if checkpoint is None:
        # a run restarted from step 0 logs every line again
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        return 0, RelativeToFirst(), 0
    last_step, relative, nonfinite_streak = restore_checkpoint(checkpoint, optimizer, scaler)
    truncate_metrics(run_dir / "metrics.jsonl", last_step)
    return last_step + 1, relative, nonfinite_streak
