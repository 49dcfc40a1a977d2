"""The one preprocessing definition: settings as data, and the functions that apply them.

shardgen applies it when writing shards, evaluation applies it to test volumes, and the
settings travel in manifest.json and every checkpoint's config.json.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse

from .errors import ShardgenError
from .orientation import CANONICAL_AXCODES


MAX_SIZE = 4096
MAX_CONTEXT = 16


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


@dataclass(frozen=True)
class Preprocessing:
    """How a CT volume becomes network input.

    HU are clipped to ``window`` and mapped linearly to 0..255 (stored as uint8, so the
    shards are small; the model sees ``uint8 / 255``). Slices are taken along z of the
    canonical (z, row, col) orientation and resized to ``size`` × ``size``. ``context``
    neighbouring slices on each side become extra channels (2 * context + 1 in all), edge
    slices replicated.
    """

    window: tuple[float, float] = (-100.0, 400.0)
    size: int = 512
    context: int = 1
    orientation: str = "".join(CANONICAL_AXCODES)

    def __post_init__(self) -> None:
        # the settings also arrive from manifest.json and checkpoints' config.json: untrusted
        window = self.window
        if (not isinstance(window, (tuple, list)) or len(window) != 2
                or not all(_is_number(v) and abs(v) <= 1e5 for v in window)):
            raise ShardgenError(f"window: the HU window must be two finite numbers LOW,HIGH, got {window!r}")
        lo, hi = window
        if not hi > lo:
            raise ShardgenError(f"window: the HU window must have high > low, got {window}")
        if type(self.size) is not int or not 8 <= self.size <= MAX_SIZE:
            raise ShardgenError(f"size: must be a whole number of pixels in 8..{MAX_SIZE} (at least 8), "
                                f"got {self.size!r}")
        if type(self.context) is not int or not 0 <= self.context <= MAX_CONTEXT:
            raise ShardgenError(f"context: must be a whole number in 0..{MAX_CONTEXT}, got {self.context!r}")
        if self.orientation != "".join(CANONICAL_AXCODES):
            raise ShardgenError(f"orientation: unsupported rule {self.orientation!r}")
        object.__setattr__(self, "window", (float(lo), float(hi)))

    @property
    def channels(self) -> int:
        return 2 * self.context + 1

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "window": list(self.window)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        if not isinstance(data, dict):
            raise ShardgenError(f"preprocessing settings must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ShardgenError(f"unknown preprocessing settings {sorted(unknown)}")
        return cls(**data)

    def fingerprint(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def window_scaled(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """HU → float32 in [0, 255] (not yet rounded)."""
    lo, hi = window
    out = np.clip(hu, lo, hi, dtype=np.float32)
    out -= np.float32(lo)
    out *= np.float32(255.0 / (hi - lo))
    return out


def quantise(scaled: np.ndarray) -> np.ndarray:
    """Round in place (``scaled`` is a temporary) and store as uint8."""
    return np.rint(scaled, out=scaled).astype(np.uint8)


def interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of linear interpolation, widened when shrinking so every input
    pixel contributes (anti-aliasing, as PIL's and torch's antialiased bilinear do)."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale - 0.5
    dist = np.abs(np.arange(n_in)[None, :] - centres[:, None]) / support
    weights = np.clip(1.0 - dist, 0.0, None)
    weights /= weights.sum(axis=1, keepdims=True)
    return weights.astype(np.float32)


def resize_linear(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize float images (..., H, W) to (..., size[0], size[1]); identity when equal."""
    h, w = images.shape[-2:]
    if (h, w) == tuple(size):
        return images.astype(np.float32, copy=False)
    rows = interpolation_matrix(h, size[0])
    cols = interpolation_matrix(w, size[1])
    return rows @ images.astype(np.float32, copy=False) @ cols.T


@functools.lru_cache(maxsize=32)
def _sparse_interpolation(n_in: int, n_out: int) -> sparse.csr_matrix:
    # banded: a handful of taps per output pixel, so the sparse product costs ~1 % of the dense one
    return sparse.csr_matrix(interpolation_matrix(n_in, n_out))


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize label images (..., H, W) of 0/1/2 on the image's own grid: the nested masks
    label >= 1 (liver with its tumours) and label == 2 are resized with the image's
    interpolation and kept where they cover more than half of an output pixel. Nearest
    neighbour would put each output pixel on an input pixel half an input pixel away from
    its centre (at 512 -> 256), shifting the labels against the linearly resized image.
    Identity when the size is unchanged."""
    h, w = labels.shape[-2:]
    if (h, w) == tuple(size):
        return labels
    rows, cols = _sparse_interpolation(h, size[0]), _sparse_interpolation(w, size[1])
    flat = labels.reshape(-1, h, w)
    out = np.zeros((flat.shape[0], *size), np.uint8)
    for plane, result in zip(flat, out):
        if not plane.any():
            continue
        for level in (1, 2):  # tumour is written over liver, as label 2 lies inside label >= 1
            covered = (cols @ (rows @ (plane >= level).astype(np.float32)).T).T
            result[covered > 0.5] = level
    return out.reshape(*labels.shape[:-2], *size)


def preprocess_image(hu: np.ndarray, settings: Preprocessing) -> np.ndarray:
    """Canonical HU slices (..., H, W), any numeric dtype → uint8 (..., size, size)."""
    scaled = resize_linear(window_scaled(hu, settings.window), (settings.size, settings.size))
    return quantise(scaled)


def preprocess_label(label: np.ndarray, settings: Preprocessing) -> np.ndarray:
    """Canonical label slices (..., H, W) → uint8 (..., size, size) on the image's grid."""
    return resize_labels(label, (settings.size, settings.size)).astype(np.uint8, copy=False)


def context_indices(z: int, depth: int, context: int) -> list[int]:
    """Slice indices stacked as channels for slice ``z``, edges replicated."""
    return [min(max(z + d, 0), depth - 1) for d in range(-context, context + 1)]


def stack_context(slices: np.ndarray, z: int, context: int) -> np.ndarray:
    """The (2k+1, H, W) network input for slice ``z`` of preprocessed slices (Z, H, W)."""
    return slices[context_indices(z, slices.shape[0], context)]


def to_model_input(stack: np.ndarray) -> np.ndarray:
    """uint8 stacks → float32 in [0, 1], the values the network sees."""
    return stack.astype(np.float32) / np.float32(255.0)
