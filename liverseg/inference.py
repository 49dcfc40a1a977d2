"""Whole-volume inference: checkpoints → per-slice softmax → labels in the input's geometry.

The checkpoint's recorded preprocessing (shardgen's windowing, resampling and rounding,
with the same weights and float32 arithmetic) runs on the device, slices are predicted in
batches there, probabilities are mapped back onto the input's in-plane grid (the inverse
of the preprocessing's resampling, padding and cropping) before the argmax, and the
canonical reorientation is undone, so a prediction has exactly the input volume's shape
and affine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shardgen.io import write_nifti
from shardgen.labels import CLASS_NAMES, NUM_CLASSES, TUMOUR
from shardgen.nifti import Spatial, is_series
from shardgen.orientation import from_canonical
from shardgen.preprocess import Preprocessing, SliceGeometry, preprocess_image, slice_geometry

from .config import TTA_CHOICES
from .errors import CheckpointError, ConfigError
from .postprocess import PROBABILITY_MAX
from .checkpoint import FLIP_SETTINGS, load_checkpoint, read_evaluable_config
from .runtime import autocast_dtype

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
    """Load every checkpoint; CheckpointError for a bad one or one evaluation cannot use
    (checked before its model is built), ConfigError when their preprocessing differs
    (their predictions would not be comparable slice by slice)."""
    if not paths:
        raise ConfigError("no checkpoint given (--checkpoint PATH, repeatable)")
    members: list[Member] = []
    for path in map(Path, paths):
        read_evaluable_config(path)
        model, config = load_checkpoint(path, map_location=device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        members.append(Member(member_name(path, {m.name for m in members}), path, model,
                              Preprocessing.from_dict(config["preprocessing"]), config))
    first = members[0]
    for other in members[1:]:
        if other.preprocessing != first.preprocessing:
            raise ConfigError(
                f"{other.path}: preprocessing {other.preprocessing.to_dict()} differs from "
                f"{first.path}'s {first.preprocessing.to_dict()}; such checkpoints cannot be ensembled")
    return members


def preprocess_torch(hu: torch.Tensor, preprocessing: Preprocessing, pixel_mm: tuple[float, float]
                     ) -> torch.Tensor:
    """shardgen.preprocess.preprocess_image with torch, where ``hu`` (n, H, W) lies: HU
    slices with pixels of ``pixel_mm`` → uint8 (n, size, size), in chunks (bounded float32
    temporaries). The arithmetic is shardgen's (float32 clip, shift and scale, the same
    interpolation matrices, rounding half to even); only a resampling's summation order
    can differ, which moves a value by one grey level when it lands within rounding error
    of a half. Used on accelerators; on a CPU shardgen's numpy version is 3x faster.
    """
    lo, hi = (float(v) for v in preprocessing.window)
    size = preprocessing.size
    depth, height, width = hu.shape
    geometry = slice_geometry((height, width), pixel_mm, preprocessing)
    resize = not geometry.identity
    if resize:
        rows = torch.from_numpy(geometry.rows.matrix().copy()).to(hu.device)
        cols_t = torch.from_numpy(geometry.cols.matrix().T.copy()).to(hu.device)
    scale = float(np.float32(255.0 / (hi - lo)))
    out = torch.empty((depth, size, size), dtype=torch.uint8, device=hu.device)
    for z in range(0, depth, PREPROCESS_CHUNK):
        x = hu[z:z + PREPROCESS_CHUNK].float().clamp(lo, hi).sub_(lo).mul_(scale)  # never in place on hu
        if resize:
            x = rows @ x @ cols_t
        out[z:z + PREPROCESS_CHUNK] = x.round_()
    return out


FLIP_DIMS = tuple(zip(FLIP_SETTINGS, ((3,), (2,))))  # augmentation setting → axis of a (B, C, H, W) batch


def trained_augment(member: Member) -> dict | None:
    """The augmentation settings a member was trained with; None when its checkpoint does
    not say (exported by other code)."""
    train = member.config.get("train")
    return None if not isinstance(train, dict) else dict(train.get("augment") or {})


def flips(tta: str, augment: dict | None = None) -> list[tuple[int, ...]]:
    """The flip axes of each test-time pass over a (B, C, H, W) batch: the slice as it is,
    then each flip the model was trained with (``augment``, its training settings; both
    flips when unknown). A model trained without flips has only seen the canonical
    orientation, where a mirrored slice puts the spleen where the liver belongs: averaging
    such passes in lowered the CPU demo's per-case tumour Dice from 0.41 to 0.29."""
    if tta not in TTA_CHOICES:
        raise ConfigError(f"unknown --tta {tta!r}; valid: {', '.join(TTA_CHOICES)}")
    if tta == "none":
        return [()]
    if augment is None:
        return [(), *(dims for _, dims in FLIP_DIMS)]
    return [(), *(dims for key, dims in FLIP_DIMS if float(augment.get(key, 0.0)) > 0)]


def tta_note(members: list[Member], tta: str) -> str | None:
    """A warning when --tta flips would add no pass: no member was trained with flips."""
    if tta == "none" or any(len(flips(tta, trained_augment(m))) > 1 for m in members):
        return None
    return ("--tta flips: no checkpoint was trained with flips (augment flip_lr / flip_ud = 0), so "
            "none is applied; mirrored slices look unlike anything these models learned")


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


class ToInputGrid:
    """Probabilities (B, K, size, size) on the network's grid → (B, K, H, W) on the input's
    in-plane grid: the inverse of the preprocessing's ``geometry``, interpolated with
    shardgen's weights (anti-aliased when shrinking). Input pixels that were cropped away
    (never seen by the model) are background with probability 1.

    The inverse of a plain resize (a square matrix of square pixels) goes through torch's
    bilinear interpolation: the same weights (a test checks), and its separable two-tap
    kernels take a third to a half of the dense matrices' time on a CPU.
    """

    def __init__(self, geometry: SliceGeometry, device: torch.device):
        back = geometry.inverse()
        self.identity, self.shape = back.identity, back.shape_out
        self.plain = geometry == SliceGeometry.resize(geometry.shape_in, geometry.shape_out)
        self.shrink = self.shape[0] < geometry.shape_out[0] or self.shape[1] < geometry.shape_out[1]
        self.rows = self.cols_t = self.unseen = None
        if not (self.identity or self.plain):
            self.rows = torch.from_numpy(back.rows.matrix().copy()).to(device)
            self.cols_t = torch.from_numpy(back.cols.matrix().T.copy()).to(device)
            unseen = ~np.outer(back.rows.inside(), back.cols.inside())
            self.unseen = torch.from_numpy(unseen).to(device) if unseen.any() else None

    def __call__(self, probs: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return probs
        if self.plain:
            return F.interpolate(probs, size=self.shape, mode="bilinear", align_corners=False, antialias=self.shrink)
        out = self.rows @ probs @ self.cols_t
        if self.unseen is not None:
            out[:, 0].masked_fill_(self.unseen, 1.0)
        return out


@dataclass
class VolumePrediction:
    """Canonical (Z, H, W) uint8 labels per member and for the ensemble, with timings.
    With one member the ensemble's labels are the member's (the same array).
    ``tumour_probability``, when asked for, is the ensemble's tumour probability on the same
    grid as uint8 (``PROBABILITY_MAX`` = 1), the postprocessing's input."""

    labels: dict[str, np.ndarray]
    seconds: dict[str, float]
    tumour_probability: np.ndarray | None = None


# the name the tumour probability travels under among the labels (never a member's name:
# member names are file names, which cannot hold a slash)
PROBABILITY = "tumour/probability"


def quantised_tumour(probs: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) probabilities → the tumour class's as uint8 (B, H, W), PROBABILITY_MAX = 1."""
    return probs[:, TUMOUR].mul(PROBABILITY_MAX).round_().to(torch.uint8)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


TORCH_DTYPES = (np.int16, np.int32, np.int64, np.uint8, np.float32)


class Transfers:
    """A volume's batches to the device and their labels back to the host.

    On a GPU every copy goes through one of two pinned buffers per direction, queued
    without waiting in the compute stream, and the host collects batch k's labels only
    once batch k+1 is queued: the copies, the host's staging and the GPU's work on the
    next batch overlap, and the GPU never idles on a synchronising copy. (Torch caches
    pinned memory, so the buffers cost their allocation once per process.) On a CPU the
    batches are views and the labels are written straight into the output.
    """

    def __init__(self, image: np.ndarray, preprocessing: Preprocessing, pixel_mm: tuple[float, float],
                 batch_size: int, names: list[str], device: torch.device):
        self.image, self.preprocessing, self.pixel_mm = image, preprocessing, pixel_mm
        self.device, self.cuda = device, device.type == "cuda"
        depth, height, width = image.shape
        self.labels = {name: np.empty((depth, height, width), np.uint8) for name in names}
        self.waiting: tuple[int, int, int, torch.cuda.Event] | None = None
        if self.cuda:
            dtype = torch.from_numpy(np.empty(0, image.dtype if image.dtype in TORCH_DTYPES else np.float32)).dtype
            rows = min(batch_size + 2 * preprocessing.context, depth)  # a batch and its context slices
            self.inputs = [torch.empty((rows, height, width), dtype=dtype, pin_memory=True) for _ in range(2)]
            self.outputs = [{name: torch.empty((batch_size, height, width), dtype=torch.uint8, pin_memory=True)
                             for name in names} for _ in range(2)]

    def slices(self, lo: int, hi: int, slot: int) -> torch.Tensor:
        """Slices [lo, hi) preprocessed for the network (uint8) on the device."""
        if not self.cuda:
            return torch.from_numpy(preprocess_image(self.image[lo:hi], self.preprocessing, self.pixel_mm))
        buffer = self.inputs[slot][:hi - lo]
        buffer.numpy()[...] = self.image[lo:hi]  # the slot's last copy finished: its batch was collected
        return preprocess_torch(buffer.to(self.device, non_blocking=True), self.preprocessing, self.pixel_mm)

    def send(self, z0: int, labels: dict[str, torch.Tensor], slot: int) -> None:
        """Queue a batch's labels for the host, then collect the batch queued before it."""
        n = len(next(iter(labels.values())))
        if not self.cuda:
            for name, batch in labels.items():
                self.labels[name][z0:z0 + n] = batch.numpy()
            return
        for name, batch in labels.items():
            self.outputs[slot][name][:n].copy_(batch, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.collect()
        self.waiting = (z0, n, slot, event)

    def collect(self) -> None:
        if self.waiting is None:
            return
        z0, n, slot, event = self.waiting
        event.synchronize()
        for name, pinned in self.outputs[slot].items():
            self.labels[name][z0:z0 + n] = pinned.numpy()[:n]
        self.waiting = None


@torch.inference_mode()
def predict_volume(members: list[Member], image: np.ndarray, spacing: tuple[float, float, float],
                   device: torch.device, batch_size: int = 16, tta: str = "none", channels_last: bool = True,
                   tumour_probability: bool = False) -> VolumePrediction:
    """Predict a canonical HU volume (Z, H, W) with voxels of ``spacing`` mm (z, row, col)
    slice by slice with every member.

    Each batch of slices (and its context neighbours) goes to the device as HU, is
    preprocessed there, predicted by every member, and its labels come back while the next
    batch runs (``Transfers``). The ensemble averages the members' softmax probabilities
    (each already averaged over the TTA passes); with ``tumour_probability`` its tumour
    probability comes back too (``VolumePrediction``). ``seconds`` holds each member's inference
    time and the host's preprocessing time (on a GPU the preprocessing runs in the stream
    ahead of the models and is counted in their time).
    """
    pre = members[0].preprocessing
    passes = {m.name: flips(tta, trained_augment(m)) for m in members}
    dtype = autocast_dtype(device)
    depth, height, width = image.shape
    names = [m.name for m in members] + ([ENSEMBLE] if len(members) > 1 else [])
    names += [PROBABILITY] if tumour_probability else []
    pixel_mm = (float(spacing[1]), float(spacing[2]))
    transfers = Transfers(image, pre, pixel_mm, batch_size, names, device)
    to_input_grid = ToInputGrid(slice_geometry((height, width), pixel_mm, pre), device)
    offsets = torch.arange(-pre.context, pre.context + 1, device=device)
    seconds = {"preprocess": 0.0, **{m.name: 0.0 for m in members}}
    # Per-member times need a device sync around each member; one member is timed as a
    # whole instead, so the GPU never waits on the host for bookkeeping.
    timed, start = len(members) > 1, time.perf_counter()
    for k, z0 in enumerate(range(0, depth, batch_size)):
        z1 = min(z0 + batch_size, depth)
        lo, hi = max(0, z0 - pre.context), min(depth, z1 + pre.context)
        tick = time.perf_counter()
        slices = transfers.slices(lo, hi, k % 2)
        seconds["preprocess"] += time.perf_counter() - tick
        z = torch.arange(z0, z1, device=device)
        x = slices[(z[:, None] + offsets).clamp_(0, depth - 1) - lo].float().div_(255.0)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ensemble, labels = None, {}
        for member in members:
            if timed:
                sync(device)
                tick = time.perf_counter()
            probs = to_input_grid(member_probabilities(member.model, x, passes[member.name], dtype))
            labels[member.name] = probs.argmax(1).to(torch.uint8)
            if timed:
                sync(device)
                seconds[member.name] += time.perf_counter() - tick
            if len(members) > 1:
                ensemble = probs if ensemble is None else ensemble.add_(probs)
        if ensemble is not None:
            labels[ENSEMBLE] = ensemble.argmax(1).to(torch.uint8)
        if tumour_probability:
            labels[PROBABILITY] = quantised_tumour(probs if ensemble is None else ensemble.div_(len(members)))
        transfers.send(z0, labels, k % 2)
    transfers.collect()
    if not timed:
        seconds[members[0].name] = time.perf_counter() - start - seconds["preprocess"]
    out = transfers.labels
    probability = out.pop(PROBABILITY, None)
    if len(members) == 1:
        out[ENSEMBLE] = out[members[0].name]
    return VolumePrediction(out, seconds, probability)


# --------------------------------------------------------------------------- writing

def prediction_name(case: str, compressed: bool) -> str:
    """LiTS names: volume-N → segmentation-N, test-volume-N → test-segmentation-N."""
    if case.startswith("volume-") or case.startswith("test-volume-"):
        case = case.replace("volume-", "segmentation-", 1)
    return case + (".nii.gz" if compressed else ".nii")


def write_labels(path: Path, canonical: np.ndarray, affine: np.ndarray, spatial: Spatial | None = None) -> Path:
    """Write canonical labels as uint8 NIfTI in the voxel order and affine of the input,
    with the input's qform, sform (matrices and codes) and units when ``spatial`` is given
    (else both forms are ``affine`` with code 1, scanner).

    Written atomically (``shardgen.io.write_nifti``); ``.nii.gz`` is deflated at ISA-L's
    fastest level (labels compress well anyway).
    """
    data = from_canonical(canonical, affine).astype(np.uint8, copy=False)
    return write_nifti(path, data, affine, spatial, compresslevel=0)


def write_prediction(path: Path, canonical: np.ndarray, affine: np.ndarray, spatial: Spatial | None,
                     source: Path, output_format: str = "nifti") -> list[Path]:
    """One case's prediction files: the NIfTI label map at ``path`` (``write_labels``) and,
    with ``output_format`` "dicom-seg" and a DICOM series as ``source``, a DICOM SEG of the
    same labels beside it (``<name>.seg.dcm``, :mod:`liverseg.dicom_seg`)."""
    written = [write_labels(path, canonical, affine, spatial)]
    if output_format == "dicom-seg" and is_series(source):
        from .dicom_seg import SEG_SUFFIX, write_dicom_seg

        stem = path.name.removesuffix(".gz").removesuffix(".nii")
        labels = from_canonical(canonical, affine).astype(np.uint8, copy=False)
        written.append(write_dicom_seg(labels, source, path.with_name(stem + SEG_SUFFIX)))
    return written
