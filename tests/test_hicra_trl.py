"""HICRA inside TRL's GRPOTrainer (hicra_trl.py, train_trl.py), pinned against our own
implementation.

Skipped when TRL is not installed (pip install -r requirements-trl.txt). The fixed batches come from
TRL's `rollout_func` hook, which replaces generation only: TRL still pads, scores, rewards, computes
the group-relative advantages, and our subclass shapes them per token.
"""

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402  (TRL brings datasets)

import eval as eval_cli  # noqa: E402
from scale_out import train_trl  # noqa: E402
from conftest import build_model  # noqa: E402
from data import InputError  # noqa: E402
from grams import batch_planning_mask  # noqa: E402
from grpo import aggregate_loss, clipped_policy_loss, group_advantages  # noqa: E402
from hicra import hicra_advantages, verl_recipe_mask  # noqa: E402
from scale_out.hicra_trl import LOSS_TYPES, HicraGRPOConfig, HicraGRPOTrainer  # noqa: E402
from rollout import completion_logprobs  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

GROUP = 4
MAX_NEW_TOKENS = 24
PROMPTS = ["Question: what is 2 + 2? Answer:", "Please reason step by step. What is 7 * 6?"]
COMPLETIONS = [  # GROUP per prompt; the ones without EOS below are cut at their length
    "Wait, that is wrong. Let me check the sum.",
    "12 + 30 = 42, so the answer is 42.",
    "First, we can see that 7 * 6 = 42.",
    "Let me check: 6 * 7 = 42. Wait, let me verify.",
    "Alternatively, consider the case where x = 3.",
    "Let's try a different approach: break it into parts.",
    "Then 3 + 4 = 7.",
    "But wait, let me check the sum again.",
]
HAS_EOS = [True, True, False, True, True, False, True, True]
# no group with equal rewards: A = +-0.5 everywhere
REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
GRAMS = ["wait", "let me check", "alternatively", "let's try a different approach"]
# the gram occurrences of each completion, in order: what the planning tokens must spell
PLANNING_PHRASES = [
    ["wait", "let me check"], [], [], ["let me check", "wait"],
    ["alternatively"], ["let's try a different approach"], [], ["wait", "let me check"],
]


def completion_ids(tokenizer) -> list[list[int]]:
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"][:MAX_NEW_TOKENS - 1]
           for text in COMPLETIONS]
    return [row + [tokenizer.eos_token_id] if eos else row for row, eos in zip(ids, HAS_EOS)]


def fixed_reward(completions, **_):
    return list(REWARDS)


def make_trainer(tmp_path, tokenizer, model, **config):
    """A HicraGRPOTrainer whose rollouts are the fixed batch above."""
    gram_file = tmp_path / "grams.txt"
    gram_file.write_text("\n".join(GRAMS) + "\n")
    fixed = completion_ids(tokenizer)

    def rollout(prompts, trainer):
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        return {"prompt_ids": prompt_ids, "completion_ids": [list(row) for row in fixed],
                "logprobs": None}

    settings = dict(
        output_dir=str(tmp_path / "out"), grams=str(gram_file), num_generations=GROUP,
        per_device_train_batch_size=len(COMPLETIONS), max_completion_length=MAX_NEW_TOKENS,
        use_cpu=True, report_to="none", save_strategy="no", shuffle_dataset=False,
        bf16=False,  # TRL defaults to bf16 autocast
    )
    settings.update(config)
    return HicraGRPOTrainer(
        model=model, reward_funcs=fixed_reward, args=HicraGRPOConfig(**settings),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer,
        rollout_func=rollout,
    )


def generation_batch(trainer) -> dict:
    """TRL's scored batch for PROMPTS x GROUP (the trainer's advantage shaping included)."""
    return trainer._generate_and_score_completions(
        [{"prompt": p} for p in PROMPTS for _ in range(GROUP)])


@pytest.fixture(autouse=True)
def quiet_experimental(monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is an experimental TRL hook


@pytest.mark.parametrize("alpha", [0.0, 0.2])
@pytest.mark.parametrize("loss_agg", sorted(LOSS_TYPES))
def test_trl_loss_and_gradient_equal_ours(tmp_path, tokenizer, alpha, loss_agg):
    """Same batch, old log-probs and rewards: TRL's loss, its gradient w.r.t. every weight and
    w.r.t. each token's log-prob (the per-token loss's derivative) equal grpo.clipped_policy_loss +
    aggregate_loss."""
    model = build_model(tokenizer).train()
    trainer = make_trainer(tmp_path, tokenizer, model, algo="hicra", hicra_alpha=alpha,
                           loss_type=LOSS_TYPES[loss_agg])
    batch = generation_batch(trainer)
    mask = batch["completion_mask"].float()  # [B, C]
    with torch.no_grad():
        current, _ = completion_logprobs(model, batch["prompt_ids"], batch["prompt_mask"],
                                         batch["completion_ids"], mask, 1.0)
    generator = torch.Generator().manual_seed(0)
    # ratios on both clip sides
    old_logp = (current + 0.3 * torch.randn(current.shape, generator=generator)) * mask
    batch["old_per_token_logps"] = old_logp

    # TRL: its own log-probs (fused LM head) and loss; keep the gradient w.r.t. its per-token
    # log-probs.
    trl_logps = []
    score = trainer._get_per_token_logps_and_entropies

    def scoring_kept(*args, **kwargs):
        logps, entropies, aux = score(*args, **kwargs)
        logps.retain_grad()
        trl_logps.append(logps)
        return logps, entropies, aux

    trainer._get_per_token_logps_and_entropies = scoring_kept
    # set by Trainer's loop: one micro-batch per optimizer step
    trainer.current_gradient_accumulation_steps = 1
    trl_loss = trainer._compute_loss(model, batch)
    trl_loss.backward()
    trl_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    # Ours, on the same weights.
    rewards = torch.tensor(REWARDS)
    planning = batch_planning_mask(tokenizer, batch["completion_ids"], mask, GRAMS)  # [B, C]
    # [B, C]
    advantages = hicra_advantages(group_advantages(rewards, GROUP, "center"), planning, alpha)
    logp, _ = completion_logprobs(model, batch["prompt_ids"], batch["prompt_mask"],
                                  batch["completion_ids"], mask, 1.0)
    logp.retain_grad()
    # [B, C]
    per_token = clipped_policy_loss(logp, old_logp, advantages, eps_low=0.2, eps_high=0.28)
    our_loss = aggregate_loss(per_token, mask, loss_agg, mask.sum(), len(COMPLETIONS),
                              MAX_NEW_TOKENS)
    our_loss.backward()

    clipped = (logp - old_logp).exp().sub(1).abs().gt(0.25) & mask.bool()
    assert clipped.any() and planning.any()  # the batch exercises the clip and the planning tokens
    torch.testing.assert_close(batch["advantages"], advantages)
    torch.testing.assert_close(trl_logps[0] * mask, logp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trl_loss.detach(), our_loss.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(trl_logps[0].grad * mask, logp.grad * mask, rtol=1e-5, atol=1e-8)
    for name, p in model.named_parameters():
        torch.testing.assert_close(trl_grads[name], p.grad, rtol=1e-4, atol=1e-7,
                                   msg=f"gradient of {name}")


def test_trainer_advantages_amplify_exactly_the_planning_tokens(tmp_path, tokenizer):
    """On a byte-level BPE tokenizer: A + alpha |A| on the tokens of the grams' words, A on every
    other token."""
    alpha = 0.2
    trainer = make_trainer(tmp_path, tokenizer, build_model(tokenizer).train(), algo="hicra",
                           hicra_alpha=alpha)
    batch = generation_batch(trainer)
    completion = batch["completion_mask"].bool()  # [B, C]
    group_a = group_advantages(torch.tensor(REWARDS), GROUP, "center")[:, None].expand(
        completion.shape)  # [B, C]
    amplified = batch["advantages"] != group_a  # [B, C]
    torch.testing.assert_close(batch["advantages"][amplified],
                               (group_a + alpha * group_a.abs())[amplified])
    assert not (amplified & ~completion).any()
    for row, ids in enumerate(batch["completion_ids"]):
        runs, run = [], []  # maximal runs of consecutive amplified tokens, decoded
        for token, is_amplified in zip(ids.tolist(), amplified[row].tolist()):
            if is_amplified:
                run.append(token)
            elif run:
                runs.append(run)
                run = []
        runs += [run] if run else []
        assert ([tokenizer.decode(r).strip().lower() for r in runs]
                == PLANNING_PHRASES[row]), COMPLETIONS[row]
    assert trainer._metrics["train"]["hicra/planning_ratio"][-1] == pytest.approx(
        float(amplified.sum()) / float(completion.sum()))


def test_high_entropy_amplifies_the_top_q_tokens(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, build_model(tokenizer).train(), algo="high_entropy",
                           entropy_top_q=0.3)
    batch = generation_batch(trainer)
    # [B, 1], never 0 here
    group_a = group_advantages(torch.tensor(REWARDS), GROUP, "center")[:, None]
    amplified = (batch["advantages"] != group_a) & batch["completion_mask"].bool()
    assert int(amplified.sum()) == math.ceil(0.3 * int(batch["completion_mask"].sum()))


def test_hicra_verl_amplifies_the_set_train_py_amplifies(tmp_path, tokenizer):
    """The TRL path shapes hicra_verl's advantages with hicra.verl_recipe_mask on TRL's own batch:
    the planning tokens of both groups (each has a correct completion) plus the high-entropy tokens
    of the correct completions longer than their group's mean."""
    trainer = make_trainer(tmp_path, tokenizer, build_model(tokenizer).train(), algo="hicra_verl",
                           entropy_top_q=0.3)
    batch = generation_batch(trainer)
    advantages = group_advantages(torch.tensor(REWARDS), GROUP, "center")  # [B]
    planning = batch_planning_mask(tokenizer, batch["completion_ids"], batch["completion_mask"],
                                   GRAMS)  # [B, C]
    mask = verl_recipe_mask(advantages, planning, trainer._sampling_entropy(batch),
                            batch["completion_mask"], GROUP, 0.3)  # [B, C]
    assert (mask & ~planning).any()  # some high-entropy tokens beyond the planning ones
    torch.testing.assert_close(batch["advantages"],
                               hicra_advantages(advantages, mask, trainer.args.hicra_alpha))


def test_grpo_hands_trl_the_sequence_advantage_on_every_token(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, build_model(tokenizer).train(), algo="grpo")
    batch = generation_batch(trainer)
    expected = group_advantages(torch.tensor(REWARDS), GROUP, "center")[:, None].expand_as(
        batch["advantages"])
    torch.testing.assert_close(batch["advantages"], expected)


@pytest.mark.parametrize("flags, message", [
    (["--algo", "ppo"], "--algo must be one of"),
    (["--alpha", "1.5"], "--alpha: must be in [0, 1], got 1.5"),
    (["--alpha", "-0.1"], "--alpha: must be in [0, 1], got -0.1"),
    (["--alpha", "nan"], "--alpha: must be a finite number"),
    (["--grams", "no/such/grams.txt"], "--grams: 'no/such/grams.txt' is neither a preset"),
    (["--algo", "placebo", "--grams", "paper"], "--grams: algo placebo needs a file"),
    (["--prompts-per-step", "1", "--group-size", "3", "--micro-batch-size", "2"],
     "must be a multiple of --micro-batch-size"),
])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        train_trl.main(["--out", str(tmp_path / "run"), *flags])
    error = capsys.readouterr().err.strip()
    assert (exit_info.value.code == 2 and error.startswith("error: ") and message in error
            and "\n" not in error)
    assert not (tmp_path / "run").exists()


def test_two_step_world_run_writes_a_checkpoint_eval_reads(tmp_path):
    out = tmp_path / "run"
    train_trl.main(["--steps", "2", "--prompts-per-step", "2", "--group-size", "4",
                    "--micro-batch-size", "4", "--max-new-tokens", "48", "--save-every", "2",
                    "--out", str(out)])
    checkpoint = out / "checkpoint-2"
    log = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    steps = [record for record in log if "loss" in record]
    assert len(steps) == 2 and all("hicra/planning_ratio" in r and "hicra/semantic_entropy" in r
                                   for r in steps)
    code = eval_cli.main(["--model", str(checkpoint), "--benchmark", "world", "--limit", "4",
                          "--samples", "1", "--max-new-tokens", "48", "--no-greedy", "--quiet",
                          "--out", str(tmp_path / "eval")])
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert code == 0 and 0.0 <= summary["passes"]["sampled T=0.6"]["pass@1"] <= 1.0


def test_bf16_mixed_precision_run_trains_float32_weights(tmp_path):
    """--dtype bfloat16 is TRL's bf16=True (accelerate's autocast) on float32 weights, as in
    train.py."""
    out = tmp_path / "run"
    train_trl.main(["--steps", "1", "--prompts-per-step", "4", "--group-size", "4",
                    "--micro-batch-size", "8", "--max-new-tokens", "64", "--save-every", "1",
                    "--dtype", "bfloat16", "--algo", "hicra", "--out", str(out)])
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    step = next(record for record in state["log_history"] if "loss" in record)
    assert math.isfinite(step["loss"]) and step["grad_norm"] > 0
    weights = load_file(out / "checkpoint-1" / "model.safetensors")
    assert all(tensor.dtype == torch.float32 for tensor in weights.values())


def test_config_rejects_bad_values_before_loading_anything(tmp_path):
    with pytest.raises(InputError, match="--algo must be one of"):
        HicraGRPOConfig(output_dir=str(tmp_path), algo="hicra2")
    with pytest.raises(InputError, match=r"--alpha must be in \[0, 1\]"):
        HicraGRPOConfig(output_dir=str(tmp_path), hicra_alpha=2.0)


@pytest.mark.parametrize("name, distributed_type", [
    ("single_gpu", "NO"), ("multi_gpu_ddp", "MULTI_GPU"), ("deepspeed_zero3", "DEEPSPEED"),
])
def test_shipped_accelerate_configs_load(name, distributed_type):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(
        str(Path(__file__).parent.parent / "scale_out" / "configs" / f"{name}.yaml"))
    assert config.distributed_type.value == distributed_type
    assert config.deepspeed_config.get("zero_stage", 3) == 3
