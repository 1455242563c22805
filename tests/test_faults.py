"""Failure behaviour of train.py: kills at any instant, damaged or planted run folders, non-finite
training.

The kill test runs each training in a child process that SIGKILLs itself at a named point, resumes
in the next child, and compares the final records with an uninterrupted run's. The points are put in
from outside the code under test (`inject_fault` wraps the functions around each write in the
child), so production code carries no test hook. The children are forks of this test process, which
has imported torch and transformers already, so no child pays for the imports again. Forking is safe
only from a process with one thread (a lock held by another thread would stay held in the child
forever): tqdm's monitor thread is stopped first, and the test checks there is no other.
"""

import itertools
import json
import multiprocessing
import os
import pickle
import signal
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tqdm import tqdm
from tqdm._monitor import TMonitor
from transformers import AutoModelForCausalLM, PreTrainedModel

import checkpoint
import runlog
import train

STEPS = 10
# long enough for the tiny world model to finish most answers: rewards vary, so the updates move the
# weights
FLAGS = [
    "--data", "world_train", "--eval-data", "world", "--eval-limit", "2", "--eval-every", "4",
    "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "64", "--threads", "1",
    "--seed", "2",
]
KILLS = [  # (point, step[, "term"]): each run of the chain is killed at the next one (SIGKILL, or
    # SIGTERM with "term"), in the order the runs reach them
    # after the first metrics line, before any checkpoint: the resume starts at step 0 again
    ("step:logged", 0),
    ("save:start", 0),
    ("save:marker", 0),  # checkpoint.tmp/ is complete, checkpoint/ does not exist yet
    ("step:logging", 1),  # mid-step: the update is done, its metrics line is not written
    ("save:model", 1),
    ("save:tokenizer", 2),
    # after the held-out evaluation's line after step 3 (its record's step is 4)
    ("eval:logged", 4),
    ("save:state", 3),
    # checkpoint/ renamed to checkpoint-4/, checkpoint.tmp/ not yet renamed
    ("save:between_renames", 4),
    ("save:renamed", 4),  # the resume finishing that rename is itself killed
    ("save:renamed", 5),
    ("save:pruned", 6),
    # a scheduler's SIGTERM mid-step: stops as Ctrl-C does, resumes exactly
    ("step:logging", 7, "term"),
    ("step:logged", 7),
    # SIGTERM inside a checkpoint write: the half-written folder is dropped
    ("save:tokenizer", 8, "term"),
    ("save:marker", 8),
]
TIMING_KEYS = {"rollout_seconds", "step_seconds", "eval/wall_s", "eval/s_per_problem"}

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill test forks")


def inject_fault(fault: str) -> None:
    """Make this process kill itself (SIGKILL, or SIGTERM for "POINT:STEP:term") at the named point
    of a step.

    Points, each wrapping the function that does the write, in the order a step reaches them:
    step:logging / step:logged (eval:...), before / after the step's (evaluation's) metrics line;
    save:start, save:model, save:tokenizer, save:state, save:marker, before and between the writes
    of a checkpoint's files; save:between_renames, save:renamed, around the rename that makes it
    checkpoint/ (also when a resume finishes that rename); save:pruned, after older checkpoints are
    deleted.
    """
    term = fault.endswith(":term")
    point, step = fault.removesuffix(":term").rsplit(":", 1)
    kill = signal.SIGTERM if term else signal.SIGKILL
    current = {"step": None}

    def at(name: str, at_step) -> None:
        if name == point and at_step == int(step):
            os.kill(os.getpid(), kill)

    def wrap(owner, attribute: str, before: str | None = None, after: str | None = None,
             step_of=None) -> None:
        original = getattr(owner, attribute)

        def wrapped(*args, **kwargs):
            if step_of is not None:
                current["step"] = step_of(*args, **kwargs)
            if before:
                at(before, current["step"])
            result = original(*args, **kwargs)
            if after:
                at(after, current["step"])
            return result

        setattr(owner, attribute, wrapped)

    def append_line(path, line):
        record = json.loads(line)
        kind = "eval" if any(key.startswith("eval/") for key in record) else "step"
        at(f"{kind}:logging", record["step"])
        original_append(path, line)
        at(f"{kind}:logged", record["step"])

    original_append, runlog.append_line = runlog.append_line, append_line
    wrap(checkpoint, "save",
         step_of=lambda run_dir, model, tokenizer, optimizer, scaler, step, *rest: step)
    wrap(PreTrainedModel, "save_pretrained", before="save:start", after="save:model")
    wrap(checkpoint, "write_trainer_state", before="save:tokenizer", after="save:state")
    wrap(checkpoint, "write_complete_marker", after="save:marker")
    wrap(checkpoint, "promote_checkpoint", after="save:renamed",
         step_of=lambda run_dir, source: checkpoint.marked_step(source))
    wrap(checkpoint, "prune_checkpoints", after="save:pruned")
    original_rename = Path.rename

    def rename(self, target):
        # the complete checkpoint taking checkpoint/'s name
        if Path(target).name == checkpoint.CHECKPOINT:
            at("save:between_renames", current["step"])
        return original_rename(self, target)

    Path.rename = rename


def fault_child(argv: list[str], fault: str | None) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if fault:
        inject_fault(fault)
    train.main(argv)


def run_in_child(argv: list[str], fault: str | None = None) -> int:
    """Exit code of train.main(argv) run in a forked child; -SIGKILL when it killed itself."""
    assert threading.active_count() == 1, (
        f"cannot fork safely beside other threads: {threading.enumerate()}")
    child = multiprocessing.get_context("fork").Process(target=fault_child, args=(argv, fault))
    child.start()
    child.join(timeout=300)
    if child.exitcode is None:
        child.kill()
        child.join()
        pytest.fail(f"training with the fault {fault} hung")
    return child.exitcode


def records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def folders(run_dir) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.is_dir())


def test_killed_anywhere_and_resumed_a_run_logs_exactly_what_an_uninterrupted_run_logs(
        tmp_path, monkeypatch):
    # no new monitor thread for the bars of this process...
    monkeypatch.setattr(tqdm, "monitor_interval", 0)
    for thread in threading.enumerate():
        if isinstance(thread, TMonitor):  # ...and none left by an earlier test's progress bar
            thread.exit()
    flags = [*FLAGS, "--steps", str(STEPS), "--save-every", "1", "--keep-checkpoints", "2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_in_child([*flags, "--out", str(straight)]) == 0
    argv = [*flags, "--out", str(killed)]
    for point, step, *term in KILLS:
        code = run_in_child(argv, ":".join([point, str(step), *term]))
        expected = 143 if term else -signal.SIGKILL  # SIGTERM: train.main's exit code for it
        assert code == expected, (
            f"the run was not stopped at {point}:{step} {term} (exit code {code})")
        argv = ["--resume", str(killed)]
    assert run_in_child(argv) == 0
    assert records(killed) == records(straight)  # every step once, in order, with the same figures
    assert [r["step"] for r in records(killed) if "reward" in r] == list(range(STEPS))
    # the optimizer state matters
    assert sum(r.get("grad_norm", 0) > 0 for r in records(killed)) >= STEPS // 2
    assert folders(killed) == folders(straight) == ["checkpoint", f"checkpoint-{STEPS - 1}"]
    for name in ("checkpoint", f"checkpoint-{STEPS - 1}"):
        for file in ("model.safetensors", "trainer_state.safetensors"):
            weights = [load_file(run / name / file) for run in (straight, killed)]
            assert weights[0].keys() == weights[1].keys()
            assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), (name, file)
        states = [json.loads((run / name / "trainer_state.json").read_text())
                  for run in (straight, killed)]
        # optimizer settings, Python and NumPy RNG states, the non-finite streak
        assert states[0] == states[1]
    AutoModelForCausalLM.from_pretrained(killed / "checkpoint")  # still a plain HF folder


def short_run(out, *extra) -> None:
    train.main([*FLAGS, "--eval-every", "0", "--out", str(out), *extra])


def error_of(argv, capsys, code: int = 2) -> str:
    """The one-line error train.main(argv) stops with; `code` is the exit code expected (2: bad
    input, 1: a run that had to stop)."""
    with pytest.raises(SystemExit) as stop:
        train.main(argv)
    assert stop.value.code == code
    message = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bar
    assert message.startswith("error: "), message
    return message


class Planted:
    """Unpickling this creates the file `target`: what a malicious trainer state could do."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return open, (self.target, "w")


def test_planted_pickle_in_a_run_folder_is_refused_and_runs_nothing(tmp_path, capsys):
    pickle.loads(pickle.dumps(Planted(tmp_path / "proof")))  # the payload works when unpickled...
    assert (tmp_path / "proof").exists()
    out, target = tmp_path / "run", tmp_path / "pwned"
    short_run(out, "--steps", "1")
    payload = pickle.dumps(Planted(target))
    (out / "checkpoint" / "trainer_state.pt").write_bytes(payload)  # the format of earlier versions
    message = error_of(["--resume", str(out), "--steps", "2"], capsys)
    assert "trainer_state.pt" in message and "pickle" in message
    (out / "checkpoint" / "trainer_state.pt").unlink()
    state = out / "checkpoint" / "trainer_state.safetensors"
    # in place of the safetensors file, its size recorded as if written by train.py
    state.write_bytes(payload)
    marker = json.loads((out / "checkpoint" / checkpoint.COMPLETE_MARKER).read_text())
    marker["files"]["trainer_state.safetensors"] = len(payload)
    (out / "checkpoint" / checkpoint.COMPLETE_MARKER).write_text(json.dumps(marker))
    message = error_of(["--resume", str(out), "--steps", "2"], capsys)
    assert str(state) in message and "not a readable safetensors file" in message
    assert not target.exists()  # ...and never ran
    assert [r["step"] for r in records(out)] == [0]  # nothing trained, nothing lost


@pytest.mark.parametrize("name",
                         ["model.safetensors", "trainer_state.safetensors", "trainer_state.json"])
def test_truncated_checkpoint_file_is_a_one_line_error_naming_it(tmp_path, capsys, name):
    out = tmp_path / "run"
    short_run(out, "--steps", "1")
    damaged = out / "checkpoint" / name
    damaged.write_bytes(damaged.read_bytes()[:100])
    message = error_of(["--resume", str(out), "--steps", "2"], capsys)
    assert f"{damaged}: 100 bytes where complete.json records" in message
    assert damaged.exists() and [r["step"] for r in records(out)] == [0]


def test_resume_without_a_complete_checkpoint_starts_again_and_clears_leftovers(tmp_path, capsys):
    out = tmp_path / "run"
    short_run(out, "--steps", "2", "--save-every", "1")
    # as if killed before the marker was written
    (out / "checkpoint" / checkpoint.COMPLETE_MARKER).unlink()
    (out / "checkpoint.tmp").mkdir()
    (out / "checkpoint.old").mkdir()  # left by earlier versions killed between their two renames
    train.main(["--resume", str(out), "--steps", "2"])
    assert ("has no complete checkpoint yet; starting it again from step 0"
            in capsys.readouterr().err)
    assert [r["step"] for r in records(out)] == [0, 1]
    assert folders(out) == ["checkpoint"] and checkpoint.checkpoint_step(out / "checkpoint") == 1


DAMAGED_MARKERS = ["", "[1, 2]", '{"step": 0}', '{"step": null, "files": {}}',
                   '{"step": 0, "files": ["model.safetensors"]}', '{"step": "0", "files": {}}']


@pytest.mark.parametrize("keep, markers", [("2", DAMAGED_MARKERS), ("1", DAMAGED_MARKERS[:1])])
def test_a_damaged_complete_marker_is_refused_and_resume_deletes_nothing(tmp_path, capsys, keep,
                                                                         markers):
    out = tmp_path / "run"
    short_run(out, "--steps", "2", "--save-every", "1", "--keep-checkpoints", keep)
    before = {path: path.stat().st_size for path in out.rglob("*")
              if path.is_file() and path.name != ".lock"}
    damaged = out / "checkpoint" / checkpoint.COMPLETE_MARKER
    for marker in markers:  # nothing is deleted, so one run serves every marker
        damaged.write_text(marker)
        message = error_of(["--resume", str(out), "--steps", "3"], capsys)
        assert (message.startswith(f"error: {damaged}: ") and "damaged" in message
                and "deletes nothing" in message)
        after = {path: path.stat().st_size for path in out.rglob("*")
                 if path.is_file() and path.name != ".lock"}
        assert after.keys() == before.keys(), marker  # no checkpoint, no metrics line lost
        assert [r["step"] for r in records(out)] == [0, 1]


def test_checkpoint_old_and_an_incomplete_tmp_are_cleaned_on_resume(tmp_path):
    out = tmp_path / "run"
    short_run(out, "--steps", "1")
    (out / "checkpoint.tmp").mkdir()
    (out / "checkpoint.tmp" / "model.safetensors").write_bytes(b"half")
    (out / "checkpoint.old").mkdir()
    train.main(["--resume", str(out), "--steps", "2"])
    assert [r["step"] for r in records(out)] == [0, 1]
    assert folders(out) == ["checkpoint"]


def test_keep_checkpoints_keeps_the_newest_loadable_folders(tmp_path):
    out = tmp_path / "run"
    short_run(out, "--steps", "4", "--save-every", "1", "--keep-checkpoints", "3")
    assert folders(out) == ["checkpoint", "checkpoint-2", "checkpoint-3"]
    assert [checkpoint.checkpoint_step(out / f) for f in folders(out)] == [3, 1, 2]
    AutoModelForCausalLM.from_pretrained(out / "checkpoint-2")


def test_default_run_folders_do_not_collide():
    names = {train.parse_args(["--seed", "3"]).out for _ in range(20)}
    assert len(names) == 20


def test_a_failed_start_removes_the_folder_it_made_and_only_that(tmp_path, capsys):
    made = tmp_path / "new" / "run"
    error_of([*FLAGS, "--out", str(made), "--data", str(tmp_path / "missing.jsonl")], capsys)
    assert not made.exists()
    kept = tmp_path / "existing"
    kept.mkdir()
    error_of([*FLAGS, "--out", str(kept), "--data", str(tmp_path / "missing.jsonl")], capsys)
    assert kept.is_dir()


def test_a_new_run_never_overwrites_a_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    short_run(out, "--steps", "1")
    (out / "metrics.jsonl").unlink()  # a checkpoint alone is a run too
    assert f"--out: {out} already holds a run; pass --resume {out}" in error_of(
        [*FLAGS, "--out", str(out)], capsys)
    assert checkpoint.checkpoint_step(out / "checkpoint") == 0


def test_out_naming_a_file_is_a_one_line_error(tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    assert (error_of([*FLAGS, "--out", str(file)], capsys)
            == f"error: --out: {file} is a file, not a folder")
    assert file.read_text() == "mine"


def test_changing_the_lora_rank_on_resume_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "run"
    short_run(out, "--steps", "1")
    message = error_of(["--resume", str(out), "--lora-rank", "4"], capsys)
    assert "--lora-rank: this run was trained with --lora-rank 0" in message
    train.main(["--resume", str(out), "--lora-rank", "0", "--steps", "2"])  # the same value is fine
    assert [r["step"] for r in records(out)] == [0, 1]


def poison_losses(monkeypatch, calls: set[int] | None) -> None:
    """Make train.aggregate_loss return NaN on the given calls (0-based; None = every call)."""
    counter, clean = itertools.count(), train.aggregate_loss

    def poisoned(*args, **kwargs):
        loss = clean(*args, **kwargs)
        return loss * float("nan") if calls is None or next(counter) in calls else loss

    monkeypatch.setattr(train, "aggregate_loss", poisoned)


def test_a_non_finite_step_is_skipped_counted_and_the_run_goes_on(tmp_path, monkeypatch):
    poison_losses(monkeypatch, {1})  # step 1 (one micro-batch per step)
    out = tmp_path / "run"
    short_run(out, "--steps", "3", "--save-every", "1", "--keep-checkpoints", "3")
    assert [r["nonfinite_updates"] for r in records(out)] == [0, 1, 0]
    assert records(out)[0]["grad_norm"] > 0 and records(out)[2]["grad_norm"] > 0
    # step 1 changed no weight nor optimizer state
    for file in ("model.safetensors", "trainer_state.safetensors"):
        after_step0, after_step1 = (load_file(out / "checkpoint-1" / file),
                                    load_file(out / "checkpoint-2" / file))
        assert all(torch.equal(after_step0[k], after_step1[k])
                   for k in after_step0 if not k.startswith("rng/")), file
    after_step1, after_step2 = (load_file(out / name / "model.safetensors")
                                for name in ("checkpoint-2", "checkpoint"))
    # step 2 trained again
    assert any(not torch.equal(after_step1[k], after_step2[k]) for k in after_step2)


def test_non_finite_steps_in_a_row_stop_the_run_with_a_one_line_error(tmp_path, monkeypatch,
                                                                       capsys):
    poison_losses(monkeypatch, None)
    out = tmp_path / "run"
    message = error_of([*FLAGS, "--eval-every", "0", "--out", str(out), "--steps", "5",
                        "--save-every", "1", "--max-nonfinite-steps", "2"], capsys, code=1)
    assert message.startswith("error: 2 steps in a row (to step 1) had a non-finite loss or "
                              "gradient norm")
    assert "likely cause: a learning rate too high (--lr 0.0002)" in message
    # saved after step 0, finite: nothing trained
    assert checkpoint.checkpoint_step(out / "checkpoint") == 0
    assert all(torch.isfinite(t).all()
               for t in load_file(out / "checkpoint" / "model.safetensors").values())


def test_an_update_that_leaves_a_weight_non_finite_stops_the_run_and_saves_nothing(
        tmp_path, monkeypatch, capsys):
    clean = train.policy_update

    def overflowing(args, model, optimizer, batch, precision):  # as an update with --lr inf would
        totals = clean(args, model, optimizer, batch, precision)
        with torch.no_grad():
            next(model.parameters())[0, 0] = float("inf")
        return totals

    monkeypatch.setattr(train, "policy_update", overflowing)
    out = tmp_path / "run"
    message = error_of([*FLAGS, "--eval-every", "0", "--out", str(out), "--steps", "3",
                        "--lr", "0.5"], capsys, code=1)
    assert message == ("error: step 0: the update made weights inf or NaN; they were not saved; "
                       "likely cause: a learning rate too high (--lr 0.5)")
    assert not out.exists()  # it failed before its first metrics line: no run folder left behind


def test_a_metrics_line_torn_by_a_crash_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "reward": 1.0}\n{"step": 1, "reward": 0.5}\n{"step": 2, "rew')
    checkpoint.truncate_metrics(path, last_step=5)
    assert path.read_text() == '{"step": 0, "reward": 1.0}\n{"step": 1, "reward": 0.5}\n'


def test_ctrl_c_says_how_to_resume_and_the_resume_continues(tmp_path, monkeypatch, capsys):
    clean, calls = train.policy_update, itertools.count()

    def interrupted_at_step_2(*args):
        if next(calls) == 2:
            raise KeyboardInterrupt
        return clean(*args)

    monkeypatch.setattr(train, "policy_update", interrupted_at_step_2)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        short_run(out, "--steps", "3", "--save-every", "1")
    assert stop.value.code == 130
    assert f"interrupted: continue with  python train.py --resume {out}" in capsys.readouterr().err
    monkeypatch.setattr(train, "policy_update", clean)
    train.main(["--resume", str(out)])
    assert [r["step"] for r in records(out)] == [0, 1, 2]


def test_a_damaged_run_config_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "run"
    short_run(out, "--steps", "1")
    (out / "config.json").write_text('{"algo": "hicra", ')
    assert f"--resume: {out / 'config.json'}: not a readable run config" in error_of(
        ["--resume", str(out)], capsys)


def test_a_learning_rate_that_overflows_the_update_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "run"
    message = error_of([*FLAGS, "--eval-every", "0", "--out", str(out), "--steps", "2",
                        "--lr", "1e39"], capsys, code=1)
    assert message.startswith("error: the update overflowed (")
    assert message.endswith("likely cause: a learning rate too high (--lr 1e+39)")
    assert not out.exists()
