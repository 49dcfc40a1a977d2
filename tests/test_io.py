"""The shared I/O layer (shardgen.io): atomic writes, JSON-ready values, the NIfTI writer."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from shardgen.io import atomic_path, json_ready, write_json_atomic, write_nifti, write_text_atomic
from shardgen.nifti import read_volume


def test_a_completed_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "out.txt"  # the folder is made
    write_text_atomic(path, "old")
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in path.parent.iterdir()) == ["out.txt"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("kept")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "kept" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_the_temporary_is_hidden_beside_the_file_and_the_mode_is_the_usual_one(tmp_path):
    path = tmp_path / "model.safetensors"
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.safetensors.") and tmp.suffix == ".tmp"
        tmp.write_bytes(b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not tempfile's 0600


@pytest.mark.parametrize("value, expected", [
    (float("nan"), None), (math.inf, None), (np.float32(0.5), 0.5), (np.int64(3), 3), (np.bool_(True), True),
    (np.arange(3), [0, 1, 2]), ((1, Path("a/b")), [1, "a/b"]), ({2: {"x": np.nan}}, {"2": {"x": None}}),
], ids=["nan", "inf", "numpy float", "numpy int", "numpy bool", "array", "tuple and path", "nested, int key"])
def test_json_ready(value, expected):
    assert json_ready(value) == expected


def test_json_is_strict_json(tmp_path):
    path = write_json_atomic(tmp_path / "a.json", {"dice": float("nan"), "n": np.int32(2)})
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard {c}")) == {
        "dice": None, "n": 2}


@pytest.mark.parametrize("name", ["labels.nii", "labels.nii.gz"])
def test_nifti_round_trip_with_scanner_forms_and_mm(tmp_path, name):
    data = np.random.default_rng(0).integers(0, 3, (5, 6, 7)).astype(np.uint8)
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = (-10, 20, 30)
    path = write_nifti(tmp_path / name, data, affine)
    image = nib.load(path)
    assert image.get_data_dtype() == np.uint8 and np.array_equal(np.asarray(image.dataobj), data)
    assert np.allclose(image.affine, affine)
    assert int(image.header["qform_code"]) == int(image.header["sform_code"]) == 1
    assert image.header.get_xyzt_units()[0] == "mm"
    assert np.array_equal(read_volume(path).data, data)  # and shardgen's own reader agrees


def test_gzip_output_is_the_same_bytes_every_time(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    first = write_nifti(tmp_path / "a.nii.gz", data, np.eye(4)).read_bytes()
    second = write_nifti(tmp_path / "b.nii.gz", data, np.eye(4)).read_bytes()
    assert first == second
    assert first[3] & 0x08 == 0 and first[4:8] == bytes(4)  # no file name, mtime 0


def test_the_input_header_is_kept_when_given(tmp_path):
    source = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.diag([1.0, 1.0, 3.0, 1.0]))
    source.set_qform(source.affine, code=2)  # aligned
    source.set_sform(source.affine, code=4)  # MNI
    source.header.set_xyzt_units("mm", "sec")
    nib.save(source, tmp_path / "ct.nii")
    spatial = read_volume(tmp_path / "ct.nii").spatial
    written = nib.load(write_nifti(tmp_path / "pred.nii", np.ones((4, 4, 4), np.uint8), source.affine, spatial))
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (2, 4)
    assert written.header.get_xyzt_units() == ("mm", "sec")
