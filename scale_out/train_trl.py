"""Train with GRPO / HICRA on TRL's GRPOTrainer (hicra_trl.py): one CPU to many GPUs, same command.

    python -m scale_out.train_trl --steps 2  # built-in world, tiny model, CPU
    accelerate launch --config_file scale_out/configs/single_gpu.yaml \
        -m scale_out.train_trl --model PATH_OR_ID \\
        --data gsm8k_train --reward gsm8k --algo hicra --use-vllm
    accelerate launch --config_file scale_out/configs/multi_gpu_ddp.yaml \
        -m scale_out.train_trl ...  # one node, N GPUs
    accelerate launch --config_file scale_out/configs/deepspeed_zero3.yaml \
        -m scale_out.train_trl ...  # models that do not fit

Flags keep train.py's names and meanings, mapped onto GRPOConfig:
- one step = --prompts-per-step x --group-size completions and --ppo-epochs optimizer steps on them,
  as in train.py: each optimizer step accumulates gradients over the whole rollout batch,
  --micro-batch-size completions per device at a time (TRL's per_device_train_batch_size;
  gradient_accumulation_steps = batch / (micro-batch x processes)); --ppo-epochs is TRL's
  num_iterations, so TRL counts --steps x --ppo-epochs optimizer steps;
- prompts are train.py's (rollout.format_prompt: the chat template's user turn, or the plain
  template);
- rewards are reward.py's functions, graded as in train.py (a grader error or timeout scores 0 and
  is counted in the reward_errors metric).
Checkpoints are TRL's (OUT/checkpoint-N, every --save-every optimizer steps, and OUT at the end):
plain Hugging Face folders that `python eval.py --model OUT/checkpoint-N` evaluates directly.
Metrics go to --report-to backends and to OUT/checkpoint-N/trainer_state.json ("log_history").
"""

import argparse
import os
import sys
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer

from cli import AT_LEAST_ONE, FRACTION, InputError, OneLineParser, check_bounds, check_text, report
from config import BOUNDS, TrainConfig, add_flags, default_grams, default_model, flag
from data import load_problems
from model_loading import USE_HUB_KERNELS, dequantized_folder, resolve_device_and_dtype
from precision import ACCELERATE_NAMES
from grading import score_completions
from reward import REWARDS
from rollout import DEFAULT_INSTRUCTION, PLAIN_TEMPLATE

try:  # the optional requirements: a one-line error, not a traceback, when they are missing
    from datasets import Dataset

    from scale_out.hicra_trl import (ADVANTAGE_SCALES, ALGOS, LOSS_TYPES, HicraGRPOConfig,
                                     HicraGRPOTrainer)
except ImportError as missing:
    sys.exit(report(InputError(f"train_trl.py needs TRL ({missing.name} is not installed): "
                               "pip install -r scale_out/requirements-trl.txt")))


SHARED_FLAGS = (  # train.py's settings that mean the same here (config.TrainConfig declares them)
    "model", "gguf_file", "dtype", "threads", "gradient_checkpointing", "lora_rank", "lora_alpha",
    "data", "reward", "prompts_per_step", "group_size", "max_new_tokens", "temperature", "top_p",
    "algo", "alpha", "grams", "advantage", "eps_low", "eps_high", "beta", "loss_agg",
    "entropy_top_q", "lr", "weight_decay", "grad_clip", "warmup_steps", "ppo_epochs",
    "micro_batch_size", "steps", "seed",
)


@dataclass
class TrlFlags:
    """The settings only this launcher has (vLLM) or that mean something else here (TRL's
    outputs)."""

    use_vllm: bool = flag(False, "generate with vLLM (pip install vllm; GPU)", "sampling")
    vllm_mode: str = flag("colocate", "colocate: vLLM shares the training GPUs; "
                                      "server: a separate `trl vllm-serve`",
                          "sampling", choices=("colocate", "server"))
    vllm_gpu_memory: float = flag(0.3, "GPU memory share of colocated vLLM", "sampling", FRACTION)
    out: str = flag("runs/trl", "output folder: TRL checkpoints and the final model", "logging")
    save_every: int = flag(50, "checkpoint every N optimizer steps", "logging", AT_LEAST_ONE)
    report_to: str = flag("none", "TRL/transformers backends: none, tensorboard, wandb, trackio",
                          "logging")


def build_parser() -> argparse.ArgumentParser:
    """train.py's shared flags (their TRL meaning where it differs) and TrlFlags."""
    parser = OneLineParser(
        description="GRPO / HICRA on TRL's GRPOTrainer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_flags(parser, TrainConfig, only=SHARED_FLAGS, overrides={
        "reward": dict(choices=sorted(REWARDS), help="reward function (reward.py)"),
        "prompts_per_step": dict(help="problems sampled per step (all processes)"),
        "algo": dict(choices=None, help=f"advantage shaping: {', '.join(ALGOS)} (hicra_trl.py)"),
        "grams": dict(help="strategic grams: preset (paper, world) or a file; "
                           "--algo placebo: a file of placebo grams"),
        "advantage": dict(choices=sorted(ADVANTAGE_SCALES)),
        "loss_agg": dict(choices=sorted(LOSS_TYPES)),
        "warmup_steps": dict(help="linear learning-rate warm-up (optimizer steps)"),
        "ppo_epochs": dict(help="optimizer steps per rollout batch (num_iterations)"),
        "micro_batch_size": dict(help="completions per device per forward/backward"),
        "steps": dict(help="training steps (rollout + update)"),
    })
    add_flags(parser, TrlFlags)
    return parser


def processes() -> int:
    """Number of training processes accelerate launched (1 under plain `python`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# Every numeric flag: finite and within its bound (cli.check_bounds): train.py's bounds for the
# shared flags, but --steps and --save-every differ (TRL has no step-0-only run, no "end only"
# save).
TRL_BOUNDS = {name: BOUNDS[name] for name in SHARED_FLAGS if name in BOUNDS} | {
    "vllm_gpu_memory": FRACTION,
    "steps": AT_LEAST_ONE,
    "save_every": AT_LEAST_ONE,
}


def check_args(args: argparse.Namespace) -> None:
    """Raise InputError for a flag out of bounds or a batch that does not split over micro-batches
    and processes; algo and the gram file are checked by HicraGRPOConfig."""
    check_bounds(args, TRL_BOUNDS)
    check_text(args)
    if args.model is None:
        args.model = default_model(args.data)
    batch, per_pass = args.prompts_per_step * args.group_size, args.micro_batch_size * processes()
    if batch % per_pass:
        raise InputError(f"--prompts-per-step x --group-size ({batch}) must be a multiple of "
                         f"--micro-batch-size x processes ({per_pass})")


def prompt_of(tokenizer, problem: str):
    """train.py's prompt: a conversation TRL renders with the chat template, or the plain-template
    text."""
    content = f"{problem}\n{DEFAULT_INSTRUCTION}"
    if tokenizer.chat_template:
        return [{"role": "user", "content": content}]
    return PLAIN_TEMPLATE.format(content=content)


def problems_dataset(name_or_path: str, tokenizer) -> Dataset:
    """Our problems (data.load_problems) as a TRL prompt dataset with an `answer` column for the
    reward."""
    problems = load_problems(name_or_path)
    return Dataset.from_list([{"prompt": prompt_of(tokenizer, p.problem), "answer": p.answer}
                              for p in problems])


def trl_reward(name: str):
    """reward.py's function `name` in TRL's reward-function form:
    (completions, answer, ...) -> rewards."""

    def reward(completions, answer, log_metric=None, **_):
        # conversational: messages
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        rewards, errors = score_completions(REWARDS[name], texts, answer)
        if log_metric is not None:
            log_metric("reward_errors", errors)
        return rewards

    reward.__name__ = name
    return reward


def build_config(args: argparse.Namespace) -> HicraGRPOConfig:
    """The HicraGRPOConfig of the flags (see the module docstring for the mapping)."""
    batch = args.prompts_per_step * args.group_size
    gpu = torch.cuda.is_available()
    # bf16 = bfloat16
    _, dtype = resolve_device_and_dtype("auto", ACCELERATE_NAMES.get(args.dtype, args.dtype))
    return HicraGRPOConfig(
        output_dir=args.out,
        algo=args.algo, hicra_alpha=args.alpha, grams=args.grams or default_grams(args.data),
        entropy_top_q=args.entropy_top_q,
        scale_rewards=ADVANTAGE_SCALES[args.advantage], loss_type=LOSS_TYPES[args.loss_agg],
        epsilon=args.eps_low, epsilon_high=args.eps_high, beta=args.beta,
        num_generations=args.group_size, max_completion_length=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p,
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=batch // (args.micro_batch_size * processes()),
        num_iterations=args.ppo_epochs, max_steps=args.steps * args.ppo_epochs,
        learning_rate=args.lr, weight_decay=args.weight_decay, max_grad_norm=args.grad_clip,
        warmup_steps=args.warmup_steps, lr_scheduler_type="constant_with_warmup", seed=args.seed,
        # Mixed precision as train.py (precision.py): float32 weights, accelerate's autocast (and
        # fp16 loss scaling).
        model_init_kwargs={"dtype": "float32", "use_kernels": USE_HUB_KERNELS,
                           "trust_remote_code": False},
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, use_cpu=not gpu,
        use_vllm=args.use_vllm, vllm_mode=args.vllm_mode,
        vllm_gpu_memory_utilization=args.vllm_gpu_memory,
        logging_steps=1, save_strategy="steps", save_steps=args.save_every,
        report_to=args.report_to,
        # passing False warns (deprecated name)
        **({"gradient_checkpointing": True} if args.gradient_checkpointing else {}),
    )


def build_trainer(args: argparse.Namespace, callbacks=None) -> HicraGRPOTrainer:
    """The trainer of the flags: config, problems, reward function, optional LoRA (bench_trl.py adds
    callbacks)."""
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = build_config(args)
    model = dequantized_folder(args.model, args.gguf_file) if args.gguf_file else args.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    except OSError as error:
        raise InputError(f"--model: cannot load '{model}': {str(error).splitlines()[0]}") from None
    peft_config = None
    if args.lora_rank > 0:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha,
                                 target_modules="all-linear")
    return HicraGRPOTrainer(
        model=model, reward_funcs=trl_reward(args.reward), args=config,
        train_dataset=problems_dataset(args.data, tokenizer),
        processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks,
    )


def run(args: argparse.Namespace) -> HicraGRPOTrainer:
    """Train per the flags and save the final model to --out."""
    trainer = build_trainer(args)
    trainer.train()
    trainer.save_model(args.out)
    return trainer


def main(argv: list[str] | None = None) -> None:
    """Parse, check and train. Bad input: one `error: ...` line on stderr, exit code 2
    (cli.report)."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except InputError as error:
        sys.exit(report(error))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
