"""Model loading for train.py, eval.py and scale_out/: an HF folder or hub id, a GGUF file, LoRA,
dtype and device.

- `load_model`: (model, tokenizer) from a folder (e.g. a train.py checkpoint), a hub id
  (`AutoModelForCausalLM.from_pretrained`), or a GGUF file. Anything that does not load is one
  InputError naming the flag and the folder.
- A GGUF file is de-quantised by transformers and saved once as a plain HF folder under
  ~/.cache/hicra/ (`dequantized_folder`), so the model can also be trained and saved.
- `load_policy`: what train.py trains: the policy (LoRA-wrapped with peft when --lora-rank > 0, from
  the run's checkpoint when resuming), its tokenizer, and the frozen reference model when
  --beta > 0.
- device "auto" = cuda when available; dtype "auto" = bfloat16 on a GPU that supports it, float32
  otherwise (`resolve_device_and_dtype`, checked before anything loads).
"""

import copy
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cli import NON_NEGATIVE, InputError, check_bounds

GGUF_CACHE = Path.home() / ".cache" / "hicra"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# transformers >= 5.25 swaps layers for kernels downloaded from the Hub on a GPU by default
# (`use_kernels`), which fails offline at the first model.train() and would make a run depend on
# code fetched at run time: plain PyTorch. Likewise nothing in a model or checkpoint folder runs as
# code: every from_pretrained passes trust_remote_code=False.
USE_HUB_KERNELS = False


def resolve_device_and_dtype(device: str, dtype: str) -> tuple[str, torch.dtype]:
    """device "auto" = cuda when available; dtype "auto" = bfloat16 on a GPU that supports it, else
    float32.

    A device this machine lacks, or a dtype it cannot run, is an InputError (checked before anything
    loads). For evaluation the dtype is the weights'; train.py computes in it under mixed precision
    (precision.py).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise InputError(f"--device: unknown device {device!r}; use auto, cpu, cuda, cuda:N "
                         "or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        why = ("this torch is a CPU-only build" if torch.version.cuda is None
               else "no GPU is visible")
        raise InputError(f"--device {device}: CUDA is not available ({why}); "
                         "use --device cpu or auto")
    if kind == "cuda" and (torch.device(device).index or 0) >= torch.cuda.device_count():
        raise InputError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {device}: MPS is not available here (Apple-silicon Macs only); "
                         "use --device cpu or auto")
    if kind not in ("cpu", "cuda", "mps"):
        raise InputError(f"--device: {device!r} is not supported; use auto, cpu, cuda, cuda:N "
                         "or mps")
    if dtype == "auto":
        bf16 = kind == "cuda" and torch.cuda.is_bf16_supported()
        return device, torch.bfloat16 if bf16 else torch.float32
    if dtype == "bfloat16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} does not support "
                         "it; use float32")
    return device, DTYPES[dtype]


def load_model(path_or_id: str, dtype: str = "auto", device: str = "auto",
               gguf_file: str | None = None, flag: str = "--model"):
    """(model, tokenizer) from an HF folder (e.g. a train.py checkpoint), a hub id, or a GGUF file.

    `path_or_id` may itself be a .gguf file; otherwise `gguf_file` names the GGUF file inside it.
    dtype: "auto" or a key of DTYPES; device: "auto" or a torch device string. Anything that does
    not load (no such folder, a config.json without a model type, truncated weights, an id not in
    the offline cache) is an InputError naming `flag` and the folder.
    """
    device, dtype = resolve_device_and_dtype(device, dtype)
    local = Path(path_or_id).expanduser()
    if path_or_id.endswith(".gguf"):
        if not local.is_file():
            raise InputError(f"{flag}: {path_or_id}: no such file")
        path_or_id, gguf_file = str(local.parent), local.name
    elif local.is_file():
        raise InputError(f"{flag}: {path_or_id} is a file; expected a model folder, a hub id or a "
                         ".gguf file")
    elif not local.exists() and looks_like_a_path(path_or_id):
        raise InputError(f"{flag}: {path_or_id}: no such folder")
    refuse_code_in_folder(local, flag)
    try:
        if gguf_file is not None:
            path_or_id = dequantized_folder(path_or_id, gguf_file)
        model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype,
                                                     use_kernels=USE_HUB_KERNELS,
                                                     trust_remote_code=False).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=False)
    except InputError:
        raise
    # transformers raises OSError, ValueError, KeyError, safetensors errors, ...
    except Exception as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = lines[0] if lines else type(error).__name__
        if (local / "checkpoint").is_dir():  # a train.py run folder: its model is in checkpoint/
            reason = f"a train.py run folder? its model is {local / 'checkpoint'}"
        raise InputError(f"{flag}: cannot load '{path_or_id}': {reason}") from None
    return model, tokenizer


def refuse_code_in_folder(folder: Path, flag: str) -> None:
    """InputError when a model folder's config asks to run code shipped beside it (`auto_map`): a
    checkpoint or download could carry anything, and nothing here runs it (trust_remote_code=False
    everywhere)."""
    for name in ("config.json", "tokenizer_config.json"):
        try:
            settings = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue  # absent or unreadable: from_pretrained reports it
        if isinstance(settings, dict) and "auto_map" in settings:
            raise InputError(f"{flag}: {folder / name} asks to run code from the model folder "
                             "(auto_map); this project never runs a folder's code: remove auto_map "
                             "to load it as a plain model")


def looks_like_a_path(path_or_id: str) -> bool:
    """Whether a --model value can only be a local path: a hub id is NAME or OWNER/NAME."""
    return path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1 or "\\" in path_or_id


def dequantized_folder(folder: str, gguf_file: str) -> str:
    """A plain HF folder holding the de-quantised weights of folder/gguf_file, built once and
    cached.

    transformers de-quantises GGUF tensors on load but marks the model as quantised, which blocks
    training and saving; a model rebuilt from the config without `quantization_config` is plain.
    """
    source = Path(folder).expanduser() / gguf_file
    if not source.is_file():
        raise InputError(f"--gguf-file: {source}: no such file")
    cached = GGUF_CACHE / f"{source.stem}-{source.stat().st_size}"
    if (cached / "config.json").is_file():
        return str(cached)
    quantized = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                     trust_remote_code=False)
    config = copy.deepcopy(quantized.config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name,
                                              trust_remote_code=False)
    # renamed when complete: no half-written cache
    partial = cached.with_name(cached.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(cached)
    return str(cached)


MODEL_BOUNDS = {"threads": NON_NEGATIVE}  # numeric model flags, shared by eval.py and train.py


def check_model_flags(args) -> None:
    """The shared model flags (config.ModelFlags), checked before anything loads; raises
    InputError."""
    check_bounds(args, MODEL_BOUNDS)
    resolve_device_and_dtype(args.device, args.dtype)


def load_policy(config, checkpoint: Path | None):
    """(policy, tokenizer, reference): the model train.py trains, optionally LoRA-wrapped (from the
    checkpoint when resuming), on --device, and the frozen reference model when --beta > 0. Trained
    weights are float32 whatever --dtype (precision.py: mixed precision keeps float32 weights);
    weights that are never updated (the reference, LoRA's base) are loaded in the compute dtype,
    --dtype resolved."""
    frozen_dtype = {v: k for k, v in DTYPES.items()}[resolve_device_and_dtype(config.device,
                                                                              config.dtype)[1]]
    if checkpoint is not None and config.lora_rank == 0:
        model, tokenizer = load_model(str(checkpoint), "float32", config.device)
    else:
        base_dtype = frozen_dtype if config.lora_rank > 0 else "float32"
        model, tokenizer = load_model(config.model, base_dtype, config.device,
                                      gguf_file=config.gguf_file)
    reference = None
    if config.beta > 0:
        reference, _ = load_model(config.model, frozen_dtype, config.device,
                                  gguf_file=config.gguf_file)
        reference.requires_grad_(False).eval()
    if config.lora_rank > 0:
        from peft import LoraConfig, PeftModel, get_peft_model

        if checkpoint is not None:
            model = PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
        else:
            lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                              target_modules="all-linear")
            model = get_peft_model(model, lora)
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model, tokenizer, reference
