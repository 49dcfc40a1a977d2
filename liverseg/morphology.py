"""Voxel geometry shared by postprocessing and scoring: bounding boxes, surfaces, and
binary morphology by ellipsoids in mm. Pure numpy/cc3d (no torch).

Boxes are what make whole volumes fast: a liver fills a few percent of a CT, so every
step works inside the box of its mask (``bounding_box``), and a speck far away is
split off into a box of its own (``separate_boxes``) instead of growing the liver's.
"""

from __future__ import annotations

from collections.abc import Sequence

import cc3d
import numpy as np

Box = tuple[slice, slice, slice]
Spacing = Sequence[float]


# --------------------------------------------------------------------------- boxes

def bounding_box(mask: np.ndarray, margin: int | Sequence[int] = 0) -> Box | None:
    """Slices of the smallest box holding every nonzero voxel, grown by ``margin`` voxels
    per axis and clipped to the array; None for an all-zero array.

    Two max-reductions at memory speed, not an argwhere; views are not copied.
    """
    a = mask.view(np.uint8) if mask.dtype == bool else mask
    z = np.flatnonzero(a.max(axis=(1, 2)))
    if z.size == 0:
        return None
    plane = a[z[0]:z[-1] + 1].max(axis=0)
    y, x = np.flatnonzero(plane.max(axis=1)), np.flatnonzero(plane.max(axis=0))
    margins = np.broadcast_to(np.asarray(margin, dtype=int), (3,))
    return tuple(slice(max(int(v[0]) - m, 0), min(int(v[-1]) + 1 + m, n))
                 for v, m, n in zip((z, y, x), margins, a.shape))


def union_box(*boxes: Box | None) -> Box | None:
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    return tuple(slice(min(b[i].start for b in boxes), max(b[i].stop for b in boxes)) for i in range(3))


def _projections(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which z, y and x indices of ``a`` hold a nonzero voxel (two passes, as bounding_box)."""
    z = a.max(axis=(1, 2))
    plane = a.max(axis=0)
    return z, plane.max(axis=1), plane.max(axis=0)


def separate_boxes(labels: np.ndarray) -> list[Box]:
    """Tight boxes of the nonzero voxels of ``labels``, split wherever a plane of zeros
    separates them: a 26-connected component never crosses such a plane, so each box can
    be labelled alone (a speck far from the liver no longer makes the liver's box huge)."""
    first = bounding_box(labels)
    done, todo = [], [first] if first is not None else []
    while todo:
        box = todo.pop()
        for axis, occupied in enumerate(_projections(labels[box])):
            index = np.flatnonzero(occupied)
            cuts = np.flatnonzero(np.diff(index) > 1)
            if cuts.size:
                starts, stops = index[np.r_[0, cuts + 1]], index[np.r_[cuts, index.size - 1]] + 1
                for lo, hi in zip(starts, stops):
                    part = list(box)
                    part[axis] = slice(box[axis].start + int(lo), box[axis].start + int(hi))
                    inner = bounding_box(labels[tuple(part)])
                    todo.append(tuple(slice(p.start + i.start, p.start + i.stop)
                                      for p, i in zip(part, inner)))
                break
        else:
            done.append(box)
    return done


# --------------------------------------------------------------------------- surfaces

def neighbour_offsets(connectivity: int) -> list[tuple[int, int, int]]:
    """The 6, 18 or 26 voxel offsets of that 3D neighbourhood: faces; faces and edges (a
    3 × 3 × 3 cube without its 8 corners); faces, edges and corners."""
    reach = {6: 1, 18: 2, 26: 3}
    if connectivity not in reach:
        raise ValueError(f"connectivity must be 6, 18 or 26, not {connectivity}")
    return [(dz, dy, dx) for dz in (-1, 0, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
            if 0 < abs(dz) + abs(dy) + abs(dx) <= reach[connectivity]]


def surface(mask: np.ndarray, connectivity: int = 6) -> np.ndarray:
    """Voxels of ``mask`` with a neighbour outside it (6-neighbours by default; 18 or 26):
    the mask minus its erosion by that neighbourhood. Voxels on the array border are
    surface (the outside counts as background), as with MONAI's get_mask_edges, medpy and
    scipy's binary_erosion."""
    interior = np.zeros_like(mask)
    core = (slice(1, -1),) * 3
    inner = interior[core]
    np.copyto(inner, mask[core])
    n = mask.shape
    for offset in neighbour_offsets(connectivity):
        inner &= mask[tuple(slice(1 + d, k - 1 + d) for d, k in zip(offset, n))]
    return mask & ~interior


# --------------------------------------------------------------------------- morphology

def ellipsoid(radius_mm: float, spacing: Spacing) -> np.ndarray:
    """(n, 3) integer offsets (z, y, x) of the voxels within ``radius_mm`` of the centre."""
    sp = np.asarray(spacing, dtype=float)
    reach = np.floor(radius_mm / sp + 1e-9).astype(int)
    grid = np.stack(np.meshgrid(*(np.arange(-r, r + 1) for r in reach), indexing="ij"), -1).reshape(-1, 3)
    inside = ((grid * sp) ** 2).sum(axis=1) <= radius_mm ** 2 + 1e-9
    return grid[inside]


def _or_shifted(out: np.ndarray, src: np.ndarray, axis: int, k: int) -> None:
    """out |= src moved by k voxels along axis (what moves past the edge is dropped)."""
    if k == 0:
        out |= src
        return
    to, fro = [slice(None)] * 3, [slice(None)] * 3
    to[axis], fro[axis] = (slice(k, None), slice(None, -k)) if k > 0 else (slice(None, k), slice(-k, None))
    out[tuple(to)] |= src[tuple(fro)]


def _dilate_x(mask: np.ndarray, widths: set[int]) -> dict[int, np.ndarray]:
    """mask dilated along x by [-w, w] for each w in widths, each grown from the last."""
    out, current = {0: mask}, mask
    for w in range(1, max(widths) + 1):
        grown = current.copy()
        _or_shifted(grown, mask, 2, w)
        _or_shifted(grown, mask, 2, -w)
        out[w] = current = grown
    return out


def dilate(mask: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Binary dilation by a symmetric ellipsoid given by its offsets, as ORs of shifted
    copies: x runs once per half-width, each (y) row once per distinct plane, each plane
    once per z. Voxels outside the array count as background; pad before calling."""
    rows: dict[int, dict[int, int]] = {}  # z → {y: half-width of the x run}
    for dz, dy, dx in offsets.tolist():
        plane = rows.setdefault(dz, {})
        plane[dy] = max(plane.get(dy, 0), abs(dx))
    by_width = _dilate_x(mask, {w for plane in rows.values() for w in plane.values()})
    planes: dict[tuple, np.ndarray] = {}
    out = np.zeros_like(mask)
    for dz, plane in rows.items():
        key = tuple(sorted(plane.items()))
        if key not in planes:
            planes[key] = np.zeros_like(mask)
            for dy, w in plane.items():
                _or_shifted(planes[key], by_width[w], 1, dy)
        _or_shifted(out, planes[key], 0, dz)
    return out


def erode(mask: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Binary erosion by a symmetric ellipsoid (outside the array counts as foreground)."""
    return ~dilate(~mask, offsets)


def padded(mask: np.ndarray, reach: np.ndarray) -> np.ndarray:
    """mask padded by ``reach`` voxels per axis, repeating its faces: an organ cut by the
    array border is taken to go on past it. A face inside the volume is zero (boxes keep a
    one-voxel margin), so there this is zero padding."""
    return np.pad(mask, [(int(r), int(r)) for r in reach], mode="edge")


def unpad(mask: np.ndarray, reach: np.ndarray) -> np.ndarray:
    return mask[tuple(slice(int(r), mask.shape[i] - int(r)) for i, r in enumerate(reach))]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """mask with its holes filled: background (6-connected) not reaching the array faces."""
    background, n = cc3d.connected_components(~mask, connectivity=6, return_N=True)
    hole = np.ones(n + 1, bool)
    hole[0] = False
    for face in _faces(background):
        hole[face] = False
    return mask | hole[background]


def _faces(a: np.ndarray) -> list[np.ndarray]:
    return [a[0], a[-1], a[:, 0], a[:, -1], a[:, :, 0], a[:, :, -1]]
