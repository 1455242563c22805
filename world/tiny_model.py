"""Build the tiny base model of the built-in world (tasks.py): tokenizer, small Llama, SFT warm
start.

    python -m world.tiny_model --out world/models/tiny-world
    # deterministic for --seed; docs/world.md gives its build time

Deliberate choices:
- word-level tokenizer whose digits are single tokens (" 47" -> "▁4", "7"), so arithmetic is
  learnable by a ~0.5M-parameter model, and whose Metaspace decoder gives the text back exactly
  (grams and \\boxed{} are matched on decoded text);
- chat template "<|begin|><|user|>{problem}\\n{instruction}<|assistant|>{trace}<|end|>"; EOS is
  "<|end|>" and carries loss, pad is a separate "<|pad|>" that never does;
- SFT in two phases. The *skill* phase (SKILL_MIX) teaches every strategy with enough traces that
  the sound ones are executed well; the short *prior* phase (PRIOR_MIX) then retrains the choice on
  a deliberately sub-optimal mix where the error-prone one-shot `direct` strategy dominates and the
  reliable `steps` / `check` strategies are rare but present, so RL has a strategy to discover. (One
  skewed phase alone also starves the sound strategies of practice: they end up no better than
  `direct`.) The errors of `direct` come from the model's own limited capacity;
- a fallible teacher in both phases (world v2): it misreads each operand it copies with probability
  --copy-slip-rate and slips on each result it writes with probability --slip-rate
  (tasks.slip_writer), building on what it wrote. The model learns the slips as probability spread
  around the right token, so at temperature 1 its execution is imperfect under every strategy, the
  sound ones included, and RL can sharpen it: the room for the paper's first phase (procedural
  consolidation). Copying the operands is the one skill every strategy shares, so every completion,
  whatever its plan, gives it a learning signal;
- loss on assistant tokens only (trace + EOS); the prompt is exactly rollout.format_prompt's.
"""

import argparse
import math
import random
import time
from collections import Counter

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from world import tasks
from cli import OneLineParser
from rollout import DEFAULT_INSTRUCTION, format_prompt, generate_rollouts

PAD, UNK, BOS, EOS, USER, ASSISTANT = ("<|pad|>", "<|unk|>", "<|begin|>", "<|end|>", "<|user|>",
                                       "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# One piece per digit, per word, or per other character; a leading space ("▁") stays glued to it.
PIECE = Regex(r"▁?(?:\d|[A-Za-z]+|[^A-Za-z\d▁])")
# Skill phase: every strategy practised often enough to be executed well.
SKILL_MIX = {"direct": 0.50, "steps": 0.35, "check": 0.15}
# Prior phase: the poor one-shot strategy dominates the choice; the sound ones are rare but present.
PRIOR_MIX = {"direct": 0.90, "steps": 0.06, "check": 0.04}
# The fallible teacher of both phases (module docstring): per copied operand and per written result.
COPY_SLIP_RATE = 0.04
SLIP_RATE = 0.03
CHECK_SLIP_RATE = 0.5  # share of `check` traces whose direct step holds a slip the check catches
MAX_NEW_TOKENS = 128  # longest reference trace is 94 tokens (a `sum` check with its slip caught)
IGNORE = -100  # label of tokens without loss (prompt, padding)


def tokenizer_corpus(seed: int) -> list[str]:
    """Texts that cover the world's whole vocabulary: every template word, name, item and digit."""
    problems = tasks.world_problems("train", 300, seed)
    texts = [p.problem + "\n" + tasks.reference_trace(p, s) for p in problems
             for s in tasks.STRATEGIES]
    texts += [tasks.reference_trace(p, "check", slip=True) for p in problems]
    digits = "0123456789"
    return texts + [" ".join(tasks.NAMES + tasks.ITEMS), digits + " " + " ".join(digits),
                    "\n" + DEFAULT_INSTRUCTION]


def build_tokenizer(seed: int) -> PreTrainedTokenizerFast:
    """The world's word-level tokenizer (single-digit tokens, exact round trip) with its chat
    template."""
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"),
        pre_tokenizers.Split(PIECE, behavior="isolated"),
    ])
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, UNK, BOS, EOS, USER, ASSISTANT])
    tokenizer.train_from_iterator(tokenizer_corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, unk_token=UNK, chat_template=CHAT_TEMPLATE,
                                   padding_side="left")


def build_model(tokenizer, args) -> LlamaForCausalLM:
    """A small Llama over the world's vocabulary, randomly initialised from `args.seed`."""
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def sft_trace(problem, rng: random.Random, mix: dict[str, float], slip_rate: float = 0.0,
              copy_slip_rate: float = 0.0) -> str:
    """A trace for `problem` whose strategy is drawn from `mix`; CHECK_SLIP_RATE of `check` traces
    hold a slip for the check to catch. A fallible teacher also slips on each written result with
    probability slip_rate and misreads each copied operand with probability copy_slip_rate
    (tasks.slip_writer), carrying the slip forward; both 0: a correct reference trace."""
    strategy = rng.choices(list(mix), weights=list(mix.values()))[0]
    slip = strategy == "check" and rng.random() < CHECK_SLIP_RATE
    if slip_rate == 0 and copy_slip_rate == 0:
        return tasks.reference_trace(problem, strategy, slip=slip, seed=rng.randrange(2**31))
    return tasks.written_trace(problem, strategy, tasks.slip_writer(rng, slip_rate),
                               first_slip=slip, rng=rng,
                               copy=tasks.slip_writer(rng, copy_slip_rate, tasks.miscopied))


def sft_batch(tokenizer, problems, rng: random.Random, mix: dict[str, float],
              slip_rate: float = 0.0,
              copy_slip_rate: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels) [B, T]; labels only on the trace and its
    EOS."""
    rows = []
    for p in problems:
        prompt = tokenizer(format_prompt(tokenizer, p.problem),
                           add_special_tokens=False)["input_ids"]
        answer = tokenizer(sft_trace(p, rng, mix, slip_rate, copy_slip_rate),
                           add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt + answer, [IGNORE] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i, _ in rows])  # [B, T]
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows])  # [B, T]
    labels = torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in rows])  # [B, T]
    return ids, mask, labels


def learning_rate(step: int, args) -> float:
    """Linear warm-up, then cosine decay to 10% of --lr."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_sft(model, tokenizer, args, phase: str) -> None:
    """Supervised fine-tuning on freshly generated train-split traces, one new batch per step.

    phase "skill": --steps steps on SKILL_MIX with warm-up and cosine decay (learning_rate);
    phase "prior": --prior-steps steps on PRIOR_MIX at the constant --prior-lr.
    Both phases' traces are written by the fallible teacher (--slip-rate, --copy-slip-rate). Each
    phase has a fresh optimizer and its own data stream, so a phase only depends on the weights it
    starts from.
    """
    skill = phase == "skill"
    mix, steps = (SKILL_MIX, args.steps) if skill else (PRIOR_MIX, args.prior_steps)
    rng = random.Random(args.seed if skill else f"{phase}:{args.seed}")
    first_problem_seed = args.seed * 1_000_003 + (0 if skill else args.steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0,
                                  betas=(0.9, 0.98))
    model.train()
    start = time.time()
    for step in range(steps):
        problems = tasks.world_problems("train", args.batch_size, seed=first_problem_seed + step)
        ids, mask, labels = sft_batch(tokenizer, problems, rng, mix, args.slip_rate,
                                      args.copy_slip_rate)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        lr = learning_rate(step, args) if skill else args.prior_lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.log_every == 0 or step == steps - 1:
            print(f"{phase} step {step:5d}  loss {loss.item():.4f}  lr {lr:.2e}  "
                  f"{time.time() - start:6.0f}s", flush=True)
    model.eval()


def sample_texts(model, tokenizer, prompts: list[str], temperature: float,
                 batch_size: int = 100) -> tuple[list[str], list[int]]:
    """One completion per prompt and its length in tokens."""
    texts, lengths = [], []
    for i in range(0, len(prompts), batch_size):
        batch = generate_rollouts(model, tokenizer, prompts[i:i + batch_size], group_size=1,
                                  max_new_tokens=MAX_NEW_TOKENS, temperature=temperature,
                                  score=False)
        texts += batch.texts
        lengths += batch.completion_mask.sum(-1).tolist()
    return texts, lengths


def forced_plan_accuracy(model, tokenizer, problems, temperature: float,
                         seed: int) -> dict[str, dict[str, float]]:
    """Accuracy per family when the trace is forced to open with the `steps` or the `direct` plan
    (the `direct` one may still add a check): the strategy gap, and the execution accuracy of the
    sound plan, measured on every problem rather than on the few that pick it."""
    torch.manual_seed(seed)
    outcomes = {}
    for strategy in ("steps", "direct"):
        plans = [tasks.PLANS[p.meta["family"]][strategy] for p in problems]
        prompts = [format_prompt(tokenizer, p.problem) + plan for p, plan in zip(problems, plans)]
        texts, _ = sample_texts(model, tokenizer, prompts, temperature)
        for p, plan, text in zip(problems, plans, texts):
            correct = tasks.classify_error(p, plan + text) is None
            outcomes.setdefault(p.meta["family"], {}).setdefault(strategy, []).append(correct)
    return {family: {s: sum(v) / len(v) for s, v in by_plan.items()}
            for family, by_plan in outcomes.items()}


def measure(model, tokenizer, problems, temperature: float, seed: int,
            batch_size: int = 100) -> dict:
    """Accuracy, strategy mix, accuracy per strategy, error types and mean length of one sample
    each."""
    torch.manual_seed(seed)
    texts, lengths = sample_texts(model, tokenizer,
                                  [format_prompt(tokenizer, p.problem) for p in problems],
                                  temperature, batch_size)
    strategies = [tasks.detect_strategy(p, t) for p, t in zip(problems, texts)]
    errors = [tasks.classify_error(p, t) for p, t in zip(problems, texts)]
    per_strategy = {}
    for s in (*tasks.STRATEGIES, None):
        outcomes = [e is None for e, st in zip(errors, strategies) if st == s]
        if outcomes:
            per_strategy[str(s)] = (sum(outcomes) / len(outcomes), len(outcomes))
    return {
        "accuracy": sum(e is None for e in errors) / len(problems),
        "strategy_mix": {str(s): c / len(problems) for s, c in Counter(strategies).items()},
        "accuracy_per_strategy": per_strategy,
        "errors": dict(Counter(e for e in errors if e is not None)),
        "mean_length": sum(lengths) / len(lengths),
        "example": texts[0],
    }


def print_report(name: str, report: dict) -> None:
    """One readable block of `measure`'s figures."""
    print(f"{name}: accuracy {report['accuracy']:.3f}  mean length {report['mean_length']:.1f} "
          f"tokens  errors {report['errors']}")
    print("  strategy mix     " + "  ".join(f"{s} {f:.2f}"
                                            for s, f in sorted(report["strategy_mix"].items())))
    print("  acc per strategy "
          + "  ".join(f"{s} {a:.2f} (n={n})"
                      for s, (a, n) in sorted(report["accuracy_per_strategy"].items())))
    print(f"  example: {report['example']}")


def parse_args() -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=tasks.DEFAULT_MODEL_DIR, help="output folder (HF format)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the tokenizer corpus, init, data and eval")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest when other jobs share the cores)")
    model = parser.add_argument_group("model")
    model.add_argument("--hidden", type=int, default=96, help="hidden size (MLP is 4x)")
    model.add_argument("--layers", type=int, default=3, help="transformer layers")
    model.add_argument("--heads", type=int, default=4, help="attention heads")
    sft = parser.add_argument_group("SFT")
    sft.add_argument("--steps", type=int, default=1800, help="optimiser steps of the skill phase")
    sft.add_argument("--batch-size", type=int, default=64, help="traces per step")
    sft.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    sft.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    sft.add_argument("--prior-steps", type=int, default=300,
                     help="optimiser steps of the prior phase")
    sft.add_argument("--prior-lr", type=float, default=3e-4,
                     help="constant learning rate of the prior phase")
    sft.add_argument("--slip-rate", type=float, default=SLIP_RATE,
                     help="probability that the teacher slips on any one result it writes")
    sft.add_argument("--copy-slip-rate", type=float, default=COPY_SLIP_RATE,
                     help="probability that the teacher misreads any one operand it copies")
    sft.add_argument("--log-every", type=int, default=100, help="print the loss every N steps")
    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--eval-n", type=int, default=200, help="held-out test problems to sample")
    args = parser.parse_args()
    for flag in ("steps", "batch_size", "threads", "hidden", "layers", "heads", "eval_n"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be > 0")
    for flag in ("slip_rate", "copy_slip_rate"):
        if not 0 <= getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be in [0, 1)")
    if args.hidden % args.heads:
        parser.error("--hidden must be a multiple of --heads")
    return args


def main() -> None:
    args = parse_args()
    start = time.time()
    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer(args.seed)
    model = build_model(tokenizer, args)
    params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tokenizer)}  parameters {params / 1e6:.2f}M")
    train_sft(model, tokenizer, args, "skill")
    train_sft(model, tokenizer, args, "prior")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    problems = tasks.world_problems("test", args.eval_n, seed=args.seed)
    for name, temperature in (("temperature 1.0", 1.0), ("greedy", 0.0)):
        print_report(f"{name}, n={args.eval_n}, seed={args.seed}",
                     measure(model, tokenizer, problems, temperature, args.seed))
        forced = forced_plan_accuracy(model, tokenizer, problems, temperature, args.seed)
        print("  plan forced      "
              + "  ".join(f"{family}: steps {acc['steps']:.2f} direct {acc['direct']:.2f}"
                          for family, acc in sorted(forced.items())))
    print(f"saved {args.out}  ({params / 1e6:.2f}M parameters)  build wall time "
          f"{time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
