"""DICOM in: series folders read as their NIfTI equivalents, the 3D-IRCADb layout, and a
one-line rejection for every series that no single affine describes.

Every series here is written by the tests themselves, slice by slice with pydicom (CT
Image Storage, explicit VR little endian, LPS geometry, RescaleIntercept -1024, file
names shuffled so that only the positions give the order).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from nibabel import orientations as ornt
from pydicom import encaps
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1,
                         generate_uid)

from conftest import blob_case, save_canonical
from shardgen.build import BuildConfig, build_shards
from shardgen.cli import main
from shardgen.discover import discover
from shardgen.nifti import load_case, load_image, read_source, read_volume
from shardgen.orientation import CANONICAL_AXCODES, canonical_transform
from shardgen.phantom import make_phantom
from shardgen.preprocess import Preprocessing

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
Edit = Callable[[int, Dataset], None]


def slice_dataset(pixels: np.ndarray, position, orientation, spacing, series_uid: str,
                  intercept: float) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", series_uid, "1.2.3.4"
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    ds.PixelSpacing = [f"{v:.6f}" for v in spacing]
    ds.SliceThickness = "5"  # deliberately not the spacing: that comes from the positions
    ds.RescaleIntercept, ds.RescaleSlope = f"{intercept:g}", "1"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.BitsAllocated = ds.BitsStored = 8 * pixels.itemsize
    ds.HighBit = ds.BitsStored - 1
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def write_series(folder: Path, data: np.ndarray, affine: np.ndarray, intercept: float = -1024.0,
                 dtype=np.uint16, edit: Edit | None = None, seed: int = 0) -> list[Path]:
    """``data`` (NIfTI voxel order) with RAS ``affine`` as one file per slice; returns the
    files by slice index."""
    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS_TO_RAS @ affine
    step = np.linalg.norm(lps[:3, :3], axis=0)
    orientation = np.concatenate([lps[:3, 0] / step[0], lps[:3, 1] / step[1]])
    series_uid = generate_uid()
    names = np.random.default_rng(seed).permutation(data.shape[2])
    paths = []
    for k in range(data.shape[2]):
        stored = (data[:, :, k].T.astype(np.int64) - int(intercept)).astype(dtype)  # (rows, columns)
        ds = slice_dataset(stored, (lps @ [0, 0, k, 1])[:3], orientation, (step[1], step[0]), series_uid, intercept)
        if edit:
            edit(k, ds)
        paths.append(folder / f"image_{names[k]}")  # no extension, as in 3D-IRCADb
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def nifti_order(canonical: np.ndarray, axcodes=("L", "P", "S")) -> np.ndarray:
    transform = ornt.ornt_transform(ornt.axcodes2ornt(CANONICAL_AXCODES), ornt.axcodes2ornt(axcodes))
    return ornt.apply_orientation(canonical, transform)


def blob_pair(folder: Path, index: int = 0) -> tuple[Path, Path, Path]:
    """The same blob case as NIfTI (``nifti/volume-i.nii.gz``) and as a DICOM series folder
    ``dicom/volume-i`` holding the NIfTI label; returns NIfTI image, label, series folder."""
    image, label = blob_case(seed=index)
    vol, seg = folder / "nifti" / f"volume-{index}.nii.gz", folder / "nifti" / f"segmentation-{index}.nii.gz"
    vol.parent.mkdir(parents=True, exist_ok=True)
    affine = save_canonical(vol, image)
    save_canonical(seg, label)
    series = folder / "dicom" / f"volume-{index}"
    write_series(series, nifti_order(image), affine, seed=index)
    shutil.copy(seg, series / "segmentation.nii.gz")
    return vol, seg, series


# --------------------------------------------------------------------------- same as NIfTI

def test_series_reads_as_the_equivalent_nifti(tmp_path):
    vol, seg, series = blob_pair(tmp_path)
    ours, nifti = read_source(series), read_volume(vol)
    np.testing.assert_array_equal(ours.data, nifti.data)
    assert ours.data.dtype == np.int16
    np.testing.assert_allclose(ours.affine, nifti.affine, atol=1e-4)
    a, b = load_case(series, series / "segmentation.nii.gz"), load_case(vol, seg)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    np.testing.assert_allclose(a.spacing, b.spacing, atol=1e-4)
    assert a.spacing[0] == pytest.approx(2.0)  # not SliceThickness (5)


def canonical_affine(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return affine @ ornt.inv_ornt_aff(canonical_transform(affine), shape)


@pytest.mark.parametrize("index", [0, 3], ids=["phantom stored L,P,I", "phantom stored L,P,S"])
def test_phantom_series_has_the_niftis_canonical_view(tmp_path, index):
    """Stored feet-first (L,P,I), the series still reads head-up along its normal: the
    voxel order differs from the NIfTI's, the canonical view and world geometry do not."""
    phantom = make_phantom(index, seed=3, size=64, slices=(10, 16))
    write_series(tmp_path / "s", phantom.volume, phantom.affine)
    volume = read_source(tmp_path / "s")
    np.testing.assert_array_equal(load_image(tmp_path / "s").image,
                                  ornt.apply_orientation(phantom.volume, canonical_transform(phantom.affine)))
    np.testing.assert_allclose(canonical_affine(volume.affine, volume.data.shape),
                               canonical_affine(phantom.affine, phantom.volume.shape), atol=1e-4)


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, affine), str(path))


def manifest_without_paths(manifest: dict) -> dict:
    cases = {c: {k: v for k, v in e.items() if k not in ("image", "label")} for c, e in manifest["cases"].items()}
    return {"shards": manifest["shards"], "cases": cases, "totals": manifest["totals"],
            "split_assignment": manifest["split_assignment"]}


def test_shards_from_dicom_equal_shards_from_nifti(tmp_path):
    for i in (0, 1):
        blob_pair(tmp_path / "in", i)
    phantom = make_phantom(0, seed=3, size=64, slices=(10, 16))
    _write_nifti(tmp_path / "in" / "nifti" / "volume-7.nii.gz", phantom.volume, phantom.affine)
    _write_nifti(tmp_path / "in" / "nifti" / "segmentation-7.nii.gz", phantom.label, phantom.affine)
    write_series(tmp_path / "in" / "dicom" / "volume-7", phantom.volume, phantom.affine)
    # the DICOM case's label is given on the series' voxel grid (slices along the normal),
    # whatever storage orientation the phantom drew
    series = read_source(tmp_path / "in" / "dicom" / "volume-7")
    transform = ornt.ornt_transform(ornt.io_orientation(phantom.affine), ornt.io_orientation(series.affine))
    _write_nifti(tmp_path / "in" / "dicom" / "volume-7" / "segmentation.nii.gz",
                 ornt.apply_orientation(phantom.label, transform), series.affine)
    settings = Preprocessing(size=32)
    nifti = build_shards(BuildConfig(inputs=(tmp_path / "in" / "nifti",), out=tmp_path / "a", preprocessing=settings))
    dicom = build_shards(BuildConfig(inputs=(tmp_path / "in" / "dicom",), out=tmp_path / "b", preprocessing=settings))
    assert dicom.rejected == [] and sorted(dicom.manifest["cases"]) == ["volume-0", "volume-1", "volume-7"]
    tars = {p.name: p.read_bytes() for p in sorted((tmp_path / "a").glob("*.tar"))}
    assert tars == {p.name: p.read_bytes() for p in sorted((tmp_path / "b").glob("*.tar"))} and len(tars) == 3
    assert manifest_without_paths(dicom.manifest) == manifest_without_paths(nifti.manifest)


# --------------------------------------------------------------------------- layouts

def mask(data: np.ndarray, on: int) -> np.ndarray:
    return data.astype(np.uint8) * on


def test_ircadb_layout_labels_liver_and_every_tumour(tmp_path):
    image, label = blob_case(seed=2)
    patient = tmp_path / "3Dircadb1.1"
    affine = save_canonical(tmp_path / "ref.nii.gz", image)
    stored = nifti_order(image)
    liver = nifti_order(label >= 1)
    tumour1 = nifti_order(label == 2)
    tumour2 = np.zeros_like(liver)
    tumour2[5:9, 5:9, 4:6] = True  # partly outside the liver
    tumour2[20:24, 18:22, 5] = True
    write_series(patient / "PATIENT_DICOM", stored, affine)
    masks = patient / "MASKS_DICOM"
    write_series(masks / "liver", mask(liver, 255), affine, intercept=0, dtype=np.uint8)
    write_series(masks / "livertumor01", mask(tumour1, 1), affine, intercept=0, dtype=np.uint16)
    write_series(masks / "livertumor02", mask(tumour2, 255), affine, intercept=0, dtype=np.uint8)
    write_series(masks / "portalvein", mask(~liver, 255), affine, intercept=0, dtype=np.uint8)  # ignored
    write_series(patient / "LABELLED_DICOM", mask(liver, 1), affine, intercept=0)  # not a case of its own
    cases, rejected = discover([tmp_path])
    assert [(c.case, c.image, c.label) for c in cases] == [("3Dircadb1.1", patient / "PATIENT_DICOM", masks)]
    assert rejected == []
    case = load_case(cases[0].image, cases[0].label)
    expected = liver.astype(np.uint8)
    expected[tumour1 | tumour2] = 2  # tumour voxels outside the liver mask are tumour too
    np.testing.assert_array_equal(case.label, ornt.apply_orientation(expected, canonical_transform(affine)))
    np.testing.assert_array_equal(case.image, image)


def test_ircadb_mask_with_other_values_is_rejected(tmp_path):
    image, label = blob_case()
    affine = save_canonical(tmp_path / "ref.nii.gz", image)
    write_series(tmp_path / "p" / "PATIENT_DICOM", nifti_order(image), affine)
    write_series(tmp_path / "p" / "MASKS_DICOM" / "liver", nifti_order(label) * 7, affine, intercept=0)
    case = discover([tmp_path])[0][0]
    with pytest.raises(Exception, match="mask values must be 0/1 or 0/255, found 7"):
        load_case(case.image, case.label)


def test_plain_series_without_label_is_found_for_prediction(tmp_path):
    image, _ = blob_case()
    affine = save_canonical(tmp_path / "ref.nii.gz", image)
    write_series(tmp_path / "scans" / "patient_07", nifti_order(image), affine)
    write_series(tmp_path / "scans" / "bad name", nifti_order(image), affine)
    (tmp_path / "scans" / "DICOMDIR").write_bytes(bytes(128) + b"DICM")  # a disc index, not a series
    cases, rejected = discover([tmp_path / "scans"])
    assert [(c.case, c.image.name, c.label) for c in cases] == [("patient_07", "patient_07", None)]
    assert [r.case for r in rejected] == ["bad name"] and "may hold only letters" in rejected[0].reason
    np.testing.assert_array_equal(load_image(cases[0].image).image, image)


def test_eval_finds_a_series_folder_to_predict(tmp_path):
    """``liverseg-eval predict --data`` given the series folder itself, or a folder above."""
    from liverseg.evaluate import find_cases

    image, _ = blob_case()
    write_series(tmp_path / "scans" / "patient_07", nifti_order(image), save_canonical(tmp_path / "r.nii.gz", image))
    for data in (tmp_path / "scans", tmp_path / "scans" / "patient_07"):
        sources, failed = find_cases(data, "test", with_labels=False)
        assert [(s.case, s.image, s.label) for s in sources] == [
            ("patient_07", tmp_path / "scans" / "patient_07", None)] and failed == []


def test_nifti_named_folders_are_not_read_as_dicom(tmp_path):
    (tmp_path / "volume-1.nii.gz").mkdir()
    with pytest.raises(Exception, match="not a regular file"):
        load_image(tmp_path / "volume-1.nii.gz")


# --------------------------------------------------------------------------- rejections

def mixed_series(k, ds):
    if k % 2:
        ds.SeriesInstanceUID = "1.2.3.99"


def gantry_tilt(k, ds):
    ds.ImagePositionPatient[1] = f"{float(ds.ImagePositionPatient[1]) + 0.5 * k:.6f}"


def uneven(k, ds):
    if k == 5:
        ds.ImagePositionPatient[2] = f"{float(ds.ImagePositionPatient[2]) + 0.5:.6f}"


def pixel_spacing(k, ds):
    if k == 3:
        ds.PixelSpacing = ["0.9", "0.9"]


def columns(k, ds):
    if k == 3:
        pixels = np.frombuffer(ds.PixelData, np.uint16).reshape(ds.Rows, ds.Columns)[:, :-1]
        ds.Columns, ds.PixelData = pixels.shape[1], np.ascontiguousarray(pixels).tobytes()


def not_orthogonal(k, ds):
    ds.ImageOrientationPatient = ["1", "0", "0", "0.2", "0.979796", "0"]


def inconsistent(k, ds):
    if k == 4:
        ds.ImageOrientationPatient = ["0.995004", "0.099833", "0", "-0.099833", "0.995004", "0"]


def compressed(syntax):
    def edit(k, ds):
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = encaps.encapsulate([b"\xff\x4f\xff\x51" + bytes(60)])  # a codestream start, then junk
        ds["PixelData"].VR = "OB"
    return edit


def missing(paths):
    paths[5].unlink()


# (name, edit of each slice's dataset, change to the files, whether the file (slice 0) is named, reason)
REJECTED = [
    ("mixed series", mixed_series, None, False, "2 series in one folder (SeriesInstanceUID "),
    ("gantry tilt", gantry_tilt, None, False, "gantry tilt: "),
    ("a missing slice", None, missing, False, "missing slice(s): 4 mm between"),
    ("uneven spacing", uneven, None, False, "unevenly spaced slices: 2.5 mm between"),
    ("differing pixel spacing", pixel_spacing, None, False, "slices differ: "),
    ("differing columns", columns, None, False, "slices differ: "),
    ("non-orthogonal orientation", not_orthogonal, None, False, "ImageOrientationPatient is not two orthogonal unit vectors"),
    ("inconsistent orientation", inconsistent, None, False, "inconsistent ImageOrientationPatient"),
    ("JPEG 2000 that cannot be decoded", compressed(JPEG2000Lossless), None, True, "cannot decode the pixel data ("),
    ("JPEG Lossless without a decoder", compressed(JPEGLosslessSV1), None, True,
     "compressed pixel data (JPEG Lossless, Non-Hierarchical, First-Order Prediction"),
]


@pytest.mark.parametrize("name, edit, change, names_file, reason", REJECTED, ids=[r[0] for r in REJECTED])
def test_bad_series_is_rejected_in_one_line(tmp_path, name, edit, change, names_file, reason):
    _, seg, _ = blob_pair(tmp_path / "in")  # the good case, dicom/volume-0
    image, _ = blob_case(seed=0)
    bad = tmp_path / "in" / "dicom" / "bad_case"
    paths = write_series(bad, nifti_order(image), read_volume(seg).affine, edit=edit)
    shutil.copy(seg, bad / "segmentation.nii.gz")  # would build, were the series accepted
    if change:
        change(paths)
    result = CliRunner().invoke(main, ["build", "--input", str(tmp_path / "in" / "dicom"),
                                       "--out", str(tmp_path / "out"), "--size", "16"])
    lines = [line for line in result.stdout.splitlines() if line.startswith("rejected ")]
    where = paths[0] if names_file else bad
    assert len(lines) == 1 and lines[0].startswith(f"rejected {where}: {reason}"), result.output
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (tmp_path / "out" / "volume-0.tar").is_file() and not (tmp_path / "out" / "bad_case.tar").exists()
