"""Reading and validating NIfTI cases: whole volumes at once, never slice by slice.

A ``.nii.gz`` is inflated in one go with ISA-L (about 5× faster than nibabel's reader, see
docs/PERFORMANCE.md) into a buffer sized from its NIfTI header, a ``.nii`` is
memory-mapped, and the voxels are viewed in place, with no float64 copy. Whatever a file
holds, the reader either returns a volume or raises :class:`InvalidCase` naming it.
DICOM folders go through the same checks: :func:`read_source` hands them to shardgen.dicom.
"""

from __future__ import annotations

import logging
import math
import mmap
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from isal import igzip, igzip_lib, isal_zlib
from nibabel.spatialimages import HeaderDataError

from .errors import InvalidCase
from .orientation import canonical_spacing, to_canonical

log = logging.getLogger(__name__)
GZIP_MAGIC = b"\x1f\x8b"
AFFINE_TOLERANCE_MM = 1e-3
HEADER_BYTES = nib.Nifti2Header.sizeof_hdr  # the larger of the two headers
MAX_DEFLATE_RATIO = 1032  # deflate's limit: a 258-byte match coded in about 2 bits
MAX_VOXELS = 2**34  # 64 times the largest CT we know of (512×512×1000): beyond, a forged header
DRAIN_CHUNK = 1 << 24


@dataclass(frozen=True)
class Spatial:
    """A NIfTI header's spatial fields as stored: qform and sform (matrices and codes) and
    the units, so that outputs can carry the input's exactly (codes 2 "aligned" stay 2, a
    qform-only file stays qform-only, a qform that differs from the sform is kept)."""

    qform: np.ndarray
    qform_code: int
    sform: np.ndarray
    sform_code: int
    units: tuple[str, str]

    @classmethod
    def of(cls, header: nib.Nifti1Header) -> "Spatial":
        (qform, qcode), (sform, scode) = header.get_qform(coded=True), header.get_sform(coded=True)
        return cls(header.get_qform(), int(qcode), header.get_sform(), int(scode), header.get_xyzt_units())

    def apply(self, header: nib.Nifti1Header) -> None:
        header.set_qform(self.qform, code=self.qform_code)
        header.set_sform(self.sform, code=self.sform_code)
        header.set_xyzt_units(*self.units)


@dataclass(frozen=True)
class Volume:
    """A NIfTI file's voxels (file order, native dtype, scaling applied), affine and
    spatial header fields."""

    data: np.ndarray
    affine: np.ndarray
    path: Path
    spatial: Spatial | None = None


@dataclass(frozen=True)
class Case:
    """A validated image/label pair, viewed in the canonical (z, row, col) orientation
    (``label`` is None for an image read alone, by :func:`load_image`)."""

    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    spatial: Spatial | None = None  # the image header's, for outputs in its geometry


def map_file(path: Path) -> mmap.mmap:
    """The file memory-mapped; :class:`InvalidCase` for anything that cannot be read."""
    if not path.exists():
        raise InvalidCase(path, "file not found")
    if not path.is_file():  # a folder, or a fifo that open() would wait on forever
        raise InvalidCase(path, "not a regular file")
    try:
        if path.stat().st_size == 0:
            raise InvalidCase(path, "empty file (0 bytes)")
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:
        raise InvalidCase(path, f"cannot read ({getattr(exc, 'strerror', None) or exc})") from None


def gzip_read(path: Path, size: int, verify: bool) -> bytes:
    """Up to ``size`` inflated bytes from the start of a gzip file, by igzip's general
    reader (any number of members; it words the errors). With ``verify`` the rest of the
    stream is read through in chunks, never held, so every member's CRC and length are
    checked."""
    try:
        with igzip.open(path, "rb") as f:
            out = f.read(size)
            while verify and f.read(DRAIN_CHUNK):
                pass
        return out
    except (EOFError, OSError, zlib.error, isal_zlib.error, ValueError) as exc:
        raise InvalidCase(path, f"truncated or corrupt gzip data ({exc})") from None


def inflate(path: Path, data: mmap.mmap, needed: int) -> bytes:
    """The first ``needed`` bytes of a gzip file (all the NIfTI header says it holds)."""
    # Sized from the NIfTI header, never from the gzip trailer: anyone can forge the
    # trailer, and a 4 GiB one failed the allocation. Deflate inflates at most
    # 1032-fold, so a header asking for more describes a truncated file.
    if needed > len(data) * MAX_DEFLATE_RATIO:
        raise InvalidCase(path, f"truncated: the header needs {needed} bytes, more than "
                                f"{len(data)} bytes of gzip can hold")
    try:
        out = inflate_one_member(data, needed)
        return out if out is not None else gzip_read(path, needed, verify=True)
    except MemoryError:
        raise InvalidCase(path, f"not enough memory to inflate its {needed} bytes") from None


def inflate_one_member(data: mmap.mmap, needed: int) -> bytes | None:
    """Fast path (docs/PERFORMANCE.md): one gzip member, inflated in one call into a buffer
    allocated once, at most ``needed`` bytes. None for anything else (several members,
    data past what the header needs, damage): the general reader takes those, and words
    the errors."""
    inflater = igzip_lib.IgzipDecompressor(flag=igzip_lib.DECOMP_GZIP)
    try:
        out = inflater.decompress(data, needed)
    except isal_zlib.error:
        return None
    return out if inflater.eof and not inflater.unused_data else None


def header_class(path: Path, raw: bytes | mmap.mmap) -> type[nib.Nifti1Header]:
    """NIfTI-1 or -2, told by the header size in the first four bytes (either byte order),
    rather than by trying both: a failed NIfTI-1 parse of a NIfTI-2 file logged spurious
    ERROR lines."""
    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        sizes = (klass.sizeof_hdr.to_bytes(4, "little"), klass.sizeof_hdr.to_bytes(4, "big"))
        if raw[:4] in sizes and len(raw) >= klass.sizeof_hdr:
            return klass
    raise InvalidCase(path, "not a NIfTI-1 or NIfTI-2 file")


class HeaderFixes(logging.LoggerAdapter):
    """nibabel's fixes of minor header faults, logged at INFO under our logger with the
    file's name (nibabel logs them under nibabel.global without naming the file)."""

    def log(self, level: int, msg: object, *args: object, **kwargs: object) -> None:
        super().log(logging.INFO, "%s: nibabel fixed the header: %s", self.extra["path"], msg)


def parse_header(path: Path, raw: bytes | mmap.mmap) -> nib.Nifti1Header:
    """The header at the start of ``raw``, checked, with nibabel's minor fixes applied."""
    klass = header_class(path, raw)
    try:
        header = klass(bytes(raw[:klass.sizeof_hdr]), check=False)
    except Exception as exc:  # nibabel raises a variety of types for a damaged header
        raise InvalidCase(path, f"unreadable NIfTI header ({exc})") from None
    pixdim = header["pixdim"][1:4].copy()  # as stored: nibabel's fixes turn a 0 into 1
    try:
        header.check_fix(logger=HeaderFixes(log, {"path": path}))
    except Exception as exc:
        raise InvalidCase(path, f"bad NIfTI header ({exc})") from None
    check_voxel_size(path, header, pixdim)
    return header


def check_voxel_size(path: Path, header: nib.Nifti1Header, pixdim: np.ndarray) -> None:
    """Without a (valid) sform the spacing comes from pixdim, qform or not: a pixdim of 0
    leaves it unknown, and nibabel would quietly make it 1 mm."""
    if header["sform_code"] == 0 and not (np.isfinite(pixdim).all() and (pixdim != 0).all()):
        raise InvalidCase(path, "voxel size (pixdim) " + "×".join(f"{v:g}" for v in pixdim)
                                + " without an sform: the spacing is unknown")


def check_shape(path: Path, shape: tuple[int, ...]) -> None:
    """Dimensions a CT volume can have, checked before anything is sized from them."""
    text = "×".join(map(str, shape))
    if any(n < 0 for n in shape):
        raise InvalidCase(path, f"implausible dimensions {text}: negative")
    if math.prod(shape) > MAX_VOXELS:
        raise InvalidCase(path, f"implausible dimensions {text}: more than 2^34 voxels")
    if 0 in shape:
        raise InvalidCase(path, f"empty volume: dimensions {text} include a zero-length axis")


def header_affine(path: Path, header: nib.Nifti1Header) -> np.ndarray:
    """The voxel-to-world affine (sform, else qform, else pixdim), checked usable."""
    try:
        affine = header.get_best_affine()
    except ValueError as exc:  # e.g. a qform quaternion that is not a rotation
        raise InvalidCase(path, f"bad qform ({exc})") from None
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    if not (np.isfinite(affine).all() and (zooms > 0).all()):
        raise InvalidCase(path, "degenerate affine: voxel size " + "×".join(f"{v:g}" for v in zooms))
    return affine


def scaled(path: Path, header: nib.Nifti1Header, data: np.ndarray) -> np.ndarray:
    """The voxels in native byte order with the header's slope and intercept applied."""
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    try:
        slope, inter = header.get_slope_inter()
    except HeaderDataError as exc:  # a valid slope with an infinite intercept, say
        raise InvalidCase(path, f"bad scaling ({exc})") from None
    if slope not in (None, 1.0) or inter not in (None, 0.0):
        data = data.astype(np.float32) * np.float32(slope or 1.0) + np.float32(inter or 0.0)
    return data


def data_layout(path: Path, header: nib.Nifti1Header) -> tuple[tuple[int, ...], np.dtype, int, int]:
    """Shape, dtype, data offset and the bytes the file must hold, all checked."""
    shape = tuple(int(n) for n in header.get_data_shape())
    check_shape(path, shape)
    dtype = header.get_data_dtype()
    if dtype.kind not in "biuf":
        raise InvalidCase(path, f"unsupported data type {dtype}")
    offset = int(header.get_data_offset())
    return shape, dtype, offset, offset + math.prod(shape) * dtype.itemsize


def read_volume(path: str | Path) -> Volume:
    """Load one NIfTI file completely; :class:`InvalidCase` for anything unreadable."""
    path = Path(path)
    mapped = map_file(path)
    gzipped = mapped[:2] == GZIP_MAGIC
    header = parse_header(path, gzip_read(path, HEADER_BYTES, verify=False) if gzipped else mapped)
    shape, dtype, offset, needed = data_layout(path, header)
    raw: bytes | mmap.mmap = mapped
    if gzipped:
        with mapped:
            raw = inflate(path, mapped, needed)
    if len(raw) < needed:
        raise InvalidCase(path, f"truncated: {len(raw)} bytes of data, the header needs {needed}")
    data = np.ndarray(shape, dtype=dtype, buffer=raw, offset=offset, order="F")
    return Volume(scaled(path, header, data), header_affine(path, header), path, Spatial.of(header))


def check_3d(volume: Volume) -> None:
    if volume.data.ndim != 3:
        raise InvalidCase(volume.path, f"{volume.data.ndim}D data of shape {volume.data.shape}, "
                                       "expected a 3D volume")


def check_finite(volume: Volume) -> None:
    if volume.data.dtype.kind == "f" and not np.isfinite(volume.data).all():
        bad = int((~np.isfinite(volume.data)).sum())
        raise InvalidCase(volume.path, f"{bad} non-finite intensities (NaN or inf)")


def check_pair(image: Volume, label: Volume) -> None:
    if image.data.shape != label.data.shape:
        raise InvalidCase(label.path, f"label shape {label.data.shape} differs from image "
                                      f"shape {image.data.shape} ({image.path.name})")
    if not np.allclose(image.affine, label.affine, rtol=0, atol=AFFINE_TOLERANCE_MM):
        raise InvalidCase(label.path, f"label affine differs from the image's ({image.path.name})"
                                      f" by up to {np.abs(image.affine - label.affine).max():.4g}")


def label_as_uint8(label: Volume) -> np.ndarray:
    """Label values must be 0, 1 or 2 (integral floats accepted)."""
    data = label.data
    if data.dtype.kind in "ui":
        valid = data.min() >= 0 and data.max() <= 2
    else:
        valid = bool(((data == 0) | (data == 1) | (data == 2)).all())
    if not valid:
        found = np.unique(data[(data != 0) & (data != 1) & (data != 2)])[:5]
        raise InvalidCase(label.path, "label values must be 0, 1 or 2, found "
                                      + ", ".join(f"{v:g}" for v in found))
    return data.astype(np.uint8, copy=False)


def is_nifti_name(path: Path) -> bool:
    return path.name.endswith((".nii", ".nii.gz"))


def is_series(path: str | Path) -> bool:
    """Whether a case's image or label is a DICOM folder (a series, or 3D-IRCADb's
    MASKS_DICOM) rather than a NIfTI file."""
    path = Path(path)
    return path.is_dir() and not is_nifti_name(path)


def read_source(path: str | Path) -> Volume:
    """The one entry for a case's image or label: a NIfTI file, or a folder that is not
    named like one, read as DICOM (a series, or 3D-IRCADb's MASKS_DICOM)."""
    path = Path(path)
    if is_series(path):
        from .dicom import read_dicom  # imported here: NIfTI-only runs never load pydicom

        return read_dicom(path)
    return read_volume(path)


def read_image(path: str | Path) -> Volume:
    """Read an image volume (NIfTI file or DICOM series folder) and check that it is 3D and finite."""
    image = read_source(path)
    check_3d(image)
    check_finite(image)
    return image


def canonical_case(image: Volume, labels: np.ndarray | None) -> Case:
    """An image (and its uint8 labels, if any) viewed in the canonical orientation."""
    canon_image = to_canonical(image.data, image.affine)
    return Case(canon_image, None if labels is None else to_canonical(labels, image.affine), image.affine,
                tuple(canon_image.shape), canonical_spacing(image.affine),  # type: ignore[arg-type]
                image.spatial)


def load_image(path: str | Path) -> Case:
    """Read and validate an image without a label (one to predict); ``label`` is None."""
    return canonical_case(read_image(path), None)


def load_case(image_path: str | Path, label_path: str | Path | None) -> Case:
    """Read and validate an image/label pair; :class:`InvalidCase` names the file and reason."""
    image = read_image(image_path)
    if label_path is None:
        raise InvalidCase(image_path, "missing label file")
    label = read_source(label_path)
    check_3d(label)
    check_pair(image, label)
    return canonical_case(image, label_as_uint8(label))
