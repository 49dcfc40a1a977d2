"""Synthetic portal-venous abdominal CT volumes with liver/tumour labels, stored like LiTS files;
docs/PHANTOMS.md describes the anatomy, the HU table, the ranges and what is not modelled."""

from __future__ import annotations

import functools
import gzip
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt
from scipy import ndimage as ndi

from .orientation import CANONICAL_AXCODES, affine_for

TISSUES = (
    "air", "lung", "skin", "fat", "muscle", "visceral_fat",
    "cortical_bone", "cancellous_bone", "cartilage", "disc", "csf",
    "table_shell", "table_foam",
    "liver", "portal_branch", "hepatic_vein",
    "portal_vein", "ivc", "aorta", "heart_blood", "myocardium",
    "spleen", "pancreas", "kidney_cortex", "kidney_medulla", "urine",
    "gut_wall", "gut_fluid", "feces", "gas", "bile",
    "lesion",
)
TISSUE_CODES: dict[str, int] = {name: code for code, name in enumerate(TISSUES)}
LIVER_TISSUES = ("liver", "portal_branch", "hepatic_vein")  # label 1, as LiTS labels vessels in the liver

# Portal-venous HU ranges, one value drawn per case (sources in docs/PHANTOMS.md).
# Spleen and lesions are drawn relative to the liver instead.
HU_RANGES: dict[str, tuple[float, float]] = {
    "air": (-1000, -1000), "lung": (-880, -820), "skin": (20, 50), "fat": (-115, -95),
    "muscle": (40, 60), "visceral_fat": (-105, -85),
    "cortical_bone": (700, 1000), "cancellous_bone": (200, 350), "cartilage": (100, 160),
    "disc": (70, 100), "csf": (5, 20), "table_shell": (150, 350), "table_foam": (-960, -900),
    "liver": (100, 130), "portal_branch": (160, 200), "hepatic_vein": (145, 185),
    "portal_vein": (160, 200), "ivc": (120, 160), "aorta": (150, 200),
    "heart_blood": (140, 180), "myocardium": (90, 120),
    "pancreas": (90, 120), "kidney_cortex": (150, 200), "kidney_medulla": (115, 150),
    "urine": (0, 15), "gut_wall": (60, 85), "gut_fluid": (0, 20), "feces": (-60, 30),
    "gas": (-1000, -950), "bile": (0, 20),
}
SPLEEN_MINUS_LIVER = (-5.0, 12.0)

_THICKNESSES = (0.7, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
_MAX_COVERAGE_MM = 400.0  # the anatomy is modelled from the lung bases to the iliac crests
_STORAGE = ((("L", "P", "S"), 0.7), (("R", "A", "S"), 0.15), (("L", "P", "I"), 0.15))
_CHUNK_VOXELS = 1 << 20  # work in z-chunks of about this many voxels: cache-sized temporaries


@dataclass(frozen=True, eq=False)
class Phantom:
    """One synthetic case. Arrays are in NIfTI voxel order (use ``affine`` and
    :func:`shardgen.orientation.to_canonical` for the (z, row, col) view)."""

    volume: np.ndarray  # int16 HU
    label: np.ndarray  # uint8: 0 background, 1 liver (incl. its vessels), 2 tumour
    affine: np.ndarray  # 4x4 float64, RAS+ mm
    tissue: np.ndarray  # uint8 codes of TISSUE_CODES, un-blurred ground truth
    spacing: tuple[float, float, float]  # mm along canonical (z, row, col)
    axcodes: tuple[str, str, str]  # storage orientation of the voxel axes
    lesion_diameters_mm: tuple[float, ...]  # nominal, before clipping to the liver
    liver_hu: float  # parenchyma mean before noise
    noise_sd: float  # HU standard deviation of the image noise

    @property
    def n_lesions(self) -> int:
        return len(self.lesion_diameters_mm)


# ----------------------------------------------------------------------------- grid & fields

def _z_steps(start: int, stop: int, plane: int) -> Iterator[slice]:
    """Consecutive row ranges of about _CHUNK_VOXELS voxels for planes of ``plane`` voxels."""
    step = max(1, _CHUNK_VOXELS // max(plane, 1))
    for z0 in range(start, stop, step):
        yield slice(z0, min(z0 + step, stop))


@dataclass(frozen=True)
class _Grid:
    """Voxel-centre coordinates (mm, float32) of the canonical array in the patient frame:
    z superior, y posterior, x patient-left, origin at the body centre / liver centre."""

    z: np.ndarray
    y: np.ndarray
    x: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.z), len(self.y), len(self.x)

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice] | None:
        """Index box of the voxels whose centres lie in [lo, hi] (z, y, x); None if empty."""
        out = []
        for axis, low, high in zip((self.z, self.y, self.x), lo, hi):
            i0, i1 = np.searchsorted(axis, low, "left"), np.searchsorted(axis, high, "right")
            if i1 <= i0:
                return None
            out.append(slice(int(i0), int(i1)))
        return tuple(out)  # type: ignore[return-value]

    def coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable (z, y, x) coordinate arrays of a box."""
        return self.z[box[0]][:, None, None], self.y[box[1]][None, :, None], self.x[box[2]][None, None, :]

    def chunks(self, box: tuple[slice, slice, slice]) -> Iterator[tuple[slice, slice, slice]]:
        """Split a box along z so temporaries stay cache-sized (about 8x faster than whole boxes)."""
        plane = (box[1].stop - box[1].start) * (box[2].stop - box[2].start)
        for rows in _z_steps(box[0].start, box[0].stop, plane):
            yield rows, box[1], box[2]

    def full(self) -> tuple[slice, slice, slice]:
        return slice(0, len(self.z)), slice(0, len(self.y)), slice(0, len(self.x))


@dataclass(frozen=True)
class _Field:
    """A smooth random field of unit variance over mm space: separable random cosines,
    so it is defined independently of the voxel grid and cheap to evaluate on a box."""

    freq: np.ndarray  # (3, n) cycles per mm along z, y, x
    phase: np.ndarray  # (3, n)
    coef: np.ndarray  # (n, n, n)

    @staticmethod
    def sample(rng: np.random.Generator, wavelength_mm: float, modes: int = 4) -> _Field:
        freq = rng.uniform(-1.0, 1.0, (3, modes)) / wavelength_mm
        phase = rng.uniform(0.0, 1.0, (3, modes))
        coef = rng.standard_normal((modes, modes, modes)) / np.sqrt(modes ** 3 / 8.0)
        return _Field(freq.astype(np.float32), phase.astype(np.float32), coef.astype(np.float32))

    def _basis(self, axis: int, c: np.ndarray) -> np.ndarray:
        return np.cos(2 * np.pi * (np.ravel(c)[:, None] * self.freq[axis] + self.phase[axis])).astype(np.float32)

    def plane(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The z-independent part over a (y, x) plane, shape (n, ny, nx): compute it once
        per box and pass it to :meth:`at` for each z-chunk."""
        return np.matmul(self._basis(1, y), self.coef @ self._basis(2, x).T)

    def at(self, plane: np.ndarray, z: np.ndarray) -> np.ndarray:
        n, ny, nx = plane.shape
        return (self._basis(0, z) @ plane.reshape(n, -1)).reshape(-1, ny, nx)

    def __call__(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return self.at(self.plane(y, x), z)


@dataclass(frozen=True)
class _Stack:
    """A solid made of axial ellipses whose centre and semi-axes (mm) are given at z knots and
    interpolated linearly: ellipsoids, tapering lobes, tilted kidneys and curved tubes alike."""

    z: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    sx: np.ndarray
    sy: np.ndarray
    angle: float = 0.0  # in-plane rotation of the ellipse axes (radians)

    def bounds(self, pad: float = 0.0) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        r = np.maximum(self.sx, self.sy) + pad
        return ((self.z[0], float(np.min(self.cy - r)), float(np.min(self.cx - r))),
                (self.z[-1], float(np.max(self.cy + r)), float(np.max(self.cx + r))))

    def rho2(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Squared normalised radius: < 1 inside."""
        zz = np.ravel(z)
        cx, cy, sx, sy = (np.interp(zz, self.z, v).astype(np.float32)[:, None, None]
                          for v in (self.cx, self.cy, self.sx, self.sy))
        dx, dy = x - cx, y - cy
        if self.angle:
            c, s = np.float32(np.cos(self.angle)), np.float32(np.sin(self.angle))
            dx, dy = c * dx + s * dy, c * dy - s * dx
        return (dx / np.maximum(sx, 1e-3)) ** 2 + (dy / np.maximum(sy, 1e-3)) ** 2


def _ellipsoid(centre: Sequence[float], semi: Sequence[float], angle: float = 0.0, taper: float = 0.0,
               lean: Sequence[float] = (0.0, 0.0), knots: int = 25) -> _Stack:
    """An ellipsoid (centre/semi in z, y, x) as a stack. ``taper`` > 0 narrows the lower half
    (fraction lost at the bottom); ``lean`` shifts the bottom by that many mm in (y, x)."""
    u = np.sin(np.linspace(-np.pi / 2, np.pi / 2, knots))  # knots crowd at the poles
    prof = np.sqrt(np.clip(1.0 - u ** 2, 0.0, None)) * (1.0 - taper * np.clip(-u, 0.0, None) ** 1.5)
    low = np.clip(-u, 0.0, None)
    return _Stack(z=centre[0] + semi[0] * u, cx=centre[2] + lean[1] * low, cy=centre[1] + lean[0] * low,
                  sx=semi[2] * prof, sy=semi[1] * prof, angle=angle)


def _tube(points: Sequence[Sequence[float]], radii: float | Sequence[float] | Sequence[Sequence[float]]
          ) -> _Stack:
    """A roughly vertical tube through points (z, y, x) sorted by z; radii: one for all,
    one per point, or a (y, x) pair per point."""
    p = np.asarray(points, dtype=float)
    r = np.asarray(radii, dtype=float)
    r = np.broadcast_to(r.reshape(-1, 1) if r.ndim == 1 else r, (len(p), 2))
    return _Stack(z=p[:, 0], cx=p[:, 2], cy=p[:, 1], sx=r[:, 1].copy(), sy=r[:, 0].copy())


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth minimum: unions of implicit shapes without creases at the seams."""
    h = np.maximum(k - np.abs(a - b), 0.0) / k  # written around min(a, b): no cancellation
    return np.minimum(a, b) - h * h * (k / 4)


def _codes(*names: str) -> np.ndarray:
    """A 256-entry boolean table selecting tissue codes, for fast `table[tissue]` masks."""
    table = np.zeros(256, dtype=bool)
    table[[TISSUE_CODES[n] for n in names]] = True
    return table


_SOFT = ("visceral_fat", "gut_wall", "gut_fluid", "feces", "gas", "pancreas", "spleen")
_ONTO_FAT = _codes("visceral_fat")
_ONTO_SOFT = _codes(*_SOFT)
_ONTO_LIVER = _codes("liver")
_IN_LIVER = _codes(*LIVER_TISSUES, "lesion")


class _Canvas:
    """The tissue-code volume being painted, its grid, and the diaphragm height map."""

    def __init__(self, grid: _Grid, dome: np.ndarray):
        self.grid = grid
        self.dome = dome  # (ny, nx) z of the diaphragm's abdominal surface
        self.tissue = np.zeros(grid.shape, dtype=np.uint8)

    def paint(self, box: tuple[slice, slice, slice], mask: np.ndarray, code: str,
              onto: np.ndarray | None = None) -> None:
        region = self.tissue[box]
        if onto is not None:
            mask = mask & onto[region]
        region[mask] = TISSUE_CODES[code]

    def side_of_dome(self, box: tuple[slice, slice, slice], z: np.ndarray, side: int) -> np.ndarray | bool:
        """True below (side -1) or above (side +1) the diaphragm; True everywhere for side 0."""
        if side == 0:
            return True
        dome = self.dome[box[1], box[2]][None]
        return z < dome if side < 0 else z > dome + 4.0

    def shape_chunks(self, stack: _Stack, field: _Field | None = None, amp: float = 0.0
                     ) -> Iterator[tuple[tuple[slice, slice, slice], tuple[np.ndarray, ...], np.ndarray]]:
        """(chunk, coords, rho2) over a stack's bounding box, rho2 perturbed by ``amp * field``."""
        box = self.grid.box(*stack.bounds(pad=amp * 30.0))
        if box is None:
            return
        for chunk in self.grid.chunks(box):
            z, y, x = self.grid.coords(chunk)
            r2 = stack.rho2(z, y, x)
            if field is not None:
                r2 += np.float32(amp) * field(z, y, x)
            yield chunk, (z, y, x), r2

    def solid(self, stack: _Stack, layers: Sequence[tuple[float, str]], onto: np.ndarray | None,
              field: _Field | None = None, amp: float = 0.0, side: int = 0) -> None:
        """Paint nested layers (rho2 limit, code), outermost first; inner layers only where
        the outer one was allowed to paint."""
        for chunk, (z, _, _), r2 in self.shape_chunks(stack, field, amp):
            region = self.tissue[chunk]
            base = (r2 < layers[0][0]) & self.side_of_dome(chunk, z, side)
            if onto is not None:
                base &= onto[region]
            for limit, code in layers:
                region[base & (r2 < limit)] = TISSUE_CODES[code]

    def capsule(self, a: np.ndarray, b: np.ndarray, ra: float, rb: float, code: str,
                onto: np.ndarray | None) -> None:
        """Paint a segment a→b (z, y, x mm) whose radius goes from ra to rb."""
        a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
        pad = max(ra, rb)
        box = self.grid.box(np.minimum(a, b) - pad, np.maximum(a, b) + pad)
        if box is None:
            return
        d = b - a
        length2 = np.float32(max(float(d @ d), 1e-6))
        for chunk in self.grid.chunks(box):
            z, y, x = self.grid.coords(chunk)
            pz, py, px = z - a[0], y - a[1], x - a[2]
            t = np.clip((pz * d[0] + py * d[1] + px * d[2]) / length2, 0.0, 1.0)
            dist2 = (pz - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (px - t * d[2]) ** 2
            radius = np.float32(ra) + np.float32(rb - ra) * t
            self.paint(chunk, dist2 < radius * radius, code, onto)

    def polyline(self, points: np.ndarray, radius: float, code: str, onto: np.ndarray | None) -> None:
        for a, b in zip(points[:-1], points[1:]):
            self.capsule(a, b, radius, radius, code, onto)


# ----------------------------------------------------------------------------- case sampling

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
    """Spacing, slice count and thickness, scanned range, storage orientation and origin."""
    spacing = rng.uniform(0.6, 0.9) * 512 / size  # fixed FOV in mm: smaller matrices are coarser
    count = int(rng.integers(slices[0], slices[1] + 1))
    allowed = [t for t in _THICKNESSES if t * count <= _MAX_COVERAGE_MM] or [_THICKNESSES[0]]
    thickness = float(allowed[int(rng.integers(len(allowed)))])
    centre = rng.uniform(-45.0, 35.0)  # scans usually reach further down than up
    storage = int(rng.choice(len(_STORAGE), p=[p for _, p in _STORAGE]))
    shift = (float(rng.uniform(-25.0, 5.0)), float(rng.uniform(-15.0, 15.0)))
    half = (size - 1) / 2 * spacing
    # canonical voxel 0 is the patient's right-anterior-inferior corner: +x, +y in RAS
    origin = (half + rng.uniform(-10, 10), half + rng.uniform(-10, 10), rng.uniform(-700.0, -100.0))
    return _Scan(shape=(count, size, size), spacing=(thickness, spacing, spacing),
                 axcodes=_STORAGE[storage][0], z_first=centre - (count - 1) * thickness / 2,
                 shift=shift, origin=tuple(float(v) for v in origin))


def _grid_for(scan: _Scan) -> _Grid:
    nz, ny, nx = scan.shape
    t, sy, sx = scan.spacing
    z = scan.z_first + t * np.arange(nz)
    y = (np.arange(ny) - (ny - 1) / 2) * sy - scan.shift[0]
    x = (np.arange(nx) - (nx - 1) / 2) * sx - scan.shift[1]
    return _Grid(z.astype(np.float32), y.astype(np.float32), x.astype(np.float32))


@dataclass(frozen=True)
class _Frame:
    """Case landmarks (mm, patient frame) that the organs are placed by."""

    a: float  # body: lateral semi-axis of the skin
    b_ant: float  # anterior semi-axis
    b_post: float  # posterior semi-axis
    p_ant: float  # superellipse exponents (front rounder, back flatter)
    p_post: float
    fat: float  # subcutaneous fat, front and sides
    fat_post: float  # subcutaneous fat over the back
    wall: float  # abdominal wall muscle
    wall_post: float  # posterior wall muscle (paraspinal muscles are painted separately)
    outline: _Field  # low-frequency irregularity of the body outline (evaluated in-plane)
    wobble: tuple[float, float, float]  # girth change along z: amplitude, period mm, phase
    y_vb: float  # vertebral body centre
    vb: tuple[float, float]  # vertebral body semi-axes (y, x)
    s: float  # organ size factor
    sl: float  # liver size factor
    dome: float  # z of the right hemidiaphragm apex

    @property
    def a_c(self) -> float:
        return self.a - self.fat - self.wall

    @property
    def y_ant(self) -> float:
        return -(self.b_ant - self.fat - self.wall)

    def layers(self) -> list[tuple[float, float, float]]:
        """Semi-axes (a, b_ant, b_post) of skin, skin's inner face, fat's inner face, cavity."""
        return [(self.a, self.b_ant, self.b_post),
                (self.a - 2, self.b_ant - 2, self.b_post - 2),
                (self.a - self.fat, self.b_ant - self.fat, self.b_post - self.fat_post),
                (self.a_c, -self.y_ant, self.b_post - self.fat_post - self.wall_post)]

    def girth(self, z: np.ndarray) -> np.ndarray:
        amp, period, phase = self.wobble
        return (1.0 + amp * np.sin(2 * np.pi * z / period + phase)).astype(np.float32)

    def dome_height(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """z of the diaphragm's abdominal surface: two domes, deeper posterior recesses."""
        yc, depth = (self.y_ant + self.y_vb) / 2, self.y_vb - self.y_ant
        fy = 40.0 * ((y - yc) / depth) ** 2
        right = self.dome - 110.0 * ((x + 0.45 * self.a_c) / self.a_c) ** 2 - fy
        left = self.dome - 15.0 - 110.0 * ((x - 0.45 * self.a_c) / self.a_c) ** 2 - fy
        recess = 15.0 * np.clip((y - self.y_vb + 20.0) / 60.0, 0.0, 1.0)
        return (np.maximum(right, left) - recess).astype(np.float32)


def _sample_frame(rng: np.random.Generator, scan: _Scan) -> _Frame:
    """Body size and habitus, spine position, organ and liver size factors, dome height."""
    # keep the body inside the field of view (with the centre shift): LiTS bodies are rarely cut
    room_x = scan.fov / 2 - 15.0 - abs(scan.shift[1])
    room_y = scan.fov / 2 - 15.0 + min(scan.shift[0], 0.0)
    a = min(rng.uniform(135.0, 180.0), room_x)
    b = a * rng.uniform(0.66, 0.8)
    fat = rng.uniform(0.04, 0.22) * a  # thin to obese, in proportion to the body
    fat_post = fat * rng.uniform(0.4, 0.8) + 4.0
    b_post = b * rng.uniform(0.88, 0.96)
    vb_x = rng.uniform(19.0, 24.0)
    return _Frame(a=a, b_ant=min(b * rng.uniform(1.0, 1.1), room_y), b_post=b_post,
                  p_ant=rng.uniform(2.0, 2.4), p_post=rng.uniform(2.6, 3.2), fat=fat, fat_post=fat_post,
                  wall=rng.uniform(7.0, 11.0), wall_post=rng.uniform(8.0, 14.0),
                  outline=_Field.sample(rng, 200.0, modes=3),
                  wobble=(rng.uniform(0.0, 0.02), rng.uniform(250.0, 500.0), rng.uniform(0, 2 * np.pi)),
                  y_vb=b_post - fat_post - rng.uniform(60.0, 70.0), vb=(vb_x * 0.75, vb_x),
                  s=rng.uniform(0.88, 1.12), sl=rng.uniform(0.85, 1.15), dome=rng.uniform(85.0, 100.0))


def _sample_hu(rng: np.random.Generator) -> np.ndarray:
    """Per-case lookup table tissue code → HU."""
    lut = np.zeros(256, dtype=np.float32)
    for name in TISSUES:
        if name in HU_RANGES:
            lut[TISSUE_CODES[name]] = rng.uniform(*HU_RANGES[name])
    liver = lut[TISSUE_CODES["liver"]]
    lut[TISSUE_CODES["spleen"]] = liver + rng.uniform(*SPLEEN_MINUS_LIVER)
    lut[TISSUE_CODES["lesion"]] = liver - 40.0  # lesions are painted individually
    return lut


# ----------------------------------------------------------------------------- body wall, thorax, bone

_LAYER_CODES = np.array([TISSUE_CODES[n] for n in ("air", "skin", "fat", "muscle", "visceral_fat")], np.uint8)


@dataclass(frozen=True)
class _Ribs:
    z12: float  # z where the 12th rib leaves the spine
    period: float  # vertical rib spacing at the back (one vertebral level)
    drop: float  # how far a rib descends from the back to the front
    hz: float  # half height and half thickness of a rib's cross-section
    hd: float
    d0: float  # rib centre outside the cavity boundary (mm)


def _superellipse(f: _Frame, semi: tuple[float, float, float], girth: np.ndarray,
                  y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """|x/a|^p + |y/b|^p (< 1 inside) of a body layer, front and back with their own b and p."""
    a, b_ant, b_post = semi
    g = girth.reshape(-1, 1, 1)
    front = y < 0
    ax = np.abs(x) / (a * g)
    by = np.abs(y) / (np.where(front, b_ant, b_post) * g)
    p = np.where(front, f.p_ant, f.p_post).astype(np.float32)
    return np.where(front, ax ** np.float32(f.p_ant), ax ** np.float32(f.p_post)) + by ** p


@dataclass(frozen=True)
class _Section:
    """The body's axial cross-section at one girth: layer codes and, for the ribs, the
    pixels of a band around the cavity boundary with their depth and angle."""

    codes: np.ndarray  # (ny, nx) uint8
    yi: np.ndarray  # band pixel rows / columns
    xi: np.ndarray
    across: np.ndarray  # ((depth outside the cavity - rib offset) / rib half-thickness)^2
    alpha: np.ndarray  # angle from the spine, / pi (0 at the back, 1 at the front)


def _body_section(f: _Frame, ribs: _Ribs, girth: float, grid: _Grid, bump: np.ndarray) -> _Section:
    y, x = grid.y[None, :, None], grid.x[None, None, :]
    g = np.array([girth], np.float32)
    layers = [_superellipse(f, semi, g, y, x)[0] + bump for semi in f.layers()]
    count = sum((layer < 1.0).astype(np.uint8) for layer in layers)
    f_cav = layers[3]
    yi, xi = np.nonzero((f_cav > 0.9) & (f_cav < 1.5))
    yy, xx = grid.y[yi], grid.x[xi]
    rho = f_cav[yi, xi] ** (1.0 / np.where(yy < 0, f.p_ant, f.p_post))
    depth = (rho - 1.0) * np.hypot(xx, yy) / rho  # approximate mm outside the cavity boundary
    return _Section(codes=_LAYER_CODES[count], yi=yi, xi=xi, across=((depth - ribs.d0) / ribs.hd) ** 2,
                    alpha=np.arctan2(np.abs(xx), yy) / np.pi)


def _paint_body(canvas: _Canvas, f: _Frame, ribs: _Ribs) -> None:
    """Skin, subcutaneous fat, wall muscle and peritoneal fat; lungs, diaphragm and ribs.
    The girth changes slowly along z, so sections are computed once per 0.2 % of girth
    (under 0.4 mm) and reused: this is the largest saving in the whole phantom."""
    grid = canvas.grid
    mediastinum = ((grid.x[None, :] - 5.0) / (30.0 * f.s)) ** 2 + ((grid.y[:, None] - f.y_vb + 25.0) / 40.0) ** 2 < 1
    # one bump for all layers, so they stay nested; clipped so the body stays in the FOV
    bump = np.float32(0.05) * np.clip(f.outline(np.zeros(1, np.float32), grid.y, grid.x)[0], -2.0, 2.0)
    keys = np.round(f.girth(grid.z) / 0.002).astype(int)
    sections: dict[int, _Section] = {}
    for chunk in grid.chunks(grid.full()):
        region = canvas.tissue[chunk]
        for k, (zk, key) in enumerate(zip(grid.z[chunk[0]], keys[chunk[0]])):
            if key not in sections:
                sections[key] = _body_section(f, ribs, key * 0.002, grid, bump)
            region[k] = sections[key].codes
            _paint_ribs(region[k], float(zk), sections[key], ribs)
        _paint_thorax(region, grid.z[chunk[0]][:, None, None], canvas.dome, mediastinum)


def _paint_thorax(region: np.ndarray, z: np.ndarray, dome: np.ndarray, mediastinum: np.ndarray) -> None:
    """Lungs above the diaphragm (a 4 mm muscle sheet over the domes), except the mediastinum."""
    if z.max() <= dome.min():
        return
    fat = region == TISSUE_CODES["visceral_fat"]
    above = z - dome[None]
    region[fat & (above > 0) & (above <= 4.0)] = TISSUE_CODES["muscle"]
    region[fat & (above > 4.0) & ~mediastinum[None]] = TISSUE_CODES["lung"]


def _paint_ribs(plane: np.ndarray, z: float, section: _Section, ribs: _Ribs) -> None:
    """Oblique rib cross-sections in one slice: each rib descends from the back to the
    front, so an axial slice cuts it into short arcs near the cavity boundary."""
    if z < ribs.z12 - ribs.drop - 10.0:
        return
    alpha = section.alpha
    level = (z + ribs.drop * alpha ** 1.3 - ribs.z12) / ribs.period
    nearest = np.round(level)
    number = 12 - nearest
    end = np.select([number <= 7, number <= 10, number == 11], [0.9, 0.8, 0.55], 0.45)
    rr = ((level - nearest) * ribs.period / ribs.hz) ** 2 + section.across
    rib = (rr < 1.0) & (nearest >= 0) & (number >= 1) & (alpha > 0.2) & (alpha < end)
    cartilage = (number <= 10) & (alpha > end - 0.15)
    code = np.where(cartilage, TISSUE_CODES["cartilage"],
                    np.where(rr > 0.45, TISSUE_CODES["cortical_bone"], TISSUE_CODES["cancellous_bone"]))
    plane[section.yi[rib], section.xi[rib]] = code[rib]


def _sample_ribs(rng: np.random.Generator, f: _Frame) -> _Ribs:
    return _Ribs(z12=rng.uniform(-55.0, -35.0) * f.s, period=rng.uniform(26.0, 32.0) * f.s,
                 drop=rng.uniform(120.0, 160.0), hz=rng.uniform(4.0, 5.5), hd=rng.uniform(3.5, 4.5),
                 d0=rng.uniform(2.0, 5.0))


def _paint_table(canvas: _Canvas, rng: np.random.Generator, f: _Frame) -> None:
    """The CT couch under the back: two thin shells around a foam core, curved at the edges."""
    grid = canvas.grid
    top = f.b_post + rng.uniform(0.0, 8.0)
    depth = grid.y[:, None] - (top - 0.0006 * grid.x[None, :] ** 2)
    within = np.abs(grid.x[None, :]) < 220.0
    shell = within & (((depth >= 0) & (depth < 3)) | ((depth >= 35) & (depth < 38)))
    foam = within & (depth >= 3) & (depth < 35)
    for chunk in grid.chunks(grid.full()):
        region = canvas.tissue[chunk]
        air = region == TISSUE_CODES["air"]
        region[air & shell[None]] = TISSUE_CODES["table_shell"]
        region[air & foam[None]] = TISSUE_CODES["table_foam"]


def _add_trunk_muscles(canvas: _Canvas, rng: np.random.Generator, f: _Frame) -> None:
    """Paraspinal muscles either side of the spinous processes, quadratus lumborum below the
    ribs, and the two recti in the front wall with the linea alba between them."""
    back = f.b_post - f.fat_post - f.wall_post
    top = f.y_vb + f.vb[0] + 6.0
    onto = _codes("visceral_fat", "lung")
    size = rng.uniform(0.85, 1.15)
    front = -(f.b_ant - f.fat) + 1.0
    for side in (-1, 1):
        erector = _tube([(-400, (top + back) / 2 + 4, side * 30 * size), (400, (top + back) / 2, side * 27 * size)],
                        [((back - top) / 2 + 4, 26 * size), ((back - top) / 2 + 4, 22 * size)])
        canvas.solid(erector, [(1.0, "muscle")], onto)
        quadratus = _tube([(-400, f.y_vb + 22, side * (f.vb[1] + 52)), (-60, f.y_vb + 28, side * (f.vb[1] + 48)),
                           (-20, f.y_vb + 30, side * (f.vb[1] + 45))], [(13, 22), (11, 18), (1, 1)])
        canvas.solid(quadratus, [(1.0, "muscle")], onto)
        rectus = _tube([(-400, front + 7, side * 40 * size), (f.dome, front + 6, side * 38 * size)],
                       [(8, 30 * size), (6, 28 * size)])
        canvas.solid(rectus, [(1.0, "muscle")], _codes("visceral_fat", "fat"))


def _vertebra_maps(grid: _Grid, f: _Frame, lumbar: bool) -> dict[str, np.ndarray]:
    """2D code maps (0 = leave) of one vertebra around the spine's centre: the body level
    with and without its processes, the endplate and the disc level."""
    y, x = grid.y[:, None] - f.y_vb, grid.x[None, :]
    sy, sx = f.vb
    shell = 2.0 / sy
    body = (np.abs(x) / sx) ** 2.4 + (np.abs(y) / sy) ** 2.4
    canal_y, canal_r = sy + 9.0, 8.5
    ring = np.hypot(x, y - canal_y)
    arch = (ring >= canal_r) & (ring < canal_r + 6.0) & (y > sy - 6.0)
    spinous = (np.abs(x) < 3.5) & (y > canal_y + canal_r) & (y < canal_y + canal_r + 28.0)
    transverse = (np.abs(y - canal_y + 2.0) < 3.5) & (np.abs(x) < (45.0 if lumbar else 28.0)) & (y > sy - 4)
    pixel = float(grid.x[1] - grid.x[0]) if len(grid.x) > 1 else 1.0
    codes = {name: TISSUE_CODES[name] for name in ("cortical_bone", "cancellous_bone", "disc", "csf")}

    def elements(mask: np.ndarray) -> np.ndarray:
        inner = ndi.binary_erosion(mask, iterations=max(1, round(1.5 / pixel)))
        return np.where(inner, codes["cancellous_bone"], np.where(mask, codes["cortical_bone"], 0))

    canal = np.where(ring < canal_r, codes["csf"], 0)
    cortex = body > (1.0 - shell) ** 2.4
    vb = np.where(body < 1.0, np.where(cortex, codes["cortical_bone"], codes["cancellous_bone"]), 0)
    full = np.maximum(vb, elements(arch | spinous | transverse))
    return {
        "body": np.where(canal > 0, canal, full).astype(np.uint8),
        "spinous": np.where(canal > 0, canal, np.maximum(vb, elements(arch | spinous))).astype(np.uint8),
        "bare": np.where(canal > 0, canal, np.maximum(vb, elements(arch))).astype(np.uint8),
        "endplate": np.where(canal > 0, canal, np.where(body < 1.0, codes["cortical_bone"],
                                                         elements(arch))).astype(np.uint8),
        "disc": np.where(canal > 0, canal, np.where(body < 1.0, codes["disc"], elements(arch))).astype(np.uint8),
    }


def _paint_spine(canvas: _Canvas, rng: np.random.Generator, f: _Frame, ribs: _Ribs) -> None:
    """Vertebrae repeating every level along z: bodies with cortical endplates, discs, and
    the posterior elements over the middle of each level."""
    grid = canvas.grid
    period = rng.uniform(28.0, 34.0) * f.s
    offset = rng.uniform(0.0, period)
    box = grid.box((grid.z[0], f.y_vb - f.vb[0] - 4, -60.0), (grid.z[-1], f.y_vb + f.vb[0] + 75, 60.0))
    if box is None:
        return
    sub = _Grid(grid.z, grid.y[box[1]], grid.x[box[2]])
    maps = {lumbar: _vertebra_maps(sub, f, lumbar) for lumbar in (True, False)}
    plate = 1.5 / period
    for k, zk in enumerate(grid.z):
        phase = ((zk - offset) / period) % 1.0
        level = maps[bool(zk < ribs.z12)]
        if phase < 0.22:
            name = "disc"
        elif phase < 0.22 + plate or phase > 1.0 - plate:
            name = "endplate"
        else:
            name = "body" if 0.45 < phase < 0.7 else ("spinous" if 0.3 < phase < 0.9 else "bare")
        region = canvas.tissue[k, box[1], box[2]]
        bone = level[name] > 0
        region[bone] = level[name][bone]


# ----------------------------------------------------------------------------- organs

_ONTO_TUBE = _codes("visceral_fat", "lung", "muscle")
_ONTO_HEART = _codes("visceral_fat", "lung")
_ONTO_LATE = _codes("visceral_fat", "liver", "gut_wall", "gut_fluid", "feces", "gas", "pancreas")


def _add_great_vessels_and_psoas(canvas: _Canvas, rng: np.random.Generator, f: _Frame) -> None:
    """Aorta (left of the midline, in front of the spine, curving back in the chest), the
    common iliac arteries below its bifurcation, both psoas muscles and the diaphragm crura."""
    yv, r = f.y_vb, rng.uniform(10.0, 13.0)
    aorta = _tube([(-215, yv - 28, 8), (-60, yv - 32, 10), (f.dome - 30, yv - 28, 13),
                   (f.dome + 30, yv - 14, 20), (f.dome + 300, yv - 10, 24)], [r, r, r, r * 1.1, r * 1.1])
    canvas.solid(aorta, [(1.0, "aorta")], _ONTO_TUBE)
    for side in (-1, 1):
        iliac = _tube([(-360, yv - 10, 8 + side * 60), (-210, yv - 28, 8 + side * 5)], r * 0.65)
        canvas.solid(iliac, [(1.0, "aorta")], _ONTO_TUBE)
        vb = f.vb[1]
        psoas = _tube([(-360, yv - 12, side * (vb + 32)), (-150, yv - 4, side * (vb + 18)),
                       (-40, yv, side * (vb + 6))], [(20, 24), (15, 17), (4, 5)])
        canvas.solid(psoas, [(1.0, "muscle")], _codes("visceral_fat"))
        crus = _tube([(-75, yv - 17, side * 15), (f.dome - 25, yv - 24, side * 20)], 5.0)
        canvas.solid(crus, [(1.0, "muscle")], _codes("visceral_fat"))


def _add_ivc(canvas: _Canvas, f: _Frame) -> None:
    """Inferior vena cava, right of the aorta, through the back of the liver into the heart."""
    yv = f.y_vb
    ivc = _tube([(-360, yv - 20, -25), (-60, yv - 25, -25), (-10, yv - 32, -28), (f.dome - 20, yv - 36, -24),
                 (f.dome + 25, yv - 48, -10)], [(9, 13), (10, 13), (11, 13), (12, 14), (12, 14)])
    canvas.solid(ivc, [(1.0, "ivc")], _codes("visceral_fat", "liver", "lung", "muscle"))


def _add_heart(canvas: _Canvas, rng: np.random.Generator, f: _Frame) -> None:
    """Heart resting on the diaphragm, front and left: myocardium around the blood pool."""
    size = f.a_c / 125.0 * rng.uniform(0.9, 1.1)
    heart = _ellipsoid((f.dome + 40.0, f.y_ant + 55.0, 25.0), (55 * size, 48 * size, 62 * size),
                       angle=rng.uniform(-0.7, -0.3))
    canvas.solid(heart, [(1.0, "myocardium"), ((1 - 11 / (48 * size)) ** 2, "heart_blood")], _ONTO_HEART, side=1)


def _add_spleen(canvas: _Canvas, rng: np.random.Generator, f: _Frame) -> None:
    """Spleen against the left posterolateral wall under the left dome, long axis along the ribs."""
    size = f.s * rng.uniform(0.8, 1.2)
    spleen = _ellipsoid((f.dome - 55.0, f.y_vb - 8.0, f.a_c - 40.0 * size), (50 * size, 42 * size, 22 * size),
                        angle=rng.uniform(0.55, 0.95), taper=0.3)
    field = _Field.sample(rng, 60.0)
    canvas.solid(spleen, [(1.0, "spleen")], _codes("visceral_fat"), field, rng.uniform(0.1, 0.25), side=-1)


def _add_kidney(canvas: _Canvas, rng: np.random.Generator, f: _Frame, side: int, onto: np.ndarray) -> None:
    """Kidney (side +1 left, -1 right): cortex shell, patchy medulla, sinus fat and pelvis
    opening to the hilum, which faces front and inwards; upper pole tilted inwards."""
    size = f.s * rng.uniform(0.9, 1.1)
    cz = (-40.0 if side > 0 else -58.0) * f.s + rng.uniform(-10, 10)
    kidney = _ellipsoid((cz, f.y_vb + 8.0, side * (f.vb[1] + 42.0 * size)), (55 * size, 24 * size, 29 * size),
                        angle=side * rng.uniform(0.4, 0.8), lean=(-10.0, side * 15.0))
    hilum = np.array([-0.8, -side * 1.0], np.float32) / np.float32(np.hypot(0.8, 1.0))  # (y, x)
    field = _Field.sample(rng, 18.0)
    for chunk, (z, y, x), r2 in canvas.shape_chunks(kidney):
        region = canvas.tissue[chunk]
        inside = (r2 < 1.0) & onto[region]
        centre = kidney.z, kidney.cy, kidney.cx
        dy = y - np.interp(z.ravel(), centre[0], centre[1]).astype(np.float32)[:, None, None]
        dx = x - np.interp(z.ravel(), centre[0], centre[2]).astype(np.float32)[:, None, None]
        towards = np.maximum(dy * hilum[0] + dx * hilum[1], 0.0) / np.float32(24 * size)
        middle = 1.0 - ((z - cz) / np.float32(55 * size)) ** 2 / 0.16  # > 0 in the middle 40 %
        core = r2 - 0.8 * towards  # the sinus bulges towards, and opens at, the hilum
        medulla = (r2 < 0.55) & (field(z, y, x) > -0.3)
        region[inside] = TISSUE_CODES["kidney_cortex"]
        region[inside & medulla] = TISSUE_CODES["kidney_medulla"]
        region[inside & (core < 0.25 * middle)] = TISSUE_CODES["visceral_fat"]
        region[inside & (core < 0.08 * middle)] = TISSUE_CODES["urine"]


def _add_stomach(canvas: _Canvas, rng: np.random.Generator, f: _Frame) -> None:
    """Stomach under the left dome: 4 mm wall, fluid with a gas cap on top (the patient lies supine)."""
    fill = f.s * rng.uniform(0.75, 1.15)
    semi = (60 * fill, 40 * fill, 45 * fill)
    centre = (f.dome - 70.0, f.y_ant + 45.0 * fill, 0.4 * f.a_c)
    stomach = _ellipsoid(centre, semi, angle=rng.uniform(0.0, 0.5), lean=(-10.0, -rng.uniform(25, 45)))
    inner = (1.0 - 4.0 / semi[1]) ** 2
    gas_level = centre[1] - semi[1] + rng.uniform(0.0, 0.9) * semi[1]
    field = _Field.sample(rng, 50.0)
    for chunk, (z, y, _), r2 in canvas.shape_chunks(stomach, field, 0.15):
        region = canvas.tissue[chunk]
        wall = (r2 < 1.0) & _ONTO_FAT[region] & canvas.side_of_dome(chunk, z, -1)
        lumen = wall & (r2 < inner)
        region[wall] = TISSUE_CODES["gut_wall"]
        region[lumen & (y < gas_level)] = TISSUE_CODES["gas"]
        region[lumen & (y >= gas_level)] = TISSUE_CODES["gut_fluid"]


def _porta(f: _Frame) -> np.ndarray:
    """The porta hepatis (z, y, x): where the portal vein enters the liver."""
    return np.array([-8.0 * f.sl, (f.y_ant + f.y_vb) / 2 + 5.0, -0.3 * f.a_c - 5.0])


def _add_pancreas_and_veins(canvas: _Canvas, rng: np.random.Generator, f: _Frame) -> None:
    """Pancreas from the head (right, by the duodenum) to the tail at the splenic hilum; the
    splenic vein behind it joins the portal vein, which runs up to the porta hepatis."""
    yv, jitter = f.y_vb, rng.uniform(-8, 8, (4, 3))
    path = np.array([(-45, yv - 42, -30), (-30, yv - 52, 0), (-20, yv - 42, 45),
                     (-5, yv - 12, 0.72 * f.a_c - 25)], dtype=float) + jitter
    radii = np.array([15.0, 10.0, 10.0, 8.0]) * rng.uniform(0.8, 1.1)
    onto = _codes("visceral_fat")
    for a, b, ra, rb in zip(path[:-1], path[1:], radii[:-1], radii[1:]):
        canvas.capsule(a, b, ra, rb, "pancreas", onto)
    behind = np.array([0.0, 11.0, 0.0])
    confluence = path[1] + np.array([-2.0, 12.0, -2.0])
    veins = _codes("visceral_fat", "pancreas")
    for a, b in zip(path[2:-1] + behind, path[3:] + behind):
        canvas.capsule(a, b, 4.5, 4.5, "portal_vein", veins)
    canvas.capsule(path[2] + behind, confluence, 4.5, 6.0, "portal_vein", veins)
    canvas.capsule(confluence, _porta(f), 7.0, 6.5, "portal_vein", veins)


def _gut_tube(canvas: _Canvas, rng: np.random.Generator, knots: np.ndarray, radius: float, wall: float,
              content: str) -> None:
    """A bowel segment through knots: wall first along the whole path, then the lumen, so
    consecutive segments join into one tube. Faeces get a few gas bubbles."""
    onto_wall, onto_lumen = _codes("visceral_fat"), _codes("gut_wall")
    canvas.polyline(knots, radius, "gut_wall", onto_wall)
    if radius - wall > 0.5:
        canvas.polyline(knots, radius - wall, content, onto_lumen)
    bubbles = rng.integers(2, 7) if content == "feces" else 0
    for _ in range(bubbles):
        seg = int(rng.integers(len(knots) - 1))
        at = knots[seg] + rng.random() * (knots[seg + 1] - knots[seg]) + rng.uniform(-0.4, 0.4, 3) * radius
        size = rng.uniform(2.0, 0.5 * radius)
        canvas.capsule(at, at + rng.uniform(-4, 4, 3), size, size, "gas", _codes("feces"))


def _wiggle(rng: np.random.Generator, knots: np.ndarray, amount: float) -> np.ndarray:
    """Jitter knots and add a jittered midpoint between each pair: tortuous, not straight."""
    knots = knots + rng.uniform(-amount, amount, knots.shape)
    mids = (knots[:-1] + knots[1:]) / 2 + rng.uniform(-amount, amount, (len(knots) - 1, 3))
    out = np.empty((2 * len(knots) - 1, 3))
    out[0::2], out[1::2] = knots, mids
    return out


def _add_bowel(canvas: _Canvas, rng: np.random.Generator, f: _Frame) -> None:
    """Colon around the periphery (hepatic and splenic flexures up by the liver and spleen),
    the duodenal C-loop around the pancreatic head, and small-bowel loops in the lower abdomen."""
    a, yv, ya = f.a_c, f.y_vb, f.y_ant
    colon = np.array([(-260, yv - 40, -0.65 * a), (-170, yv - 30, -0.72 * a), (-100, ya + 55, -0.62 * a),
                      (-115, ya + 32, -0.2 * a), (-120, ya + 32, 0.25 * a), (-40, yv - 45, 0.72 * a),
                      (-150, yv - 40, 0.78 * a), (-260, yv - 35, 0.72 * a), (-330, ya + 60, 0.3 * a)])
    _gut_tube(canvas, rng, _wiggle(rng, colon, 10.0), rng.uniform(16.0, 24.0), 3.0, "feces")
    duodenum = np.array([(-40, ya + 55, -5), (-50, yv - 42, -45), (-85, yv - 38, -48),
                         (-100, yv - 42, -5), (-90, yv - 44, 25)])
    _gut_tube(canvas, rng, _wiggle(rng, duodenum, 5.0), rng.uniform(9.0, 13.0), 2.5,
              "gas" if rng.random() < 0.3 else "gut_fluid")
    _add_mesenteric_vessels(canvas, f)
    regions = [((-330.0, ya + 20.0, -0.6 * a), (-70.0, yv - 25.0, 0.6 * a), rng.integers(20, 30)),
               ((-120.0, ya + 25.0, 0.1 * a), (-15.0, yv - 30.0, 0.7 * a), rng.integers(4, 8))]  # jejunum, LUQ
    for lo, hi, loops in regions:
        for _ in range(int(loops)):
            kind = rng.random()
            radius = rng.uniform(9.0, 15.0) if kind < 0.75 else rng.uniform(5.0, 7.0)
            content = "gas" if 0.6 <= kind < 0.72 else "gut_fluid"
            lo_, hi_ = np.array(lo), np.array(hi)
            walk = _random_walk(rng, lo_, np.maximum(hi_, lo_ + 10.0), int(rng.integers(8, 15)))
            _gut_tube(canvas, rng, walk, radius, 2.5, content)


def _add_mesenteric_vessels(canvas: _Canvas, f: _Frame) -> None:
    """Superior mesenteric artery and vein: the bright dots in the mesentery, SMV to the
    right of the SMA, joining the portal confluence behind the pancreatic neck."""
    yv, ya = f.y_vb, f.y_ant
    onto = _codes("visceral_fat")
    artery = np.array([(-45, yv - 36, 10), (-70, yv - 58, 8), (-160, ya + 55, -5), (-260, ya + 50, -25)])
    vein = np.array([(-260, ya + 48, -40), (-160, ya + 52, -22), (-70, yv - 60, -12), (-32, yv - 42, -2)])
    for a, b in zip(artery[:-1], artery[1:]):
        canvas.capsule(a, b, 4.0, 3.5, "aorta", onto)
    for a, b in zip(vein[:-1], vein[1:]):
        canvas.capsule(a, b, 4.0, 5.5, "portal_vein", onto)


def _random_walk(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, steps: int) -> np.ndarray:
    """A persistent random walk of ~25 mm steps that bounces off the box [lo, hi]."""
    points = [rng.uniform(lo, hi)]
    heading = rng.standard_normal(3)
    for _ in range(steps):
        heading = heading / np.linalg.norm(heading) + 0.8 * rng.standard_normal(3)
        step = points[-1] + heading / np.linalg.norm(heading) * rng.uniform(20.0, 30.0)
        heading = np.where((step < lo) | (step > hi), -heading, heading)
        points.append(np.clip(step, lo, hi))
    return np.array(points)


# ----------------------------------------------------------------------------- liver

def _liver_lobes(rng: np.random.Generator, f: _Frame) -> list[_Stack]:
    """Right lobe (large, lateral, tapering and drifting forward-outward inferiorly), the
    medial segment/caudate, and a flat left lobe crossing the midline in front. Widths
    follow the cavity (a small trunk has a small liver), heights the liver size factor."""
    sl, back = f.sl, f.y_vb + 30.0
    kx, ky = sl * f.a_c / 125.0, (f.y_vb - f.y_ant) / 115.0
    half_ap, yc = (back - f.y_ant) / 2 + 5.0, (back + f.y_ant) / 2
    # the right lobe reaches above the dome on purpose: the diaphragm clips it, so the
    # liver's top follows the diaphragm as in life
    right = _ellipsoid((25 * sl, yc, -f.a_c + 66 * kx), (115 * sl, half_ap, 70 * kx), angle=rng.uniform(0.2, 0.4),
                       taper=rng.uniform(0.35, 0.6), lean=(-rng.uniform(5, 25), -rng.uniform(0, 20)))
    medial = _ellipsoid((20 * sl, yc - 15.0, -25.0 * kx), (70 * sl, 0.65 * half_ap, 42 * kx), taper=0.6)
    left = _ellipsoid((40 * sl, f.y_ant + 30 * ky, 12.0 * kx), (45 * sl, 30 * ky, 70 * kx * rng.uniform(0.7, 1.2)),
                      angle=rng.uniform(0.05, 0.35), taper=0.5)
    return [right, medial, left]


def _midline_penalty(f: _Frame, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Grows smoothly past the right edge of the prevertebral region (IVC, crura, aorta,
    spine), so the liver's bare area stays to the right of the IVC with a rounded border."""
    across = np.maximum(x + (f.vb[1] + 18.0), 0.0) / 40.0
    back = np.clip((y - (f.y_vb - f.vb[0] - 50.0)) / 40.0, 0.0, 1.0)
    return (2.0 * across ** 2 * back).astype(np.float32)


def _add_liver(canvas: _Canvas, rng: np.random.Generator, f: _Frame) -> tuple[np.ndarray, np.ndarray]:
    """Paint the liver; returns its mm bounding box (lo, hi) in (z, y, x)."""
    lobes = _liver_lobes(rng, f)
    coarse, fine = _Field.sample(rng, 110.0), _Field.sample(rng, 40.0)
    amp_coarse, amp_fine = rng.uniform(0.08, 0.18), rng.uniform(0.03, 0.06)
    bounds = [lobe.bounds(pad=20.0) for lobe in lobes]
    lo, hi = np.min([b[0] for b in bounds], axis=0), np.max([b[1] for b in bounds], axis=0)
    box = canvas.grid.box(lo, hi)
    if box is not None:
        _, y, x = canvas.grid.coords(box)
        planes = coarse.plane(y, x) * np.float32(amp_coarse), fine.plane(y, x) * np.float32(amp_fine)
        penalty = _midline_penalty(f, y, x)
        for chunk in canvas.grid.chunks(box):
            z = canvas.grid.coords(chunk)[0]
            r2 = lobes[0].rho2(z, y, x)
            for lobe in lobes[1:]:
                r2 = _smin(r2, lobe.rho2(z, y, x), 0.35)
            r2 += coarse.at(planes[0], z)
            r2 += fine.at(planes[1], z)
            r2 += penalty
            canvas.paint(chunk, (r2 < 1.0) & canvas.side_of_dome(chunk, z, -1), "liver", _ONTO_SOFT)
    return lo, hi


def _add_gallbladder(canvas: _Canvas, rng: np.random.Generator, f: _Frame) -> None:
    """Gallbladder in its fossa under the liver, fundus forward and down (absent in 15 %)."""
    semi = (rng.uniform(30, 45), rng.uniform(12, 18), rng.uniform(13, 20))
    centre = (-45.0 * f.sl + rng.uniform(-10, 10), f.y_ant + rng.uniform(30, 45), -0.35 * f.a_c + rng.uniform(-10, 10))
    gallbladder = _ellipsoid(centre, semi, angle=rng.uniform(-0.4, 0.4), lean=(-15.0, 0.0))
    if rng.random() < 0.85:
        canvas.solid(gallbladder, [(1.0, "gut_wall"), ((1 - 2.5 / semi[1]) ** 2, "bile")], _ONTO_LATE)


def _vessel_tree(rng: np.random.Generator, root: np.ndarray, target: np.ndarray, radius: float,
                 min_radius: float = 0.7, generations: int = 6) -> tuple[np.ndarray, ...]:
    """Segments (starts, ends, start radii, end radii) of a bifurcating tree: a trunk 40 %
    of the way from root to target, then generations of branches that split in two thinner
    ones deflected 20-45 degrees apart, drifting towards the target. Vectorised per
    generation: a tree has a few hundred segments."""
    trunk_end = root + 0.4 * (target - root)
    parts = [(root[None], trunk_end[None], np.array([radius]), np.array([0.9 * radius]))]
    starts, heads, r = trunk_end[None], _units((target - root)[None]), np.array([0.9 * radius])
    for _ in range(generations):
        if not len(r):
            break
        side = _units(np.cross(heads, rng.standard_normal(heads.shape)))
        pull = 0.3 * _units(target - starts)
        angle = rng.uniform(0.35, 0.8, (2, len(r), 1))
        grow = [(rng.uniform(0.72, 0.88, len(r)), rng.uniform(5.0, 9.0, len(r))) for _ in range(2)]
        children = []
        for sign, turn, (ratio, aspect) in zip((1.0, -1.0), angle, grow):
            heading = _units(np.cos(turn) * heads + sign * np.sin(turn) * side + pull)
            child_r = r * ratio
            ends = starts + heading * (aspect * child_r + 6.0)[:, None]
            parts.append((starts, ends, child_r, 0.92 * child_r))
            keep = 0.92 * child_r > min_radius
            children.append((ends[keep], heading[keep], 0.92 * child_r[keep]))
        starts, heads, r = (np.concatenate(c) for c in zip(*children))
    return tuple(np.concatenate(c) for c in zip(*parts))


def _units(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)


def _add_liver_vessels(canvas: _Canvas, rng: np.random.Generator, f: _Frame) -> None:
    """Portal branches from the porta (right posterior, right anterior, left, caudate) and
    the right, middle and left hepatic veins from the IVC at the dome, painted only inside
    the liver (so they are labelled liver, as in LiTS)."""
    porta, sl, a = _porta(f), f.sl, f.a_c
    yc = (f.y_ant + f.y_vb) / 2
    confluence = np.array([f.dome - 20.0, f.y_vb - 36.0, -22.0])
    trees = [
        ("portal_branch", porta, (0.0, f.y_vb + 10, -a + 40), 5.5),
        ("portal_branch", porta, (20 * sl, f.y_ant + 40, -a + 60), 5.0),
        ("portal_branch", porta, (35 * sl, f.y_ant + 25, 30.0), 5.0),
        ("portal_branch", porta, (30 * sl, yc, -15.0), 3.5),
        ("hepatic_vein", confluence, (-40 * sl, yc + 15, -a + 40), 6.0),
        ("hepatic_vein", confluence, (-40 * sl, f.y_ant + 35, -40.0), 5.0),
        ("hepatic_vein", confluence, (30 * sl, f.y_ant + 25, 35.0), 4.5),
    ]
    # branches much thinner than a pixel would almost never cover a voxel centre: skip them
    thinnest = 0.25 * float(canvas.grid.x[1] - canvas.grid.x[0])
    for code, root, target, radius in trees:
        for start, end, ra, rb in zip(*_vessel_tree(rng, root, np.array(target), radius)):
            if ra >= thinnest:
                canvas.capsule(start, end, float(ra), float(rb), code, _ONTO_LIVER)


def _paint_anatomy(canvas: _Canvas, rng: np.random.Generator, f: _Frame) -> tuple[np.ndarray, np.ndarray]:
    """Everything but the lesions, in painting order (later organs indent earlier ones
    only where their `onto` codes allow). Returns the liver's mm bounding box."""
    ribs = _sample_ribs(rng, f)
    _paint_body(canvas, f, ribs)
    _paint_table(canvas, rng, f)
    _add_trunk_muscles(canvas, rng, f)
    _paint_spine(canvas, rng, f, ribs)
    _add_great_vessels_and_psoas(canvas, rng, f)
    _add_heart(canvas, rng, f)
    _add_spleen(canvas, rng, f)
    _add_kidney(canvas, rng, f, +1, _codes("visceral_fat"))
    _add_stomach(canvas, rng, f)
    _add_pancreas_and_veins(canvas, rng, f)
    _add_bowel(canvas, rng, f)
    liver_box = _add_liver(canvas, rng, f)
    _add_kidney(canvas, rng, f, -1, _ONTO_LATE)
    _add_gallbladder(canvas, rng, f)
    _add_ivc(canvas, f)
    _add_liver_vessels(canvas, rng, f)
    return liver_box


# ----------------------------------------------------------------------------- lesions

@dataclass(frozen=True)
class _Lesion:
    centre: np.ndarray  # (z, y, x) mm
    diameter: float  # nominal, mm
    axes: np.ndarray  # relative semi-axes (z, y, x)
    contrast: float  # HU relative to the liver (negative: hypodense)
    rim: float | None  # HU relative to the liver of an enhancing rim
    core: float | None  # HU relative to the liver of a necrotic centre
    edge: float  # fraction of the radius over which the margin fades into the liver
    irregularity: float  # amplitude of the boundary perturbation (fraction of the radius)
    shape: _Field
    texture: _Field
    texture_hu: float


def _sample_lesion(rng: np.random.Generator, centre: np.ndarray) -> _Lesion:
    diameter = float(np.exp(rng.uniform(np.log(3.0), np.log(60.0))))  # log-uniform: more small ones
    hyper = rng.random() < 0.08
    contrast = rng.uniform(15, 35) if hyper else -rng.uniform(20, 70)
    rim = rng.uniform(-5, 30) if rng.random() < 0.3 else None
    core = -rng.uniform(60, 100) if diameter > 25 and rng.random() < 0.5 else None
    return _Lesion(centre=centre, diameter=diameter, axes=rng.uniform(0.8, 1.2, 3), contrast=contrast,
                   rim=rim, core=core, edge=rng.uniform(0.0, 0.35), irregularity=rng.uniform(0.05, 0.25),
                   shape=_Field.sample(rng, max(diameter, 8.0)), texture=_Field.sample(rng, 6.0),
                   texture_hu=rng.uniform(2.0, 8.0))


def _sample_lesions(rng: np.random.Generator, canvas: _Canvas, liver_box: tuple[np.ndarray, np.ndarray]
                    ) -> list[_Lesion]:
    """0 lesions in ~22 % of cases, else a geometric count (1, 2, 3, ... up to 10) placed at
    random points of the liver that lie in the scanned range."""
    params, places = rng.spawn(2)  # positions depend on the grid; sizes and kinds must not
    if params.random() < 0.22:
        return []
    lesions = []
    for _ in range(min(int(params.geometric(0.4)), 10)):
        centre = _point_in_liver(places, canvas, liver_box)
        lesion = _sample_lesion(params, centre if centre is not None else np.zeros(3))
        if centre is not None:
            lesions.append(lesion)
    return lesions


def _point_in_liver(rng: np.random.Generator, canvas: _Canvas, liver_box: tuple[np.ndarray, np.ndarray]
                    ) -> np.ndarray | None:
    grid = canvas.grid
    axes = (grid.z, grid.y, grid.x)
    lo = np.maximum(liver_box[0], [a[0] for a in axes])
    hi = np.minimum(liver_box[1], [a[-1] for a in axes])
    if np.any(hi < lo):
        return None
    for _ in range(20):
        points = rng.uniform(lo, hi, (64, 3))
        index = tuple(np.clip(np.rint((points[:, i] - a[0]) / max(float(a[-1] - a[0]), 1e-6) * (len(a) - 1)),
                              0, len(a) - 1).astype(int) for i, a in enumerate(axes))
        hits = np.flatnonzero(_IN_LIVER[canvas.tissue[index]])
        if hits.size:
            return points[hits[0]]
    return None


_Patch = tuple[int, slice, slice, np.ndarray, np.ndarray]  # row, rows/cols of the plane, mask, HU


def _paint_lesion(canvas: _Canvas, lesion: _Lesion, liver_hu: float) -> list[_Patch]:
    """Mark the lesion's voxels inside the liver with the 'lesion' code; return their HU as
    per-slice patches for :func:`_render_hu`."""
    radius = lesion.diameter / 2 * lesion.axes
    extent = radius.max() * (1.0 + 2 * lesion.irregularity) + 1.0
    box = canvas.grid.box(lesion.centre - extent, lesion.centre + extent)
    patches: list[_Patch] = []
    for chunk in canvas.grid.chunks(box) if box is not None else ():
        z, y, x = canvas.grid.coords(chunk)
        c = lesion.centre.astype(np.float32)
        rho = np.sqrt(((z - c[0]) / radius[0]) ** 2 + ((y - c[1]) / radius[1]) ** 2 + ((x - c[2]) / radius[2]) ** 2)
        rho += np.float32(lesion.irregularity) * lesion.shape(z, y, x)
        region = canvas.tissue[chunk]
        inside = (rho < 1.0) & _IN_LIVER[region]
        target = np.full(rho.shape, lesion.contrast, np.float32)
        if lesion.core is not None:
            target[rho < 0.5] = lesion.core
        if lesion.rim is not None:
            target[rho > 0.75] = lesion.rim
        weight = 0.35 + 0.65 * np.clip((1.0 - rho) / max(lesion.edge, 1e-3), 0.0, 1.0)  # soft margins
        values = liver_hu + target * weight + lesion.texture_hu * lesion.texture(z, y, x)
        region[inside] = TISSUE_CODES["lesion"]
        patches += [(chunk[0].start + k, chunk[1], chunk[2], inside[k], values[k])
                    for k in range(inside.shape[0]) if inside[k].any()]
    return patches


# ----------------------------------------------------------------------------- image formation

_LABELS = np.zeros(256, dtype=np.uint8)
_LABELS[[TISSUE_CODES[n] for n in LIVER_TISSUES]] = 1
_LABELS[TISSUE_CODES["lesion"]] = 2


@dataclass(frozen=True)
class _Imaging:
    """Noise level and blur kernels of one case."""

    noise_sd: float  # HU, of the final (blurred) noise
    kz: np.ndarray  # symmetric taps along z and in-plane (centre first)
    kp: np.ndarray

    @property
    def gain(self) -> np.float32:
        """Scale of uniform(-0.5, 0.5) white noise that has ``noise_sd`` after blurring."""
        energy = [k[0] ** 2 + 2 * (k[1:] ** 2).sum() for k in (self.kz, self.kp, self.kp)]
        return np.float32(self.noise_sd * np.sqrt(12.0) / np.sqrt(np.prod(energy)))


def _sample_imaging(rng: np.random.Generator) -> _Imaging:
    sigma = rng.uniform(0.5, 1.0)  # in-plane partial volume and reconstruction kernel, pixels
    return _Imaging(noise_sd=float(rng.uniform(10.0, 25.0)), kz=_gauss_taps(0.45, 1),
                    kp=_gauss_taps(sigma, 1 if sigma <= 0.6 else 2))


def _hu_blocks(canvas: _Canvas, lut: np.ndarray, rng: np.random.Generator, liver_box: tuple[np.ndarray, np.ndarray],
               patches: Sequence[_Patch], gain: np.float32) -> Iterator[np.ndarray]:
    """Consecutive z-blocks of the unblurred image: mean HU per tissue, a faint low-frequency
    texture in the liver parenchyma, the lesions' own HU, and white noise (blurred later,
    so it ends up correlated). Blocks, not one volume: a float32 volume costs more to
    allocate than to compute."""
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
        noise = rng.random(h.shape, dtype=np.float32)
        noise -= np.float32(0.5)
        noise *= gain
        h += noise
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


def _acquire(blocks: Iterator[np.ndarray], imaging: _Imaging, shape: tuple[int, int, int]) -> np.ndarray:
    """Blur image and noise together (partial volume along z and in-plane, and the noise
    correlation of a smooth reconstruction kernel); round and clip to int16."""
    out = np.empty(shape, dtype=np.int16)
    for row, image in _z_blurred(blocks, imaging.kz):
        image = _blur_axis(_blur_axis(image, imaging.kp, 1), imaging.kp, 2)
        np.rint(image, out=image)
        out[row:row + len(image)] = np.clip(image, -1024, 3071)
    return out


# ----------------------------------------------------------------------------- public API

def _check_args(size: int, slices: tuple[int, int]) -> None:
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    if not 1 <= slices[0] <= slices[1]:
        raise ValueError(f"slices must be (min, max) with 1 <= min <= max, got {slices}")


def _to_storage(scan: _Scan, *canonical: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The LiTS-like affine and the arrays flipped/permuted from (z, row, col) into storage order."""
    affine, _ = affine_for(scan.shape, scan.spacing, scan.axcodes, scan.origin)
    transform = ornt.ornt_transform(ornt.axcodes2ornt(CANONICAL_AXCODES), ornt.axcodes2ornt(scan.axcodes))
    return affine, [ornt.apply_orientation(a, transform) for a in canonical]


@dataclass(frozen=True)
class _Case:
    """A synthesised case in the canonical (z, row, col) frame, before storage."""

    scan: _Scan
    volume: np.ndarray  # int16
    tissue: np.ndarray  # uint8 codes
    lesions: list[_Lesion]
    liver_hu: float
    noise_sd: float


def _synthesise(case_index: int, seed: int, size: int, slices: tuple[int, int]) -> _Case:
    # independent streams: lesion placement may draw a grid-dependent number of samples
    # without shifting the anatomy, and the anatomy does not depend on ``size``
    scan_rng, anatomy_rng, lesion_rng, image_rng = np.random.default_rng([seed, case_index]).spawn(4)
    scan = _sample_scan(scan_rng, size, slices)
    frame = _sample_frame(anatomy_rng, scan)
    grid = _grid_for(scan)
    canvas = _Canvas(grid, frame.dome_height(grid.y[:, None], grid.x[None, :]))
    liver_box = _paint_anatomy(canvas, anatomy_rng, frame)
    lut = _sample_hu(image_rng)
    imaging = _sample_imaging(image_rng)
    liver_hu = float(lut[TISSUE_CODES["liver"]])
    lesions = _sample_lesions(lesion_rng, canvas, liver_box)
    patches = [patch for lesion in lesions for patch in _paint_lesion(canvas, lesion, liver_hu)]
    volume = _acquire(_hu_blocks(canvas, lut, image_rng, liver_box, patches, imaging.gain), imaging, grid.shape)
    return _Case(scan, volume, canvas.tissue, lesions, liver_hu, imaging.noise_sd)


def make_phantom(case_index: int, seed: int = 0, size: int = 512,
                 slices: tuple[int, int] = (80, 200)) -> Phantom:
    """Synthesise case ``case_index`` of the phantom set ``seed``: a size x size x N volume
    (N uniform in ``slices``, inclusive) stored like a LiTS NIfTI file.

    Deterministic in (seed, case_index, size, slices); the anatomy and the lesion sizes
    do not depend on ``size`` (smaller matrices only see them more coarsely).
    """
    _check_args(size, slices)
    case = _synthesise(case_index, seed, size, slices)
    affine, (volume, label, tissue) = _to_storage(case.scan, case.volume, _LABELS[case.tissue], case.tissue)
    return Phantom(volume=volume, label=label, affine=affine, tissue=tissue, spacing=case.scan.spacing,
                   axcodes=case.scan.axcodes,
                   lesion_diameters_mm=tuple(round(lesion.diameter, 2) for lesion in case.lesions),
                   liver_hu=case.liver_hu, noise_sd=case.noise_sd)


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write a .nii.gz via a temporary file in the same folder and os.replace: readers
    never see a half-written file. The gzip header holds no name (it would be the
    temporary one, with the writer's pid) and mtime 0, so reruns write identical bytes."""
    image = nib.Nifti1Image(array, affine)
    image.set_data_dtype(array.dtype)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=1,
                                                        mtime=0) as gz:
            gz.write(image.to_bytes())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_phantom_case(out: Path, i: int, seed: int, size: int, slices: tuple[int, int]) -> list[Path]:
    """Write case ``i`` (volume then segmentation); the unit of work of :func:`write_phantoms`."""
    case = make_phantom(i, seed=seed, size=size, slices=slices)
    return [_write_nifti(out / f"volume-{i}.nii.gz", case.volume, case.affine),
            _write_nifti(out / f"segmentation-{i}.nii.gz", case.label, case.affine)]


def write_phantoms(out_dir: Path, cases: int, seed: int = 0, size: int = 512,
                   slices: tuple[int, int] = (80, 200),
                   on_case: Callable[[int], None] | None = None, workers: int = 1) -> list[Path]:
    """Write ``volume-{i}.nii.gz`` (int16) and ``segmentation-{i}.nii.gz`` (uint8) for
    i in 0..cases-1 into ``out_dir`` (created if needed), LiTS layout, in ``workers``
    processes (each case depends only on (seed, i), so the files do not depend on it).
    Returns the paths written, volume then segmentation for each case, in case order;
    calls ``on_case(i)`` after each case."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    job = functools.partial(write_phantom_case, out, seed=seed, size=size, slices=slices)
    done: dict[int, list[Path]] = {}
    if workers <= 1:
        for i in range(cases):
            done[i] = job(i)
            if on_case is not None:
                on_case(i)
    else:
        with ProcessPoolExecutor(workers) as pool:
            futures = {pool.submit(job, i): i for i in range(cases)}
            for future in as_completed(futures):
                done[futures[future]] = future.result()
                if on_case is not None:
                    on_case(futures[future])
    return [path for i in range(cases) for path in done[i]]
