"""Whole-volume inference: checkpoints → per-slice softmax → labels in the input's geometry.

The checkpoint's recorded preprocessing is applied with shardgen's own functions, slices
are predicted in batches on the device, probabilities are resized back to the input's
in-plane size before the argmax, and the canonical reorientation is undone, so a
prediction has exactly the input volume's shape and affine.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from isal import igzip

from shardgen.orientation import from_canonical
from shardgen.preprocess import Preprocessing, preprocess_image

from .errors import CheckpointError, ConfigError
from .models import load_checkpoint

TTA_CHOICES = ("none", "flips")
ENSEMBLE = "ensemble"
PREPROCESS_CHUNK = 32  # slices windowed and resized at a time: bounds the float32 temporaries


@dataclass
class Member:
    """One checkpoint of an ensemble, loaded on its device."""

    name: str
    path: Path
    model: torch.nn.Module
    preprocessing: Preprocessing
    config: dict = field(repr=False, default_factory=dict)


def member_name(path: Path, taken: set[str]) -> str:
    """'unet' for runs/unet/best (the run's name says more than best/last), made unique."""
    path = Path(path)
    base = path.parent.name if path.name in ("best", "last") and path.parent.name else path.name
    if path.name == "last":
        base += "-last"
    name, n = base or "model", 2
    while name in taken or name == ENSEMBLE:
        name, n = f"{base}-{n}", n + 1
    return name


def load_members(paths: list[str | Path], device: torch.device, channels_last: bool = True
                 ) -> list[Member]:
    """Load every checkpoint; CheckpointError for a bad one, ConfigError when their
    preprocessing differs (their predictions would not be comparable slice by slice)."""
    if not paths:
        raise ConfigError("no checkpoint given (--checkpoint PATH, repeatable)")
    members: list[Member] = []
    for path in map(Path, paths):
        model, config = load_checkpoint(path, map_location=device)
        if "preprocessing" not in config:
            raise CheckpointError(f"{path / 'config.json'}: no recorded preprocessing")
        try:
            preprocessing = Preprocessing.from_dict(config["preprocessing"])
        except Exception as exc:  # shardgen raises its own error type for bad settings
            raise CheckpointError(f"{path / 'config.json'}: invalid preprocessing ({exc})") from None
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        members.append(Member(member_name(path, {m.name for m in members}), path, model,
                              preprocessing, config))
    first = members[0]
    for other in members[1:]:
        if other.preprocessing != first.preprocessing:
            raise ConfigError(
                f"{other.path}: preprocessing {other.preprocessing.to_dict()} differs from "
                f"{first.path}'s {first.preprocessing.to_dict()}; such checkpoints cannot be ensembled")
    return members


def preprocess_volume(image: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """Canonical HU volume (Z, H, W) → uint8 network slices (Z, size, size), in chunks."""
    out = np.empty((image.shape[0], preprocessing.size, preprocessing.size), np.uint8)
    for z in range(0, image.shape[0], PREPROCESS_CHUNK):
        out[z:z + PREPROCESS_CHUNK] = preprocess_image(image[z:z + PREPROCESS_CHUNK], preprocessing)
    return out


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def flips(tta: str) -> list[tuple[int, ...]]:
    """The flip axes of each test-time pass over a (B, C, H, W) batch."""
    if tta not in TTA_CHOICES:
        raise ConfigError(f"unknown --tta {tta!r}; valid: {', '.join(TTA_CHOICES)}")
    return [()] if tta == "none" else [(), (3,), (2,)]


def member_probabilities(model: torch.nn.Module, x: torch.Tensor, passes: list[tuple[int, ...]],
                         dtype: torch.dtype | None) -> torch.Tensor:
    """Softmax probabilities (B, K, h, w) in float32, averaged over the flip passes."""
    total = None
    for dims in passes:
        inp = x.flip(dims) if dims else x
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(inp)
        probs = logits.float().softmax(1)
        probs = probs.flip(dims) if dims else probs
        total = probs if total is None else total.add_(probs)
    return total / len(passes)


def to_input_size(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize probabilities to the input's in-plane size (pixel centres as in shardgen's resize)."""
    if tuple(probs.shape[-2:]) == tuple(size):
        return probs
    shrink = size[0] < probs.shape[-2] or size[1] < probs.shape[-1]
    return F.interpolate(probs, size=size, mode="bilinear", align_corners=False, antialias=shrink)


@dataclass
class VolumePrediction:
    """Canonical (Z, H, W) uint8 labels per member and for the ensemble, with timings."""

    labels: dict[str, np.ndarray]
    seconds: dict[str, float]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def predict_volume(members: list[Member], image: np.ndarray, device: torch.device,
                   batch_size: int = 16, tta: str = "none", channels_last: bool = True
                   ) -> VolumePrediction:
    """Predict a canonical HU volume (Z, H, W) slice by slice with every member.

    The ensemble averages the members' softmax probabilities (each already averaged over
    the TTA passes). ``seconds`` holds each member's inference time and the preprocessing's.
    """
    pre = members[0].preprocessing
    passes, dtype = flips(tta), autocast_dtype(device)
    depth, height, width = image.shape
    tick = time.perf_counter()
    volume = torch.from_numpy(preprocess_volume(image, pre)).to(device)
    seconds = {"preprocess": time.perf_counter() - tick, **{m.name: 0.0 for m in members}}
    names = [m.name for m in members] + [ENSEMBLE]
    # labels stay on the device until the volume is done: one copy to the host per volume
    # instead of a synchronising copy per batch, which would leave a GPU idle
    labels = {name: torch.empty((depth, height, width), dtype=torch.uint8, device=device) for name in names}
    offsets = torch.arange(-pre.context, pre.context + 1, device=device)
    # Per-member times need a device sync around each member; one member is timed as a
    # whole instead, so the GPU never waits on the host for bookkeeping.
    timed, start = len(members) > 1, time.perf_counter()
    for z0 in range(0, depth, batch_size):
        z = torch.arange(z0, min(z0 + batch_size, depth), device=device)
        x = volume[(z[:, None] + offsets).clamp_(0, depth - 1)].float().div_(255.0)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ensemble = None
        for member in members:
            if timed:
                sync(device)
                tick = time.perf_counter()
            probs = to_input_size(member_probabilities(member.model, x, passes, dtype), (height, width))
            labels[member.name][z0:z0 + len(z)] = probs.argmax(1)
            if timed:
                sync(device)
                seconds[member.name] += time.perf_counter() - tick
            ensemble = probs if ensemble is None else ensemble.add_(probs)
        labels[ENSEMBLE][z0:z0 + len(z)] = ensemble.argmax(1)
    sync(device)
    if not timed:
        seconds[members[0].name] = time.perf_counter() - start
    return VolumePrediction({name: volume.cpu().numpy() for name, volume in labels.items()}, seconds)


# --------------------------------------------------------------------------- writing

def prediction_name(case: str, compressed: bool) -> str:
    """LiTS names: volume-N → segmentation-N, test-volume-N → test-segmentation-N."""
    if case.startswith("volume-") or case.startswith("test-volume-"):
        case = case.replace("volume-", "segmentation-", 1)
    return case + (".nii.gz" if compressed else ".nii")


def write_labels(path: Path, canonical: np.ndarray, affine: np.ndarray) -> Path:
    """Write canonical labels as uint8 NIfTI in the voxel order and affine of the input.

    Written under a temporary name and renamed, so a crash never leaves half a file;
    ``.nii.gz`` is deflated with ISA-L at its fastest level (labels compress well anyway).
    """
    data = np.ascontiguousarray(from_canonical(canonical, affine).astype(np.uint8, copy=False))
    image = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    image.header.set_data_dtype(np.uint8)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    payload = image.to_bytes()
    if path.name.endswith(".gz"):
        payload = igzip.compress(payload, compresslevel=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(payload)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
