"""The fast sampler, rollout.sample_completions, pinned to its plain definition,
rollout.reference_sample_completions (Hugging Face's `model.generate`).

Greedy, the two give the same completions whichever rows finish when. Sampling, they draw the same
tokens from the same seed only while both draw for the same rows: torch.multinomial takes random
numbers for every row of its batch, and the fast sampler drops finished rows (COMPACT_AT) where
generate keeps drawing for them, so after the first drop the two random streams part (two valid
samples of one policy, not the same sample). The sampling comparison therefore runs with dropping
switched off; what dropping could break under sampling is tested on its own: each row's recorded
log-probs against a fresh forward, and its EOS stop and padding.
"""

import pytest
import torch

import model_loading
import rollout
from conftest import build_model
from rollout import (completion_mask_from_eos, encode_prompts, eos_token_ids, format_prompt,
                     pad_token_id, reference_completion_logprobs, reference_sample_completions,
                     sample_completions)
from world.tasks import world_problems

GROUP_SIZE = 3
MAX_NEW_TOKENS = 120  # the world model's traces end within 38 to ~90 tokens: rows stop apart


@pytest.fixture(scope="module")
def world():
    """The world's trained tiny model, its tokenizer, and four left-padded prompts [N, P]."""
    model, tokenizer = model_loading.load_model("world/models/tiny-world", "float32", "cpu", None)
    prompts = [format_prompt(tokenizer, p.problem) for p in world_problems("test", 4, seed=3)]
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, "cpu")  # [N, P]
    assert len(set(prompt_mask.sum(-1).tolist())) > 1  # prompts of different lengths: left padding
    return model, tokenizer, prompt_ids, prompt_mask


@pytest.fixture()
def drops(monkeypatch):
    """How many times the fast sampler dropped finished rows (a list, one entry per drop)."""
    calls = []
    drop = rollout._drop_finished_rows

    def counted(batch, token):
        calls.append(len(token))
        return drop(batch, token)

    monkeypatch.setattr(rollout, "_drop_finished_rows", counted)
    return calls


def both_samplers(model, prompt_ids, prompt_mask, temperature, top_p, eos_ids, pad_id, seed=0):
    """(fast, reference), each (completion_ids, logp, entropy) [B, C], drawn from the same seed."""
    outputs = []
    for sampler in (sample_completions, reference_sample_completions):
        torch.manual_seed(seed)
        outputs.append(sampler(model, prompt_ids, prompt_mask, GROUP_SIZE, MAX_NEW_TOKENS,
                               temperature, top_p, eos_ids, pad_id))
    return outputs


def assert_same_completions(fast, reference):
    """Identical ids; log-probs and entropies equal up to float rounding of the two forwards."""
    (fast_ids, fast_logp, fast_entropy), (ids, logp, entropy) = fast, reference
    assert fast_ids.shape == ids.shape and torch.equal(fast_ids, ids)
    assert torch.allclose(fast_logp, logp, rtol=0, atol=1e-5)
    assert torch.allclose(fast_entropy, entropy, rtol=0, atol=1e-5)


def test_greedy_completions_are_those_of_generate_while_finished_rows_are_dropped(world, drops):
    model, tokenizer, prompt_ids, prompt_mask = world
    eos_ids = eos_token_ids(model, tokenizer)
    fast, reference = both_samplers(model, prompt_ids, prompt_mask, 0.0, 1.0, eos_ids,
                                    pad_token_id(tokenizer))
    assert_same_completions(fast, reference)
    mask, truncated = completion_mask_from_eos(fast[0], eos_ids)  # [B, C], [B]
    assert not truncated.all() and len(set(mask.sum(-1).tolist())) > 1  # rows stop apart
    assert drops  # and the finished ones were dropped on the way


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_greedy_completions_are_those_of_generate_on_random_models(tokenizer, architecture):
    """A random model rarely emits its EOS: a second EOS id (as a generation_config may add), the
    token the first prompt's completion has where the prompts' completions first differ, makes
    rows stop at different steps."""
    model = build_model(tokenizer, architecture)
    questions = ["What is 2 + 2?", "Add 12 and 30, then check the sum twice.", "Sum 3 and 4."]
    prompts = [format_prompt(tokenizer, q) for q in questions]
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, "cpu")  # [N, P], left-padded
    pad_id = pad_token_id(tokenizer)
    ids = reference_sample_completions(model, prompt_ids, prompt_mask, 1, 16, 0.0, 1.0,
                                       [tokenizer.eos_token_id], pad_id)[0]  # [N, 16]
    parting = int((ids != ids[0]).any(0).int().argmax())  # the first step the rows differ at
    eos_ids = sorted({tokenizer.eos_token_id, int(ids[0, parting])})
    fast, reference = both_samplers(model, prompt_ids, prompt_mask, 0.0, 1.0, eos_ids, pad_id)
    assert_same_completions(fast, reference)
    lengths = completion_mask_from_eos(fast[0], eos_ids)[0].sum(-1)  # [B]
    assert len(set(lengths.tolist())) > 1


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (1.3, 0.95)])
@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_completions_are_those_of_generate_from_the_same_seed(
    world, monkeypatch, temperature, top_p, seed
):
    """With dropping switched off (COMPACT_AT = 0) both draw for all B rows at every step: the same
    random numbers, the same tokens, the same stops."""
    monkeypatch.setattr(rollout, "COMPACT_AT", 0.0)
    model, tokenizer, prompt_ids, prompt_mask = world
    eos_ids = eos_token_ids(model, tokenizer)
    fast, reference = both_samplers(model, prompt_ids, prompt_mask, temperature, top_p, eos_ids,
                                    pad_token_id(tokenizer), seed)
    assert_same_completions(fast, reference)
    groups = fast[0].view(len(prompt_ids), GROUP_SIZE, -1)  # [N, G, C]
    assert (groups != groups[:, :1]).any()  # a group's completions differ: tokens were drawn
    assert not completion_mask_from_eos(fast[0], eos_ids)[1].all()  # and rows stopped at an EOS


@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_rows_kept_after_a_drop_are_scored_and_padded_as_a_fresh_forward_sees_them(
    world, drops, temperature
):
    """Under sampling with dropping on: each row's recorded log-probs and entropies are those of one
    full forward over prompt + completion, its tokens after the first EOS are padding scored 0, and
    the width is where the last row stopped."""
    model, tokenizer, prompt_ids, prompt_mask = world
    eos_ids, pad_id = eos_token_ids(model, tokenizer), pad_token_id(tokenizer)
    torch.manual_seed(0)
    ids, logp, entropy = sample_completions(model, prompt_ids, prompt_mask, GROUP_SIZE,
                                            MAX_NEW_TOKENS, temperature, 1.0, eos_ids, pad_id)
    assert drops
    mask, truncated = completion_mask_from_eos(ids, eos_ids)  # [B, C], [B]
    fresh_logp, fresh_entropy = reference_completion_logprobs(
        model, prompt_ids.repeat_interleave(GROUP_SIZE, 0),
        prompt_mask.repeat_interleave(GROUP_SIZE, 0), ids, mask, temperature,
    )  # [B, C] each
    assert torch.allclose(logp, fresh_logp, rtol=0, atol=1e-5)
    assert torch.allclose(entropy, fresh_entropy, rtol=0, atol=1e-5)
    after_eos = mask == 0  # [B, C]
    assert after_eos.any() and (ids[after_eos] == pad_id).all()
    assert (logp[after_eos] == 0).all() and (entropy[after_eos] == 0).all()
    assert int(mask.sum(-1).max()) == ids.shape[1] < MAX_NEW_TOKENS and not truncated.any()
