"""Run folders cannot be turned against their owner (run_folder.py): no writes through planted
links, no clobbered folders, one writer at a time, resume flags applied and recorded, rewards with a
deadline, SIGTERM as Ctrl-C. Every case runs the real command line in a process of its own and
checks its exit code, its stderr and the bytes of what it must not touch. The processes are forked
from a server that imported torch and transformers once (as tests/test_bad_input.py does), so each
costs milliseconds to start, not seconds; the cases that need a fresh interpreter or a shell
(encodings, a pipe, a file-size limit) start one."""

import json
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).parent.parent
TINY = ["--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "24",
        "--eval-every", "0", "--threads", "1", "--save-every", "1"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}


FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(["train", "pytest"])


def run_train(argv: list[str], stderr_path: str) -> None:
    """Child process body: `python train.py ARGV` as __main__ in the repository root, stderr to a
    file. The SIGINT handler and blocked signals it starts with go to signals.txt beside it
    (`Child.signal_state`)."""
    os.environ.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    os.chdir(ROOT)
    handler, blocked = (signal.getsignal(signal.SIGINT),
                        sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
    Path(stderr_path).with_name("signals.txt").write_text(
        f"SIGINT handler {handler}, blocked {blocked}")
    with open(stderr_path, "w") as stderr, open(os.devnull, "w") as stdout:
        os.dup2(stdout.fileno(), 1)
        os.dup2(stderr.fileno(), 2)
    sys.argv = ["train.py", *argv]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")


class Child:
    """A running train.py (`train(..., wait=False)`), with Popen's poll / send_signal / wait."""

    def __init__(self, argv: list[str], stderr_path: Path):
        self.stderr_path = stderr_path
        self.process = FORKSERVER.Process(target=run_train, args=(argv, str(stderr_path)))
        self.process.start()

    def poll(self) -> int | None:
        return self.process.exitcode

    def send_signal(self, number: int) -> None:
        os.kill(self.process.pid, number)

    def wait(self, timeout: float) -> int | None:
        self.process.join(timeout)
        return self.process.exitcode

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def signal_state(self) -> str:
        """What a failed signal test needs to tell a lost signal from a handled one: the child's
        starting SIGINT handler and blocked signals, and the end of its stderr."""
        state = self.stderr_path.with_name("signals.txt")
        return (f"{state.read_text() if state.exists() else 'no signal state'}; "
                f"stderr ends: {self.stderr()[-1500:]!r}")


def train(*argv, wait: bool = True):
    """train.py with ARGV in a process of its own: (exit code, stderr), or the running Child when
    not `wait`."""
    stderr_path = Path(tempfile.mkdtemp(prefix="train-stderr-")) / "stderr.txt"
    child = Child([str(a) for a in argv], stderr_path)
    if not wait:
        return child
    code = child.wait(timeout=600)
    if code is None:
        child.process.kill()
        pytest.fail(f"train.py {' '.join(map(str, argv))} hung")
    return code, child.stderr()


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished two-step run, copied by the tests that need one."""
    run = tmp_path_factory.mktemp("finished") / "run"
    code, stderr = train(*TINY, "--steps", "2", "--out", run)
    assert code == 0, stderr
    return run


def copy_run(finished: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    subprocess.run(["cp", "-a", str(finished), str(run)], check=True)
    (run / ".lock").unlink(missing_ok=True)
    return run


def test_links_planted_at_temporary_names_are_never_written_through(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    victim, victim_folder = tmp_path / "mine.txt", tmp_path / "my_folder"
    victim.write_text("the user's own file\n")
    victim_folder.mkdir()
    # the names earlier versions wrote through
    for name in ("metrics.jsonl.tmp", "config.json.tmp"):
        (run / name).symlink_to(victim)
    code, stderr = train("--resume", run, "--steps", "3")
    # its temporary files have fresh random names: the links are never opened
    assert code == 0, stderr
    assert victim.read_text() == "the user's own file\n"
    assert [json.loads(line)["step"]
            for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    # where checkpoints are written
    (run / "checkpoint.tmp").symlink_to(victim_folder, target_is_directory=True)
    before = snapshot(run)
    code, stderr = train("--resume", run, "--steps", "4")
    assert code == 2 and "checkpoint.tmp: a symbolic link" in last_line(stderr), stderr
    assert not any(victim_folder.iterdir()) and snapshot(run) == before


def test_a_link_where_the_run_keeps_its_own_file_is_refused_with_one_line(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    victim = tmp_path / "mine.jsonl"
    victim.write_text((run / "metrics.jsonl").read_text())
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(victim)
    before = victim.read_bytes()
    code, stderr = train("--resume", run, "--steps", "3")
    assert (code == 2 and last_line(stderr).startswith("error: ")
            and "symbolic link" in last_line(stderr))
    assert victim.read_bytes() == before


def test_out_on_a_folder_that_is_not_a_run_is_refused_and_left_as_it_was(tmp_path):
    model = tmp_path / "model"
    subprocess.run(["cp", "-a", str(ROOT / "world" / "models" / "tiny-world"), str(model)],
                   check=True)
    before = snapshot(model)
    code, stderr = train(*TINY, "--steps", "1", "--model", model, "--out", model)
    assert code == 2 and "not empty and not a train.py run folder" in last_line(stderr), stderr
    assert snapshot(model) == before
    code, stderr = train("--resume", model)
    assert code == 2 and "is not a train.py run folder" in last_line(stderr), stderr
    assert snapshot(model) == before


def test_two_processes_on_one_run_folder_one_writes_and_the_other_is_refused(tmp_path):
    run = tmp_path / "run"
    first = train(*TINY, "--steps", "5000", "--seed", "1", "--out", run, wait=False)
    # it has logged its first step
    while not (run / "metrics.jsonl").exists() and first.poll() is None:
        time.sleep(0.05)
    code, stderr = train(*TINY, "--steps", "2", "--seed", "2", "--lr", "1e-3", "--out", run)
    assert code == 2 and "is in use by process" in last_line(stderr), stderr
    code, stderr = train("--resume", run, "--steps", "6")  # nor can a resume join it
    assert code == 2 and "is in use by process" in last_line(stderr), stderr
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 143, first.signal_state()
    config = json.loads((run / "config.json").read_text())
    assert (config["seed"], config["lr"], config["steps"]) == (1, 2e-4, 5000)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(len(steps)))  # the first run's lines only, each once, in order


def test_resume_with_another_learning_rate_applies_and_records_it(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    code, stderr = train("--resume", run, "--steps", "3", "--lr", "1e-3", "--weight-decay", "0.1")
    assert code == 0, stderr
    assert json.loads((run / "config.json").read_text())["lr"] == 1e-3  # a later resume keeps it
    assert json.loads((run / "resumes.jsonl").read_text()) == {
        "step": 2, "changed": {"lr": [2e-4, 1e-3], "weight_decay": [0.0, 0.1], "steps": [2, 3]}}
    groups = json.loads(
        (run / "checkpoint" / "trainer_state.json").read_text())["optimizer_param_groups"]
    assert all((g["lr"], g["weight_decay"]) == (1e-3, 0.1) for g in groups)
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert (record["step"], record["lr"]) == (2, 1e-3)


REWARDS = '''
import sys
import time


def slow(completion, answer):
    time.sleep(30)
    return 1.0


def broken(completion, answer):
    raise ValueError("no answer field")


def interrupts(completion, answer):
    raise KeyboardInterrupt


def exits(completion, answer):
    sys.exit(3)


def huge(completion, answer):
    return 1e300
'''


def test_a_reward_that_hangs_scores_zero_at_its_deadline(tmp_path):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    run = tmp_path / "run"
    started = time.monotonic()
    code, stderr = train(*TINY, "--steps", "1", "--reward", f"{tmp_path / 'my_rewards.py'}:slow",
                         "--reward-timeout", "1", "--out", run)
    assert code == 0, stderr
    record = json.loads((run / "metrics.jsonl").read_text())
    assert (record["reward"], record["reward_errors"]) == (0.0, 4)
    assert time.monotonic() - started < 30  # not waited for


def test_a_reward_failing_on_every_completion_stops_the_run_naming_it(tmp_path):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    spec = f"{tmp_path / 'my_rewards.py'}:broken"
    code, stderr = train(*TINY, "--steps", "10", "--reward", spec, "--out", tmp_path / "run")
    assert code == 1
    assert last_line(stderr) == (f"error: --reward {spec}: every grading failed on 3 steps in a "
                                 "row (to step 2); on the first completion it raised ValueError: "
                                 "no answer field")


@pytest.mark.parametrize("name, what", [("interrupts", "raised KeyboardInterrupt"),
                                        ("exits", "called sys.exit(3)"),
                                        ("huge", "returned 1e+300 (not a number within +-1e+06)")])
def test_a_reward_raising_keyboardinterrupt_or_exiting_or_out_of_range_is_one_line(
        tmp_path, name, what):
    """Raised in the grading threads, neither is the user's Ctrl-C: each grading counts as failed,
    no traceback is printed per completion, and the run stops after 3 such steps naming what the
    reward did."""
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    spec = f"{tmp_path / 'my_rewards.py'}:{name}"
    code, stderr = train(*TINY, "--steps", "10", "--reward", spec, "--out", tmp_path / "run")
    assert code == 1 and "Traceback" not in stderr and "Exception in thread" not in stderr, stderr
    assert last_line(stderr) == (f"error: --reward {spec}: every grading failed on 3 steps in a "
                                 f"row (to step 2); on the first completion it {what}")


def test_sigterm_stops_like_ctrl_c_and_the_run_resumes(tmp_path):
    run = tmp_path / "run (1)"  # a name the shell must quote
    process = train(*TINY, "--steps", "400", "--out", run, wait=False)
    while not (run / "checkpoint").exists() and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143, process.signal_state()
    stderr = process.stderr()
    assert f"interrupted: continue with  python train.py --resume '{run}'" in stderr
    code, stderr = train("--resume", run, "--steps", "3")
    assert code == 0, stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] >= 2
    assert load_file(run / "checkpoint" / "model.safetensors")


def shell(command: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=ROOT, env={**ENV, **env},
                          capture_output=True, text=True, timeout=600)


def test_a_reader_that_leaves_early_ends_the_run_quietly(tmp_path):
    done = shell(f"{sys.executable} train.py {' '.join(TINY)} --steps 2 --out {tmp_path / 'run'} "
                 "| head -1; exit ${PIPESTATUS[0]}")
    assert done.returncode == 141 and "Traceback" not in done.stderr, done.stderr


def test_a_full_disk_during_a_save_is_one_line_and_the_run_resumes(tmp_path):
    run = tmp_path / "run"
    # 1 MiB files
    done = shell(f"ulimit -f 1024; {sys.executable} train.py {' '.join(TINY)} --steps 2 "
                 f"--out {run}")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert (last_line(done.stderr).startswith("error: ")
            and "File too large" in last_line(done.stderr))
    assert "python train.py --resume" in last_line(done.stderr)
    code, stderr = train("--resume", run)
    assert code == 0, stderr
    assert (run / "checkpoint" / "complete.json").is_file()


def test_problem_text_cannot_drive_the_terminal_nor_crash_an_ascii_one(tmp_path):
    data = tmp_path / "odd.jsonl"
    rows = [{"problem": f"Café \x1b[2J clear {i} + {i}?", "answer": str(2 * i)} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    flags = [*TINY, "--steps", "1", "--data", data, "--eval-data", data, "--eval-every", "1"]
    done = subprocess.run([sys.executable, "train.py", *map(str, flags),
                           "--out", str(tmp_path / "a")],
                          cwd=ROOT, env={**ENV, "PYTHONIOENCODING": "utf-8"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "\x1b[2J" not in done.stdout and "\u241b[2J clear" in done.stdout
    done = subprocess.run([sys.executable, "train.py", *map(str, flags),
                           "--out", str(tmp_path / "b")],
                          cwd=ROOT, env={**ENV, "PYTHONIOENCODING": "ascii"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "Caf\\xe9" in done.stdout


def test_ctrl_c_during_the_first_evaluation_is_one_line_and_leaves_no_folder(tmp_path):
    run = tmp_path / "run"
    process = train(*TINY, "--steps", "2", "--eval-every", "1", "--eval-limit", "500", "--out", run,
                    wait=False)
    while not (run / "config.json").exists() and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130, process.signal_state()
    assert "Traceback" not in process.stderr()
    assert not run.exists()  # a start that logged nothing leaves no folder behind


def test_a_reward_module_that_parses_the_command_line_at_import_sees_none_of_train_py_flags(
        tmp_path, monkeypatch):
    import reward

    module = tmp_path / "cli_reward.py"
    module.write_text("import argparse\nparser = argparse.ArgumentParser()\n"
                      "parser.add_argument('--scale', type=float, default=1.0)\n"
                      "SCALE = parser.parse_args().scale\n\ndef scaled(c, a):\n    return SCALE\n")
    monkeypatch.setattr(sys, "argv", ["train.py", "--steps", "3", "--reward", f"{module}:scaled"])
    assert reward.load_reward(f"{module}:scaled")("x", "1") == 1.0
    assert sys.argv == ["train.py", "--steps", "3", "--reward", f"{module}:scaled"]


def test_a_lock_file_that_is_a_hard_link_is_refused_and_not_truncated(tmp_path):
    import run_folder  # noqa: PLC0415  (the forkserver preloads train; this test needs no child)
    from cli import InputError  # noqa: PLC0415

    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    run.mkdir()
    victim.write_text("keep me")
    os.link(victim, run / run_folder.LOCK)
    with pytest.raises(InputError, match=r"\.lock is a hard link to another file"):
        run_folder.claim(run, resuming=False)
    assert victim.read_text() == "keep me"


def test_a_fifo_in_a_run_folder_is_refused_instead_of_waited_on(tmp_path):
    """Opening or reading a FIFO waits for a writer: the checks run in a thread, and a hang fails
    the test."""
    import threading  # noqa: PLC0415

    import run_folder  # noqa: PLC0415
    from cli import InputError  # noqa: PLC0415

    for name in (".lock", "metrics.jsonl"):
        run = tmp_path / name.strip(".")
        run.mkdir()
        (run / run_folder.MARKER).write_text('{"created_by": "train.py"}\n')
        os.mkfifo(run / name)
        outcome = []

        def resume_checks(run=run):
            try:
                run_folder.check_out(run, resuming=True)
                with run_folder.claim(run, resuming=True):
                    outcome.append("claimed")
            except InputError as error:
                outcome.append(str(error))

        worker = threading.Thread(target=resume_checks, daemon=True)
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive(), f"waiting on a FIFO at {name}"
        assert outcome and name in outcome[0] and "not a regular file" in outcome[0], outcome


def fresh_process(script: str, *argv, stderr_path: Path) -> subprocess.Popen:
    """`python SCRIPT ARGV` in a fresh interpreter (its imports included), stderr to a file."""
    return subprocess.Popen([sys.executable, script, *map(str, argv)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=open(stderr_path, "w"))


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_ctrl_c_while_torch_loads_exits_130_without_a_traceback(tmp_path, script):
    argv = (["--steps", "1"] if script == "train.py"
            else ["--model", "world/models/tiny-world", "--benchmark", "world"])
    process = fresh_process(script, *argv, "--out", tmp_path / "out",
                            stderr_path=tmp_path / "stderr.txt")
    # past the interpreter's own start-up (site-packages' .pth files), well inside importing
    # torch and transformers (2.7 s here): the window the handler at the top of the script covers
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    assert ("Traceback" not in (tmp_path / "stderr.txt").read_text()
            and not (tmp_path / "out").exists())


def test_a_burst_of_ctrl_c_stops_a_run_once_in_one_line(tmp_path):
    run = tmp_path / "run"
    process = train(*TINY, "--steps", "400", "--out", run, wait=False)
    while not (run / "checkpoint").exists() and process.poll() is None:
        time.sleep(0.05)
    # a key held down: signals a millisecond apart, some while the first one is being handled
    for _ in range(5):
        process.send_signal(signal.SIGINT)
        time.sleep(0.001)
    assert process.wait(timeout=120) == 130, process.signal_state()
    stderr = process.stderr()
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert stderr.count("interrupted: continue with") == 1


def test_ctrl_c_during_an_evaluation_writes_nothing(tmp_path):
    stderr_path = tmp_path / "stderr.txt"
    process = fresh_process("eval.py", "--model", "world/models/tiny-world", "--benchmark", "world",
                            "--samples", "64", "--max-new-tokens", "128",
                            "--out", tmp_path / "eval", stderr_path=stderr_path)
    while "completion/s" not in stderr_path.read_text() and process.poll() is None:
        time.sleep(0.05)
    for _ in range(3):
        process.send_signal(signal.SIGINT)
        time.sleep(0.001)
    assert process.wait(timeout=120) == 130
    stderr = stderr_path.read_text()
    assert ("Traceback" not in stderr
            and stderr.count("interrupted: nothing was written") == 1), stderr[-500:]
    assert not (tmp_path / "eval").exists()


def test_appending_refuses_links_fifos_and_hard_links_without_blocking(tmp_path):
    import run_folder  # noqa: PLC0415
    from cli import InputError  # noqa: PLC0415

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    (tmp_path / "symbolic.log").symlink_to(victim)
    os.link(victim, tmp_path / "hard.log")
    os.mkfifo(tmp_path / "fifo.log")
    for name, what in [("symbolic.log", "symbolic link"), ("hard.log", "hard link"),
                       ("fifo.log", "FIFO")]:
        with pytest.raises(InputError, match=what):
            run_folder.append_line(tmp_path / name, "planted")
    assert victim.read_text() == "keep me\n"
    run_folder.append_line(tmp_path / "own.log", "fine")
    assert (tmp_path / "own.log").read_text() == "fine\n"
