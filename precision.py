"""Mixed precision for train.py, as accelerate, Lightning and TRL do it: float32 weights,
half-precision compute.

- The trained weights and AdamW's moments stay in float32 (`--dtype` does not change them): an
  update smaller than a bfloat16 weight's resolution (about 1/256 of it) would be lost, and at lr
  1e-5 nearly every update is.
- The forward passes (sampling, scoring, training, evaluation) run under
  `torch.autocast(device, compute dtype)`: matrix products in bfloat16 or float16, the ops autocast
  lists as precision-sensitive in float32. The backward follows the forward's dtypes. The log-prob
  and loss math is float32 whatever the flag (rollout.py's log-softmax casts to float32).
- float16's narrow range needs loss scaling: `torch.amp.GradScaler` multiplies the loss before the
  backward and divides the gradients after it, lowering the scale when a gradient overflows.
  bfloat16 has float32's range and needs none; the scaler is then disabled and passes everything
  through.
- Frozen weights that are only read (the --beta reference model, LoRA's frozen base) are stored in
  the compute dtype: nothing updates them, so nothing is lost, and they take half the memory.
"""

import torch

from model_loading import resolve_device_and_dtype

# --mixed-precision's spellings
ACCELERATE_NAMES = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}


class MixedPrecision:
    """The compute dtype of a training run, its autocast context and its gradient scaler."""

    def __init__(self, device: str, dtype: str):
        self.device, self.compute_dtype = resolve_device_and_dtype(device, dtype)
        self.device_type = torch.device(self.device).type
        self.mixed = self.compute_dtype != torch.float32
        self.scaler = torch.amp.GradScaler(self.device_type,
                                           enabled=self.compute_dtype == torch.float16)

    def autocast(self):
        """Forward passes in the compute dtype (a no-op in float32)."""
        return torch.autocast(self.device_type, dtype=self.compute_dtype, enabled=self.mixed)

    def describe(self) -> str:
        """One line for the start of a run."""
        if not self.mixed:
            return "float32 (weights, AdamW state and compute)"
        name = str(self.compute_dtype).removeprefix("torch.")
        scaling = ", loss scaling" if self.scaler.is_enabled() else ""
        return (f"{name} mixed precision: float32 weights and AdamW state, forward and backward "
                f"under autocast({self.device_type}, {name}){scaling}; frozen weights (reference, "
                f"LoRA base) in {name}")


# no autocast, no loss scaling: what train.py's step functions default to
FLOAT32 = MixedPrecision("cpu", "float32")
