"""Image formation: mean HU per tissue, liver texture, lesion HU, partial-volume blur and
noise at the level of a real portal-venous CT for the pixel size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from scipy import ndimage as ndi

from .tissues import TISSUE_CODES
from .geometry import _Canvas, _Field, _z_steps
from .liver import _Patch


# Liver noise as stats.liver_noise measures it (SD of x minus its 3x3 in-plane mean) at
# 0.75 mm pixels, drawn per case (dose, patient size): real portal-venous CT gives ~19 HU at
# 512^2 and ~10 HU resampled to 256^2, i.e. it scales like 1 / pixel size for a given dose.
_NOISE_PIXEL_MM = 0.75
_NOISE_HU = (14.0, 25.0)
# Noise is correlated over a fixed distance in mm (the reconstruction kernel), not a fixed
# number of pixels: nearly white at 1.5 mm pixels, a little correlated at 0.75 mm.
_NOISE_CORRELATION_MM = 0.4


@dataclass(frozen=True)
class _Imaging:
    """Noise level and blur kernels of one case."""

    fine_noise: float  # HU, SD of (noise minus its 3x3 in-plane mean) at this pixel size
    kz: np.ndarray  # symmetric taps (centre first) of the image blur along z and in-plane
    kp: np.ndarray
    kn: np.ndarray  # in-plane taps of the noise correlation

    def _energy(self, residual: bool) -> float:
        """Sum of squares of the filter from white noise to the image noise (or to the noise
        minus its 3x3 in-plane mean)."""
        full = np.concatenate([self.kn[:0:-1], self.kn])
        plane = np.outer(full, full)
        if residual:
            box = np.full((3, 3), -1.0 / 9.0)
            box[1, 1] += 1.0
            plane = ndi.convolve(np.pad(plane, 1), box, mode="constant")
        return float(np.sum(plane ** 2))

    @property
    def gain(self) -> np.float32:
        """Scale of uniform(-0.5, 0.5) white noise that gives ``fine_noise`` once correlated."""
        return np.float32(self.fine_noise * np.sqrt(12.0) / np.sqrt(self._energy(residual=True)))

    @property
    def noise_sd(self) -> float:
        """HU standard deviation of the image noise."""
        return float(self.gain / np.sqrt(12.0) * np.sqrt(self._energy(residual=False)))


def _sample_imaging(rng: np.random.Generator, pixel_mm: float) -> _Imaging:
    sigma = rng.uniform(0.5, 1.0)  # in-plane partial volume, pixels
    fine = rng.uniform(*_NOISE_HU) * _NOISE_PIXEL_MM / pixel_mm
    return _Imaging(fine_noise=float(fine), kz=_gauss_taps(0.45, 1), kp=_gauss_taps(sigma, 1 if sigma <= 0.6 else 2),
                    kn=_gauss_taps(_NOISE_CORRELATION_MM / pixel_mm, 1))


def _hu_blocks(canvas: _Canvas, lut: np.ndarray, rng: np.random.Generator, liver_box: tuple[np.ndarray, np.ndarray],
               patches: Sequence[_Patch]) -> Iterator[np.ndarray]:
    """Consecutive z-blocks of the noiseless, unblurred image: mean HU per tissue, a faint
    low-frequency texture in the liver parenchyma, the lesions' own HU. Blocks, not one
    volume: a float32 volume costs more to allocate than to compute."""
    grid = canvas.grid
    texture, amp = _Field.sample(rng, 25.0), np.float32(rng.uniform(2.0, 5.0))
    box = grid.box(*liver_box)
    plane = texture.plane(*grid.coords(box)[1:]) * amp if box is not None else None
    by_row: dict[int, list[_Patch]] = {}
    for patch in patches:
        by_row.setdefault(patch[0], []).append(patch)
    for rows in _z_steps(0, grid.shape[0], grid.shape[1] * grid.shape[2]):
        h = lut[canvas.tissue[rows]]
        if box is not None and rows.start < box[0].stop and box[0].start < rows.stop:
            sub = slice(max(rows.start, box[0].start), min(rows.stop, box[0].stop))
            liver = canvas.tissue[sub, box[1], box[2]] == TISSUE_CODES["liver"]
            field = texture.at(plane, grid.z[sub])
            h[sub.start - rows.start:sub.stop - rows.start, box[1], box[2]] += np.where(liver, field, 0)
        for row in range(rows.start, rows.stop):
            for _, ys, xs, mask, values in by_row.get(row, ()):
                h[row - rows.start, ys, xs][mask] = values[mask]
        yield h


def _gauss_taps(sigma: float, radius: int) -> np.ndarray:
    """Taps k[0..radius] of a symmetric Gaussian normalised to sum 1 over -radius..radius."""
    k = np.exp(-0.5 * (np.arange(radius + 1) / sigma) ** 2)
    return (k / (k[0] + 2 * k[1:].sum())).astype(np.float32)


def _along(a: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    index = [slice(None)] * a.ndim
    index[axis] = slice(start, stop)
    return a[tuple(index)]


def _blur_axis(a: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    """Symmetric FIR filter along one axis, edges replicated; shifted in-place sums are
    faster than scipy.ndimage on strided axes for 3-5 tap kernels."""
    n = a.shape[axis]
    out = a * taps[0]
    for o in range(1, min(len(taps), n)):
        k = taps[o]
        _along(out, axis, o, n)[...] += _along(a, axis, 0, n - o) * k
        _along(out, axis, 0, n - o)[...] += _along(a, axis, o, n) * k
        _along(out, axis, 0, o)[...] += _along(a, axis, 0, 1) * k
        _along(out, axis, n - o, n)[...] += _along(a, axis, n - 1, n) * k
    return out


def _z_blurred(blocks: Iterator[np.ndarray], taps: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """3-tap filter along z over a stream of consecutive row blocks, edges replicated:
    yields (first row, filtered rows). Two rows are carried from block to block."""
    carry, row = None, 0
    for block in blocks:
        window = np.concatenate([block[:1] if carry is None else carry, block])  # rows row-1 .. end
        if len(window) >= 3:
            yield row, window[1:-1] * taps[0] + (window[:-2] + window[2:]) * taps[1]
            row += len(window) - 2
        carry = window[-2:]
    if carry is not None:
        yield row, carry[1:] * taps[0] + (carry[:1] + carry[1:]) * taps[1]


def _acquire(blocks: Iterator[np.ndarray], imaging: _Imaging, shape: tuple[int, int, int],
             rng: np.random.Generator) -> np.ndarray:
    """Blur the image (partial volume along z and in-plane), add noise correlated over a
    fixed distance in mm, round and clip to int16."""
    out = np.empty(shape, dtype=np.int16)
    gain = imaging.gain
    for row, image in _z_blurred(blocks, imaging.kz):
        image = _blur_axis(_blur_axis(image, imaging.kp, 1), imaging.kp, 2)
        noise = rng.random(image.shape, dtype=np.float32)
        noise -= np.float32(0.5)
        noise *= gain
        if imaging.kn[1] > 0.01:  # else white to within 1 %: skip two passes over the block
            noise = _blur_axis(_blur_axis(noise, imaging.kn, 1), imaging.kn, 2)
        image += noise
        np.rint(image, out=image)
        out[row:row + len(image)] = np.clip(image, -1024, 3071)
    return out
