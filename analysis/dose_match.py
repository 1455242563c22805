"""The --entropy-top-q that gives the high-entropy ablation another --algo's effective dose.

    python -m analysis.dose_match --model world/models/tiny-world \
        runs/verl_v2/hicra_verl-seed0/checkpoint

Samples --batches steps of train.py's default world batch (16 problems x 8 completions, T = 1) from
each --model, rewards them, and prints the effective dose (metrics.gradient_signal_share: the
amplified tokens' share of sum_t |A_t| (1 - p(y_t)), each algorithm's own shaped advantages) of
hicra, hicra_verl, random_spans and high_entropy at each --top-q, averaged over the batches of each
model and over the models.
"""

import argparse

import torch

from data import load_problems
from grading import score_completions
from grams import batch_planning_mask, load_grams
from grpo import group_advantages
from hicra import PAPER_ALPHA, amplified_mask, hicra_advantages
from metrics import gradient_signal_share
from model_loading import load_model
from reward import boxed_reward
from rollout import format_prompt, generate_rollouts
from train import prompts_for_step

GROUP = 8


def doses(model, tokenizer, problems, grams, step: int, seed: int,
          top_qs: list[float]) -> dict[str, float]:
    """The effective dose of each arm on one sampled batch."""
    chosen = [problems[i] for i in prompts_for_step(len(problems), step, 16, seed)]
    rollout = generate_rollouts(model, tokenizer,
                                [format_prompt(tokenizer, p.problem) for p in chosen],
                                GROUP, 128, 1.0)
    rewards, _ = score_completions(boxed_reward, rollout.texts,
                                   [p.answer for p in chosen for _ in range(GROUP)])
    advantages = group_advantages(torch.tensor(rewards), GROUP)  # [B]
    planning = batch_planning_mask(tokenizer, rollout.completion_ids,
                                   rollout.completion_mask, grams)  # [B, C]
    arms = {algo: (algo, 0.3) for algo in ("hicra", "hicra_verl", "random_spans")}
    arms.update({f"high_entropy q={q:g}": ("high_entropy", q) for q in top_qs})
    result = {}
    for name, (algo, q) in arms.items():
        mask = amplified_mask(algo, advantages, planning, rollout.entropy, rollout.completion_mask,
                              GROUP, q)
        shaped = hicra_advantages(advantages, mask, PAPER_ALPHA)  # [B, C]
        share = gradient_signal_share(shaped, rollout.old_logp, mask, rollout.completion_mask,
                                      per_sequence=False)
        if share is not None:
            result[name] = share
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", nargs="+", required=True,
                        help="model folders (a base model, run checkpoints)")
    parser.add_argument("--data", default="world_train", help="training problems")
    parser.add_argument("--grams", default="world", help="strategic grams")
    parser.add_argument("--top-q", type=float, nargs="+", default=[0.01, 0.02, 0.03, 0.05, 0.1],
                        help="q values")
    parser.add_argument("--batches", type=int, default=2,
                        help="batches of 16 problems x 8 completions per model")
    parser.add_argument("--seed", type=int, default=0, help="problem order and sampling seed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    problems, grams = load_problems(args.data), load_grams(args.grams)
    per_model = []
    for folder in args.model:
        model, tokenizer = load_model(folder, dtype="float32", device="cpu")
        batches = [doses(model, tokenizer, problems, grams, step, args.seed, args.top_q)
                   for step in range(args.batches)]
        means = {name: (sum(b[name] for b in batches if name in b)
                        / max(sum(name in b for b in batches), 1))
                 for name in batches[0]}
        per_model.append(means)
        print(f"{folder}: " + ", ".join(f"{name} {value:.3f}" for name, value in means.items()))
    names = per_model[0]
    print("mean over models: "
          + ", ".join(f"{n} {sum(m[n] for m in per_model) / len(per_model):.3f}" for n in names))


if __name__ == "__main__":
    main()
