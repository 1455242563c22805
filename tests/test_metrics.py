"""Metrics (Sec. 4), strategic-gram extraction (Sec. 2.1) and plots, on hand-computed examples."""

import json
import math
import random

import numpy as np
import pytest
import torch

from analysis import plots
from gram_sets.extraction import (clusters_kept, contains_gram, extract_strategic_grams,
                                  lexical_embeddings, word_ngrams)
from gram_sets.placebo import placebo_grams
from grams import semantic_entropy
from hicra import high_entropy_mask
from metrics import (RelativeToFirst, conditional_entropy, error_type_metrics, group_pass_at_k,
                     perplexity, planning_entropy_overlap, rollout_metrics, zero_variance_fraction)
from rollout import RolloutBatch

GRAMS = ["let me check", "so the answer is"]


def make_batch(texts, completion_mask, old_logp, entropy, group_size,
               truncated=None) -> RolloutBatch:
    """A RolloutBatch with the fields metrics read; ids are placeholders."""
    completion_mask = torch.tensor(completion_mask, dtype=torch.float)  # [B, C]
    batch_size = completion_mask.shape[0]
    return RolloutBatch(
        prompt_ids=torch.zeros(batch_size, 1, dtype=torch.long),
        prompt_mask=torch.ones(batch_size, 1, dtype=torch.long),
        completion_ids=torch.zeros(completion_mask.shape, dtype=torch.long),
        completion_mask=completion_mask,
        old_logp=torch.tensor(old_logp),
        entropy=torch.tensor(entropy),
        texts=texts,
        truncated=torch.tensor(truncated or [False] * batch_size),
        group_size=group_size,
    )


def test_semantic_entropy_of_known_counts():
    # -2(1/4 ln 1/4) - 1/2 ln 1/2
    assert semantic_entropy([1, 1, 2]) == pytest.approx(1.0397, abs=1e-4)


def test_conditional_entropy_averages_continuation_entropy_weighted_by_gram_count():
    texts = ["let me check a b c. so the answer is 4", "let me check x y z.", "let me check a b c."]
    # "let me check": 3 occurrences, continuations {abc: 2, xyz: 1} -> H = ln 3 - 2/3 ln 2
    # "so the answer is": 1 occurrence -> H = 0; weights 3/4 and 1/4.
    expected = 0.75 * (math.log(3) - 2 / 3 * math.log(2))
    assert conditional_entropy(texts, GRAMS) == pytest.approx(expected)
    assert conditional_entropy(["no grams here"], GRAMS) is None


def test_perplexity_is_exp_of_mean_nll_and_relative_perplexity_divides_by_first_step():
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]])  # [1, 2]
    # exp(1.5 ln 2)
    assert perplexity(logp, torch.tensor([[True, True]])) == pytest.approx(math.sqrt(8))
    assert perplexity(logp, torch.tensor([[False, False]])) is None
    relative = RelativeToFirst()
    first = relative({"ppl_planning": 2.0, "semantic_entropy": 1.0})
    later = relative({"ppl_planning": 1.5, "semantic_entropy": 1.25, "accuracy": 0.5})
    assert first["ppl_planning_rel"] == 1.0 and first["semantic_entropy_change"] == 0.0
    assert later["ppl_planning_rel"] == pytest.approx(0.75)
    assert later["semantic_entropy_change"] == pytest.approx(0.25)
    assert "accuracy_rel" not in later
    # resumed run
    assert RelativeToFirst(relative.first)({"ppl_planning": 1.0})["ppl_planning_rel"] == 0.5


def test_planning_and_high_entropy_overlap():
    entropy = torch.tensor([[0.1, 0.9, 0.8, 0.2, 0.0], [0.7, 0.3, 0.4, 0.6, 5.0]])  # [2, 5]
    completion = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])  # 9 tokens; the 5.0 is padding
    top = high_entropy_mask(entropy, completion, top_q=0.3)  # ceil(2.7) = 3 tokens: 0.9, 0.8, 0.7
    assert top.tolist() == [[False, True, True, False, False], [True, False, False, False, False]]
    planning = torch.tensor([[True, True, False, False, False], [False, False, False, True, False]])
    overlap = planning_entropy_overlap(planning, top)
    # 1 of 3 planning tokens is in the top
    assert overlap["planning_in_top_entropy"] == pytest.approx(1 / 3)
    # 1 of 3 top tokens is planning
    assert overlap["top_entropy_is_planning"] == pytest.approx(1 / 3)


def test_group_pass_at_k_and_zero_variance_fraction():
    correct = torch.tensor([True, False, False, False, True, True])  # 3 groups of 2
    assert group_pass_at_k(correct, 2) == pytest.approx(2 / 3)
    # groups 2 (all wrong) and 3 (all right)
    assert zero_variance_fraction(correct, 2) == pytest.approx(2 / 3)


def test_rollout_metrics_on_a_small_batch():
    texts = ["let me check 2 + 2. so the answer is 4", "4", "so the answer is 5", "5 5"]
    batch = make_batch(
        texts,
        completion_mask=[[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]],
        old_logp=[[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0], [-2.0, 0.0, 0.0], [-1.0, -1.0, -1.0]],
        entropy=[[1.0, 0.5, 0.0], [0.2, 0.2, 0.0], [2.0, 0.0, 0.0], [0.1, 0.1, 0.1]],
        group_size=2,
        truncated=[False, False, False, True],
    )
    planning = torch.tensor([[True, False, False], [False, False, False], [True, False, False],
                             [False] * 3])
    correct = torch.tensor([True, True, False, False])
    m = rollout_metrics(batch, planning, correct, GRAMS)
    assert m["entropy_planning"] == pytest.approx(1.5)  # tokens with entropy 1.0 and 2.0
    assert m["entropy_execution"] == pytest.approx(1.2 / 7)
    assert m["ppl_planning"] == pytest.approx(math.exp(1.5))
    assert m["planning_ratio"] == pytest.approx(2 / 9)
    assert m["semantic_entropy"] == pytest.approx(semantic_entropy([1, 2]))
    assert m["gram_occurrences"] == 3
    assert (m["length_mean"], m["length_max"]) == (2.25, 3.0)
    assert (m["accuracy"], m["pass_at_k"], m["zero_variance_frac"], m["truncation_rate"]) == (
        0.5, 0.5, 1.0, 0.25)
    errors = error_type_metrics([None, None, "strategy", "execution"])
    assert (errors["errors_strategy"], errors["errors_execution"],
            errors["errors_strategy_rate"]) == (1.0, 1.0, 0.25)
    assert m["top_entropy_is_planning"] == pytest.approx(2 / 3)  # top 3 of 9: 2.0, 1.0, 0.5
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    json.dumps(m)


def test_rollout_metrics_omits_keys_over_empty_sets():
    batch = make_batch(["4", "5"], [[1, 1], [1, 0]], [[-1.0, -1.0], [-1.0, 0.0]],
                       [[0.1, 0.2], [0.3, 0.0]], 2)
    m = rollout_metrics(batch, torch.zeros(2, 2, dtype=torch.bool), torch.tensor([False, True]),
                        GRAMS)
    assert ("entropy_planning" not in m and "ppl_planning" not in m
            and "planning_in_top_entropy" not in m)
    assert "conditional_entropy" not in m and "errors_strategy" not in m
    assert m["semantic_entropy"] == 0.0 and m["top_entropy_is_planning"] == 0.0


def test_word_ngrams_break_at_numbers_and_punctuation():
    assert word_ngrams("So, let me check: 2 + 2 is four", 3, 3) == {"let me check"}
    assert "let's try again" in word_ngrams("Let\u2019s try again", 3, 3)


PLANTED = [["let me check the result", "let me check the answer"],
           ["we can see that", "we can now see that"]]


def random_word(rng: random.Random) -> str:
    return "".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(6))


def synthetic_corpus(n_docs: int = 200, seed: int = 0) -> list[str]:
    """Solutions of random filler words, each with one planted strategic phrase (a paraphrase family
    is in about half of the documents) and two "content" trigrams from a pool of 40 (each in about
    10)."""
    rng = random.Random(seed)
    content = [" ".join(random_word(rng) for _ in range(3)) for _ in range(40)]
    docs = []
    for _ in range(n_docs):
        pieces = ([random_word(rng) for _ in range(10)] + rng.sample(content, 2)
                  + [rng.choice(rng.choice(PLANTED))])
        rng.shuffle(pieces)
        docs.append(". ".join(pieces))
    return docs


def test_extraction_ranks_planted_phrase_clusters_first_and_keeps_them():
    docs = synthetic_corpus()
    phrase_words = {word for family in PLANTED for phrase in family for word in phrase.split()}
    every = extract_strategic_grams(docs, lexical_embeddings, min_df=3, threshold=0.6,
                                    top_fraction=1.0)
    is_planted = [all(w in phrase_words for gram in c.members for w in gram.split()) for c in every]
    # content last
    assert is_planted == sorted(is_planted, reverse=True) and is_planted.count(False) == 40
    kept = extract_strategic_grams(docs, lexical_embeddings, min_df=3, threshold=0.6,
                                   top_fraction=0.2)
    assert ({phrase for family in PLANTED for phrase in family}
            <= {g for c in kept for g in c.members})
    assert any({"let me check the result", "let me check the answer"} <= set(c.members)
               for c in kept)
    assert len(kept) == clusters_kept(0.2, len(every))


def test_the_top_fraction_of_clusters_is_counted_without_a_float_extra():
    assert 0.07 * 100 > 7 and clusters_kept(0.07, 100) == 7  # plain ceil would keep 8
    assert [clusters_kept(0.2, n) for n in (1, 5, 10, 11, 0)] == [1, 1, 2, 3, 0]


def write_fake_run(run_dir, algo: str, seed: int, steps: int = 12) -> None:
    """A tiny metrics.jsonl + config.json, like train.py writes."""
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"algo": algo, "seed": seed}))
    rows = []
    for step in range(steps):
        row = {"step": step, "accuracy": step / steps, "length_mean": 10.0 + step,
               "entropy_all": 1.0 - step / 20, "entropy_planning": 1.5, "entropy_execution": 0.8,
               "ppl_planning_rel": 1 - step / 50, "semantic_entropy": 1.0 + step / 10,
               "pass_at_k": 0.5, "errors_strategy": 3.0, "errors_execution": 2.0,
               "planning_in_top_entropy": 0.8, "top_entropy_is_planning": 0.1}
        if step % 4 == 0:
            row["eval/accuracy"] = step / steps
        rows.append(json.dumps(row))
    (run_dir / "metrics.jsonl").write_text("\n".join(rows) + "\n")


def test_plots_write_nonempty_pngs(tmp_path):
    runs = [tmp_path / "hicra0", tmp_path / "hicra1", tmp_path / "grpo0"]
    for run_dir, (algo, seed) in zip(runs, [("hicra", 0), ("hicra", 1), ("grpo", 0)]):
        write_fake_run(run_dir, algo, seed)
    written = plots.main([str(path) for path in runs])
    names = {path.name for path in written}
    assert names == {"fig3_dynamics.png", "fig6_comparison.png", "fig5_error_types.png",
                     "fig10_planning_vs_entropy.png"}
    assert all(path.parent == runs[0] and path.stat().st_size > 1000 for path in written)


def test_the_strategy_shift_figure_compares_algorithms_with_bands(tmp_path):
    runs = []
    for algo, seed in [("hicra", 0), ("hicra", 1), ("grpo", 0), ("grpo", 1)]:
        run_dir = tmp_path / f"{algo}{seed}"
        write_fake_run(run_dir, algo, seed)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        for row in rows:
            row["share_sound"] = min(1.0, row["step"] / 10 + 0.05 * seed)
            if "eval/accuracy" in row:
                row["eval/pass@1"] = row.pop("eval/accuracy")
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        runs.append(plots.load_run(str(run_dir)))
    path = plots.fig_strategy_shift(runs, tmp_path, band="ci")
    assert path.name == "fig_strategy_shift.png" and path.stat().st_size > 1000


def test_placebo_grams_match_count_and_lengths_and_avoid_strategic_grams():
    strategic = ["let me check", "so the answer is", "wait, that is wrong", "that is right"]
    corpus = [f"let me check: {a} + {b} = {a + b}. that is right. we add the two piles. "
              f"so the answer is {a + b}."
              for a in range(10, 40) for b in range(3, 9)]
    placebo = placebo_grams(corpus, strategic, seed=0)
    # 3, 3, 4, 4
    assert sorted(len(g.split()) for g in placebo) == sorted(len(g.split()) for g in strategic)
    assert len(set(placebo)) == len(placebo)
    for gram in placebo:
        assert not any(contains_gram(gram, s) or contains_gram(s, gram)
                       for s in ("let me check", "that is right", "so the answer is",
                                 "that is wrong"))
        # drawn from the corpus
        assert any(gram in " ".join(text.lower().split()) for text in corpus)
    assert placebo_grams(corpus, strategic, seed=0) == placebo
    assert placebo_grams(corpus, strategic, seed=1) != placebo
    with pytest.raises(ValueError, match="1 non-strategic 3-word n-grams, 2 needed"):
        placebo_grams(["let me check: 1 + 2. so the answer is 3."], strategic, seed=0)


def test_runs_with_the_same_first_steps_are_smoothed_the_same_whatever_their_length():
    rng = random.Random(0)
    values = np.array([rng.random() for _ in range(200)])
    short, long = plots.smooth(np.arange(20.0), values[:20]), plots.smooth(np.arange(200.0), values)
    assert np.allclose(short, long[:20])
    assert math.isclose(long[-1], values[-plots.SMOOTH_STEPS:].mean())
    evaluations = plots.smooth(np.array([0.0, 50.0, 100.0]), np.array([0.2, 0.4, 0.6]))
    # points further apart than the window are drawn as logged
    assert np.allclose(evaluations, [0.2, 0.4, 0.6])


def test_a_probability_band_stays_inside_zero_and_one():
    values = np.array([[0.0, 0.9, 0.5], [0.1, 1.0, 0.5]])  # [R, S]: two seeds
    low, high = plots.band_limits(values, "ci", probability=True)
    assert (low >= 0).all() and (high <= 1).all() and low[0] == 0 and high[1] == 1
    low, high = plots.band_limits(values, "ci")
    assert low[0] < 0 < 1 < high[1]  # a t interval over two seeds runs past [0, 1] unclipped
    assert (plots.is_probability("eval/pass@1") and plots.is_probability("pass_at_k")
            and plots.is_probability("share_sound"))
    assert not plots.is_probability("eval/pass@1_se") and not plots.is_probability("entropy_all")


def test_gradient_share_push_is_the_norm_of_the_logit_gradient_of_log_p(tokenizer, model):
    from analysis.gradient_share import token_measures  # noqa: PLC0415
    from rollout import format_prompt, generate_rollouts  # noqa: PLC0415

    torch.manual_seed(0)
    rollout = generate_rollouts(model, tokenizer, [format_prompt(tokenizer, "What is 2 + 2?")],
                                2, 6, 1.0)
    entropy, p_token, push = token_measures(model, rollout, 1.0)
    attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask.long()], dim=1)
    logits = (model(input_ids=torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1),
                    attention_mask=attention_mask,
                    position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0))
              .logits[:, rollout.prompt_ids.shape[1] - 1:-1])
    logits = logits.detach().requires_grad_(True)  # [B, C, V]
    # [B, C]
    logp = logits.log_softmax(-1).gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
    for b, c in [(0, 0), (1, 2)]:
        (gradient,) = torch.autograd.grad(logp[b, c], logits, retain_graph=True)
        assert math.isclose(gradient[b, c].norm().item(), push[b, c].item(), rel_tol=1e-4)
    assert torch.allclose(p_token, logp.detach().exp(), atol=1e-6)
    assert (push <= 2 ** 0.5 * (1 - p_token) + 1e-6).all() and (push >= (1 - p_token) - 1e-6).all()


@pytest.mark.parametrize("line", ['{"step": 0, "x": ' + "[" * 50_000 + "]" * 50_000 + "}",
                                  '{"step": 0, "x": ' + "9" * 5_000 + "}"])
def test_a_hostile_metrics_line_is_one_line_naming_file_and_line(tmp_path, line):
    from cli import InputError  # noqa: PLC0415

    write_fake_run(tmp_path / "run", "hicra", 0)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as metrics:
        metrics.write(line + "\n")
    with pytest.raises(InputError, match=r"metrics.jsonl:13: unreadable JSON"):
        plots.load_run(str(tmp_path / "run"))
