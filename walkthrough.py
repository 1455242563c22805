# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # One HICRA training step, on real tensors
#
# This walk-through follows one step of `train.py` on the built-in world's tiny model (CPU, under a
# minute): a few problems and their G completions, the rewards, the group advantages (Sec. 3), the
# planning tokens, HICRA's advantages beside GRPO's token by token, the ratio and the clip, the loss
# and its gradient on planning vs execution tokens. Every cell calls the project's own functions;
# none is re-implemented here.
#
# Run it as a script (`python walkthrough.py`) or open it as a notebook (jupytext reads this
# "percent" format). The knobs below can also be set from the environment
# (`WALKTHROUGH_ALPHA=0 python walkthrough.py`), which is how the exercises at the end are checked.

# %%
import os

import torch
import transformers

from analysis.gradient_share import token_measures
from config import TrainConfig
from data import load_problems
from grams import batch_planning_mask, load_grams
from grpo import aggregate_loss, clip_fractions, clipped_policy_loss, group_advantages
from model_loading import load_model
from grading import score_completions
from reward import boxed_reward
from rollout import completion_logprobs, format_prompt, generate_rollouts
from train import policy_update, prompts_for_step, shape_advantages

ALPHA = float(os.environ.get("WALKTHROUGH_ALPHA", 0.2))  # HICRA's amplification (the paper's 0.2)
# problems in this step (train.py: --prompts-per-step 16)
PROMPTS = int(os.environ.get("WALKTHROUGH_PROMPTS", 2))
G = 8  # completions per problem (train.py: --group-size 8)
SEED = int(os.environ.get("WALKTHROUGH_SEED", 1))
torch.manual_seed(SEED)
torch.set_num_threads(1)
transformers.utils.logging.disable_progress_bar()
config = TrainConfig(prompts_per_step=PROMPTS, group_size=G, alpha=ALPHA, algo="hicra")
model, tokenizer = load_model(config.model, dtype="float32", device="cpu")
grams = load_grams(config.grams)  # the world's strategic grams, e.g. "let's break it into parts"
train_problems = load_problems(config.data)
problems = [train_problems[i]
            for i in prompts_for_step(len(train_problems), step=0, per_step=PROMPTS, seed=SEED)]

# %% [markdown]
# ## 1. Sample G completions per problem (`rollout.generate_rollouts`)
# The sampler also records each token's log-probability under the policy that drew it, `old_logp`
# (log pi_old), and the entropy of that distribution: no second forward pass is needed.

# %%
prompts = [format_prompt(tokenizer, p.problem) for p in problems]
rollout = generate_rollouts(model, tokenizer, prompts, G, config.max_new_tokens, config.temperature,
                            config.top_p)
print("completion_ids:", list(rollout.completion_ids.shape),
      " [B = problems x G, C = longest completion]")
for i, text in enumerate(rollout.texts):
    if i % G == 0:
        print(f"\nproblem {i // G}: {problems[i // G].problem}  (answer {problems[i // G].answer})")
    print(f"  [{i}] {text}")

# %% [markdown]
# ## 2. Reward each completion with the verifier (`reward.boxed_reward`)
# 1 if the last `\boxed{}` holds the right answer, else 0.

# %%
answers = [p.answer for p in problems for _ in range(G)]
rewards, _ = score_completions(boxed_reward, rollout.texts, answers)
rewards = torch.tensor(rewards)  # [B]
print("rewards:", rewards.tolist())

# %% [markdown]
# ## 3. Group-relative advantages (`grpo.group_advantages`, Sec. 3)
# A_i = R(q, o_i) - (1/G) sum_j R(q, o_j): each completion is judged against the others of its
# group. A group whose completions all score the same (a zero-variance group) has A = 0 everywhere:
# it teaches nothing, and HICRA changes nothing there either.

# %%
advantages = group_advantages(rewards, G, "center")  # [B]
for group in range(PROMPTS):
    rows = slice(group * G, (group + 1) * G)
    zero_variance = "  (zero-variance group: nothing to learn)" if rewards[rows].std() == 0 else ""
    print(f"group {group}: mean reward {rewards[rows].mean():.3f} -> A = r - mean = "
          f"{[round(a, 3) for a in advantages[rows].tolist()]}{zero_variance}")
print("advantages:", [round(a, 6) for a in advantages.tolist()])

# %% [markdown]
# ## 4. Planning tokens (`grams.batch_planning_mask`, Sec. 2.1)
# A token is a planning token iff its characters overlap a strategic gram; the rest are execution
# tokens. Below, one completion's tokens with the planning ones in [[ ]].

# %%
# [B, C] bool
planning = batch_planning_mask(tokenizer, rollout.completion_ids, rollout.completion_mask, grams)
completion = rollout.completion_mask.bool()  # [B, C]
row = int(advantages.abs().argmax())  # a completion whose advantage is not zero
tokens = tokenizer.convert_ids_to_tokens(rollout.completion_ids[row][completion[row]].tolist())
print(" ".join(f"[[{t}]]" if p else t
               for t, p in zip(tokens, planning[row][completion[row]].tolist())))
print(f"planning ratio of the batch: {(planning & completion).sum() / completion.sum():.3f}")

# %% [markdown]
# ## 5. HICRA's advantages beside GRPO's (Sec. 3: `train.shape_advantages`, `hicra_advantages`)
# A^H_{i,t} = A_i + alpha * |A_i| on planning tokens, A_i elsewhere. A correct completion's planning
# tokens get (1 + alpha) x its credit; a failed one's get (1 - alpha) x its blame.

# %%
hicra_tokens, amplified, _ = shape_advantages(config, advantages, rollout, planning, tokenizer,
                                              placebo=None)  # [B, C]
grpo_tokens, _, _ = shape_advantages(TrainConfig(algo="grpo"), advantages, rollout, planning,
                                     tokenizer, placebo=None)
print(f"completion [{row}], A = {advantages[row]:+.3f}, alpha = {ALPHA}")
print(f"  {'token':<14}{'planning':>9}{'A (GRPO)':>10}{'A^H (HICRA)':>13}")
for t, (token, is_plan) in enumerate(zip(tokens, planning[row][completion[row]].tolist())):
    if t < 12 or is_plan:
        print(f"  {token:<14}{'yes' if is_plan else '':>9}{grpo_tokens[row, t]:>+10.3f}"
              f"{hicra_tokens[row, t]:>+13.3f}")
same = torch.equal(hicra_tokens[completion], grpo_tokens[completion])
print(f"HICRA advantages equal GRPO's on every token: {same}")
failed = [r for r in range(len(rollout.texts))
          if advantages[r] < 0 and (planning[r] & completion[r]).any()]
if failed:  # a failed completion with planning tokens: HICRA softens their blame to (1 - alpha) x A
    f = failed[0]
    plan_values = sorted({round(v, 3)
                          for v in hicra_tokens[f][planning[f] & completion[f]].tolist()})
    exec_values = sorted({round(v, 3)
                          for v in hicra_tokens[f][completion[f] & ~planning[f]].tolist()})
    print(f"failed completion [{f}], A = {advantages[f]:+.3f}: A^H on its planning tokens "
          f"{plan_values}, on its execution tokens {exec_values}")
for group in range(PROMPTS):
    rows = slice(group * G, (group + 1) * G)
    if rewards[rows].std() == 0:
        tokens_in_group = int(completion[rows].sum())
        print(f"zero-variance group {group}: A^H is 0 on all its {tokens_in_group} tokens: "
              f"{bool((hicra_tokens[rows][completion[rows]] == 0).all())}")

# %% [markdown]
# ## 6. The ratio and the clipped surrogate (`grpo.clipped_policy_loss`, `grpo.clip_fractions`)
# ratio = pi_theta / pi_old = exp(logp - old_logp); the loss per token is
# -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A). Before any update the policy *is*
# pi_old, so the ratio is 1 (to float rounding) and the clip cannot act: with `--ppo-epochs 1`,
# train.py's default, this is every step. The loss is then a plain policy gradient with the shaped
# advantages.

# %%
logp, _ = completion_logprobs(model, rollout.prompt_ids, rollout.prompt_mask,
                              rollout.completion_ids, rollout.completion_mask,
                              config.temperature)  # [B, C], with gradients
logp.retain_grad()
ratio = torch.exp(logp - rollout.old_logp)  # [B, C]
print(f"first pass: largest |ratio - 1| = {(ratio - 1)[completion].abs().max():.2e}")
clipped = clip_fractions(logp, rollout.old_logp, hicra_tokens, rollout.completion_mask,
                         config.eps_low, config.eps_high)
print(f"first pass: clipped below {clipped.low:.3f}, above {clipped.high:.3f}")
batch_tokens = rollout.completion_mask.sum()
per_token = clipped_policy_loss(logp, rollout.old_logp, hicra_tokens, config.eps_low,
                                config.eps_high)  # [B, C]
loss = aggregate_loss(per_token, rollout.completion_mask, config.loss_agg, batch_tokens,
                      len(rollout.texts), config.max_new_tokens)
print(f"loss (token-mean over {int(batch_tokens)} tokens): {loss.item():+.5f}")

# %% [markdown]
# ## 7. Where the gradient goes: planning vs execution tokens
# d loss / d logp_t = -A^H_t / N at ratio 1: HICRA scales the push on a planning token by
# (1 + alpha) for a correct completion and (1 - alpha) for a failed one, and leaves execution tokens
# as GRPO does.

# %%
loss.backward()
grad = logp.grad  # [B, C]
for name, mask in (("planning", planning & completion), ("execution", completion & ~planning)):
    for sign, rows in (("A > 0", advantages > 0), ("A < 0", advantages < 0)):
        chosen = mask & rows[:, None]
        if chosen.any():
            ratio_to_grpo = (grad[chosen] / (-grpo_tokens[chosen] / batch_tokens)).mean()
            print(f"{name:>9} tokens, {sign}: mean |d loss/d logp| = "
                  f"{grad[chosen].abs().mean():.2e}, {ratio_to_grpo:.3f} x GRPO's")
model.zero_grad(set_to_none=True)

# %% [markdown]
# ## 8. The update, and a second pass over the same batch: now the clip acts
# `train.policy_update` takes one AdamW step per PPO epoch. After the first, the policy has moved:
# on a second pass over the same rollouts the ratio departs from 1 and the clip bounds it
# (`--ppo-epochs 2` in train.py), on about one token in a hundred at train.py's learning rate.

# %%
from train import StepBatch  # noqa: E402  (the batch train.py's update takes)

batch = StepBatch(rollout, rewards, 0, hicra_tokens, planning, amplified, 0.0, None)
optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
update = policy_update(config, model, optimizer, batch)  # one epoch: ratio 1, no clipping
print(f"update: loss {update['loss']:+.5f}, grad norm {update['grad_norm']:.3f}, "
      f"clipped below {update['clip_low']:.3f} above {update['clip_high']:.3f}")
with torch.no_grad():
    logp, _ = completion_logprobs(model, rollout.prompt_ids, rollout.prompt_mask,
                                  rollout.completion_ids, rollout.completion_mask,
                                  config.temperature)
ratio = torch.exp(logp - rollout.old_logp)[completion]
clipped = clip_fractions(logp, rollout.old_logp, hicra_tokens, rollout.completion_mask,
                         config.eps_low, config.eps_high)
print(f"second pass: ratio in [{ratio.min():.3f}, {ratio.max():.3f}], "
      f"clipped below {clipped.low:.3f}, above {clipped.high:.3f}")

# %% [markdown]
# ## 9. Why a confident token barely moves (the policy gradient at the logits)
# The loss reaches the weights through the logits z of each position. For a token y drawn with
# probability p, d logp_y / d z = e_y - softmax(z), whose norm lies between 1 - p and sqrt(2)
# (1 - p). So a token the policy already predicts with near certainty receives almost no gradient,
# whatever its advantage, and amplifying that advantage by 1.2 changes little. (The model here is
# the one step 8 just updated.) Compare the mean p of planning and execution tokens below: in this
# world most tokens, planning ones included, are near 1.

# %%
# [B, C] each: p(y_t), |e_y - softmax(z_t)|
_, p_token, push = token_measures(model, rollout, config.temperature)
for name, mask in (("planning", planning & completion), ("execution", completion & ~planning)):
    print(f"mean over {name} tokens: p(token) {p_token[mask].mean():.3f}, "
          f"|e_y - softmax(z)| {push[mask].mean():.3f}")
# the most confident planning token
sure = torch.where(planning & completion, p_token, -1.0).flatten().argmax()
r, t = divmod(int(sure), p_token.shape[1])
print("most confident planning token "
      f"{tokenizer.convert_ids_to_tokens(int(rollout.completion_ids[r, t]))!r}: "
      f"1 - p = {1 - p_token[r, t]:.3e}, |e_y - softmax(z)| = {push[r, t]:.3e}, sqrt(2) (1 - p) = "
      f"{2 ** 0.5 * (1 - p_token[r, t]):.3e}")  # 1 - p <= |e_y - softmax(z)| <= sqrt(2) (1 - p)

# %% [markdown]
# ## 10. Exercise: write the HICRA advantage yourself
# Replace the body of `my_hicra_advantages` with your own code from the formula in step 5 (it is
# written out below as one answer). The line under it compares yours with `hicra.hicra_advantages`
# on this batch.

# %%
def my_hicra_advantages(advantages, planning_mask, alpha):
    """A^H_{i,t} = A_i + alpha * |A_i| where token t of completion i is a planning token, A_i
    elsewhere."""
    per_token = advantages[:, None].expand(planning_mask.shape)  # [B, C]
    return per_token + alpha * per_token.abs() * planning_mask  # [B, C]


mine = my_hicra_advantages(advantages, planning, ALPHA)
print(f"your A^H equals hicra.hicra_advantages on every completion token: "
      f"{torch.allclose(mine[completion], hicra_tokens[completion])}")

# %% [markdown]
# ## Exercises (each answer is printed by the script, and tests/test_walkthrough.py checks it)
# 1. Set alpha to 0 (`WALKTHROUGH_ALPHA=0 python walkthrough.py`). Look at step 5's last line,
#    "HICRA advantages equal GRPO's on every token", and at step 7's "x GRPO's" ratios. Predict both
#    first. (True, and 1.000 everywhere.)
# 2. Find a zero-variance group: take more problems (`WALKTHROUGH_PROMPTS=8 python walkthrough.py`)
#    until step 3 marks a group whose rewards are all equal. Look at step 5's line "zero-variance
#    group g: A^H is 0 on all its N tokens". Predict it first. (True: neither GRPO nor HICRA learns
#    from such a group.)
# 3. With alpha = 1 (`WALKTHROUGH_ALPHA=1 python walkthrough.py`), what do the planning tokens of a
#    failed completion receive? Predict from the formula, then look at step 5's line "failed
#    completion [i], A = ...: A^H on its planning tokens [...]". (A + |A| = 0 for A < 0: [0.0]; its
#    execution tokens keep A.)
# 4. Step 9: which tokens does the policy already predict with near certainty, planning or
#    execution? Predict the most confident planning token's |e_y - softmax(z)| from its 1 - p before
#    reading it. (Between 1 - p and sqrt(2) (1 - p): a token with 1 - p = 1e-4 gets about a
#    ten-thousandth of a full push.)
# 5. Step 10: delete the body of `my_hicra_advantages` and write your own; the line under it says
#    whether it equals the project's on every token. Then break it on purpose (forget the `abs`) and
#    watch it fail.
# 6. Step 8: the second pass over the same rollouts is off-policy, and the clip acts there. Look at
#    "second pass: ratio in [...], clipped below ..., above ...". Which side clips more, below
#    (1 - eps_low) or above (1 + eps_high)? (The script prints both; the first pass clips nothing,
#    the second does.)
