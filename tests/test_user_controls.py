"""Prompt flags (instruction, system prompt, few-shot), --reward module:function, --report-to
runlog."""

import importlib.machinery
import json
import sys
import types

import pytest

from benchmarks import bench
import eval as evaluation
import train
import runlog
from conftest import build_tokenizer, one_line_input_error, read_metrics, tiny_args
from data import read_examples
from reward import load_reward
from rollout import DEFAULT_INSTRUCTION, PLAIN_TEMPLATE, PromptFormat, format_prompt

EXAMPLES = (("What is 1 + 1?", "1 + 1 = 2. \\boxed{2}"),
            ("What is 2 + 3?", "2 + 3 = 5. \\boxed{5}"))
REWARD_MODULE = '''
from __future__ import annotations

from dataclasses import dataclass

NOT_A_FUNCTION = 3

@dataclass
class Score:  # a dataclass needs its module in sys.modules: loading from a path must register it
    value: float = 1.0

def always_one(completion, answer):
    return Score().value

def broken(completion, answer):
    raise RuntimeError("bug in the user's reward")
'''


@pytest.fixture(scope="module")
def plain_tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    return tokenizer


@pytest.fixture(scope="module")
def run_files(tiny_model_dir):
    """The tiny model folder and its 4-problem JSONL file, plus a few-shot file and a reward
    module."""
    shots = "".join(json.dumps({"problem": p, "solution": s}) + "\n" for p, s in EXAMPLES)
    (tiny_model_dir / "shots.jsonl").write_text(shots)
    (tiny_model_dir / "my_rewards.py").write_text(REWARD_MODULE)
    return tiny_model_dir


def train_args(folder, out, *extra):
    """tiny_args for one step on one thread, in micro-batches of 4 (the later flag wins)."""
    return tiny_args(folder, out, "--micro-batch-size", "4", "--steps", "1", "--threads", "1",
                     *extra)


def one_line_error(stop: pytest.ExceptionInfo, capsys) -> str:
    """The one `error: ...` line a stopped train.main wrote on stderr (exit code 2: bad input)."""
    text = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and text.startswith("error: ") and "\n" not in text, text
    return text


def test_default_prompt_is_the_problem_then_the_instruction_in_one_user_turn(tokenizer,
                                                                             plain_tokenizer):
    messages = [{"role": "user", "content": f"What is 2 + 2?\n{DEFAULT_INSTRUCTION}"}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert format_prompt(tokenizer, "What is 2 + 2?") == expected
    plain = f"Question: What is 2 + 2?\n{DEFAULT_INSTRUCTION}\nAnswer:"
    assert format_prompt(plain_tokenizer, "What is 2 + 2?") == plain


@pytest.mark.parametrize("template, expected", [
    ("chat",  # a system turn, then the examples as user and assistant turns
     "<|system|>Be brief.<|end|>"
     "<|user|>What is 1 + 1?\nBox it.<|end|><|assistant|>1 + 1 = 2. \\boxed{2}<|end|>"
     "<|user|>What is 2 + 3?\nBox it.<|end|><|assistant|>2 + 3 = 5. \\boxed{5}<|end|>"
     "<|user|>What is 4 + 4?\nBox it.<|end|><|assistant|>"),
    ("plain",  # a system line, then answered question blocks
     "Be brief.\n\n"
     "Question: What is 1 + 1?\nBox it.\nAnswer: 1 + 1 = 2. \\boxed{2}\n\n"
     "Question: What is 2 + 3?\nBox it.\nAnswer: 2 + 3 = 5. \\boxed{5}\n\n"
     "Question: What is 4 + 4?\nBox it.\nAnswer:"),
], ids=["chat", "plain"])
def test_prompt_has_the_system_prompt_then_the_examples_then_the_problem(tokenizer, plain_tokenizer,
                                                                         template, expected):
    chosen = tokenizer if template == "chat" else plain_tokenizer
    prompt_format = PromptFormat("Box it.", "Be brief.", EXAMPLES)
    assert format_prompt(chosen, "What is 4 + 4?", prompt_format) == expected
    assert PLAIN_TEMPLATE.format(content="x").endswith("Answer:")


def test_empty_instruction_leaves_the_problem_alone(tokenizer, plain_tokenizer):
    no_instruction = PromptFormat(instruction="")
    plain = format_prompt(plain_tokenizer, "What is 4 + 4?", no_instruction)
    assert plain == "Question: What is 4 + 4?\nAnswer:"
    chat = format_prompt(tokenizer, "What is 4 + 4?", no_instruction)
    assert "<|user|>What is 4 + 4?<|end|>" in chat


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"problem": "1+1?", "solution": "2"}\n{"problem": "2+2?"}\n',
         ":2: expected a JSON object"),
        ('{"problem": "1+1?", "solution": "2"\n', ":1: malformed JSON"),
        ("\n\n", "file is empty"),
    ],
)
def test_few_shot_file_errors_name_file_and_line(tmp_path, content, message):
    assert message in one_line_input_error(tmp_path / "shots.jsonl", content, read_examples)


def test_training_with_system_prompt_and_few_shot_records_them_and_prompts_with_them(
        run_files, tmp_path, monkeypatch):
    prompts_seen = []
    original = train.generate_rollouts

    def seen(m, t, prompts, *a):
        return prompts_seen.extend(prompts) or original(m, t, prompts, *a)

    monkeypatch.setattr(train, "generate_rollouts", seen)
    out = tmp_path / "run"
    train.main(train_args(run_files, out, "--few-shot", str(run_files / "shots.jsonl"),
                          "--system-prompt", "Be brief.", "--instruction", "Box it."))
    config = json.loads((out / "config.json").read_text())
    assert (config["system_prompt"], config["instruction"]) == ("Be brief.", "Box it.")
    assert len(prompts_seen) == 2
    start = "<|system|>Be brief.<|end|><|user|>What is 1 + 1?\nBox it.<|end|>"
    assert all(p.startswith(start) for p in prompts_seen)


def test_eval_cli_uses_the_prompt_flags(run_files, tmp_path):
    out = tmp_path / "eval"
    code = evaluation.main([
        "--model", str(run_files / "model"), "--benchmark", str(run_files / "train.jsonl"),
        "--limit", "2", "--temperature", "0", "--max-new-tokens", "4",
        "--few-shot", str(run_files / "shots.jsonl"), "--instruction", "", "--out", str(out),
        "--quiet",
    ])
    assert code == 0
    results = (out / "results.jsonl").read_text().splitlines()
    prompts = [json.loads(line)["prompt"] for line in results]
    first_shot = "<|user|>What is 1 + 1?<|end|><|assistant|>1 + 1 = 2. \\boxed{2}<|end|>"
    assert prompts[0].startswith(first_shot)
    assert prompts[0].endswith("<|user|>What is 2 + 2?<|end|><|assistant|>")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["few_shot"] == str(run_files / "shots.jsonl")


def test_resuming_a_run_from_before_the_prompt_flags_uses_their_defaults(run_files, tmp_path):
    out = tmp_path / "old"
    train.main(train_args(run_files, out))
    config = json.loads((out / "config.json").read_text())
    for key in ("instruction", "system_prompt", "few_shot", "report_to"):
        del config[key]
    (out / "config.json").write_text(json.dumps(config))
    train.main(["--resume", str(out), "--steps", "2"])
    assert [r["step"] for r in read_metrics(out)] == [0, 1]


def test_reward_from_module_function_is_used_and_a_raising_one_scores_zero_and_is_counted(
        run_files, tmp_path):
    module = run_files / "my_rewards.py"
    train.main(train_args(run_files, tmp_path / "one", "--reward", f"{module}:always_one"))
    assert read_metrics(tmp_path / "one")[0]["reward"] == 1.0
    train.main(train_args(run_files, tmp_path / "broken", "--reward", f"{module}:broken"))
    record = read_metrics(tmp_path / "broken")[0]
    assert (record["reward"], record["reward_errors"]) == (0.0, 4)


def test_reward_loads_a_dotted_module_name():
    assert load_reward("reward:gsm8k_reward")("the answer is 7", "7") == 1.0


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:score",
         "--reward: cannot import 'no_such_module_xyz': ModuleNotFoundError"),
        ("MODULE:missing", "has no attribute 'missing'"),
        ("MODULE:NOT_A_FUNCTION", "is not callable (it is a int)"),
        ("nonsense", "--reward: unknown reward 'nonsense'"),
    ],
)
def test_reward_loading_errors_are_one_line_and_name_the_flag(run_files, tmp_path, capsys, spec,
                                                              message):
    spec = spec.replace("MODULE", str(run_files / "my_rewards.py"))
    with pytest.raises(SystemExit) as stop:
        train.main(train_args(run_files, tmp_path / "run", "--reward", spec))
    assert message in one_line_error(stop, capsys)
    eval_argv = ["--model", "unused", "--benchmark", str(run_files / "train.jsonl"),
                 "--reward", spec]
    assert evaluation.main(eval_argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_tensorboard_gets_a_scalar_per_logged_key_on_a_two_step_run(run_files, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    train.main(train_args(run_files, out, "--steps", "2", "--eval-every", "1", "--eval-limit", "2",
                          "--report-to", "tensorboard"))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = {}
    for record in read_metrics(out):
        for tag in runlog.scalars(record):
            logged.setdefault(tag, []).append(record["step"])
    assert "train/reward" in logged and "eval/pass@1" in logged
    assert set(events.Tags()["scalars"]) == set(logged)
    for tag, steps in logged.items():
        assert [e.step for e in events.Scalars(tag)] == steps, tag


def test_wandb_tracker_logs_the_same_scalars_at_the_record_step(tmp_path, monkeypatch):
    calls = []
    fake_run = types.SimpleNamespace(log=lambda values, step: calls.append((step, values)),
                                     finish=lambda: calls.append("finish"))
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kwargs: calls.append(kwargs) or fake_run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    runlog.check_installed(["wandb"])
    (tracker,) = runlog.open_trackers(["wandb"], tmp_path / "run-a", {"lr": 0.1}, purge_from=0)
    tracker.log({"step": 3, "reward": 0.5, "eval/pass@1": 0.25})
    tracker.close()
    assert calls[0]["config"] == {"lr": 0.1} and calls[0]["name"] == "run-a"
    assert calls[1:] == [(3, {"train/reward": 0.5, "eval/pass@1": 0.25}), "finish"]


def test_missing_tracker_package_is_a_one_line_error_before_training(run_files, tmp_path,
                                                                      monkeypatch, capsys):
    monkeypatch.setattr(runlog.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as stop:
        train.main(train_args(run_files, tmp_path / "run", "--report-to", "wandb"))
    assert "--report-to wandb: the wandb package is not installed" in one_line_error(stop, capsys)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_bench_times_a_step_with_the_prompt_and_reward_flags(run_files, tmp_path, capsys):
    reward = f"{run_files / 'my_rewards.py'}:always_one"
    bench.main(train_args(run_files, tmp_path, "--few-shot", str(run_files / "shots.jsonl"),
                          "--reward", reward, "--repeats", "1"))
    assert "step 0: rollout" in capsys.readouterr().out


def test_bench_memory_poll_stops_with_its_block_so_a_later_fork_is_safe():
    with bench.PhaseMemory(interval_s=0.001) as memory:
        with memory.track("sampling 0"):
            bytearray(2**20)
        assert memory.thread.is_alive()
    assert not memory.thread.is_alive() and memory.peaks["sampling 0"] > 0


def test_held_out_samples_show_the_reference_answer_beside_wrong(tmp_path, capsys):
    records = [{"problem": "What is 40 + 2?", "answer": "42", "completions": ["\\boxed{41}"],
                "correct": [False]},
               {"problem": "What is 1 + 1?", "answer": "2", "completions": ["\\boxed{2}"],
                "correct": [True]}]
    runlog.show_samples(tmp_path, 7, records, ["let's"])
    assert "--- wrong (the answer is 42): What is 40 + 2?" in capsys.readouterr().out
    page = (tmp_path / "samples_step00007.html").read_text()
    assert "<h3>wrong (the answer is 42)</h3>" in page and "<h3>correct</h3>" in page
