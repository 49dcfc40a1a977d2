"""The liver, its vessels and gallbladder, and the lesions painted into it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .tissues import TISSUE_CODES, _IN_LIVER, _ONTO_LIVER, _ONTO_SOFT
from .geometry import _Canvas, _Field, _Stack, _ellipsoid, _smin
from .body import _Frame, _ONTO_LATE, _RIGHT_LOBE_Z, _porta


def _liver_lobes(rng: np.random.Generator, f: _Frame) -> list[_Stack]:
    """Right lobe (large, lateral, tapering and drifting forward-outward inferiorly), the
    medial segment/caudate, and a flat left lobe crossing the midline in front. Widths
    follow the cavity (a small trunk has a small liver), heights the liver size factor."""
    sl, back = f.sl, f.y_vb + 30.0
    kx, ky = sl * f.a_c / 125.0, (f.y_vb - f.y_ant) / 115.0
    half_ap, yc = (back - f.y_ant) / 2 + 5.0, (back + f.y_ant) / 2
    # the right lobe reaches above the dome on purpose: the diaphragm clips it, so the
    # liver's top follows the diaphragm as in life
    right = _ellipsoid((_RIGHT_LOBE_Z[0] * sl, yc, -f.a_c + 66 * kx), (_RIGHT_LOBE_Z[1] * sl, half_ap, 70 * kx),
                       angle=rng.uniform(0.2, 0.4),
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


# ----------------------------------------------------------------------------- lesions

# Lesion statistics: targets and sources in docs/PHANTOMS.md ("Lesions").
_TUMOUR_FREE = 0.10  # LiTS: 13 of 131 training volumes
# 1 + negative binomial, mean 9: many cases with 1-3, some with 20+ (the smallest are lost
# between thick slices, so fewer are measured)
_COUNT_SHAPE, _COUNT_MEAN = 0.7, 9.0
_MAX_LESIONS = 60
_DOMINANT = 0.25  # tumour cases with one large primary-like mass (HCC, large metastasis)
_DOMINANT_MM = (40.0, 120.0)  # its diameter, log-uniform
_SATELLITE_MM = (16.0, 0.7, 3.0, 60.0)  # others: log-normal median, sigma (log), clipped to min, max
_HYPERDENSE = 0.10  # hypervascular lesions still brighter than the liver at the portal-venous phase
_HYPO_HU, _HYPER_HU = (45.0, 110.0), (30.0, 70.0)  # |lesion - liver|
_NECROTIC = (15.0, 0.7)  # lesions above 15 mm get a necrotic/cystic core in 70 %
_NECROSIS_HU = (5.0, 40.0)  # fluid to necrotic debris
_RIM, _RIM_HU = 0.3, (-15.0, 25.0)  # an enhancing rim, HU relative to the liver


@dataclass(frozen=True)
class _Lesion:
    centre: np.ndarray  # (z, y, x) mm
    diameter: float  # nominal, mm
    axes: np.ndarray  # relative semi-axes (z, y, x)
    contrast: float  # HU relative to the liver (negative: hypodense)
    rim: float | None  # HU relative to the liver of an enhancing rim
    rim_from: float  # normalised radius where the rim starts
    core: float | None  # HU (absolute: fluid or debris) of a necrotic centre
    core_to: float  # normalised radius of the necrotic centre
    edge: float  # fraction of the radius over which the margin fades into the liver
    irregularity: float  # amplitude of the boundary perturbation (fraction of the radius)
    shape: _Field
    texture: _Field
    texture_hu: float


def _lesion_diameter(rng: np.random.Generator, dominant: bool) -> float:
    if dominant:
        return float(np.exp(rng.uniform(*np.log(_DOMINANT_MM))))
    median, sigma, low, high = _SATELLITE_MM
    return float(np.clip(median * np.exp(sigma * rng.standard_normal()), low, high))


def _sample_lesion(rng: np.random.Generator, centre: np.ndarray, diameter: float) -> _Lesion:
    hyper = rng.random() < _HYPERDENSE
    contrast = rng.uniform(*_HYPER_HU) if hyper else -rng.uniform(*_HYPO_HU)
    rim = rng.uniform(*_RIM_HU) if not hyper and rng.random() < _RIM else None
    necrotic = diameter > _NECROTIC[0] and rng.random() < _NECROTIC[1]
    core = rng.uniform(*_NECROSIS_HU) if necrotic else None
    return _Lesion(centre=centre, diameter=diameter, axes=rng.uniform(0.8, 1.2, 3), contrast=contrast,
                   rim=rim, rim_from=rng.uniform(0.82, 0.9), core=core, core_to=rng.uniform(0.6, 0.8),
                   edge=rng.uniform(0.0, 0.3), irregularity=rng.uniform(0.05, 0.25),
                   shape=_Field.sample(rng, max(diameter, 8.0)), texture=_Field.sample(rng, 6.0),
                   texture_hu=rng.uniform(2.0, 8.0))


def _lesion_count(rng: np.random.Generator) -> int:
    if rng.random() < _TUMOUR_FREE:
        return 0
    extra = rng.negative_binomial(_COUNT_SHAPE, _COUNT_SHAPE / (_COUNT_SHAPE + _COUNT_MEAN - 1.0))
    return int(min(1 + extra, _MAX_LESIONS))


def _sample_lesions(rng: np.random.Generator, canvas: _Canvas, liver_box: tuple[np.ndarray, np.ndarray]
                    ) -> list[_Lesion]:
    """No lesion in _TUMOUR_FREE of the cases, else 1 + a negative-binomial count, each at a
    random point of the liver (a large one far enough inside that most of it is liver), apart
    from the lesions before it: LiTS counts connected components, so lesions that ran into
    each other would be counted as one."""
    params, places = rng.spawn(2)  # positions depend on the grid; sizes and kinds must not
    count = _lesion_count(params)
    dominant = count > 0 and params.random() < _DOMINANT
    lesions: list[_Lesion] = []
    for k in range(count):
        diameter = _lesion_diameter(params, dominant and k == 0)
        taken = [(lesion.centre, lesion.diameter / 2 + diameter / 2 + 2.0) for lesion in lesions]
        centre = _point_in_liver(places, canvas, liver_box, clearance=0.35 * diameter, avoid=taken)
        lesion = _sample_lesion(params, centre if centre is not None else np.zeros(3), diameter)
        if centre is not None:
            lesions.append(lesion)
    return lesions


def _point_in_liver(rng: np.random.Generator, canvas: _Canvas, liver_box: tuple[np.ndarray, np.ndarray],
                    clearance: float = 0.0, avoid: Sequence[tuple[np.ndarray, float]] = ()
                    ) -> np.ndarray | None:
    """A random point of the liver whose six neighbours ``clearance`` mm away along the axes
    are liver too (relaxed to the point alone after a few tries) and that is further than
    the distance given from each centre in ``avoid``; None if there is none."""
    grid = canvas.grid
    axes = (grid.z, grid.y, grid.x)
    lo = np.maximum(liver_box[0], [a[0] for a in axes])
    hi = np.minimum(liver_box[1], [a[-1] for a in axes])
    if np.any(hi < lo):
        return None
    offsets = np.concatenate([np.zeros((1, 3)), clearance * np.eye(3), -clearance * np.eye(3)])
    centres = np.array([c for c, _ in avoid]).reshape(-1, 3)
    distances = np.array([d for _, d in avoid])
    for attempt in range(20):
        points = rng.uniform(lo, hi, (64, 3))
        inside = np.ones(len(points), bool)
        for offset in offsets if attempt < 10 else offsets[:1]:
            inside &= _in_liver(canvas, points + offset)
        if len(centres):
            gaps = np.linalg.norm(points[:, None] - centres[None], axis=-1)
            inside &= (gaps > distances).all(axis=1)
        hits = np.flatnonzero(inside)
        if hits.size:
            return points[hits[0]]
    return None


def _in_liver(canvas: _Canvas, points: np.ndarray) -> np.ndarray:
    """Whether the voxel nearest each point (z, y, x mm) is liver (or lesion); False outside the grid."""
    grid = canvas.grid
    index, valid = [], np.ones(len(points), bool)
    for i, a in enumerate((grid.z, grid.y, grid.x)):
        step = float(a[1] - a[0]) if len(a) > 1 else 1.0
        k = np.rint((points[:, i] - float(a[0])) / step).astype(int)
        valid &= (k >= 0) & (k < len(a))
        index.append(np.clip(k, 0, len(a) - 1))
    return valid & _IN_LIVER[canvas.tissue[tuple(index)]]


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
            target[rho < lesion.core_to] = lesion.core - liver_hu
        if lesion.rim is not None:
            target[rho > lesion.rim_from] = lesion.rim
        weight = 0.35 + 0.65 * np.clip((1.0 - rho) / max(lesion.edge, 1e-3), 0.0, 1.0)  # soft margins
        values = liver_hu + target * weight + lesion.texture_hu * lesion.texture(z, y, x)
        region[inside] = TISSUE_CODES["lesion"]
        patches += [(chunk[0].start + k, chunk[1], chunk[2], inside[k], values[k])
                    for k in range(inside.shape[0]) if inside[k].any()]
    return patches
