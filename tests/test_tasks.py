"""Tests of the built-in world (tasks.py) and of the shipped tiny base model (tiny_model.py)."""

import os
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from world import tasks
from cli import InputError
from data import Problem, load_problems
from reward import boxed_reward
from rollout import (completion_mask_from_eos, encode_prompts, eos_token_ids, format_prompt,
                     generate_rollouts)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODEL_DIR = Path(tasks.DEFAULT_MODEL_DIR)
# Greedy accuracy of the shipped model on test problems 0..31 of seed 0 (measured 12/32 = 0.375;
# 0.33 on 200 problems); the band allows for float differences across CPUs, not for a different
# model.
BASE_SAMPLE, BASE_SEED, BASE_BAND = 32, 0, (0.25, 0.50)
# Plan-forced greedy accuracy on test problems 0..149 (43-55 per family): steps must beat direct by
# GAP_MIN in every family (measured: sum 0.71 vs 0.08, mul 0.77 vs 0.56, packs 0.91 vs 0.36).
GAP_SAMPLE, GAP_MIN = 150, 0.1
# World v1's model (the reliable-execution regime): greedy accuracy on v1 test problems 0..31 of
# seed 0 (measured 16/32 = 0.50; 0.44 on 200 problems).
V1_MODEL_DIR, V1_BAND = Path(tasks.MODEL_DIRS["v1"]), (0.35, 0.65)

MUL = Problem("Ana buys 47 bags of pens. Each bag holds 6 pens. How many pens does Ana buy?", "282",
              {"family": "mul", "operands": [47, 6], "split": "test"})


def test_generator_is_deterministic_for_a_seed():
    assert tasks.world_problems("train", 50, seed=3) == tasks.world_problems("train", 50, seed=3)
    assert tasks.world_problems("train", 50, seed=3) != tasks.world_problems("train", 50, seed=4)


def test_train_and_test_splits_share_no_operands():
    def keys(split):
        return {(p.meta["family"], tuple(p.meta["operands"]))
                for p in tasks.world_problems(split, 2000, seed=0)}

    assert not keys("train") & keys("test")


def test_every_family_appears_with_an_integer_answer():
    problems = tasks.world_problems("test", 60, seed=0)
    assert {p.meta["family"] for p in problems} == set(tasks.FAMILIES)
    assert all(p.answer == str(int(p.answer)) and int(p.answer) > 0 for p in problems)


@pytest.mark.parametrize("strategy,slip",
                         [("direct", False), ("steps", False), ("check", False), ("check", True)])
def test_every_reference_trace_verifies(strategy, slip):
    for i, p in enumerate(tasks.world_problems("train", 300, seed=1)):
        trace = tasks.reference_trace(p, strategy, slip=slip, seed=i)
        assert tasks.boxed_answer(trace) == p.answer, trace
        assert tasks.detect_strategy(p, trace) == strategy
        assert tasks.classify_error(p, trace) is None


def test_exact_writer_gives_the_reference_trace():
    for p in tasks.world_problems("train", 60, seed=2):
        for strategy in tasks.STRATEGIES:
            assert tasks.written_trace(p, strategy) == tasks.reference_trace(p, strategy)


def test_a_slip_carries_forward_to_a_wrong_answer_classified_as_execution():
    # the first result written 10 too high; the sum built on it is right
    written = iter([240 + 10, 42, 292])

    trace = tasks.written_trace(MUL, "steps", lambda value: next(written))
    assert trace == ("let's break it into parts. the numbers are 47, 6. 40 * 6 = 250. 7 * 6 = 42. "
                     "250 + 42 = 292. so the answer is \\boxed{292}.")
    assert tasks.classify_error(MUL, trace) == "execution"


def test_a_slip_inside_the_check_is_an_execution_error():
    written = iter([282, 240, 42, 292])  # the direct step right, the check's last small step slips

    trace = tasks.written_trace(MUL, "check", lambda value: next(written))
    assert trace.endswith("240 + 42 = 292. wait, that is wrong. so the answer is \\boxed{292}.")
    assert (tasks.detect_strategy(MUL, trace) == "check"
            and tasks.classify_error(MUL, trace) == "execution")


def test_a_misread_operand_carries_into_every_strategy_as_an_execution_error_under_a_sound_plan():
    for strategy, error in (("steps", "execution"), ("check", "execution"), ("direct", "strategy")):
        copied = iter([48, 6])  # 47 read as 48
        trace = tasks.written_trace(MUL, strategy, copy=lambda value: next(copied))
        assert "the numbers are 48, 6. " in trace and tasks.boxed_answer(trace) == "288", trace
        assert tasks.classify_error(MUL, trace) == error


def test_miscopied_changes_one_digit_by_one():
    rng = random.Random(0)
    assert {tasks.miscopied(47, rng) for _ in range(200)} == {46, 48, 37, 57}
    assert {tasks.miscopied(6, rng) for _ in range(200)} == {5, 7}


def test_slip_writer_slips_at_its_rate():
    write = tasks.slip_writer(random.Random(0), 0.25)
    slips = sum(write(500) != 500 for _ in range(4000))
    assert 800 < slips < 1200
    assert all(tasks.slip_writer(random.Random(1), 0.0)(v) == v for v in range(1, 200))


def test_fallible_teacher_is_wrong_at_the_rate_its_slips_imply():
    from world import tiny_model

    # 3 results
    problems = [p for p in tasks.world_problems("train", 900, seed=5) if p.meta["family"] == "mul"]
    rng = random.Random(0)
    traces = [tiny_model.sft_trace(p, rng, {"steps": 1.0}, slip_rate=0.1) for p in problems]
    wrong = sum(tasks.classify_error(p, t) == "execution"
                for p, t in zip(problems, traces)) / len(problems)
    assert 0.17 < wrong < 0.37  # 1 - 0.9**3 = 0.27, minus the rare slips that cancel
    copied = [tiny_model.sft_trace(p, rng, {"steps": 1.0}, copy_slip_rate=0.1) for p in problems]
    wrong = sum(tasks.classify_error(p, t) == "execution"
                for p, t in zip(problems, copied)) / len(problems)
    assert 0.12 < wrong < 0.27  # 1 - 0.9**2 = 0.19: two operands to copy
    exact = [tiny_model.sft_trace(p, random.Random(1), {"steps": 1.0}) for p in problems[:50]]
    assert all(tasks.classify_error(p, t) is None for p, t in zip(problems, exact))


def test_slip_is_caught_by_the_check():
    p = tasks.world_problems("test", 1, seed=0)[0]
    trace = tasks.reference_trace(p, "check", slip=True)
    assert tasks.CHECK_WRONG in trace and trace.index(tasks.CHECK) < trace.index(tasks.CHECK_WRONG)
    assert tasks.CHECK_OK in tasks.reference_trace(p, "check")


def test_world_grams_are_lower_case_and_mark_every_plan():
    assert all(g == g.lower() for g in tasks.WORLD_GRAMS)
    for plans in tasks.PLANS.values():
        assert set(plans.values()) <= set(tasks.WORLD_GRAMS)


def test_classify_error_correct_is_none():
    assert tasks.classify_error(MUL, "let's multiply in one step. the numbers are 47, 6. "
                                     "47 * 6 = 282. so the answer is \\boxed{282}.") is None


def test_classify_error_poor_plan_is_strategy_error():
    wrong_direct = ("let's multiply in one step. the numbers are 47, 6. 47 * 6 = 272. "
                    "so the answer is \\boxed{272}.")
    assert tasks.classify_error(MUL, wrong_direct) == "strategy"


def test_classify_error_missing_or_foreign_plan_is_strategy_error():
    assert tasks.classify_error(MUL, "47 * 6 = 272. so the answer is \\boxed{272}.") == "strategy"
    assert tasks.classify_error(
        MUL, "let's add them all at once. 47 + 6 = 53. \\boxed{53}") == "strategy"


def test_classify_error_slip_under_sound_plan_is_execution_error():
    slip = ("let's break it into parts. the numbers are 47, 6. 40 * 6 = 240. 7 * 6 = 48. "
            "240 + 48 = 288. so the answer is \\boxed{288}.")
    assert tasks.classify_error(MUL, slip) == "execution"
    missed = ("let's multiply in one step. the numbers are 47, 6. 47 * 6 = 272. "
              "let me check: 40 * 6 = 240, 7 * 6 = 42, 240 + 42 = 282. "
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
    assert all(len(t.lstrip("▁")) == 1 for t in tokenizer.convert_ids_to_tokens(ids)
               if t.lstrip("▁").isdigit())
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert format_prompt(tokenizer, "x").endswith("<|assistant|>")


def test_shipped_model_loads_offline_and_reaches_base_accuracy():
    from world import tiny_model

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()
    assert sum(f.stat().st_size for f in MODEL_DIR.iterdir()) < 10 * 2**20
    problems = tasks.world_problems("test", BASE_SAMPLE, seed=BASE_SEED)
    batch = generate_rollouts(model, tokenizer,
                              [format_prompt(tokenizer, p.problem) for p in problems],
                              group_size=1, max_new_tokens=tiny_model.MAX_NEW_TOKENS,
                              temperature=0.0)
    accuracy = sum(tasks.classify_error(p, t) is None
                   for p, t in zip(problems, batch.texts)) / len(problems)
    assert BASE_BAND[0] <= accuracy <= BASE_BAND[1]
    assert not batch.truncated.any()


def test_world_v1_has_its_families_traces_without_the_operand_copy_and_its_data_names():
    problems = tasks.world_problems("test", 60, seed=0, world="v1")
    assert ({p.meta["family"] for p in problems} == set(tasks.WORLDS["v1"])
            == {"sum", "mul", "change"})
    change = next(p for p in problems if p.meta["family"] == "change")
    a, b, c = change.meta["operands"]
    assert change.answer == str(a + b - c) and "gives away" in change.problem
    for i, p in enumerate(problems):
        for strategy in tasks.STRATEGIES:
            trace = tasks.reference_trace(p, strategy, slip=strategy == "check", seed=i)
            assert tasks.classify_error(p, trace) is None and tasks.RESTATE not in trace, trace
    # v2 copies
    assert tasks.RESTATE in tasks.reference_trace(tasks.world_problems("test", 1, seed=0)[0],
                                                  "steps")
    assert load_problems("world_v1", limit=5) == problems[:5]
    assert load_problems("world_v1_train", limit=3) == tasks.world_problems("train", 3, seed=0,
                                                                            world="v1")


def test_world_v1_model_reads_its_problems_and_reaches_its_base_accuracy():
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(V1_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(V1_MODEL_DIR).eval()
    assert sum(f.stat().st_size for f in V1_MODEL_DIR.iterdir()) < 10 * 2**20
    problems = tasks.world_problems("test", BASE_SAMPLE, seed=BASE_SEED, world="v1")
    prompts = [format_prompt(tokenizer, p.problem) for p in problems]
    assert all(tokenizer.unk_token_id not in tokenizer(text)["input_ids"] for text in prompts)
    batch = generate_rollouts(model, tokenizer, prompts, group_size=1, max_new_tokens=96,
                              temperature=0.0)
    accuracy = sum(tasks.classify_error(p, t) is None
                   for p, t in zip(problems, batch.texts)) / len(problems)
    assert V1_BAND[0] <= accuracy <= V1_BAND[1]
    # v2's tokenizer does not know v1's words ("gives", "away"), which is why the check below exists
    v2_tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    assert any(v2_tokenizer.unk_token_id in v2_tokenizer(text)["input_ids"] for text in prompts)


def test_world_problems_refuse_the_other_worlds_model():
    with pytest.raises(InputError, match=r"^--data world_v1_train: world v1 problems, but "
                                         r"--model .* is world v2's model; use --model "
                                         r"world/models/tiny-world-v1$"):
        tasks.check_world_model(str(MODEL_DIR), {"--data": "world_v1_train"})
    with pytest.raises(InputError,
                       match=r"^--eval-data world: .* use --model world/models/tiny-world$"):
        tasks.check_world_model(str(V1_MODEL_DIR),
                                {"--data": "world_v1_train", "--eval-data": "world"})
    tasks.check_world_model(str(V1_MODEL_DIR), {"--data": "world_v1_train", "--eval-data": "gsm8k"})
    tasks.check_world_model("some/other/model", {"--data": "world", "--eval-data": "world_v1"})


def test_sampler_decodes_greedily_like_generate_while_rows_finish_at_different_steps():
    """Our RL sampling loop (shared prompt prefill, static cache, finished rows dropped) against
    model.generate."""
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()
    prompts = [format_prompt(tokenizer, p.problem)
               for p in tasks.world_problems("test", 12, seed=1)]
    batch = generate_rollouts(model, tokenizer, prompts, group_size=2, max_new_tokens=96,
                              temperature=0.0)
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, "cpu")
    sequences = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=False,
                               max_new_tokens=96)
    expected = sequences[:, prompt_ids.shape[1] :].repeat_interleave(2, dim=0)  # [B, C']
    expected_mask, _ = completion_mask_from_eos(expected, eos_token_ids(model, tokenizer))
    assert len(set(batch.lengths.tolist())) > 3  # rows did finish at different steps
    assert torch.equal(batch.completion_mask, expected_mask[:, : batch.completion_mask.shape[1]])
    assert torch.equal(batch.completion_ids * batch.completion_mask.long(),
                       (expected * expected_mask.long())[:, : batch.completion_ids.shape[1]])


def test_shipped_model_executes_the_small_steps_better_than_the_one_long_step():
    """Plan forced, greedy (no sampling noise): `steps` beats `direct` in every family."""
    from world import tiny_model

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()
    problems = tasks.world_problems("test", GAP_SAMPLE, seed=BASE_SEED)
    accuracy = tiny_model.forced_plan_accuracy(model, tokenizer, problems, temperature=0.0,
                                               seed=BASE_SEED)
    for family in tasks.FAMILIES:
        assert accuracy[family]["steps"] >= accuracy[family]["direct"] + GAP_MIN, (
            family, accuracy[family])


def test_drill_splits_are_disjoint_distinct_and_their_solutions_are_correct_and_boxed():
    test, train = (tasks.drill_problems("test", 300, seed=0),
                   tasks.drill_problems("train", 1000, seed=0))
    assert (len({p.problem for p in test}) == 300
            and not {p.problem for p in test} & {p.problem for p in train})
    for p in test[:50]:
        assert boxed_reward(p.meta["solution"], p.answer) == 1.0
    assert tasks.drill_solution(47, 38) == (
        "Let's add the tens and the ones. 40 + 30 = 70. 7 + 8 = 15. 70 + 15 = 85. "
        "So the answer is \\boxed{85}."
    )
    with pytest.raises(ValueError, match="distinct drill problems"):
        tasks.drill_problems("test", 5000, seed=0)
