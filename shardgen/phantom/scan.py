"""Acquisition geometry: matrix, pixel and slice spacing, the scanned range (the whole
liver plus a margin) and the LiTS-like storage orientation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from nibabel import orientations as ornt

from ..orientation import CANONICAL_AXCODES, affine_for
from .geometry import _Grid


_THICKNESSES = (0.7, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
_MAX_COVERAGE_MM = 400.0  # the anatomy is modelled from the lung bases to the iliac crests
_MARGIN_ABOVE_MM = (5.0, 30.0)  # scanned beyond the liver: lung bases above, kidneys and bowel
_MARGIN_BELOW_MM = (5.0, 40.0)  # below (modest, so that 20-32 slices are not too thick)
_MAX_THICKNESS_MM = 15.0  # with fewer slices than the liver needs at this thickness, it is cut
_STORAGE = ((("L", "P", "S"), 0.7), (("R", "A", "S"), 0.15), (("L", "P", "I"), 0.15))


@dataclass(frozen=True)
class _Scan:
    """Acquisition geometry of one case."""

    shape: tuple[int, int, int]  # canonical (z, row, col)
    spacing: tuple[float, float, float]  # mm along (z, row, col)
    axcodes: tuple[str, str, str]
    z_first: float  # patient z of the most inferior slice (liver centre near 0)
    shift: tuple[float, float]  # body centre relative to the FOV centre (y, x) mm
    origin: tuple[float, float, float]  # RAS mm of canonical voxel (0, 0, 0)

    @property
    def fov(self) -> float:
        return self.shape[1] * self.spacing[1]


def _sample_scan(rng: np.random.Generator, size: int, slices: tuple[int, int]) -> _Scan:
    """In-plane spacing, slice count, storage orientation and origin; the slices are placed
    along z by :func:`_place_slices` once the anatomy (and so the liver's height) is known."""
    spacing = rng.uniform(0.6, 0.9) * 512 / size  # fixed FOV in mm: smaller matrices are coarser
    count = int(rng.integers(slices[0], slices[1] + 1))
    storage = int(rng.choice(len(_STORAGE), p=[p for _, p in _STORAGE]))
    shift = (float(rng.uniform(-25.0, 5.0)), float(rng.uniform(-15.0, 15.0)))
    half = (size - 1) / 2 * spacing
    # canonical voxel 0 is the patient's right-anterior-inferior corner: +x, +y in RAS
    origin = (half + rng.uniform(-10, 10), half + rng.uniform(-10, 10), rng.uniform(-700.0, -100.0))
    return _Scan(shape=(count, size, size), spacing=(_THICKNESSES[-1], spacing, spacing),
                 axcodes=_STORAGE[storage][0], z_first=0.0, shift=shift, origin=tuple(float(v) for v in origin))


def _place_slices(rng: np.random.Generator, scan: _Scan, liver_z: tuple[float, float]) -> _Scan:
    """Slice thickness and scanned range: like a clinical abdominal CT, the scan covers the
    whole liver (liver_z, mm) plus a margin above and below, whatever the slice count. A
    standard thickness is drawn among those that cover it within _MAX_COVERAGE_MM; when
    none does (few slices), the slices get as thick as needed (rounded up to 0.5 mm), up
    to _MAX_THICKNESS_MM: fewer than ~17 slices then cut the liver, centred on it."""
    count = scan.shape[0]
    lo, hi = liver_z[0] - rng.uniform(*_MARGIN_BELOW_MM), liver_z[1] + rng.uniform(*_MARGIN_ABOVE_MM)
    need = hi - lo
    allowed = [t for t in _THICKNESSES if t * (count - 1) >= need and t * count <= _MAX_COVERAGE_MM]
    if allowed:
        thickness = float(allowed[int(rng.integers(len(allowed)))])
    elif count == 1:
        thickness = _THICKNESSES[-1]
    else:
        thickness = min(float(np.ceil(need / (count - 1) * 2.0) / 2.0), _MAX_THICKNESS_MM)
    spare = (count - 1) * thickness - need
    # surplus coverage goes mostly below the liver: scans reach further down than up
    below = rng.uniform(0.5, 1.0) if count > 1 else 0.0
    z_first = lo - spare * below if spare >= 0 else (lo + hi - (count - 1) * thickness) / 2
    return dataclasses.replace(scan, spacing=(thickness, *scan.spacing[1:]), z_first=float(z_first))


def _grid_for(scan: _Scan) -> _Grid:
    nz, ny, nx = scan.shape
    t, sy, sx = scan.spacing
    z = scan.z_first + t * np.arange(nz)
    y = (np.arange(ny) - (ny - 1) / 2) * sy - scan.shift[0]
    x = (np.arange(nx) - (nx - 1) / 2) * sx - scan.shift[1]
    return _Grid(z.astype(np.float32), y.astype(np.float32), x.astype(np.float32))


def _to_storage(scan: _Scan, *canonical: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The LiTS-like affine and the arrays flipped/permuted from (z, row, col) into storage order."""
    affine, _ = affine_for(scan.shape, scan.spacing, scan.axcodes, scan.origin)
    transform = ornt.ornt_transform(ornt.axcodes2ornt(CANONICAL_AXCODES), ornt.axcodes2ornt(scan.axcodes))
    return affine, [ornt.apply_orientation(a, transform) for a in canonical]
