"""Devices and precision: the Accelerator every liverseg run makes, and the one rule for
which half precision a GPU gets."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator


def make_accelerator(**settings: Any) -> Accelerator:
    """An Accelerator with ``settings``. Without a GPU, it is told so: Accelerate then runs
    processes started by torchrun (or `accelerate launch --multi_gpu`) as one CPU group
    over gloo instead of independent copies."""
    return Accelerator(cpu=not torch.cuda.is_available(), **settings)


def resolve_precision(precision: str) -> str:
    """"auto": bf16 on GPUs that have it, fp16 on older GPUs (a T4), full precision ("no")
    on CPU; any other value as given."""
    if precision != "auto":
        return precision
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype of inference on ``device`` ("auto" precision), None for full precision."""
    if device.type != "cuda":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[resolve_precision("auto")]
