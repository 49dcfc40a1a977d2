"""Reading DICOM series folders (one series per folder, read with pydicom) and 3D-IRCADb
mask folders as :class:`~shardgen.nifti.Volume` in NIfTI's terms: voxels (column, row,
slice), the RAS affine, and :class:`InvalidCase` naming the folder or file otherwise.

DICOM's patient frame is LPS (x to the patient's left, y to the back), NIfTI's world frame
RAS: the affine built from ImageOrientationPatient/ImagePositionPatient is turned into RAS
by negating its first two rows, so a series comes out as the equivalent NIfTI file does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder

from .discover import IRCADB_LIVER, IRCADB_TUMOURS, is_dicom_file
from .errors import InvalidCase
from .nifti import Spatial, Volume, check_pair

log = logging.getLogger(__name__)
SPACING_TOLERANCE = 0.01  # of the slice spacing: steps, gaps and in-plane drift (gantry tilt)
ORIENTATION_TOLERANCE = 1e-4  # on direction cosines
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files directly in ``folder`` (other files, such as a label, are ignored)."""
    try:
        return sorted(p for p in folder.iterdir() if is_dicom_file(p))
    except OSError as exc:
        raise InvalidCase(folder, f"cannot list the folder ({exc.strerror or exc})") from None


@dataclass(frozen=True)
class Slice:
    """One file of a series: where it lies and what its pixels are."""

    path: Path
    dataset: Dataset
    position: np.ndarray  # ImagePositionPatient, LPS mm
    orientation: np.ndarray  # ImageOrientationPatient: row then column direction cosines
    pixel_spacing: tuple[float, float]  # between rows, between columns (mm)
    shape: tuple[int, int]  # rows, columns


def read_file(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path, force=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise InvalidCase(path, f"unreadable DICOM file ({exc})") from None


def as_slice(path: Path, ds: Dataset) -> Slice:
    """The file's geometry, checked present and usable for a slice of a volume."""
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows",
                    "Columns", "PixelData"):
        if ds.get(keyword) in (None, ""):
            raise InvalidCase(path, f"no {keyword}: not a slice of a volume")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise InvalidCase(path, "multi-frame DICOM (enhanced CT) is not supported; use one file per slice")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InvalidCase(path, f"{ds.SamplesPerPixel} samples per pixel: not a greyscale CT slice")
    try:
        position = np.array([float(v) for v in ds.ImagePositionPatient])
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
        spacing = tuple(float(v) for v in ds.PixelSpacing)
    except (TypeError, ValueError) as exc:
        raise InvalidCase(path, f"unreadable geometry ({exc})") from None
    if position.shape != (3,) or orientation.shape != (6,) or len(spacing) != 2 \
            or not (np.isfinite(position).all() and np.isfinite(orientation).all()) or min(spacing) <= 0:
        raise InvalidCase(path, "malformed ImagePositionPatient, ImageOrientationPatient or PixelSpacing")
    return Slice(path, ds, position, orientation, spacing, (int(ds.Rows), int(ds.Columns)))


def read_slices(folder: Path) -> list[Slice]:
    """Every slice of the folder's one series, unsorted; mixed series refused."""
    files = dicom_files(folder)
    if not files:
        raise InvalidCase(folder, "no DICOM files in the folder")
    datasets = [(path, read_file(path)) for path in files]
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in datasets})
    if len(series) > 1:
        raise InvalidCase(folder, f"{len(series)} series in one folder (SeriesInstanceUID "
                                  + ", ".join(series[:3]) + "): one series per folder")
    return [as_slice(path, ds) for path, ds in datasets]


def check_grid(folder: Path, slices: list[Slice]) -> None:
    """Every slice the same matrix, pixel spacing and orientation; an orthonormal one."""
    first = slices[0]
    for s in slices[1:]:
        if s.shape != first.shape or not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=0):
            raise InvalidCase(folder, f"slices differ: {s.path.name} is {fmt_grid(s)}, "
                                      f"{first.path.name} is {fmt_grid(first)}")
        if not np.allclose(s.orientation, first.orientation, rtol=0, atol=ORIENTATION_TOLERANCE):
            raise InvalidCase(folder, f"inconsistent ImageOrientationPatient: {s.path.name} differs "
                                      f"from {first.path.name}")
    row, col = first.orientation[:3], first.orientation[3:]
    if abs(np.linalg.norm(row) - 1) > ORIENTATION_TOLERANCE or abs(np.linalg.norm(col) - 1) > ORIENTATION_TOLERANCE \
            or abs(row @ col) > ORIENTATION_TOLERANCE:
        raise InvalidCase(folder, "ImageOrientationPatient is not two orthogonal unit vectors")


def fmt_grid(s: Slice) -> str:
    return f"{s.shape[0]}×{s.shape[1]} pixels of {s.pixel_spacing[0]:g}×{s.pixel_spacing[1]:g} mm"


def slice_order(folder: Path, slices: list[Slice]) -> tuple[list[Slice], float]:
    """The slices sorted along the slice normal, and their spacing, measured from the
    positions (SliceThickness is not the spacing). Missing, repeated or unevenly spaced
    slices and gantry tilt are refused."""
    if len(slices) < 2:
        raise InvalidCase(folder, "a single slice: the slice spacing is unknown")
    row, col = slices[0].orientation[:3], slices[0].orientation[3:]
    normal = np.cross(row, col)
    order = sorted(slices, key=lambda s: float(s.position @ normal))
    depth = np.array([s.position @ normal for s in order])
    steps = np.diff(depth)
    step = float(np.median(steps))
    if step <= 0 or steps.min() < 0.5 * step:
        twins = int(steps.argmin())
        raise InvalidCase(folder, f"two slices at the same position ({order[twins].path.name}, "
                                  f"{order[twins + 1].path.name})")
    if np.abs(steps - step).max() > SPACING_TOLERANCE * step:
        worst = int(np.abs(steps - step).argmax())
        gap, files = steps[worst], f"{order[worst].path.name} → {order[worst + 1].path.name}"
        kind = "missing slice(s)" if gap > 1.5 * step else "unevenly spaced slices"
        raise InvalidCase(folder, f"{kind}: {gap:g} mm between {files}, the spacing elsewhere "
                                  f"is {step:g} mm (tolerance {SPACING_TOLERANCE:.0%})")
    spacing = float((depth[-1] - depth[0]) / (len(order) - 1))
    check_no_tilt(folder, order, normal, spacing)
    return order, spacing


def check_no_tilt(folder: Path, order: list[Slice], normal: np.ndarray, spacing: float) -> None:
    """The positions must move along the slice normal: a sideways drift is a gantry tilt
    (or a sheared stack), which no affine of orthogonal axes describes."""
    offsets = np.array([s.position - order[0].position for s in order])
    sideways = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
    allowed = SPACING_TOLERANCE * np.abs(offsets @ normal) + 1e-3
    if (sideways > allowed).any():
        k = int((sideways - allowed).argmax())
        raise InvalidCase(folder, f"gantry tilt: {order[k].path.name} lies {sideways[k]:.3g} mm sideways of "
                                  f"the slice normal through {order[0].path.name} (not supported: resample "
                                  "the series first)")


def series_affine(first: Slice, spacing: float) -> np.ndarray:
    """The RAS voxel-to-world affine of voxels (column, row, slice)."""
    row, col = first.orientation[:3], first.orientation[3:]
    lps = np.eye(4)
    lps[:3, 0] = row * first.pixel_spacing[1]  # along a row, one column to the next
    lps[:3, 1] = col * first.pixel_spacing[0]  # down a column, one row to the next
    lps[:3, 2] = np.cross(row, col) * spacing
    lps[:3, 3] = first.position
    # float32, as a NIfTI header stores it: a series and its NIfTI conversion then give
    # the same spacing to the last digit, so the same manifest (a change far below 1e-4 mm)
    return (LPS_TO_RAS @ lps).astype(np.float32).astype(np.float64)


def stored_pixels(s: Slice) -> np.ndarray:
    """The slice's stored values (rows, columns), decoded by pydicom."""
    meta = getattr(s.dataset, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and syntax.is_compressed and not get_decoder(syntax).is_available:
        raise InvalidCase(s.path, f"compressed pixel data ({syntax.name}) and no decoder for it is "
                                  "installed (pylibjpeg or gdcm would read it)")
    try:
        pixels = s.dataset.pixel_array
    except (RuntimeError, NotImplementedError, ValueError, TypeError, AttributeError, KeyError) as exc:
        reason = str(exc).splitlines()[-1].strip() if str(exc) else type(exc).__name__
        raise InvalidCase(s.path, f"cannot decode the pixel data ({reason})") from None
    if pixels.shape != s.shape:
        raise InvalidCase(s.path, f"pixel data of shape {pixels.shape}, expected {s.shape}")
    return pixels


def rescale(s: Slice) -> tuple[float, float]:
    slope = float(s.dataset.get("RescaleSlope", 1) or 1)
    intercept = float(s.dataset.get("RescaleIntercept", 0) or 0)
    if not (np.isfinite(slope) and np.isfinite(intercept)):
        raise InvalidCase(s.path, f"bad RescaleSlope/RescaleIntercept {slope:g}/{intercept:g}")
    return slope, intercept


def stack_voxels(order: list[Slice]) -> np.ndarray:
    """Voxels (column, row, slice) with each slice's own RescaleSlope/Intercept applied:
    integers stay integers (int16 when they fit, as a CT NIfTI stores them), other
    scalings give float32 as the NIfTI reader does."""
    stored = np.stack([stored_pixels(s) for s in order], axis=-1).transpose(1, 0, 2)
    scales = np.array([rescale(s) for s in order])
    if (scales == [1.0, 0.0]).all():
        return stored
    if (scales == np.round(scales)).all() and (np.abs(scales) <= [1000, 2**20]).all():  # int32 holds it
        values = stored.astype(np.int32) * scales[:, 0].astype(np.int32) + scales[:, 1].astype(np.int32)
        small = values.min() >= np.iinfo(np.int16).min and values.max() <= np.iinfo(np.int16).max
        return values.astype(np.int16 if small else np.int32)
    return stored.astype(np.float32) * scales[:, 0].astype(np.float32) + scales[:, 1].astype(np.float32)


def read_series(folder: str | Path) -> Volume:
    """One DICOM series folder as a :class:`Volume`, exactly as its NIfTI conversion
    (voxels column, row, slice along the normal; RAS affine) would read."""
    folder = Path(folder)
    slices = read_slices(folder)
    check_grid(folder, slices)
    order, spacing = slice_order(folder, slices)
    affine = series_affine(order[0], spacing)
    return Volume(stack_voxels(order), affine, folder, Spatial(affine, 1, affine, 1, ("mm", "sec")))


def read_mask(folder: Path) -> Volume:
    """A 3D-IRCADb mask series as booleans: its values must be 0 and 1, or 0 and 255."""
    volume = read_series(folder)
    data = volume.data
    odd = (data != 0) & (data != 1) & (data != 255)
    if odd.any():
        found = ", ".join(f"{v:g}" for v in np.unique(data[odd])[:5])
        raise InvalidCase(folder, f"mask values must be 0/1 or 0/255, found {found}")
    return Volume(data != 0, volume.affine, folder, volume.spatial)


def read_ircadb_masks(folder: str | Path) -> Volume:
    """3D-IRCADb's MASKS_DICOM as labels: 1 in ``liver``, 2 in any ``livertumor*`` mask.

    A tumour voxel outside the liver mask is still labelled 2 (tumour implies liver in the
    LiTS labels, and the tumour masks are the reference for lesions); the count is logged.
    """
    folder = Path(folder)
    liver = read_mask(folder / IRCADB_LIVER)
    labels = liver.data.astype(np.uint8)
    outside = 0
    for path in sorted(p for p in folder.glob(IRCADB_TUMOURS) if p.is_dir()):
        tumour = read_mask(path)
        check_pair(liver, tumour)
        labels[tumour.data] = 2
        outside += int((tumour.data & ~liver.data).sum())
    if outside:
        log.info("%s: %d tumour voxels outside the liver mask, labelled tumour (2)", folder, outside)
    return Volume(labels, liver.affine, folder, liver.spatial)


def is_ircadb_masks(folder: Path) -> bool:
    return (folder / IRCADB_LIVER).is_dir()


def read_dicom(folder: str | Path) -> Volume:
    """A DICOM folder: 3D-IRCADb's MASKS_DICOM (labels), else one series."""
    folder = Path(folder)
    return read_ircadb_masks(folder) if is_ircadb_masks(folder) else read_series(folder)
