"""train.py end to end on a tiny random model (conftest.tiny_model_dir): what a run logs and saves,
resume, every --algo, the placebo control, LoRA, held-out evaluations, and the order of prompts."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import checkpoint
import train
from conftest import read_metrics, tiny_args


def test_training_logs_every_step_and_saves_a_loadable_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    flags = ["--steps", "2", "--algo", "entropy_reg", "--ppo-epochs", "2", "--beta", "0.1"]
    train.main(tiny_args(tiny_model_dir, out, *flags))
    records = read_metrics(out)
    assert [r["step"] for r in records] == [0, 1]
    assert not any(k.startswith("eval/") for r in records for k in r)  # --eval-every 0
    for key in ("reward", "loss", "clip_low", "clip_high", "kl", "grad_norm", "planning_ratio",
                "entropy_all"):
        assert key in records[0], key
    trained = AutoModelForCausalLM.from_pretrained(out / "checkpoint").state_dict()
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir / "model").state_dict()
    assert trained.keys() == initial.keys()
    # the entropy bonus moved the weights
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)


def test_resume_continues_exactly_where_the_run_stopped(tiny_model_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(tiny_args(tiny_model_dir, straight, "--steps", "3", "--seed", "3"))
    train.main(tiny_args(tiny_model_dir, resumed, "--steps", "2", "--seed", "3"))
    train.main(["--resume", str(resumed), "--steps", "3"])
    assert read_metrics(straight)[2]["loss"] == read_metrics(resumed)[2]["loss"]
    assert [r["step"] for r in read_metrics(resumed)] == [0, 1, 2]
    weights = [AutoModelForCausalLM.from_pretrained(d / "checkpoint").state_dict()
               for d in (straight, resumed)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_each_start_of_a_run_records_where_it_ran(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(tiny_args(tiny_model_dir, out, "--steps", "1", "--threads", "1"))
    train.main(["--resume", str(out), "--steps", "2"])
    lines = [json.loads(line) for line in (out / "environment.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1]
    assert all(line["threads"] == 1 for line in lines)
    assert lines[0]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert lines[0]["torch"] == torch.__version__ and lines[0]["cpu"]
    assert "ran on: " in capsys.readouterr().out


@pytest.mark.parametrize("algo", ["grpo", "hicra", "high_entropy"])
def test_every_algo_runs_a_step(tiny_model_dir, tmp_path, algo):
    train.main(tiny_args(tiny_model_dir, tmp_path / algo, "--steps", "1", "--algo", algo))
    assert len(read_metrics(tmp_path / algo)) == 1


def test_placebo_amplifies_the_placebo_grams_it_draws_from_the_solutions(tiny_model_dir, tmp_path,
                                                                        capsys):
    rows = [{"problem": f"What is {a} + {b}?", "answer": str(a + b),
             "solution": f"Let me check: {a} plus {b} gives {a + b}, so the answer is {a + b}."}
            for a, b in [(2, 2), (3, 4), (12, 30), (5, 6)]]
    data, grams = tmp_path / "solved.jsonl", tmp_path / "grams.txt"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    grams.write_text("let me check\nso the answer is\n")
    out = tmp_path / "placebo"
    train.main([*tiny_args(tiny_model_dir, out, "--steps", "1", "--algo", "placebo"),
                "--data", str(data), "--grams", str(grams)])
    placebo = (out / "placebo_grams.txt").read_text().split("\n")[:-1]
    assert sorted(len(g.split()) for g in placebo) == [3, 4]
    # only non-strategic text
    assert all(" plus " in f" {g} " or " gives " in f" {g} " for g in placebo)
    assert "amplified_ratio" in read_metrics(out)[0]
    with pytest.raises(SystemExit):
        train.main(tiny_args(tiny_model_dir, tmp_path / "nosolution", "--steps", "1",
                             "--algo", "placebo"))
    error = capsys.readouterr().err
    assert "--algo placebo: " in error and "has no 'solution' field" in error


def test_lora_run_with_gradient_checkpointing_saves_and_resumes(tiny_model_dir, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    flags = ["--lora-rank", "4", "--gradient-checkpointing", "--algo", "entropy_reg", "--seed", "1"]
    train.main(tiny_args(tiny_model_dir, out, "--steps", "1", *flags))
    assert (out / "checkpoint" / "adapter_config.json").is_file()
    train.main(["--resume", str(out), "--steps", "2"])
    assert [r["step"] for r in read_metrics(out)] == [0, 1]


def test_prompt_order_visits_every_problem_once_per_epoch_and_is_a_function_of_seed_and_step():
    first_epoch = [i for step in range(4) for i in train.prompts_for_step(12, step, 3, seed=5)]
    assert sorted(first_epoch) == list(range(12))
    assert train.prompts_for_step(12, 6, 3, seed=5) == train.prompts_for_step(12, 6, 3, seed=5)
    assert train.prompts_for_step(12, 0, 12, seed=5) != train.prompts_for_step(12, 0, 12, seed=6)


def test_evaluations_are_logged_as_their_own_lines_and_survive_resume(tiny_model_dir, tmp_path):
    out = tmp_path / "evals"
    flags = ["--eval-every", "1", "--eval-limit", "2", "--save-every", "1"]
    train.main(tiny_args(tiny_model_dir, out, "--steps", "1", *flags))
    train.main(["--resume", str(out), "--steps", "2"])
    records = read_metrics(out)
    evals = [r["step"] for r in records if "eval/pass@1" in r]
    steps = [r["step"] for r in records if "reward" in r]
    assert evals == [0, 1, 2] and steps == [0, 1]  # held-out after 0, 1 and 2 updates
    pages = sorted(p.name for p in out.glob("samples_step*.html"))
    assert pages == [f"samples_step0000{i}.html" for i in range(3)]
    checkpoint.truncate_metrics(out / "metrics.jsonl", last_step=0)
    assert [(r["step"], "reward" in r) for r in read_metrics(out)] == [(0, False), (0, True),
                                                                      (1, False)]
