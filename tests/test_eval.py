"""Tests for reward.py, data.py and eval.py: the grader's hard cases, pass@k, one-line input errors,
and an end-to-end run of the CLI on a tiny random model (fixtures in conftest.py, no network)."""

import argparse
import json
import threading
from pathlib import Path

import pytest

import eval as evaluation
import model_loading
from conftest import build_model
from cli import InputError
from data import load_problems
from grading import grade, score_completions
from reward import (GradingTimeout, answers_match, boxed_reward, extract_boxed, format_reward,
                    gsm8k_reward)

# An answer whose comparison makes sympy compute a tower of powers: it never finishes in time.
RUNAWAY_ANSWER = "2^{2^{2^{2^{2^{100}}}}}!"


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("so the answer is \\boxed{\\frac{1}{2}}.", "0.5"),
        ("\\boxed{\\text{(C)}}", "C"),
        ("\\boxed{1,000}", "1000"),
        ("\\boxed{\\dfrac{1}{2}}", "\\frac12"),
        ("\\boxed{\\left(3, \\dfrac{\\pi}{2}\\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed{90^\\circ}", "90"),
        ("$\\boxed{18.00}$", "18"),
        ("\\boxed 5.", "5"),
    ],
)
def test_boxed_reward_accepts_equivalent_forms(completion, answer):
    assert boxed_reward(completion, answer) == 1.0


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("\\boxed{\\frac{1}{3}}", "0.5"),
        ("\\boxed{B}", "C"),
        ("the answer is 42", "42"),  # strict: no box is wrong
        ("\\boxed{42} but wait, \\boxed{41}", "42"),  # the last box counts
    ],
)
def test_boxed_reward_rejects_wrong_or_unboxed_answers(completion, answer):
    assert boxed_reward(completion, answer) == 0.0


def test_extract_boxed_matches_nested_braces_and_takes_the_last_box():
    assert extract_boxed("\\boxed{\\frac{a}{b^{2}}}") == "\\frac{a}{b^{2}}"
    assert extract_boxed("\\boxed{1} then \\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert extract_boxed("\\boxed{7} and a truncated \\boxed{\\frac{1") == "7"
    assert extract_boxed("no box here") is None
    assert extract_boxed("\\boxed{}") is None


def test_gsm8k_reward_compares_numbers_with_commas_units_and_boxes():
    assert gsm8k_reward("She makes $1,000.00 dollars.", "1000") == 1.0
    assert gsm8k_reward("\\boxed{18 \\text{ dollars}}", "18") == 1.0
    assert gsm8k_reward("2 apples and 3 pears", "2") == 0.0  # the last number counts
    assert gsm8k_reward("no number", "2") == 0.0


def test_format_reward_checks_only_for_a_box():
    assert format_reward("\\boxed{x}", "7") == 1.0
    assert format_reward("x = 7", "7") == 0.0


def test_grading_timeout_works_off_the_main_thread():
    outcome = {}

    def worker():
        try:
            answers_match(RUNAWAY_ANSWER, "3", timeout_s=0.5)
        except GradingTimeout:
            outcome["timeout"] = True
        outcome["graded"] = grade(lambda c, a: float(answers_match(c, a, timeout_s=0.5)),
                                  RUNAWAY_ANSWER, "3")

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=30)
    assert outcome == {"timeout": True, "graded": (0.0, "timeout")}


def test_score_completions_scores_a_raising_reward_as_zero_and_counts_it():
    def flaky(completion, answer):
        if completion == "bad":
            raise RuntimeError("grader bug")
        return 1.0

    assert score_completions(flaky, ["ok", "bad", "ok"], ["1", "1", "1"]) == ([1.0, 0.0, 1.0], 1)


def test_pass_at_k_matches_hand_computed_values():
    assert [evaluation.pass_at_k(4, 1, k) for k in range(1, 5)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0])
    assert evaluation.pass_at_k(4, 0, 4) == 0.0
    assert evaluation.pass_at_k(32, 32, 1) == 1.0
    with pytest.raises(ValueError):
        evaluation.pass_at_k(4, 1, 5)


def test_load_problems_reads_benchmarks_and_keeps_extra_fields():
    problems = load_problems("math500", limit=2)
    assert len(problems) == 2 and problems[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert "solution" in problems[0].meta
    assert len(load_problems("aime24")) == 30


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("", "file is empty"),
        ('{"problem": "1+1", "answer": "2"}\n{"problem": oops}\n', ":2: malformed JSON"),
        ('{"problem": "1+1", "answer": "2"}\n\n{"problem": "2+2"}\n', ":3: missing field 'answer'"),
        ('{"answer": "2"}\n', ":1: missing field 'problem'"),
    ],
)
def test_load_problems_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bench.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=message) as error:
        load_problems(str(path))
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_unknown_benchmark_lists_valid_names():
    with pytest.raises(InputError, match="valid names: gsm8k, .*math500"):
        load_problems("gsm9k")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """The tiny random model and its tokenizer saved as an HF folder, as train.py writes
    checkpoints."""
    folder = tmp_path_factory.mktemp("tiny-model")
    build_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_evaluate_returns_pass_at_k_and_one_record_per_problem(model_dir):
    model, tokenizer = model_loading.load_model(str(model_dir))
    problems = load_problems("gsm8k", limit=2)
    summary, records = evaluation.evaluate(
        model, tokenizer, problems, samples=3, temperature=1.0, max_new_tokens=6, batch_size=4,
        progress=False
    )
    assert {"pass@1", "pass@2", "pass@3", "mean_length", "no_box", "timeouts"} <= summary.keys()
    assert [len(r["completions"]) for r in records] == [3, 3]
    assert 1 <= summary["mean_length"] <= 6


def test_cli_writes_results_and_summary_for_a_checkpoint_folder(model_dir, tmp_path):
    out = tmp_path / "eval"
    argv = ["--model", str(model_dir), "--benchmark", "gsm8k", "--limit", "3", "--samples", "2",
            "--max-new-tokens", "5", "--batch-size", "4", "--out", str(out), "--quiet"]
    assert evaluation.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == 3
    assert set(summary["passes"]) == {"sampled T=0.6", "greedy"}
    assert {"pass@1", "pass@2"} <= summary["passes"]["sampled T=0.6"].keys()
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6  # 3 problems x (sampled + greedy)
    assert {"prompt", "completions", "extracted", "correct"} <= rows[0].keys()


@pytest.mark.parametrize(
    "model, gguf_file, folder",
    [
        ("runs/first/checkpoint", None, "eval-aime24-first-checkpoint"),
        ("runs/second/checkpoint/", None, "eval-aime24-second-checkpoint"),
        ("runs/trl/checkpoint-40", None, "eval-aime24-trl-checkpoint-40"),
        ("Qwen/Qwen2.5-0.5B-Instruct", None, "eval-aime24-Qwen2.5-0.5B-Instruct"),
        ("models/tiny-world", None, "eval-aime24-tiny-world"),
        ("models/smol.Q8_0.gguf", None, "eval-aime24-smol.Q8_0"),
        ("models/smol", "smol-q4_k_m.gguf", "eval-aime24-smol-q4_k_m"),
    ],
)
def test_default_out_names_the_run_of_a_checkpoint_and_keeps_model_names_whole(model, gguf_file,
                                                                               folder):
    """Two runs' checkpoints must not share runs/eval-BENCH-checkpoint; a dot in a hub id is not a
    file suffix."""
    args = argparse.Namespace(model=model, gguf_file=gguf_file, benchmark="aime24")
    assert evaluation.default_out(args) == Path("runs") / folder


def test_default_out_names_the_run_of_a_relative_checkpoint_path(tmp_path, monkeypatch):
    (tmp_path / "my-run" / "checkpoint").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "my-run")
    args = argparse.Namespace(model="checkpoint", gguf_file=None, benchmark="data/bench.jsonl")
    assert evaluation.default_out(args) == Path("runs") / "eval-bench-my-run-checkpoint"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--benchmark", "gsm9k"], "unknown benchmark 'gsm9k'"),
        (["--benchmark", "missing/file.jsonl"], "no such file"),
        (["--benchmark", "gsm8k", "--samples", "0"], "--samples: must be >= 1, got 0"),
        (["--benchmark", "gsm8k", "--samples", "2", "--pass-k", "1,4"],
         "--pass-k: k must be between 1 and"),
    ],
)
def test_bad_input_is_a_one_line_error(model_dir, capsys, extra, message):
    assert evaluation.main(["--model", str(model_dir), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_bad_problem_line_is_a_one_line_error(model_dir, tmp_path, capsys):
    bench = tmp_path / "bench.jsonl"
    bench.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2"}\n')
    assert evaluation.main(["--model", str(model_dir), "--benchmark", str(bench)]) == 2
    assert capsys.readouterr().err == f"error: --benchmark: {bench}:2: missing field 'answer'\n"


def test_plot_without_run_dirs_is_a_one_line_error(capsys):
    assert evaluation.main(["plot"]) == 2
    assert capsys.readouterr().err.startswith("error: plot:")


@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    """A one-step train.py run on the built-in world: RUN/config.json beside RUN/checkpoint."""
    import train  # noqa: PLC0415

    run = tmp_path_factory.mktemp("world-run") / "run"
    train.main(["--steps", "1", "--prompts-per-step", "2", "--group-size", "2",
                "--max-new-tokens", "64", "--eval-every", "0", "--instruction", "Box it.",
                "--threads", "1", "--out", str(run)])
    return run


def test_a_runs_checkpoint_is_evaluated_with_the_runs_problems_prompt_and_length(world_run,
                                                                                 tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["--model", str(world_run / "checkpoint"), "--limit", "2", "--samples", "1",
            "--no-greedy", "--quiet", "--out", str(out)]
    assert evaluation.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["benchmark"], summary["max_new_tokens"], summary["instruction"]) == (
        "world", 64, "Box it.")
    assert f"from {world_run / 'config.json'}: --benchmark world" in capsys.readouterr().out
    # given flags win
    assert evaluation.main([*argv, "--max-new-tokens", "32", "--instruction", ""]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["max_new_tokens"], summary["instruction"]) == (32, "")


def test_a_model_that_is_not_a_runs_checkpoint_needs_a_benchmark(model_dir, tmp_path, capsys):
    assert evaluation.main(["--model", str(model_dir), "--out", str(tmp_path / "eval")]) == 2
    assert capsys.readouterr().err.startswith("error: --benchmark: required")
    assert not (tmp_path / "eval").exists()


def test_an_evaluation_longer_than_the_models_positions_fails_in_one_line_and_writes_nothing(
        world_run, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["--model", str(world_run / "checkpoint"), "--max-new-tokens", "1024", "--limit", "2",
            "--out", str(out)]
    assert evaluation.main(argv) == 2
    # in-process, transformers' "Loading weights" bar comes before
    last = capsys.readouterr().err.split("\n")[-2]
    assert (last.startswith("error: --max-new-tokens:")
            and "exceeds the model's 256 positions" in last)
    assert not out.exists()


def test_without_max_new_tokens_a_small_model_gets_what_its_positions_leave(tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["--model", "world/models/tiny-world", "--benchmark", "world", "--limit", "2",
            "--samples", "1", "--no-greedy", "--quiet", "--out", str(out)]
    assert evaluation.main(argv) == 0, capsys.readouterr().err
    model, tokenizer = model_loading.load_model("world/models/tiny-world", "float32", "cpu", None)
    problems = [p.problem for p in load_problems("world", 2, 0)]
    prompt = evaluation.longest_prompt_tokens(tokenizer, problems, evaluation.PromptFormat(),
                                              longest=len(problems))
    assert json.loads((out / "summary.json").read_text())["max_new_tokens"] == 256 - prompt < 1024


def test_a_model_folder_asking_to_run_its_own_code_is_refused_in_one_line_and_runs_nothing(
        model_dir, tmp_path):
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        if (model_dir / name).exists():
            (crafted / name).write_bytes((model_dir / name).read_bytes())
    config = json.loads((crafted / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (crafted / "config.json").write_text(json.dumps(config))
    ran = tmp_path / "ran"
    (crafted / "evil.py").write_text(f"open({str(ran)!r}, 'w').write('code from the folder ran')\n")
    with pytest.raises(InputError, match=r"--model: .*config.json asks to run code from the "
                                         r"model folder") as refused:
        model_loading.load_model(str(crafted))
    assert "\n" not in str(refused.value) and not ran.exists()


def test_results_replace_planted_links_and_a_live_writer_is_refused(model_dir, tmp_path, capsys):
    out, victim = tmp_path / "eval", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("keep me")
    (out / "results.jsonl").symlink_to(victim)
    (out / "summary.json.tmp").symlink_to(victim)  # the fixed temporary name of earlier versions
    argv = ["--model", str(model_dir), "--benchmark", "gsm8k", "--limit", "1", "--samples", "1",
            "--max-new-tokens", "3", "--no-greedy", "--quiet", "--out", str(out)]
    assert evaluation.main(argv) == 0
    assert victim.read_text() == "keep me" and not (out / "results.jsonl").is_symlink()
    assert json.loads((out / "summary.json").read_text())["problems"] == 1
    import fcntl  # noqa: PLC0415

    with open(out / ".lock", "w") as held:  # as a live train.py run or another evaluation holds it
        held.write("process 1 on elsewhere\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        assert evaluation.main(argv) == 2
    assert "is in use by process 1 on elsewhere" in capsys.readouterr().err


def test_a_figure_replaces_a_planted_link_instead_of_writing_through_it(tmp_path):
    from analysis import plots  # noqa: PLC0415
    from test_metrics import write_fake_run  # noqa: PLC0415

    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    write_fake_run(run, "hicra", 0)
    victim.write_text("keep me")
    (run / "fig3_dynamics.png").symlink_to(victim)
    plots.main([str(run)])
    assert victim.read_text() == "keep me" and not (run / "fig3_dynamics.png").is_symlink()


def test_a_problem_line_over_the_limit_is_refused_before_parsing(tmp_path):
    import data  # noqa: PLC0415

    path = tmp_path / "long.jsonl"
    path.write_text('{"problem": "1+1", "answer": "2"}\n'
                    + json.dumps({"problem": "x" * 200_000, "answer": "1"}) + "\n")
    with pytest.raises(InputError, match=rf"long.jsonl:2: a line of 200,030 characters, over the "
                                         rf"{data.MAX_LINE_CHARS:,}"):
        load_problems(str(path))
