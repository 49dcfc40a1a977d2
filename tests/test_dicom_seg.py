"""DICOM-SEG out: a prediction for a DICOM series written as a Segmentation object that
highdicom reads back voxel for voxel, coded and referencing its source series."""

from __future__ import annotations

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from conftest import blob_case, save_canonical
from liverseg.dicom_seg import read_dicom_seg, write_dicom_seg
from liverseg.eval_cli import main as eval_main
from shardgen.errors import InvalidCase
from shardgen.nifti import read_source
from test_dicom import nifti_order, write_series

FRAME_OF_REFERENCE = generate_uid()


def with_patient(k: int, ds: Dataset) -> None:
    """What a scanner's series carries and a SEG copies: patient, study, frame of reference."""
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^One", "P1", "", "O"
    ds.StudyID, ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "1", "20261129", "120000", ""
    ds.ReferringPhysicianName, ds.Manufacturer = "", "phantom"
    ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
    ds.FrameOfReferenceUID = FRAME_OF_REFERENCE


@pytest.fixture
def series(tmp_path):
    image, label = blob_case(depth=10, size=40)
    affine = save_canonical(tmp_path / "volume-0.nii.gz", image)
    folder = tmp_path / "series"
    write_series(folder, nifti_order(image), affine, edit=with_patient)
    return folder, nifti_order(label)


def test_the_seg_reads_back_as_the_prediction_voxel_for_voxel(series, tmp_path):
    folder, labels = series
    assert labels.shape == read_source(folder).data.shape and set(np.unique(labels)) == {0, 1, 2}
    out = write_dicom_seg(labels, folder, tmp_path / "out" / "volume-0.seg.dcm")
    np.testing.assert_array_equal(read_dicom_seg(out, folder), labels)


def test_the_seg_is_coded_and_references_its_source_series(series, tmp_path):
    folder, labels = series
    seg = hd.seg.segread(str(write_dicom_seg(labels, folder, tmp_path / "a.seg.dcm")))
    source = read_source(folder)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert [(s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeValue) for s in seg.SegmentSequence] == [
        ("Liver", "10200004"), ("Liver tumour", "108369006")]
    assert all(s.SegmentAlgorithmType == "AUTOMATIC" for s in seg.SegmentSequence)
    referenced = seg.ReferencedSeriesSequence[0]
    files = [dcmread(f) for f in folder.iterdir()]
    assert referenced.SeriesInstanceUID == files[0].SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence} == {
        f.SOPInstanceUID for f in files} and len(files) == source.data.shape[2]
    assert seg.FrameOfReferenceUID == FRAME_OF_REFERENCE and seg.PatientID == "P1"


def test_a_prediction_of_another_shape_is_one_line_and_writes_nothing(series, tmp_path):
    folder, labels = series
    with pytest.raises(InvalidCase, match="does not fit the series"):
        write_dicom_seg(labels[:, :, :-1], folder, tmp_path / "b.seg.dcm")
    assert not list(tmp_path.glob("*.dcm")) and not list(tmp_path.glob(".*tmp"))


def test_predict_writes_a_seg_equal_to_its_nifti_prediction(checkpoints, phantom_dir, tmp_path):
    volume = nib.load(phantom_dir / "volume-0.nii.gz")
    series = tmp_path / "data" / "patient-0"
    write_series(series, np.asarray(volume.dataobj), volume.affine, edit=with_patient)
    out = tmp_path / "out"
    result = CliRunner().invoke(eval_main, ["predict", "--checkpoint", checkpoints[0], "--data", str(tmp_path / "data"),
                                            "--out", str(out), "--format", "dicom-seg"])
    assert result.exit_code == 0, result.output
    nifti = np.asarray(nib.load(out / "predictions" / "patient-0.nii").dataobj)
    assert (nifti == 1).any()  # the model finds liver: the comparison below is not of empty masks
    np.testing.assert_array_equal(read_dicom_seg(out / "predictions" / "patient-0.seg.dcm", series), nifti)


def test_dicom_seg_for_nifti_inputs_is_one_line(checkpoints, phantom_dir, tmp_path):
    result = CliRunner().invoke(eval_main, ["predict", "--checkpoint", checkpoints[0], "--data", str(phantom_dir),
                                            "--out", str(tmp_path / "out"), "--format", "dicom-seg"])
    assert result.exit_code == 1 and "none of these cases is one" in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out" / "predictions").exists()
