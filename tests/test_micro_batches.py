"""How a rollout batch is cut into micro-batches: rollout.micro_batches within its row and token
caps, and the automatic token cap model_loading sizes from the weights and the free memory."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import machine
import model_loading
import rollout as rollout_lib
import train


def test_micro_batches_cover_every_row_once_within_both_caps():
    # two rows per prompt: groups (0, 1), (2, 3), ...
    lengths = torch.tensor([5, 1, 3, 9, 2, 7, 30, 4])
    for shared in (True, False):
        for max_rows, max_tokens in [(3, 0), (8, 40), (2, 25), (8, 60)]:
            batches = rollout_lib.micro_batches(lengths, 2, 10, max_rows, max_tokens,
                                                shared_prompts=shared)
            assert sorted(torch.cat(batches).tolist()) == list(range(len(lengths)))
            for rows in batches:
                prompts = len({r // 2 for r in rows.tolist()}) if shared else len(rows)
                assert len(rows) <= max_rows
                tokens = prompts * 10 + len(rows) * lengths[rows].max()
                assert len(rows) == 1 or not max_tokens or tokens <= max_tokens
    by_length = lengths.argsort(stable=True).tolist()
    assert rollout_lib.micro_batches(lengths, 2, 10, 8, 0)[0].tolist() == by_length


def test_token_capped_micro_batches_keep_a_group_together_and_count_its_prompt_once():
    lengths = torch.tensor([4, 6, 5, 3, 20, 2, 6, 6])  # four prompts of width 50, two rows each
    batches = [rows.tolist() for rows in rollout_lib.micro_batches(lengths, 2, 50, 8, 120)]
    # groups in order of their longest row: (2, 3) 5, (0, 1) 6, (6, 7) 6, (4, 5) 20; adding row 1
    # would cost 2 prompts x 50 + 4 rows x 6 = 124 > 120, while rows 1, 6, 7 cost
    # 2 x 50 + 3 x 6 = 118
    assert batches == [[3, 2, 0], [1, 6, 7], [5, 4]]
    unshared = [rows.tolist()
                for rows in rollout_lib.micro_batches(lengths, 2, 50, 8, 120, shared_prompts=False)]
    # every row pays its own prompt: 2 x (50 + 6) = 112
    assert unshared == [[3, 2], [0, 1], [6, 7], [5], [4]]


def smollm2_shaped_model():
    """SmolLM2-135M's shape (30 layers, 576 wide, MLP 1536, 49,152 tokens), built without memory on
    the meta device."""
    shape = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                        tie_word_embeddings=True)
    with torch.device("meta"):
        return LlamaForCausalLM(shape)


def test_automatic_micro_batch_token_cap_bounds_activations_by_the_weights_size(monkeypatch):
    monkeypatch.setattr(machine, "available_memory_bytes", lambda: 24 * 2**30)
    smol = smollm2_shaped_model()
    per_token = machine.activation_bytes_per_token(smol)
    # 1.29 MB; 0.9-1.9 MiB measured (docs/speed.md)
    assert per_token == 30 * (8 * 576 + 4 * 1536) * 4
    weights = sum(p.numel() * 4 for p in smol.parameters())
    cap, why = machine.choose_micro_batch_tokens(smol, micro_batch_size=32, max_new_tokens=64)
    assert cap * per_token <= weights < (cap + 1) * per_token and 400 < cap < 430, why
    # the world's model: not capped
    tiny = AutoModelForCausalLM.from_pretrained(train.TrainConfig().model)
    assert machine.choose_micro_batch_tokens(tiny, 32, 128)[0] == 0
    # a quarter: 100 MiB
    monkeypatch.setattr(machine, "available_memory_bytes", lambda: 400 * 2**20)
    assert machine.choose_micro_batch_tokens(smol, 32, 64)[0] == 100 * 2**20 // per_token


@pytest.mark.parametrize("flag, expected", [([], 0), (["--micro-batch-tokens", "0"], 0),
                                            (["--micro-batch-tokens", "768"], 768)])
def test_an_unset_micro_batch_token_cap_is_resolved_once_and_a_given_one_kept(flag, expected):
    config = train.parse_args(flag)
    assert config.micro_batch_tokens == (expected if flag else None)
    model, _, _ = model_loading.load_policy(config, checkpoint=None)
    machine.resolve_micro_batch_tokens(config, model)
    # the world's model needs no cap; a given cap is kept
    assert config.micro_batch_tokens == expected
