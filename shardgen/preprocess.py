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
from .settings import from_dict


MAX_SIZE = 4096
MAX_CONTEXT = 16
MAX_SPACING_MM = 100.0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


@dataclass(frozen=True)
class Preprocessing:
    """How a CT volume becomes network input.

    HU are clipped to ``window`` and mapped linearly to 0..255 (stored as uint8, so the
    shards are small; the model sees ``uint8 / 255``). Slices are taken along z of the
    canonical (z, row, col) orientation and resampled to ``size`` × ``size`` square pixels
    of ``spacing_mm`` (None: the pixel size that fits the whole field of view in the
    slice), centred, padded or cropped (``slice_geometry``), so anatomy keeps its shape
    whatever the input's matrix and pixel aspect. ``context`` neighbouring slices on each
    side become extra channels (2 * context + 1 in all), edge slices replicated.
    """

    window: tuple[float, float] = (-100.0, 400.0)
    size: int = 512
    context: int = 1
    orientation: str = "".join(CANONICAL_AXCODES)
    spacing_mm: float | None = None

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
        spacing = self.spacing_mm
        if spacing is not None and not (_is_number(spacing) and 0 < spacing <= MAX_SPACING_MM):
            raise ShardgenError(f"spacing_mm: must be a pixel size in mm in (0, {MAX_SPACING_MM:g}], or null "
                                f"to fit the field of view, got {spacing!r}")
        object.__setattr__(self, "window", (float(lo), float(hi)))
        object.__setattr__(self, "spacing_mm", None if spacing is None else float(spacing))

    @property
    def channels(self) -> int:
        return 2 * self.context + 1

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "window": list(self.window)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        return from_dict(cls, data, "preprocessing settings")

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


def interpolation_matrix(n_in: int, n_out: int, scale: float | None = None, start: float = 0.0) -> np.ndarray:
    """(n_out, n_in) weights of linear interpolation, widened when shrinking so every input
    pixel contributes (anti-aliasing, as PIL's and torch's antialiased bilinear do).

    Output pixel k is centred at input coordinate ``start + (k + 0.5) * scale - 0.5``
    (pixel centres at whole numbers); by default ``scale = n_in / n_out`` and ``start = 0``,
    a plain resize. Output pixels centred off the input (beyond its outer pixel edges)
    get no weight at all: they are padding.
    """
    scale = n_in / n_out if scale is None else scale
    support = max(scale, 1.0)
    centres = pixel_centres(n_out, scale, start)
    dist = np.abs(np.arange(n_in)[None, :] - centres[:, None]) / support
    weights = np.clip(1.0 - dist, 0.0, None)
    weights[~on_input(centres, n_in)] = 0.0
    sums = weights.sum(axis=1, keepdims=True)
    weights /= np.where(sums > 0, sums, 1.0)
    return weights.astype(np.float32)


def pixel_centres(n_out: int, scale: float, start: float) -> np.ndarray:
    """The input coordinates of ``n_out`` output pixels' centres (input pixel centres at
    whole numbers)."""
    return start + (np.arange(n_out) + 0.5) * scale - 0.5


def on_input(centres: np.ndarray, n_in: int) -> np.ndarray:
    """Which coordinates lie on an axis of ``n_in`` pixels (its outer edges included, give
    or take rounding)."""
    return (centres >= -0.5 - 1e-6) & (centres <= n_in - 0.5 + 1e-6)


@dataclass(frozen=True)
class AxisMap:
    """One in-plane axis of a resampling: ``n_out`` output pixels, each ``scale`` input
    pixels wide, the first starting ``start`` input pixels after the input's first edge
    (negative: the input is padded before its first pixel)."""

    n_in: int
    n_out: int
    scale: float
    start: float = 0.0

    @classmethod
    def resize(cls, n_in: int, n_out: int) -> "AxisMap":
        """A plain resize: the input's extent stretched over the output's."""
        return cls(n_in, n_out, n_in / n_out)

    @property
    def identity(self) -> bool:
        return self.n_in == self.n_out and self.scale == 1.0 and self.start == 0.0

    def inverse(self) -> "AxisMap":
        """The map back: each input pixel's place on the output axis."""
        return AxisMap(self.n_out, self.n_in, 1.0 / self.scale, -self.start / self.scale)

    def inside(self) -> np.ndarray:
        """Which output pixels lie on the input (the rest are padding)."""
        return on_input(pixel_centres(self.n_out, self.scale, self.start), self.n_in)

    def matrix(self) -> np.ndarray:
        """The (n_out, n_in) interpolation weights (cached, read-only)."""
        return _axis_matrix(self)

    def sparse(self) -> sparse.csr_matrix:
        """The same weights as a sparse matrix (cached)."""
        return _axis_sparse(self)


# a build or an evaluation meets a handful of slice shapes; a few cached matrices cover them
@functools.lru_cache(maxsize=16)
def _axis_matrix(axis: AxisMap) -> np.ndarray:
    weights = interpolation_matrix(axis.n_in, axis.n_out, axis.scale, axis.start)
    weights.flags.writeable = False
    return weights


@functools.lru_cache(maxsize=16)
def _axis_sparse(axis: AxisMap) -> sparse.csr_matrix:
    # banded: a handful of taps per output pixel, so the sparse product costs ~1 % of the dense one
    return sparse.csr_matrix(_axis_matrix(axis))


@dataclass(frozen=True)
class SliceGeometry:
    """Where the pixels of a resampled slice lie on the input slice, row axis and column axis."""

    rows: AxisMap
    cols: AxisMap

    @classmethod
    def resize(cls, shape_in: tuple[int, int], shape_out: tuple[int, int]) -> "SliceGeometry":
        """A plain resize of (H, W) slices to ``shape_out``, whatever the pixels' aspect."""
        return cls(AxisMap.resize(shape_in[0], shape_out[0]), AxisMap.resize(shape_in[1], shape_out[1]))

    @property
    def shape_in(self) -> tuple[int, int]:
        return self.rows.n_in, self.cols.n_in

    @property
    def shape_out(self) -> tuple[int, int]:
        return self.rows.n_out, self.cols.n_out

    @property
    def identity(self) -> bool:
        return self.rows.identity and self.cols.identity

    def inverse(self) -> "SliceGeometry":
        return SliceGeometry(self.rows.inverse(), self.cols.inverse())


def slice_geometry(shape: tuple[int, int], pixel_mm: tuple[float, float], settings: Preprocessing
                   ) -> SliceGeometry:
    """How slices of ``shape`` (H, W) with pixels of ``pixel_mm`` (between rows, between
    columns) become ``settings.size`` square: square pixels of ``settings.spacing_mm``, or
    by default of the size that fits the whole field of view, the field of view centred
    and the slice padded or cropped around it. The axis spanning the field of view is then
    plainly resized, so a square matrix of square pixels is resized exactly as a plain
    resize would. Padding and cropping are whole output pixels: at the input's own pixel
    size, pixels are copied, not interpolated, and the inverse restores them exactly.
    """
    size = settings.size
    extents = [n * float(d) for n, d in zip(shape, pixel_mm)]
    pixel = settings.spacing_mm if settings.spacing_mm is not None else max(extents) / size
    axes = []
    for n, d, extent in zip(shape, pixel_mm, extents):
        if settings.spacing_mm is None and extent == max(extents):
            axes.append(AxisMap.resize(n, size))
            continue
        scale = pixel / float(d)
        pad = round((size - n / scale) / 2)
        axes.append(AxisMap(n, size, scale, -pad * scale))
    return SliceGeometry(*axes)


def resize_linear(images: np.ndarray, geometry: SliceGeometry) -> np.ndarray:
    """Resample float images (..., H, W) as ``geometry`` says, to (..., *geometry.shape_out);
    padding is 0. Identity when the geometry is."""
    if geometry.identity:
        return images.astype(np.float32, copy=False)
    return geometry.rows.matrix() @ images.astype(np.float32, copy=False) @ geometry.cols.matrix().T


def resize_labels(labels: np.ndarray, geometry: SliceGeometry) -> np.ndarray:
    """Resample label images (..., H, W) of 0/1/2 on the image's own grid: the nested masks
    label >= 1 (liver with its tumours) and label == 2 are resampled with the image's
    interpolation and kept where they cover more than half of an output pixel; padding is
    0. Nearest neighbour would put each output pixel on an input pixel half an input pixel
    away from its centre (at 512 -> 256), shifting the labels against the linearly resized
    image. Identity when the geometry is."""
    if geometry.identity:
        return labels
    h, w = labels.shape[-2:]
    size = geometry.shape_out
    rows, cols = geometry.rows.sparse(), geometry.cols.sparse()
    flat = labels.reshape(-1, h, w)
    out = np.zeros((flat.shape[0], *size), np.uint8)
    for plane, result in zip(flat, out):
        if not plane.any():
            continue
        for level in (1, 2):  # tumour is written over liver, as label 2 lies inside label >= 1
            covered = (cols @ (rows @ (plane >= level).astype(np.float32)).T).T
            result[covered > 0.5] = level
    return out.reshape(*labels.shape[:-2], *size)


def preprocess_image(hu: np.ndarray, settings: Preprocessing, pixel_mm: tuple[float, float]) -> np.ndarray:
    """Canonical HU slices (..., H, W) with pixels of ``pixel_mm`` (row, col) → uint8
    (..., size, size); padding is the window's low end (0)."""
    geometry = slice_geometry(hu.shape[-2:], pixel_mm, settings)
    return quantise(resize_linear(window_scaled(hu, settings.window), geometry))


def preprocess_label(label: np.ndarray, settings: Preprocessing, pixel_mm: tuple[float, float]) -> np.ndarray:
    """Canonical label slices (..., H, W) → uint8 (..., size, size) on the image's grid."""
    geometry = slice_geometry(label.shape[-2:], pixel_mm, settings)
    return resize_labels(label, geometry).astype(np.uint8, copy=False)


def context_indices(z: int, depth: int, context: int) -> list[int]:
    """Slice indices stacked as channels for slice ``z``, edges replicated."""
    return [min(max(z + d, 0), depth - 1) for d in range(-context, context + 1)]


def stack_context(slices: np.ndarray, z: int, context: int) -> np.ndarray:
    """The (2k+1, H, W) network input for slice ``z`` of preprocessed slices (Z, H, W)."""
    return slices[context_indices(z, slices.shape[0], context)]


def to_model_input(stack: np.ndarray) -> np.ndarray:
    """uint8 stacks → float32 in [0, 1], the values the network sees."""
    return stack.astype(np.float32) / np.float32(255.0)
