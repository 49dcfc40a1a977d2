"""Shapes in mm and the tissue canvas they are painted on: voxel grid, smooth random
fields, stacks of ellipses, capsules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .tissues import TISSUE_CODES


_CHUNK_VOXELS = 1 << 20  # work in z-chunks of about this many voxels: cache-sized temporaries


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
