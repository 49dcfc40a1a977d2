"""The canonical orientation rule: every volume is handled as an array (z, row, col).

z increases towards the patient's head (S), rows towards the back (P) and columns towards
the patient's left (L), so ``plt.imshow(vol[z])`` shows the usual radiological axial view
(anterior at the top, the patient's right on the image's left). Only flips and axis
permutations are used, so the mapping is exact and invertible.
"""

from __future__ import annotations

import numpy as np
from nibabel import orientations as ornt

CANONICAL_AXCODES = ("S", "P", "L")


def canonical_transform(affine: np.ndarray) -> np.ndarray:
    """The nibabel orientation transform from an array with ``affine`` to canonical."""
    return ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt(CANONICAL_AXCODES))


def to_canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """View ``array`` (NIfTI voxel order) as (z, row, col); no copy is made."""
    return ornt.apply_orientation(array, canonical_transform(affine))


def from_canonical(canonical: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Undo :func:`to_canonical`: put a (z, row, col) array back into the voxel order of
    a NIfTI image with ``affine``. Works for any trailing-free 3D array of that shape."""
    back = ornt.ornt_transform(ornt.axcodes2ornt(CANONICAL_AXCODES), ornt.io_orientation(affine))
    return ornt.apply_orientation(canonical, back)


def canonical_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along (z, row, col)."""
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    axes = ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt(CANONICAL_AXCODES))
    # axes[i, 0] is the canonical axis that source axis i becomes
    out = [0.0, 0.0, 0.0]
    for src, (dst, _) in enumerate(axes):
        out[int(dst)] = float(zooms[src])
    return out[0], out[1], out[2]


def affine_for(shape_canonical: tuple[int, int, int], spacing: tuple[float, float, float],
               axcodes: tuple[str, str, str], origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
               ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """An affine for storing a canonical (z, row, col) volume with voxel axes ``axcodes``.

    Returns the affine and the shape of the stored array; pass both to
    :func:`from_canonical`'s result. Used by the phantoms to write LiTS-like files.
    """
    src = ornt.axcodes2ornt(CANONICAL_AXCODES)
    dst = ornt.axcodes2ornt(axcodes)
    # affine of the canonical array in RAS+: column j points along world axis src[j,0]
    canon_aff = np.eye(4)
    canon_aff[:3, :3] = 0
    for j, (world, sign) in enumerate(src):
        canon_aff[int(world), j] = sign * spacing[j]
    canon_aff[:3, 3] = origin
    transform = ornt.ornt_transform(src, dst)
    stored_aff = canon_aff @ ornt.inv_ornt_aff(transform, shape_canonical)
    stored_shape = tuple(int(shape_canonical[int(i)]) for i in np.argsort(transform[:, 0]))
    return stored_aff, stored_shape  # type: ignore[return-value]
