"""Where the policy gradient goes: planning vs execution tokens, and what HICRA's amplification adds

    python -m analysis.gradient_share  # the built-in world's base model
    python -m analysis.gradient_share --model runs/lesson/hicra-seed0/checkpoint \
        --batches 4 --seed 0

Samples --batches steps of train.py's default world batch (16 problems x 8 completions, T = 1) from
--model, rewards them, and measures at every completion token t of completion i, with
p = softmax(z_t / T) the policy at that position and y_t the sampled token:
- the entropy H(p) in nats, and p(y_t);
- push_t = |e_y - p|, the norm of d log p(y_t) / d z_t: the loss's gradient at the logits is
  A_i x push_t / N (token-mean, ratio 1), so push_t is how much a unit of advantage moves this
  position's logits. It lies between 1 - p(y_t) and sqrt(2) (1 - p(y_t)): a token predicted with
  near certainty gets almost none;
- the gradient signal of a token set S: sum over S of |A_i| push_t (|A^H_t| push_t for HICRA).
It prints, over all batches: the planning tokens' share of completion tokens and of the GRPO
gradient signal, the mean entropy, p(y) and push of planning and execution tokens, and by how much
HICRA (A + alpha |A| on planning tokens) can change: alpha x the planning tokens' share of the
signal, HICRA's effective dose, and the net change of the total signal.
"""

import argparse

import torch

from data import load_problems
from grams import batch_planning_mask, load_grams
from grpo import group_advantages
from hicra import PAPER_ALPHA, hicra_advantages
from model_loading import load_model
from grading import score_completions
from reward import boxed_reward
from rollout import format_prompt, generate_rollouts
from train import prompts_for_step
from world.tasks import DEFAULT_MODEL_DIR


@torch.no_grad()
def token_measures(model, rollout,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(entropy, p(y), push) at every completion token, each [B, C], from one full forward as in
    training."""
    # [B, P+C]
    attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask.long()], dim=1)
    logits = model(input_ids=torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1),
                   attention_mask=attention_mask,
                   position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0)).logits
    logits = logits[:, rollout.prompt_ids.shape[1] - 1 : -1].float() / temperature  # [B, C, V]
    log_probs = logits.log_softmax(-1)  # [B, C, V]
    probs = log_probs.exp()
    entropy = -(probs * log_probs).sum(-1)  # [B, C]
    targets = rollout.completion_ids.unsqueeze(-1)  # [B, C, 1]
    p_token = probs.gather(-1, targets).squeeze(-1)  # [B, C]
    others = probs.scatter(-1, targets, 0.0)  # [B, C, V]: p without the sampled token
    # |e_y - p|^2 = (1 - p_y)^2 + sum_{v != y} p_v^2, with 1 - p_y summed from the other tokens:
    # written as 1 - 2 p_y + sum p^2 it cancels to float32 noise (~1e-4) for a token with
    # p_y near 1, where it is ~1e-6.
    push = torch.sqrt(others.sum(-1) ** 2 + (others ** 2).sum(-1))  # [B, C]
    return entropy, p_token, push


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL_DIR,
                        help="model folder (a run's checkpoint, say)")
    parser.add_argument("--data", default="world_train", help="training problems")
    parser.add_argument("--grams", default="world", help="strategic grams")
    parser.add_argument("--batches", type=int, default=4,
                        help="batches of 16 problems x 8 completions")
    parser.add_argument("--alpha", type=float, default=PAPER_ALPHA, help="HICRA's alpha")
    parser.add_argument("--seed", type=int, default=0, help="problem order and sampling seed")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, dtype="float32", device="cpu")
    model.eval()
    problems, grams = load_problems(args.data), load_grams(args.grams)
    sums = dict.fromkeys(("tokens", "planning", "grpo_all", "grpo_planning", "hicra_all"), 0.0)
    by_kind: dict[str, list[torch.Tensor]] = {"planning": [], "execution": []}
    for step in range(args.batches):
        chosen = [problems[i] for i in prompts_for_step(len(problems), step, 16, args.seed)]
        rollout = generate_rollouts(model, tokenizer,
                                    [format_prompt(tokenizer, p.problem) for p in chosen],
                                    8, 128, 1.0)
        rewards, _ = score_completions(boxed_reward, rollout.texts,
                                       [p.answer for p in chosen for _ in range(8)])
        advantages = group_advantages(torch.tensor(rewards), 8)  # [B]
        real = rollout.completion_mask.bool()  # [B, C]
        planning = batch_planning_mask(tokenizer, rollout.completion_ids,
                                       rollout.completion_mask, grams) & real
        entropy, p_token, push = token_measures(model, rollout, 1.0)
        grpo = advantages[:, None].abs() * push  # [B, C]
        hicra = hicra_advantages(advantages, planning, args.alpha).abs() * push  # [B, C]
        sums["tokens"] += real.sum().item()
        sums["planning"] += planning.sum().item()
        sums["grpo_all"] += grpo[real].sum().item()
        sums["grpo_planning"] += grpo[planning].sum().item()
        sums["hicra_all"] += hicra[real].sum().item()
        for kind, mask in (("planning", planning), ("execution", real & ~planning)):
            by_kind[kind].append(torch.stack([entropy[mask], p_token[mask], push[mask]]))  # [3, n]
    results = {"planning_token_share": sums["planning"] / sums["tokens"],
               "planning_gradient_share": sums["grpo_planning"] / max(sums["grpo_all"], 1e-12),
               "hicra_extra_signal": sums["hicra_all"] / max(sums["grpo_all"], 1e-12) - 1}
    print(f"model {args.model}: {args.batches} batches of 16 x 8 completions, seed {args.seed}, "
          f"{int(sums['tokens'])} completion tokens")
    for kind, parts in by_kind.items():
        entropy, p_token, push = torch.cat(parts, dim=1)
        results[kind] = {"entropy": entropy.mean().item(), "p_token": p_token.mean().item(),
                         "push": push.mean().item()}
        print(f"  {kind:<9} tokens: mean entropy {entropy.mean():.3f} nats, "
              f"mean p(y) {p_token.mean():.3f}, "
              f"mean |e_y - p| {push.mean():.3f}")
    print(f"  planning tokens: {results['planning_token_share']:.1%} of completion tokens, "
          f"{results['planning_gradient_share']:.1%} of GRPO's gradient signal (sum |A| |e_y - p|)")
    print(f"  HICRA at alpha {args.alpha:g} rescales the planning tokens' signal by 1 +- alpha: "
          f"at most {args.alpha * results['planning_gradient_share']:.1%} of the total signal "
          "moves; net change of the total "
          f"{results['hicra_extra_signal']:+.2%}")
    return results


if __name__ == "__main__":
    main()
