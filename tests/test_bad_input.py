"""Bad input, tried as a new user would: one line `error: ...` naming the flag, file and line, and
nothing lost.

The table CASES runs each input through the real command line (`python train.py ...`,
`python eval.py ...` in a child process, tiny files in a temporary folder) and checks: exit code 2,
exactly one line on stderr, that it starts with `error:` and names what it must, and that the files
already in the run folder are unchanged. Each case runs in a child process forked from a server that
has imported the scripts' modules once (a fresh interpreter spends ~4 s of CPU importing torch and
transformers); two cases also run in a fresh `python` and must give the same line and exit code.

Then, in-process: the bounds of every numeric flag and of alpha, and train.main's one-line errors.
Below them, the inputs that must *work* rather than fail: files with a UTF-8 byte-order mark, a data
set smaller than one step, an all-truncated batch, reward functions that raise or return NaN / a
string, colour only on a terminal, and math-verify timeouts graded in parallel.
"""

import argparse
import json
import math
import multiprocessing
import os
import runpy
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import cli
import config
import eval as evaluation
import grading
import grams
import model_loading
import reward
import run_folder
import runlog
import train
from conftest import TINY_PROBLEMS, build_model, build_tokenizer, tiny_args
from cli import InputError
from data import load_problems
from hicra import validate_alpha

HERE = Path(__file__).parent.parent  # the repository root, where the scripts are
# Children forked from a server that imported the scripts' modules once: a case then costs
# milliseconds, not the ~4 s of CPU a fresh interpreter spends importing torch and transformers.
FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(["train", "eval", "pytest", "test_bad_input"])


@dataclass(frozen=True)
class Case:
    """One bad input: the script, its flags ({dir}: the folder of inputs, {out}: this case's run
    folder, {run}: this case's copy of a finished run), and the texts its one error line must
    contain."""

    name: str
    script: str
    flags: str
    expected: tuple[str, ...]
    needs_no: str = ""  # "cuda" / "mps": skipped on a machine that has that device
    bare: bool = False  # the flags are the whole command line (no tiny defaults before them)
    damaged_config: bool = False  # {run}/config.json is cut short before the command runs
    # JSON settings written over {run}/config.json's before the command runs (a hand edit)
    config_edit: str = ""
    metrics_line: str = ""  # a line put first in {run}/metrics.jsonl before the command runs


TRAIN = "train.py"
EVAL = "eval.py"


def file_case(name: str, flag: str, file: str, line: int, *expected: str, script: str = TRAIN,
              names_flag: bool = True) -> Case:
    """A case that hands `flag` the bad file {dir}/FILE: its error line names the flag (unless
    `names_flag` is False), then FILE:LINE:, then the `expected` texts."""
    named = (flag,) if names_flag else ()
    return Case(name, script, f"{flag} {{dir}}/{file}", (*named, f"{file}:{line}:", *expected))


def model_case(name: str, folder: str, *expected: str, script: str = TRAIN) -> Case:
    """A case that hands --model the model folder {dir}/FOLDER: its error line names the flag and
    the folder, then the `expected` texts."""
    return Case(name, script, f"--model {{dir}}/{folder}", ("--model", folder, *expected))


CASES = [
    # the command line itself (argparse): one line, no usage block
    Case("parser-bad-int", TRAIN, "--steps abc", ("argument --steps", "invalid int value: 'abc'")),
    Case("parser-unknown-flag", TRAIN, "--bogus 1", ("unrecognized arguments: --bogus",)),
    Case("parser-bad-choice", TRAIN, "--algo ppo", ("argument --algo", "invalid choice: 'ppo'")),
    Case("parser-missing-value", TRAIN, "--lr", ("argument --lr", "expected one argument")),
    # numbers: finite and in range, before anything is written
    Case("lr-nan", TRAIN, "--lr nan", ("--lr", "finite", "nan")),
    Case("lr-negative", TRAIN, "--lr -1", ("--lr", "> 0", "-1")),
    Case("lr-inf", TRAIN, "--lr inf", ("--lr", "finite", "inf")),
    Case("lr-overflow", TRAIN, "--lr 1e999", ("--lr", "finite", "inf")),
    Case("grad-clip-nan", TRAIN, "--grad-clip nan", ("--grad-clip", "finite", "nan")),
    Case("temperature-zero", TRAIN, "--temperature 0", ("--temperature", "> 0")),
    Case("alpha-out-of-range", TRAIN, "--alpha 1.5", ("--alpha", "[0, 1]")),
    Case("world-v1-data-on-v2-model", TRAIN, "--data world_v1_train --out {out}/run",
         ("--data world_v1_train", "world v2's model", "--model world/models/tiny-world-v1"),
         bare=True),
    Case("group-size-one", TRAIN, "--group-size 1", ("--group-size", ">= 2")),
    Case("logprob-chunk-zero", TRAIN, "--logprob-chunk 0", ("--logprob-chunk", ">= 1")),
    Case("eval-limit-zero-train", TRAIN, "--eval-limit 0 --eval-every 1",
         ("error: --eval-limit:", ">= 1")),
    Case("steps-zero", TRAIN, "--steps 0", ("--steps", ">= 1", "eval.py")),
    Case("seed-negative", TRAIN, "--seed -1", ("--seed", "-1")),
    Case("lora-rank-negative", TRAIN, "--lora-rank -1", ("--lora-rank", ">= 0")),
    # devices and dtypes
    Case("device-cuda-missing", TRAIN, "--device cuda", ("--device cuda", "CUDA is not available"),
         needs_no="cuda"),
    Case("device-mps-missing", TRAIN, "--device mps", ("--device mps", "MPS is not available"),
         needs_no="mps"),
    Case("device-unknown", TRAIN, "--device gpu", ("--device", "unknown device 'gpu'")),
    Case("mixed-precision-unknown", TRAIN, "--mixed-precision fp8",
         ("--dtype/--mixed-precision", "fp8")),
    # model folders
    model_case("model-no-model-type", "no_model_type", "model_type"),
    model_case("model-missing-folder", "missing_model", "no such folder"),
    model_case("model-is-a-file", "train.jsonl", "is a file"),
    model_case("model-truncated-weights", "truncated_model"),
    model_case("model-bad-config-json", "bad_config", "config.json"),
    Case("model-is-a-run-folder", TRAIN, "--model {run}",
         ("--model", "train.py run folder", "checkpoint")),
    Case("gguf-file-missing", TRAIN, "--gguf-file nope.gguf",
         ("--gguf-file", "nope.gguf", "no such file")),
    # data and grams files
    file_case("data-latin1", "--data", "latin1.jsonl", 2, "not UTF-8", "0xe9"),
    file_case("data-utf16", "--data", "utf16.jsonl", 1, "not UTF-8", "0xff"),
    file_case("data-malformed-line", "--data", "malformed.jsonl", 2, "malformed JSON"),
    file_case("data-missing-field", "--data", "no_answer.jsonl", 1, "'answer'"),
    file_case("data-answer-not-text", "--data", "list_answer.jsonl", 1, "'answer'"),
    Case("data-empty-file", TRAIN, "--data {dir}/empty.jsonl", ("--data", "empty.jsonl", "empty")),
    Case("data-missing-file", TRAIN, "--data {dir}/missing.jsonl",
         ("--data", "missing.jsonl", "no such file")),
    Case("data-folder", TRAIN, "--data {dir}", ("--data", "is a folder")),
    Case("data-unknown-name", TRAIN, "--data gsm9k", ("--data", "unknown benchmark 'gsm9k'")),
    Case("eval-data-latin1", TRAIN, "--eval-data {dir}/latin1.jsonl --eval-every 1",
         ("--eval-data", "latin1.jsonl:2:")),
    file_case("grams-latin1", "--grams", "latin1_grams.txt", 2, "not UTF-8"),
    Case("grams-blank", TRAIN, "--grams {dir}/blank_grams.txt",
         ("--grams", "blank_grams.txt", "no grams")),
    Case("grams-unknown", TRAIN, "--grams nope", ("--grams", "'nope'")),
    # resuming: bad flags and a bad config must leave the finished run as it was
    Case("resume-lr-nan", TRAIN, "--resume {run} --lr nan", ("--lr", "nan"), bare=True),
    Case("resume-no-run", TRAIN, "--resume {dir}/no_run",
         ("--resume", "no_run", "not a train.py run folder"), bare=True),
    Case("resume-with-another-out", TRAIN, "--resume {run} --out {out}/elsewhere",
         ("--out", "--resume"), bare=True),
    Case("resume-bad-config", TRAIN, "--resume {run}", ("--resume", "config.json"), bare=True,
         damaged_config=True),
    Case("resume-config-wrong-type", TRAIN, "--resume {run}",
         ("config.json", "--lr: expected float, got 'fast'"), bare=True,
         config_edit='{"lr": "fast"}'),
    Case("resume-config-unknown-algo", TRAIN, "--resume {run}",
         ("config.json", "--algo: 'ppo' is not one of"), bare=True, config_edit='{"algo": "ppo"}'),
    Case("resume-config-null", TRAIN, "--resume {run}",
         ("config.json", "--algo: expected str, got None"), bare=True,
         config_edit='{"algo": null}'),
    Case("resume-config-tracker-string", TRAIN, "--resume {run}",
         ("--report-to: expected a list of names",), bare=True,
         config_edit='{"report_to": "tensorboard"}'),
    Case("resume-corrupt-metrics-line", TRAIN, "--resume {run}",
         ("metrics.jsonl:1:", "not a metrics record"), bare=True, metrics_line='{"step": "zero"}'),
    Case("resume-not-a-run", TRAIN, "--resume {dir}/model",
         ("--resume", "not a train.py run folder"), bare=True),
    # run folders: never clobbered
    Case("out-not-a-run", TRAIN, "--out {out}",
         ("--out", "not empty and not a train.py run folder")),
    Case("out-holds-a-run", TRAIN, "--out {run}", ("--out", "already holds a run", "--resume")),
    # sizes the model cannot take
    Case("max-new-tokens-huge", TRAIN, "--max-new-tokens 100000000",
         ("--max-new-tokens", "1024 positions")),
    Case("data-problem-too-long", TRAIN, "--data {dir}/long_problem.jsonl",
         ("--max-new-tokens", "1024 positions")),
    file_case("data-huge-number", "--data", "huge_number.jsonl", 1, "unreadable"),
    file_case("data-deeply-nested", "--data", "deep.jsonl", 1, "nested too deeply"),
    file_case("few-shot-huge-number", "--few-shot", "huge_number.jsonl", 1, "unreadable JSON"),
    file_case("few-shot-deeply-nested", "--few-shot", "deep.jsonl", 1, "nested too deeply"),
    file_case("few-shot-lone-surrogate", "--few-shot", "surrogate.jsonl", 1, "lone surrogate"),
    # text no tokenizer takes: bytes that were not UTF-8 on the command line, lone surrogate escapes
    # in files
    Case("instruction-not-utf8", TRAIN, "--instruction \udcff",
         ("--instruction", "not valid text", "'\\udcff'")),
    Case("eval-instruction-not-utf8", EVAL, "--instruction \udcff",
         ("--instruction", "not valid text")),
    file_case("data-lone-surrogate", "--data", "surrogate.jsonl", 1, "lone surrogate"),
    Case("config-lone-surrogate", TRAIN, "--config {dir}/surrogate.yaml",
         ("--instruction", "not valid text")),
    Case("grams-too-many", TRAIN, "--grams {dir}/many_grams.txt",
         ("--grams", "many_grams.txt holds 2,001 grams")),
    # a model's chat template that does not render
    Case("model-template-syntax-error", TRAIN, "--model {dir}/bad_template",
         ("--model", "chat template fails", "TemplateSyntaxError")),
    Case("eval-model-template-raises", EVAL, "--model {dir}/raising_template",
         ("--model", "chat template fails", "no system role here")),
    # eval.py shares the checks of the flags it shares
    Case("eval-missing-benchmark", EVAL, "--model {dir}/model --out {out}",
         ("required", "--benchmark"), bare=True),
    Case("eval-limit-zero-eval", EVAL, "--limit 0", ("error: --limit:", ">= 1")),
    Case("eval-temperature-nan", EVAL, "--temperature nan", ("--temperature", "finite", "nan")),
    Case("eval-threads-negative", EVAL, "--threads -1", ("--threads", ">= 0")),
    Case("eval-pass-k-not-numbers", EVAL, "--pass-k a", ("--pass-k", "'a'")),
    Case("eval-device-cuda", EVAL, "--device cuda", ("--device cuda", "CUDA is not available"),
         needs_no="cuda"),
    file_case("eval-benchmark-latin1", "--benchmark", "latin1.jsonl", 2, script=EVAL),
    model_case("eval-model-no-model-type", "no_model_type", script=EVAL),
    Case("eval-out-is-a-file", EVAL, "--out {dir}/train.jsonl",
         ("--out", "train.jsonl", "is a file")),
    Case("eval-model-is-a-run-folder", EVAL, "--model {run}", ("--model", "train.py run folder")),
    Case("eval-plot-nothing", EVAL, "plot", ("plot:",), bare=True),
    # the other command-line tools
    Case("tasks-out-in-missing-folder", "world.tasks",
         "traces --n 2 --out {out}/no_folder/traces.jsonl",
         ("--out", "no_folder", "does not exist"), bare=True),
    Case("grams-extract-out-is-a-folder", "gram_sets.extraction",
         "extract --corpus {dir}/train.jsonl --field problem --out {out}", ("--out", "is a folder"),
         bare=True),
    Case("grams-extract-huge-number", "gram_sets.extraction",
         "extract --corpus {dir}/huge_number.jsonl --field problem --out {out}/g.txt",
         ("--corpus", "huge_number.jsonl:1:", "unreadable JSON"), bare=True),
    Case("grams-extract-deeply-nested", "gram_sets.extraction",
         "extract --corpus {dir}/deep.jsonl --field problem --out {out}/g.txt",
         ("--corpus", "deep.jsonl:1:", "nested too deeply"), bare=True),
    Case("grams-extract-lone-surrogate", "gram_sets.extraction",
         "extract --corpus {dir}/surrogate.jsonl --field problem --out {out}/g.txt",
         ("--corpus", "surrogate.jsonl:1:", "lone surrogate"), bare=True),
    Case("grams-compare-latin1", "gram_sets.extraction", "compare --grams {dir}/latin1_grams.txt",
         ("--grams", "latin1_grams.txt:2:"), bare=True),
    Case("eval-plot-cut-metrics-line", EVAL, "plot {dir}/cut_run",
         ("cut_run/metrics.jsonl:2:", "malformed JSON"), bare=True),
]


def device_present(kind: str) -> bool:
    if kind == "cuda":
        return torch.cuda.is_available()
    return kind == "mps" and torch.backends.mps.is_available()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder of good and bad inputs: a tiny model, broken model folders, data and grams files."""
    folder = tmp_path_factory.mktemp("inputs")
    tokenizer = build_tokenizer()
    build_model(tokenizer).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    lines = [json.dumps(r) for r in TINY_PROBLEMS]
    files = {
        "train.jsonl": "\n".join(lines) + "\n",
        "malformed.jsonl": lines[0] + '\n{"problem": "oops"\n',
        "no_answer.jsonl": '{"problem": "1 + 1?"}\n',
        "list_answer.jsonl": '{"problem": "1 + 1?", "answer": [2]}\n',
        "empty.jsonl": "",
        "blank_grams.txt": "\n  \n",
        "cut_run/metrics.jsonl": '{"step": 0, "reward": 1.0}\n{"step": 1, "rew',
        "long_problem.jsonl": json.dumps({"problem": "what is " + " plus ".join(["2"] * 400) + "?",
                                          "answer": "800"}) + "\n",
        "huge_number.jsonl": '{"problem": "1 + 1?", "answer": ' + "9" * 5000 + "}\n",
        "deep.jsonl": ('{"problem": "1 + 1?", "answer": "2", "x": ' + "[" * 40_000 + "]" * 40_000
                       + "}\n"),
        "many_grams.txt": "".join(f"gram number {i}\n" for i in range(2001)),
        "surrogate.jsonl": '{"problem": "1 + 1? \\ud800", "answer": "2"}\n',
        "surrogate.yaml": 'instruction: "think \\uD800"\n',
    }
    (folder / "cut_run").mkdir()
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    latin1 = lines[0] + '\n{"problem": "caf\xe9: 1 + 1?", "answer": "2"}\n'
    (folder / "latin1.jsonl").write_bytes(latin1.encode("latin-1"))
    (folder / "utf16.jsonl").write_text(lines[0] + "\n", encoding="utf-16")  # Notepad's "Unicode"
    (folder / "latin1_grams.txt").write_bytes("wait\nr\xe9sum\xe9 the plan\n".encode("latin-1"))
    for name, template in (("bad_template", "{% for message in messages %}{{ message.content }"),
                           ("raising_template", "{{ raise_exception('no system role here') }}")):
        tokenizer.chat_template = template
        tokenizer.save_pretrained(folder / name)
        build_model(tokenizer).save_pretrained(folder / name)
    tokenizer.chat_template = None
    for name in ("no_model_type", "truncated_model", "bad_config"):
        shutil.copytree(folder / "model", folder / name)
    (folder / "no_model_type" / "config.json").write_text("{}")
    weights = folder / "truncated_model" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    (folder / "bad_config" / "config.json").write_text('{"model_type": "llama",')
    return folder


def tiny_train_flags(folder: Path) -> list[str]:
    return [
        "--model", str(folder / "model"), "--data", str(folder / "train.jsonl"),
        "--eval-data", str(folder / "train.jsonl"), "--grams", "paper", "--prompts-per-step", "2",
        "--group-size", "2", "--max-new-tokens", "6", "--micro-batch-size", "4",
        "--eval-every", "0", "--steps", "1", "--threads", "1",
    ]


@pytest.fixture(scope="module")
def finished_run(inputs, tmp_path_factory) -> Path:
    """A one-step run with its checkpoint, to resume from."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train.main([*tiny_train_flags(inputs), "--out", str(run_dir)])
    return run_dir


def case_argv(case: Case, inputs: Path, out: Path, run: Path) -> list[str]:
    """The full command line of a case: its flags after the tiny defaults (a later flag wins in
    argparse)."""
    flags = case.flags.format(dir=inputs, out=out, run=run).split()
    if case.bare:
        return flags
    if case.script == EVAL:
        defaults = ["--model", str(inputs / "model"), "--benchmark", str(inputs / "train.jsonl"),
                    "--samples", "1", "--max-new-tokens", "4", "--no-greedy", "--quiet",
                    "--threads", "1", "--out", str(out)]
        return defaults + flags
    return [*tiny_train_flags(inputs), "--out", str(out / "new_run"), *flags]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (a run folder's lock file aside: it names its latest
    holder)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != run_folder.LOCK}


def prepare_case(case: Case, inputs: Path, finished: Path, root: Path) -> tuple[list[str], Path]:
    """This case's run folder (a sentinel file and a copy of the finished run) and its command
    line."""
    out = root / case.name
    run = out / "run"
    out.mkdir()
    (out / "notes.txt").write_text("written before the command ran\n")
    shutil.copytree(finished, run)
    if case.damaged_config:
        (run / "config.json").write_text('{"algo": "hicra",')
    if case.config_edit:
        settings = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**settings, **json.loads(case.config_edit)}))
    if case.metrics_line:
        metrics = run / "metrics.jsonl"
        metrics.write_text(case.metrics_line + "\n" + metrics.read_text())
    # a file, or a module
    script = [str(HERE / case.script)] if case.script.endswith(".py") else ["-m", case.script]
    return [sys.executable, *script, *case_argv(case, inputs, out, run)], out


def run_script(script: str, argv: list[str], cwd: Path, stderr_path: Path) -> None:
    """Child process body: `python SCRIPT ARGV` (or `python -m MODULE ARGV`: script "-m", argv[0]
    the module) run as __main__ in `cwd`, stdout dropped, stderr to a file."""
    os.chdir(cwd)
    with open(stderr_path, "w") as stderr, open(os.devnull, "w") as stdout:
        os.dup2(stdout.fileno(), 1)
        os.dup2(stderr.fileno(), 2)
    if script == "-m":
        sys.argv = [argv[0], *argv[1:]]
        # preloaded by the server; a fresh `python -m` has not imported it yet
        sys.modules.pop(argv[0], None)
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = [script, *argv]
        runpy.run_path(script, run_name="__main__")


def run_command_line(argv: list[str], cwd: Path, stderr_path: Path) -> tuple[int, str]:
    """(exit code, stderr) of `argv` = [python, SCRIPT, flags...], run in a child forked from a
    server that has imported torch and transformers once (the interpreter start is what a fresh
    `python` would add; test_a_fresh_interpreter_gives_the_same_error checks that it changes
    nothing)."""
    child = FORKSERVER.Process(target=run_script, args=(argv[1], argv[2:], cwd, stderr_path))
    child.start()
    child.join(timeout=300)
    if child.exitcode is None:
        child.kill()
        child.join()
    return child.exitcode, stderr_path.read_text()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_error_line_and_nothing_written(case, inputs, finished_run, tmp_path):
    if case.needs_no and device_present(case.needs_no):
        pytest.skip(f"this machine has {case.needs_no}")
    argv, out = prepare_case(case, inputs, finished_run, tmp_path)
    before = snapshot(out)
    returncode, stderr = run_command_line(argv, out, tmp_path / "stderr.txt")
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), lines[0]
    for text in case.expected:
        assert text in lines[0], (text, lines[0])
    assert returncode == cli.USAGE_ERROR, (returncode, lines[0])
    # the sentinel and the finished run are untouched, and nothing was added
    assert snapshot(out) == before


@pytest.mark.parametrize("name", ["model-no-model-type", "eval-benchmark-latin1"])
def test_a_fresh_interpreter_gives_the_same_error(name, inputs, finished_run, tmp_path):
    case = next(c for c in CASES if c.name == name)
    argv, out = prepare_case(case, inputs, finished_run, tmp_path)
    # PYTHONPATH: -m MODULE from out
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    fresh = subprocess.run(argv, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert (fresh.returncode, fresh.stderr) == run_command_line(argv, out, tmp_path / "stderr.txt")


# ---------------------------------------------------------------- every numeric flag, in-process


@pytest.mark.parametrize("bounds",
                         [config.BOUNDS, evaluation.EVAL_BOUNDS, model_loading.MODEL_BOUNDS])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -1e9])
def test_every_numeric_flag_refuses_non_finite_and_out_of_range_values(bounds, bad):
    args = train.parse_args(["--steps", "1"])
    for dest in bounds:
        values = {**vars(args), **{d: getattr(args, d, 1) for d in bounds}, dest: bad}
        with pytest.raises(InputError, match=f"^{cli.flag_name(dest)}: must be"):
            cli.check_bounds(argparse.Namespace(**values), bounds)


def test_a_resumed_config_with_a_string_for_a_number_is_refused():
    args = argparse.Namespace(lr="0.1")
    with pytest.raises(InputError, match="^--lr: expected a number, got '0.1'"):
        cli.check_bounds(args, {"lr": cli.POSITIVE})


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_outside_unit_interval_is_rejected(alpha):
    with pytest.raises(ValueError, match="--alpha"):
        validate_alpha(alpha)


# ---------------------------------------------------------------- train.main in-process: one line


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--alpha", "1.5"], "--alpha: must be in [0, 1]"),
        (["--group-size", "1"], "--group-size: must be >= 2"),
        (["--algo", "ppo"], "invalid choice: 'ppo'"),
        (["--model", "no/such/model_dir"], "--model: no/such/model_dir: no such folder"),
        (["--data", "missing.jsonl"], "missing.jsonl"),
        (["--grams", "nope.txt"], "--grams: 'nope.txt'"),
    ],
)
def test_bad_input_is_a_one_line_error(tiny_model_dir, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as stop:
        train.main(tiny_args(tiny_model_dir, tmp_path / "run", "--steps", "1", *flags))
    code = stop.value.code
    text = str(code) if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert message in text and "\n" not in text.strip()


def test_malformed_data_line_names_file_and_line(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "oops"\n')
    with pytest.raises(SystemExit) as stop:
        train.main(tiny_args(tiny_model_dir, tmp_path / "run", "--steps", "1", "--data", str(bad)))
    assert stop.value.code == 2 and f"--data: {bad}:2" in capsys.readouterr().err


# ---------------------------------------------------------------- inputs that must work


def test_files_with_a_byte_order_mark_or_crlf_are_read_and_keep_their_first_line(tmp_path):
    data, gram_file = tmp_path / "bom.jsonl", tmp_path / "bom_grams.txt"
    crlf_lines = "".join(json.dumps(r) + "\r\n" for r in TINY_PROBLEMS)
    data.write_bytes(b"\xef\xbb\xbf" + crlf_lines.encode())
    gram_file.write_bytes(b"\xef\xbb\xbfwait\r\nlet me check\r\n")
    assert [p.answer for p in load_problems(str(data))] == [r["answer"] for r in TINY_PROBLEMS]
    assert grams.load_grams(str(gram_file)) == ["wait", "let me check"]


def test_a_line_separator_inside_a_json_string_does_not_split_the_line(tmp_path):
    data = tmp_path / "sep.jsonl"
    line = json.dumps({"problem": "a\u2028b", "answer": "1"}, ensure_ascii=False)
    data.write_text(line + "\n", encoding="utf-8")
    assert load_problems(str(data))[0].problem == "a\u2028b"


def test_a_data_set_smaller_than_one_step_repeats_its_problems(inputs, tmp_path, capsys):
    out = tmp_path / "small"
    train.main([*tiny_train_flags(inputs), "--prompts-per-step", "6", "--out", str(out)])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0]
    assert "has 4 problems, fewer than --prompts-per-step 6" in capsys.readouterr().out
    assert sorted(set(train.prompts_for_step(4, 0, 6, seed=0))) == [0, 1, 2, 3]


def test_an_all_truncated_batch_trains_and_says_so(inputs, tmp_path, capsys):
    out = tmp_path / "truncated"
    train.main([*tiny_train_flags(inputs), "--max-new-tokens", "1", "--out", str(out)])
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["truncation_rate"] == 1.0 and math.isfinite(record["loss"])
    assert "every completion of step 0 hit --max-new-tokens 1" in capsys.readouterr().out


@pytest.mark.parametrize("returned", [math.nan, math.inf, "1.0", None, RuntimeError("grader bug")])
def test_a_reward_that_raises_or_returns_no_finite_number_scores_zero_and_is_counted(
    inputs, tmp_path, monkeypatch, returned
):
    def broken(completion, answer):
        if isinstance(returned, Exception):
            raise returned
        return returned

    # train.py resolves --reward through reward.load_reward
    monkeypatch.setitem(reward.REWARDS, "format", broken)
    out = tmp_path / "reward"
    train.main([*tiny_train_flags(inputs), "--reward", "format", "--out", str(out)])
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["reward"] == 0.0 and record["reward_errors"] == 4
    assert math.isfinite(record["loss"])


class FloatFails:
    def __float__(self):
        raise RuntimeError("no float")


def interrupts(completion, answer):
    raise KeyboardInterrupt


def test_grade_tells_failures_apart():
    assert grading.grade(lambda c, a: 1, "x", "1") == (1.0, None)
    lowest = -grading.REWARD_LIMIT
    assert grading.grade(lambda c, a: lowest, "x", "1") == (lowest, None)
    for value in (math.nan, "1", 10 ** 400, 1e300, -2 * grading.REWARD_LIMIT, FloatFails()):
        assert grading.grade(lambda c, a: value, "x", "1") == (0.0, "invalid"), value
    assert grading.grade(lambda c, a: 1 / 0, "x", "1") == (0.0, "error")
    # from a worker thread it is no Ctrl-C
    assert grading.grade(interrupts, "x", "1") == (0.0, "error")
    assert grading.grade(lambda c, a: sys.exit(3), "x", "1") == (0.0, "exit")


def test_describe_failure_names_what_the_reward_did():
    assert grading.describe_failure(lambda c, a: sys.exit(3), "x", "1") == "called sys.exit(3)"
    assert grading.describe_failure(interrupts, "x", "1") == "raised KeyboardInterrupt"
    assert grading.describe_failure(lambda c, a: 1e300, "x", "1") == (
        "returned 1e+300 (not a number within +-1e+06)")
    assert grading.describe_failure(lambda c, a: 10 ** 5000, "x", "1") == (
        "returned a int with no printable value (not a number within +-1e+06)")
    assert grading.describe_failure(lambda c, a: time.sleep(5), "x", "1", timeout_s=0.2) == (
        "ran over --reward-timeout 0.2 s")


def test_a_chat_template_that_loops_is_refused_at_its_deadline(monkeypatch):
    import rollout  # noqa: PLC0415

    tokenizer = build_tokenizer()
    tokenizer.chat_template = ("{% for i in range(100000) %}{% for j in range(100000) %}"
                               "{% endfor %}{% endfor %}")
    monkeypatch.setattr(rollout, "TEMPLATE_DEADLINE_S", 0.3)
    started = time.monotonic()
    with pytest.raises(InputError, match="--model: its chat template ran over 0.3 s on 1 prompts"):
        rollout.formatted_with_deadline(tokenizer, ["1 + 1?"], rollout.PromptFormat())
    assert time.monotonic() - started < 5


def test_the_deadline_bounds_the_whole_batch():
    """A reward that always hangs costs a batch one --reward-timeout, not one per GRADING_WORKERS
    completions."""
    release = threading.Event()
    started = time.monotonic()
    graded = grading.grade_batch(lambda c, a: release.wait(60), ["x"] * 64, ["1"] * 64,
                                 timeout_s=0.5)
    elapsed = time.monotonic() - started
    release.set()
    assert graded == [(0.0, "timeout")] * 64 and elapsed < 3.0


def test_resuming_a_finished_run_says_there_is_nothing_to_do(finished_run, tmp_path, capsys):
    run_dir = tmp_path / "again"
    shutil.copytree(finished_run, run_dir)
    before = snapshot(run_dir)
    train.main(["--resume", str(run_dir), "--steps", "1"])
    assert "has already trained 1 steps (--steps 1): nothing to do" in capsys.readouterr().out
    assert snapshot(run_dir)["metrics.jsonl"] == before["metrics.jsonl"]


def transpose_a_moment(run_dir: Path) -> None:
    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    path = run_dir / "checkpoint" / "trainer_state.safetensors"
    tensors = load_file(path)
    key = next(k for k, v in tensors.items()
               if k.endswith("/exp_avg") and v.dim() == 2 and v.shape[0] != v.shape[1])
    save_file({**tensors, key: tensors[key].t().contiguous()}, path)
    keep_the_marker_true(path)


def switch_amsgrad_on(run_dir: Path) -> None:
    path = run_dir / "checkpoint" / "trainer_state.json"
    state = json.loads(path.read_text())
    state["optimizer_param_groups"][0]["amsgrad"] = True
    path.write_text(json.dumps(state))
    keep_the_marker_true(path)


def keep_the_marker_true(path: Path) -> None:
    """Record an edited checkpoint file's new size in complete.json (a damage the size check cannot
    see)."""
    marker = path.parent / "complete.json"
    complete = json.loads(marker.read_text())
    complete["files"][path.name] = path.stat().st_size
    marker.write_text(json.dumps(complete))


@pytest.mark.parametrize("damage, message", [
    (transpose_a_moment, "exp_avg of parameter"),
    (switch_amsgrad_on, "AdamW amsgrad True, this run's optimizer has False"),
])
def test_trainer_state_that_does_not_fit_the_model_is_refused_before_anything_changes(
        finished_run, tmp_path, capsys, damage, message):
    run_dir = tmp_path / "damaged"
    shutil.copytree(finished_run, run_dir)
    damage(run_dir)
    before = snapshot(run_dir)
    with pytest.raises(SystemExit) as stop:
        train.main(["--resume", str(run_dir), "--steps", "3"])
    stderr = capsys.readouterr().err
    error = stderr.strip().splitlines()[-1]
    assert stop.value.code == 2 and error.startswith("error: "), stderr
    assert "trainer state does not fit" in error, stderr
    assert message in error and "Traceback" not in stderr
    assert snapshot(run_dir) == before


def test_colour_only_on_a_terminal_and_never_with_no_color(tmp_path, capsys, monkeypatch):
    class Terminal:
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    with open(tmp_path / "log.txt", "w") as log_file:
        assert cli.use_colour(Terminal()) and not cli.use_colour(log_file)
    monkeypatch.setenv("NO_COLOR", "1")
    assert not cli.use_colour(Terminal())
    monkeypatch.delenv("NO_COLOR")
    records = [{"problem": "1 + 1?", "answer": "2", "completions": ["wait, let me check: 2"],
                "correct": [True]}]
    # pytest's captured stdout is not a terminal
    runlog.show_samples(tmp_path, 0, records, ["wait"])
    shown = capsys.readouterr().out
    assert "\033[" not in shown and "[[wait]]" in shown


# -------------------------------------------------------- math-verify timeouts, graded in parallel

TOWER = "\\boxed{9^{9^{9^{9}}}}"  # math-verify / sympy would run for minutes on this


def short_timeout_reward(completion: str, answer: str) -> float:
    """boxed_reward with a 2 s grading timeout (not 5 s), to keep the test short; a real comparison
    takes ~20 ms."""
    pred = reward.extract_boxed(completion)
    return float(pred is not None and reward.answers_match(pred, answer, timeout_s=2.0))


def test_a_slow_answer_times_out_while_the_rest_of_the_batch_is_graded():
    completions = [TOWER, "\\boxed{42}", TOWER, "\\boxed{\\frac{84}{2}}", "\\boxed{41}"]
    graded = grading.grade_batch(short_timeout_reward, completions, ["42"] * len(completions))
    assert graded == [(0.0, "timeout"), (1.0, None), (0.0, "timeout"), (1.0, None), (0.0, None)]


def test_a_batch_is_graded_concurrently():
    """Every grading waits at a barrier for all the others: graded one at a time, the barrier would
    break."""
    size = grading.GRADING_WORKERS
    barrier = threading.Barrier(size)

    def waits_for_the_whole_batch(completion, answer):
        barrier.wait(timeout=60)
        return 1.0

    graded = grading.grade_batch(waits_for_the_whole_batch, ["x"] * size, ["x"] * size)
    assert graded == [(1.0, None)] * size


def test_timeouts_are_counted_by_score_completions():
    rewards, failures = grading.score_completions(short_timeout_reward, [TOWER, "\\boxed{7}"],
                                                  ["7", "7"])
    assert rewards == [0.0, 1.0] and failures == 1
