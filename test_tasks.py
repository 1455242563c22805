"""Tests of the built-in world (tasks.py) and of the shipped tiny base model (tiny_model.py)."""

import argparse
import os
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tasks
from data import Problem
from rollout import format_prompt, generate_rollouts

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODEL_DIR = Path(tasks.DEFAULT_MODEL_DIR)
# Greedy accuracy of the shipped model on test problems 0..31 of seed 0 (measured 16/32 = 0.50; 0.45 on
# 100 problems); the band allows for float differences across CPUs, not for a different model.
BASE_SAMPLE, BASE_SEED, BASE_BAND = 32, 0, (0.35, 0.60)
# Forced-plan greedy accuracy on test problems 0..59 (about 20 per family): steps must beat direct by GAP_MIN.
GAP_SAMPLE, GAP_MIN = 60, 0.2


def test_generator_is_deterministic_for_a_seed():
    assert tasks.world_problems("train", 50, seed=3) == tasks.world_problems("train", 50, seed=3)
    assert tasks.world_problems("train", 50, seed=3) != tasks.world_problems("train", 50, seed=4)


def test_train_and_test_splits_share_no_operands():
    def keys(split):
        return {(p.meta["family"], tuple(p.meta["operands"])) for p in tasks.world_problems(split, 2000, seed=0)}

    assert not keys("train") & keys("test")


def test_every_family_appears_with_an_integer_answer():
    problems = tasks.world_problems("test", 60, seed=0)
    assert {p.meta["family"] for p in problems} == set(tasks.FAMILIES)
    assert all(p.answer == str(int(p.answer)) and int(p.answer) > 0 for p in problems)


@pytest.mark.parametrize("strategy,slip", [("direct", False), ("steps", False), ("check", False), ("check", True)])
def test_every_reference_trace_verifies(strategy, slip):
    for i, p in enumerate(tasks.world_problems("train", 300, seed=1)):
        trace = tasks.reference_trace(p, strategy, slip=slip, seed=i)
        assert tasks.boxed_answer(trace) == p.answer, trace
        assert tasks.detect_strategy(p, trace) == strategy
        assert tasks.classify_error(p, trace) is None


def test_exact_writer_gives_the_reference_trace():
    for i, p in enumerate(tasks.world_problems("train", 60, seed=2)):
        for strategy in tasks.STRATEGIES:
            assert tasks.written_trace(p, strategy) == tasks.reference_trace(p, strategy)


def test_a_slip_carries_forward_to_a_wrong_answer_classified_as_execution():
    packs = Problem("Ana buys 3 packs of 5 pens and 9 packs of 2 pens. How many pens does Ana buy?", "33",
                    {"family": "packs", "operands": [3, 5, 9, 2], "split": "test"})
    first_only = iter([15 + 10])  # the first result is written 10 too high, the rest exactly

    def write(value):
        return next(first_only, value)

    trace = tasks.written_trace(packs, "steps", write)
    assert trace == ("let's count each kind first. 3 * 5 = 25. 9 * 2 = 18. 25 + 18 = 43. "
                     "so the answer is \\boxed{43}.")
    assert tasks.classify_error(packs, trace) == "execution"


def test_slip_writer_slips_at_its_rate():
    write = tasks.slip_writer(random.Random(0), 0.25)
    slips = sum(write(500) != 500 for _ in range(4000))
    assert 800 < slips < 1200
    assert all(tasks.slip_writer(random.Random(1), 0.0)(v) == v for v in range(1, 200))


def test_a_slip_inside_the_check_is_an_execution_error():
    p = Problem("x", "100", {"family": "sum", "operands": [10, 20, 30, 40], "split": "test"})
    written = iter([100, 30, 60, 110])  # direct step exact; the check's last small step slips (+10)

    trace = tasks.written_trace(p, "check", lambda value: next(written))
    assert trace.endswith("60 + 40 = 110. wait, that is wrong. so the answer is \\boxed{110}.")
    assert tasks.detect_strategy(p, trace) == "check" and tasks.classify_error(p, trace) == "execution"


def test_slip_is_caught_by_the_check():
    p = tasks.world_problems("test", 1, seed=0)[0]
    trace = tasks.reference_trace(p, "check", slip=True)
    assert tasks.CHECK_WRONG in trace and trace.index(tasks.CHECK) < trace.index(tasks.CHECK_WRONG)
    assert tasks.CHECK_OK in tasks.reference_trace(p, "check")


def test_world_grams_are_lower_case_and_mark_every_plan():
    assert all(g == g.lower() for g in tasks.WORLD_GRAMS)
    for plans in tasks.PLANS.values():
        assert set(plans.values()) <= set(tasks.WORLD_GRAMS)


MUL = Problem("Ana buys 47 bags of pens. Each bag holds 6 pens. How many pens does Ana buy?", "282",
              {"family": "mul", "operands": [47, 6], "split": "test"})


def test_classify_error_correct_is_none():
    assert tasks.classify_error(MUL, "let's multiply in one step. 47 * 6 = 282. so the answer is \\boxed{282}.") is None


def test_classify_error_poor_plan_is_strategy_error():
    wrong_direct = "let's multiply in one step. 47 * 6 = 272. so the answer is \\boxed{272}."
    assert tasks.classify_error(MUL, wrong_direct) == "strategy"


def test_classify_error_missing_or_foreign_plan_is_strategy_error():
    assert tasks.classify_error(MUL, "47 * 6 = 272. so the answer is \\boxed{272}.") == "strategy"
    assert tasks.classify_error(MUL, "let's add them all at once. 47 + 6 = 53. \\boxed{53}") == "strategy"


def test_classify_error_slip_under_sound_plan_is_execution_error():
    slip = "let's break it into parts. 40 * 6 = 240. 7 * 6 = 48. 240 + 48 = 288. so the answer is \\boxed{288}."
    assert tasks.classify_error(MUL, slip) == "execution"
    missed = ("let's multiply in one step. 47 * 6 = 272. let me check: 40 * 6 = 240, 7 * 6 = 42, 240 + 42 = 282. "
              "that is right. so the answer is \\boxed{272}.")
    assert tasks.classify_error(MUL, missed) == "execution"


def test_bad_input_raises_one_line_errors():
    with pytest.raises(ValueError, match="split must be one of"):
        tasks.world_problems("dev", 3, seed=0)
    with pytest.raises(ValueError, match="unknown strategy"):
        tasks.reference_trace(MUL, "guess")


def test_tokenizer_round_trips_traces_with_single_digit_tokens():
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    trace = tasks.reference_trace(MUL, "check", slip=True)
    ids = tokenizer(trace, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == trace and tokenizer.unk_token_id not in ids
    assert all(len(t.lstrip("▁")) == 1 for t in tokenizer.convert_ids_to_tokens(ids) if t.lstrip("▁").isdigit())
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert format_prompt(tokenizer, "x").endswith("<|assistant|>")


def test_shipped_model_loads_offline_and_reaches_base_accuracy():
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()
    assert sum(f.stat().st_size for f in MODEL_DIR.iterdir()) < 10 * 2**20
    problems = tasks.world_problems("test", BASE_SAMPLE, seed=BASE_SEED)
    batch = generate_rollouts(model, tokenizer, [format_prompt(tokenizer, p.problem) for p in problems],
                              group_size=1, max_new_tokens=96, temperature=0.0)
    accuracy = sum(tasks.classify_error(p, t) is None for p, t in zip(problems, batch.texts)) / len(problems)
    assert BASE_BAND[0] <= accuracy <= BASE_BAND[1]
    assert not batch.truncated.any()


def test_shipped_model_has_a_strategy_gap_in_every_family():
    """With the plan forced and greedy decoding (no sampling noise), the small steps beat the one long
    step in every family: the strategy matters everywhere."""
    import tiny_model

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()
    problems = tasks.world_problems("test", GAP_SAMPLE, seed=BASE_SEED)
    accuracy = tiny_model.forced_plan_accuracy(model, tokenizer, problems, temperature=0.0, seed=BASE_SEED)
    assert set(accuracy) == set(tasks.FAMILIES)
    for family, by_plan in accuracy.items():
        assert by_plan["steps"] >= by_plan["direct"] + GAP_MIN, (family, by_plan)


def test_mix_flag_rejects_bad_weights():
    import tiny_model

    assert tiny_model.parse_mix("0.9,0.1,0") == {"direct": 0.9, "steps": 0.1, "check": 0.0}
    for bad in ("0.5,0.5", "1,-1,1", "0,0,0"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected 3 non-negative weights"):
            tiny_model.parse_mix(bad)
