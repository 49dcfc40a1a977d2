"""One phantom case from (seed, case index): the anatomy painted in order, the lesions, the
image, the storage orientation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tissues import TISSUE_CODES, _LABELS, _codes, _sample_hu
from .geometry import _Canvas
from .scan import _Scan, _grid_for, _place_slices, _sample_scan, _to_storage
from .body import (
    _Frame, _ONTO_LATE, _add_bowel, _add_great_vessels_and_psoas, _add_heart, _add_ivc, _add_kidney,
    _add_pancreas_and_veins, _add_spleen, _add_stomach, _add_trunk_muscles, _paint_body, _paint_spine,
    _paint_table, _sample_frame, _sample_ribs
)
from .liver import _Lesion, _add_gallbladder, _add_liver, _add_liver_vessels, _paint_lesion, _sample_lesions
from .imaging import _acquire, _hu_blocks, _sample_imaging


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


def _check_args(size: int, slices: tuple[int, int]) -> None:
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    if not 1 <= slices[0] <= slices[1]:
        raise ValueError(f"slices must be (min, max) with 1 <= min <= max, got {slices}")


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
    scan = _place_slices(scan_rng, scan, frame.liver_z)
    grid = _grid_for(scan)
    canvas = _Canvas(grid, frame.dome_height(grid.y[:, None], grid.x[None, :]))
    liver_box = _paint_anatomy(canvas, anatomy_rng, frame)
    lut = _sample_hu(image_rng)
    imaging = _sample_imaging(image_rng, scan.spacing[1])
    liver_hu = float(lut[TISSUE_CODES["liver"]])
    lesions = _sample_lesions(lesion_rng, canvas, liver_box)
    patches = [patch for lesion in lesions for patch in _paint_lesion(canvas, lesion, liver_hu)]
    volume = _acquire(_hu_blocks(canvas, lut, image_rng, liver_box, patches), imaging, grid.shape, image_rng)
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
