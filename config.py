"""The training configuration, each flag declared once: its default, help text, group and bound.

`TrainConfig` is the table (as CleanRL's `Args` and TRL's `GRPOConfig`); everything else is derived
from it:
- the command line (`build_parser`): `--lora-rank` for the field `lora_rank`, help with the default;
- the checks (`check_config`): every number finite and within its field's bound, every file value of
  the right type and choice, before anything is written; one `error: ...` line naming the flag
  otherwise;
- a run's RUN_DIR/config.json (`saved_settings`) and its resume (`parse_config`: the saved settings,
  then those given explicitly on the command line);
- `--config FILE` (YAML or JSON, e.g. a run's own config.json): settings read from a file, which the
  flags given on the command line override, as TRL's scripts do.
scale_out/train_trl.py takes the fields it shares with train.py from here
(`add_flags(..., only=...)`).

Why not transformers' HfArgumentParser, which reads dataclasses too: it spells each flag twice
(`--lora_rank` and `--lora-rank`), makes one help group per dataclass, turns booleans into
`--x [BOOL]` plus `--no_x`, and reports a bad value with argparse's usage block; the bounds and the
one-line errors would be ours to add anyway. The derivation here is the part of it this project
needs, in ~40 lines.
"""

import argparse
import dataclasses
import importlib.util
import json
import secrets
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from data import check_data_model, source_of
import cli
from cli import (AT_LEAST_ONE, FRACTION, NON_NEGATIVE, POSITIVE, SEED, UNIT_INTERVAL, Bound,
                 InputError, OneLineParser, check_bounds, check_text, flag_name)
from grpo import ADVANTAGE_MODES, AGGREGATIONS
from hicra import PAPER_ALPHA
from model_loading import check_model_flags
from precision import ACCELERATE_NAMES
from grading import REWARD_TIMEOUT_S
from reward import REWARD_HELP
from rollout import DEFAULT_INSTRUCTION
import run_folder
from run_folder import write_atomically
from runlog import TRACKERS

ALGOS = ("grpo", "hicra", "entropy_reg", "high_entropy", "placebo", "random_spans", "hicra_verl")
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
GROUPS = ("model", "data", "prompt", "sampling", "algorithm", "optimisation", "logging", "run")
# what is trained: fixed for the life of a run
MODEL_FLAGS = ("model", "gguf_file", "lora_rank", "lora_alpha")
DEFAULT_DATA = "world_train"  # the built-in world's training problems (data.problem_sources)
# how this process was started, not settings of the run: never saved
SESSION_FLAGS = ("resume", "config")


def flag(default, help: str, group: str, bound: Bound | None = None, choices: tuple | None = None,
         aliases: tuple[str, ...] = (), **argparse_kwargs):
    """A TrainConfig field: its default and what the command line, the checks and the help need to
    know.
    `aliases`: other spellings of the flag on the command line (e.g. accelerate's
    --mixed-precision)."""
    metadata = dict(help=help, group=group, bound=bound, choices=choices, aliases=aliases,
                    argparse=argparse_kwargs)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelFlags:
    """How the model is loaded (model_loading.py): shared by train.py and eval.py."""

    model: str | None = flag(None, "HF model folder or hub id (from_pretrained); unset: the model "
                                   "--data's problem source ships (the built-in world's tiny model "
                                   "for world data and for files)", "model")
    gguf_file: str | None = flag(None, "GGUF file name inside the --model folder", "model")
    dtype: str = flag("auto", "weights dtype; auto = bfloat16 on a GPU that supports it, float32 "
                              "otherwise", "model", choices=DTYPE_NAMES)
    device: str = flag("auto", "auto (cuda when available), cpu, cuda, cuda:1, ...", "model")
    threads: int = flag(0, "CPU threads for torch; 0 = one per core not kept busy by other "
                           "programs (chosen at start, printed, and kept by a resume)", "model",
                        NON_NEGATIVE)


@dataclass
class PromptFlags:
    """How a problem becomes a prompt (rollout.PromptFormat): shared by train.py and eval.py."""

    instruction: str = flag(DEFAULT_INSTRUCTION, "text added after each problem; '' for none",
                            "prompt")
    system_prompt: str | None = flag(None, "system prompt (a chat template's system turn, or a "
                                           "first line)", "prompt")
    few_shot: str | None = flag(None, "few-shot examples shown before each problem: JSONL with "
                                      "'problem' and 'solution' fields", "prompt", metavar="FILE")


@dataclass
class TrainConfig(PromptFlags, ModelFlags):
    """Every flag of train.py. A field's metadata holds its help, group, bound and choices (see
    `flag`)."""

    dtype: str = flag("auto", "compute precision; auto = bfloat16 on a GPU that supports it, "
                              "float32 otherwise. bfloat16 and float16 are mixed precision "
                              "(precision.py): float32 weights and AdamW state, forward and "
                              "backward under autocast, float16 with loss scaling. Also spelled as "
                              "accelerate's --mixed-precision {no,bf16,fp16}", "model",
                      choices=DTYPE_NAMES + tuple(ACCELERATE_NAMES),
                      aliases=("--mixed-precision",))
    gradient_checkpointing: bool = flag(False, "recompute activations in backward", "model")
    lora_rank: int = flag(0, "LoRA rank via peft; 0 trains all weights", "model", NON_NEGATIVE)
    lora_alpha: float = flag(32.0, "LoRA scaling numerator (alpha / rank)", "model", POSITIVE)

    data: str = flag(DEFAULT_DATA, "training problems: benchmark name or JSONL file", "data")
    eval_data: str | None = flag(None, "held-out problems: benchmark name or JSONL file; unset: "
                                       "those of --data (world_train: world, world_v1_train: "
                                       "world_v1, gsm8k_train: gsm8k; a file or another name: "
                                       "none, and no held-out evaluation)", "data")
    eval_limit: int = flag(500, "held-out problems per evaluation (the first N)", "data",
                           AT_LEAST_ONE)
    reward: str = flag("boxed", REWARD_HELP, "data")
    reward_timeout: float = flag(REWARD_TIMEOUT_S, "seconds a step's grading may run (custom "
                                                   "rewards too); every grading still running then "
                                                   "scores 0, counted as a reward error", "data",
                                 POSITIVE)

    prompts_per_step: int = flag(16, "problems sampled per step", "sampling", AT_LEAST_ONE)
    group_size: int = flag(8, "completions per problem (G >= 2)", "sampling",
                           (">= 2 (group-relative advantages need a group)", lambda v: v >= 2))
    max_new_tokens: int = flag(128, "completion length limit", "sampling", AT_LEAST_ONE)
    temperature: float = flag(1.0, "sampling temperature (> 0)", "sampling", POSITIVE)
    top_p: float = flag(1.0, "nucleus sampling threshold", "sampling", FRACTION)
    logprob_chunk: int = flag(512, "completion tokens per fp32 vocabulary log-softmax chunk "
                                   "(bounds its memory)", "sampling", AT_LEAST_ONE)

    algo: str = flag("hicra", "advantage shaping, see train.py's docstring", "algorithm",
                     choices=ALGOS)
    alpha: float = flag(PAPER_ALPHA, "HICRA amplification, in [0, 1]", "algorithm", UNIT_INTERVAL)
    grams: str | None = flag(None, "strategic grams: preset (paper, world) or a file; unset: world "
                                   "for the built-in world's --data, paper otherwise", "algorithm")
    advantage: str = flag("center", "group baseline form", "algorithm", choices=ADVANTAGE_MODES)
    eps_low: float = flag(0.2, "lower clip range: ratio >= 1 - eps_low", "algorithm", UNIT_INTERVAL)
    eps_high: float = flag(0.28, "upper clip range (clip-higher, DAPO)", "algorithm", NON_NEGATIVE)
    beta: float = flag(0.0, "k3 KL coefficient; 0 loads no reference model", "algorithm",
                       NON_NEGATIVE)
    loss_agg: str = flag("token-mean", "loss normaliser", "algorithm", choices=AGGREGATIONS)
    entropy_coef: float = flag(0.01, "entropy bonus of --algo entropy_reg", "algorithm",
                               NON_NEGATIVE)
    entropy_top_q: float = flag(0.3, "fraction of highest-entropy tokens: those --algo "
                                     "high_entropy amplifies (Fig. 10's 30%%), hicra_verl's "
                                     "threshold (k)", "algorithm", FRACTION)

    lr: float = flag(2e-4, "AdamW learning rate", "optimisation", POSITIVE)
    weight_decay: float = flag(0.0, "AdamW weight decay", "optimisation", NON_NEGATIVE)
    grad_clip: float = flag(1.0, "max global grad norm; 0 = off", "optimisation", NON_NEGATIVE)
    warmup_steps: int = flag(0, "linear learning-rate warm-up steps", "optimisation", NON_NEGATIVE)
    ppo_epochs: int = flag(1, "optimizer steps (passes) per rollout batch. With 1 the ratio "
                              "pi/pi_old is 1 (the sampler's log-probs are the policy's) and the "
                              "clip never acts; from the 2nd pass on it does",
                           "optimisation", AT_LEAST_ONE)
    micro_batch_size: int = flag(32, "completions per forward/backward", "optimisation",
                                 AT_LEAST_ONE)
    micro_batch_tokens: int | None = flag(None, "also cap the tokens a micro-batch's forward "
                                                "processes (each distinct prompt once + rows x "
                                                "longest completion; rows kept with their group); "
                                                "0 = no cap; unset: chosen at start from the "
                                                "model's size and the machine's memory (printed, "
                                                "kept in config.json). Bounds activation memory; "
                                                "the gradient is the same", "optimisation",
                                          NON_NEGATIVE)
    steps: int = flag(200, "training steps (rollout + update)", "optimisation",
                      (">= 1 (to evaluate a model without training, use eval.py)",
                       lambda v: v >= 1))
    max_nonfinite_steps: int = flag(5, "stop after this many steps in a row skipped for a "
                                       "non-finite loss or gradient", "optimisation", AT_LEAST_ONE)
    seed: int = flag(0, "seed of prompts order, sampling and init", "optimisation", SEED)

    out: str | None = flag(None, "run directory (default runs/ALGO-seedS-TIME-XXXXXX, XXXXXX "
                                 "random)", "logging")
    eval_every: int = flag(50, "evaluate every N steps (and at 0 and the end); 0 = never",
                           "logging", NON_NEGATIVE)
    eval_samples: int = flag(1, "samples per held-out problem", "logging", AT_LEAST_ONE)
    eval_temperature: float = flag(1.0, "held-out sampling temperature; 0 = greedy", "logging",
                                   NON_NEGATIVE)
    save_every: int = flag(50, "checkpoint every N steps (and at the end); 0 = end only", "logging",
                           NON_NEGATIVE)
    keep_checkpoints: int = flag(1, "checkpoints kept: the newest in RUN_DIR/checkpoint, older "
                                    "ones in RUN_DIR/checkpoint-N", "logging", AT_LEAST_ONE)
    report_to: list[str] = flag([], f"also log metrics to {' and/or '.join(TRACKERS)} (optional "
                                    "packages; metrics.jsonl is always written)", "logging",
                                choices=TRACKERS, metavar="TRACKER")

    resume: str | None = flag(None, "continue this run from its checkpoint", "run",
                              metavar="RUN_DIR")
    config: str | None = flag(None, "read settings from a YAML or JSON file (e.g. a run's "
                                    "config.json); flags given on the command line override it",
                              "run", metavar="FILE")

    def __post_init__(self):
        """--model, --eval-data and --grams follow --data when not set (default_model, held_out,
        default_grams)."""
        if self.model is None:
            self.model = default_model(self.data)
        if self.eval_data is None:
            self.eval_data = held_out(self.data)
        if self.grams is None:
            self.grams = default_grams(self.data)


HELD_OUT = {"gsm8k_train": "gsm8k"}  # a benchmark's training set -> its held-out set


def held_out(data: str) -> str | None:
    """The held-out set of an unset --eval-data: HELD_OUT's, or that of --data's problem source;
    else None."""
    source = source_of(data)
    return source.held_out.get(data) if source else HELD_OUT.get(data)


def default_grams(data: str) -> str:
    """The strategic grams of an unset --grams: --data's problem source's (the world's), the paper's
    otherwise."""
    source = source_of(data)
    return source.grams_preset if source else "paper"


def default_model(data: str) -> str:
    """The model of an unset --model: the one --data's problem source ships, else DEFAULT_DATA's."""
    return (source_of(data) or source_of(DEFAULT_DATA)).model

# ---------------------------------------------------------------- derived: the command line


def value_types(annotation) -> tuple[type, ...]:
    """The Python types a field's annotation admits: int -> (int,), str | None -> (str,
    NoneType)."""
    if isinstance(annotation, types.UnionType):
        return typing.get_args(annotation)
    return (typing.get_origin(annotation) or annotation,)


def add_flags(parser: argparse.ArgumentParser, config_class, only: tuple[str, ...] | None = None,
              overrides: dict[str, dict] | None = None) -> None:
    """One argparse flag per field of `config_class` (or of those named in `only`), in groups, in
    GROUPS order.

    `overrides` changes a flag's argparse settings by field name (scale_out/train_trl.py: another
    default).
    """
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for spec in dataclasses.fields(config_class):
        if only is not None and spec.name not in only:
            continue
        meta, kinds = spec.metadata, value_types(spec.type)
        default = (spec.default_factory() if spec.default_factory is not dataclasses.MISSING
                   else spec.default)
        kwargs = dict(default=default, help=meta["help"], **meta["argparse"])
        if bool in kinds:
            kwargs["action"] = "store_true"
        elif list in kinds:
            kwargs["nargs"] = "+"
        else:
            kwargs["type"] = kinds[0]
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        kwargs.update((overrides or {}).get(spec.name, {}))
        groups[meta["group"]].add_argument(flag_name(spec.name), *meta["aliases"], **kwargs)
    for group in groups.values():  # argparse prints empty groups' titles too
        if not group._group_actions:
            parser._action_groups.remove(group)


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """train.py's command line, derived from TrainConfig; `suppress_defaults`: only the flags given
    appear (their declared defaults still in --help)."""
    parser = OneLineParser(description="GRPO / HICRA training.",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(parser, TrainConfig)
    if suppress_defaults:
        cli.suppress_defaults(parser)
    return parser


# ---------------------------------------------------------------- derived: checks and files


# setting name -> its declaration
SPECS = {spec.name: spec for spec in dataclasses.fields(TrainConfig)}
BOUNDS = {name: spec.metadata["bound"] for name, spec in SPECS.items() if spec.metadata["bound"]}


def checked_setting(name: str, value, where: str):
    """`value` (read from a file at `where`) if it has the type and choice the field `name` allows;
    InputError otherwise.

    A number written as a string ("1e-4", which YAML 1.1 reads as text) is taken as the number it
    spells.
    """
    if name not in SPECS or name in SESSION_FLAGS:
        raise InputError(f"{where}: unknown setting {short(name)}")
    kinds, choices = value_types(SPECS[name].type), SPECS[name].metadata["choices"]
    if float in kinds and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if list in kinds:
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise InputError(f"{where}: {flag_name(name)}: expected a list of names, got "
                             f"{short(value)}")
        items = value
    else:
        numeric = float in kinds and isinstance(value, int)  # JSON may write 1.0 as 1
        if isinstance(value, bool) != (bool in kinds) or not (isinstance(value, kinds) or numeric):
            wanted = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise InputError(f"{where}: {flag_name(name)}: expected {wanted}, got {short(value)}")
        items = [value]
    for item in items:
        if choices and item not in choices:
            raise InputError(f"{where}: {flag_name(name)}: {short(item)} is not one of "
                             f"{', '.join(map(str, choices))}")
    return value


MAX_CONFIG_BYTES = 1_000_000  # a run config is a few hundred bytes; a larger file is refused unread


def short(value, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: an error line quotes a bad value, never a huge
    one."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def read_settings(path: str, flag: str) -> dict:
    """The settings of a JSON file, or of a YAML file (.yaml, .yml), each checked by
    checked_setting.

    JSON is read as JSON: PyYAML (YAML 1.1) would read JSON's 1e-05 as a string.
    """
    import yaml  # transformers' own dependency

    file = Path(path)
    if not file.is_file():
        raise InputError(f"{flag}: {path} not found")
    if (size := file.stat().st_size) > MAX_CONFIG_BYTES:
        raise InputError(f"{flag}: {path}: {size:,} bytes, over the {MAX_CONFIG_BYTES:,} a run "
                         "config may have")
    try:
        text = file.read_text(encoding="utf-8")
        if file.suffix in (".yaml", ".yml"):
            if any(isinstance(token, (yaml.AliasToken, yaml.AnchorToken))
                   for token in yaml.scan(text)):
                raise InputError(f"{flag}: {path}: YAML anchors and aliases (&name, *name) are not "
                                 "read in a run config; write each value out")
            settings = yaml.safe_load(text)
        else:
            settings = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, yaml.YAMLError) as error:
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        raise InputError(f"{flag}: {path}: not a readable run config ({reason})") from None
    if not isinstance(settings, dict):
        raise InputError(f"{flag}: {path}: not a readable run config (not a mapping of settings)")
    settings = {str(name).replace("-", "_"): value for name, value in settings.items()}
    for name, value in settings.items():
        settings[name] = checked_setting(name, value, f"{flag} {path}")
    return settings


def saved_settings(config: TrainConfig) -> dict:
    """What RUN_DIR/config.json holds: every setting of the run (not --resume and --config)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in SESSION_FLAGS}


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The run's settings: defaults < the resumed run's config.json < --config FILE < flags given on
    the command line, checked before anything loads or is written (bounds, device and dtype, LoRA's
    package); InputError otherwise.

    Defaults first, so a run saved before a setting existed resumes with that setting's default. The
    model (MODEL_FLAGS) of a resumed run cannot change, nor its folder.
    """
    explicit = vars(build_parser(suppress_defaults=True).parse_args(argv))
    from_file = read_settings(explicit["config"], "--config") if explicit.get("config") else {}
    # what this command asks for, from the file or the command line
    given = {**from_file, **explicit}
    settings = {}
    if explicit.get("resume"):
        # a model folder's config.json is not a run's
        run_folder.check_out(Path(explicit["resume"]), resuming=True)
        saved = read_settings(str(Path(explicit["resume"]) / "config.json"), "--resume")

        def source(key: str) -> str:
            return (f"--config {explicit['config']}" if key in from_file and key not in explicit
                    else "the command line")

        if given.get("out", explicit["resume"]) != explicit["resume"]:
            raise InputError(f"--out: a resumed run stays in its folder, but {source('out')} sets "
                             f"out: {given['out']}; give --resume RUN_DIR alone")
        for key in MODEL_FLAGS:
            if key in given and given[key] != saved.get(key):
                raise InputError(f"{flag_name(key)}: this run was trained with {flag_name(key)} "
                                 f"{saved.get(key)}, {source(key)} asks for {given[key]}; a "
                                 f"resumed run keeps its {', '.join(map(flag_name, MODEL_FLAGS))} "
                                 "(start a new run to change them)")
        settings.update(saved, out=explicit["resume"])
    settings.update(from_file)
    config = TrainConfig(**{**settings, **explicit})
    # --mixed-precision bf16 = --dtype bfloat16
    config.dtype = ACCELERATE_NAMES.get(config.dtype, config.dtype)
    if config.eval_data is None and config.eval_every:
        print(f"note: --data {config.data} has no held-out set of its own: no held-out evaluation "
              "(--eval-data NAME to have one)")
        config.eval_every = 0
    if config.out is None:
        config.out = (f"runs/{config.algo}-seed{config.seed}-{time.strftime('%Y%m%d-%H%M%S')}-"
                      f"{secrets.token_hex(3)}")
    check_bounds(config, BOUNDS)
    check_text(config)
    check_model_flags(config)
    check_data_model(config.model, {"--data": config.data, "--eval-data": config.eval_data})
    if config.lora_rank > 0 and importlib.util.find_spec("peft") is None:
        raise InputError("--lora-rank: LoRA needs peft (pip install peft)")
    return config


def record_changed_settings(run_dir: Path, config: TrainConfig, step: int) -> None:
    """A resumed run's settings that differ from its config.json (flags given with --resume, applied
    from `step` on): config.json takes them, so a later resume keeps them, and RUN_DIR/resumes.jsonl
    records which changed, from what, and at which step."""
    saved = read_settings(str(run_dir / "config.json"), "--resume")
    changed = {k: [saved.get(k), v] for k, v in saved_settings(config).items()
               if k != "out" and saved.get(k) != v}
    if changed:
        write_config(run_dir, config)
        run_folder.append_line(run_dir / "resumes.jsonl",
                               json.dumps({"step": step, "changed": changed}))
        now = ", ".join(f"{flag_name(k)} {new} (was {old})" for k, (old, new) in changed.items())
        print(f"--resume: from step {step} on, {now}; recorded in {run_dir / 'resumes.jsonl'}")


def write_config(run_dir: Path, config: TrainConfig) -> None:
    """RUN_DIR/config.json: saved_settings, written whole or not at all
    (run_folder.write_atomically)."""
    write_atomically(run_dir / "config.json", json.dumps(saved_settings(config), indent=2))
