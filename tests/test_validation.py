"""Bad inputs: each is rejected with one line naming the file and the reason; the rest is kept."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import blob_case, save_canonical, write_blob_case
from shardgen.build import BuildConfig, build_shards
from shardgen.cli import main
from shardgen.preprocess import Preprocessing


def zero_byte(folder: Path) -> Path:
    vol, _ = write_blob_case(folder, 7)
    vol.write_bytes(b"")
    return vol


def truncated_gz(folder: Path) -> Path:
    vol, _ = write_blob_case(folder, 7)
    vol.write_bytes(vol.read_bytes()[: vol.stat().st_size // 2])
    return vol


def truncated_nii(folder: Path) -> Path:
    vol, _ = write_blob_case(folder, 7, gz=False)
    vol.write_bytes(vol.read_bytes()[:5000])
    return vol


def not_nifti(folder: Path) -> Path:
    write_blob_case(folder, 7)
    vol = folder / "volume-7.nii.gz"
    vol.write_bytes(gzip.compress(b"this is a CSV file, not an image\n" * 20))
    return vol


def four_d(folder: Path) -> Path:
    _, seg = write_blob_case(folder, 7)
    vol = folder / "volume-7.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((48, 48, 12, 2), np.int16), np.eye(4)), str(vol))
    return vol


def shape_mismatch(folder: Path) -> Path:
    write_blob_case(folder, 7)
    seg = folder / "segmentation-7.nii.gz"
    save_canonical(seg, blob_case(depth=10)[1])
    return seg


def affine_mismatch(folder: Path) -> Path:
    write_blob_case(folder, 7)
    seg = folder / "segmentation-7.nii.gz"
    save_canonical(seg, blob_case()[1], spacing=(2.5, 0.8, 0.8))
    return seg


def label_three(folder: Path) -> Path:
    write_blob_case(folder, 7)
    seg = folder / "segmentation-7.nii.gz"
    label = blob_case()[1]
    label[5, 10, 10] = 3
    save_canonical(seg, label)
    return seg


def nan_intensity(folder: Path) -> Path:
    write_blob_case(folder, 7)
    vol = folder / "volume-7.nii.gz"
    image = blob_case()[0].astype(np.float32)
    image[3, 4, 5] = np.nan
    save_canonical(vol, image)
    return vol


def missing_label(folder: Path) -> Path:
    vol, seg = write_blob_case(folder, 7)
    seg.unlink()
    return vol


def float_label_integral(folder: Path) -> Path:  # accepted: integral floats are fine
    write_blob_case(folder, 7)
    seg = folder / "segmentation-7.nii.gz"
    save_canonical(seg, blob_case(seed=7)[1].astype(np.float32))
    return seg


BAD_INPUTS = [
    ("zero-byte file", zero_byte, "empty file (0 bytes)"),
    ("truncated .nii.gz", truncated_gz, "truncated or corrupt gzip data (Compressed file ended before the end-of-stream marker was reached)"),
    ("truncated .nii", truncated_nii, "truncated: 5000 bytes of data, the header needs 55648"),
    ("not NIfTI", not_nifti, "not a NIfTI-1 or NIfTI-2 file"),
    ("4D image", four_d, "4D data of shape (48, 48, 12, 2), expected a 3D volume"),
    ("shape mismatch", shape_mismatch, "label shape (48, 48, 10) differs from image shape (48, 48, 12) (volume-7.nii.gz)"),
    ("affine mismatch", affine_mismatch, "label affine differs from the image's (volume-7.nii.gz) by up to 0.5"),
    ("label value 3", label_three, "label values must be 0, 1 or 2, found 3"),
    ("NaN intensities", nan_intensity, "1 non-finite intensities (NaN or inf)"),
    ("missing label file", missing_label, "missing label file"),
]


def good_cases(folder: Path, n: int = 3) -> None:
    for i in range(n):
        write_blob_case(folder, i)


def config(inp: Path, out: Path) -> BuildConfig:
    return BuildConfig(inputs=(inp,), out=out, preprocessing=Preprocessing(size=32),
                       fractions=(1.0, 0.0, 0.0))


@pytest.mark.parametrize("name, make_bad, reason", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_case_is_rejected_and_the_others_are_sharded(tmp_path, name, make_bad, reason):
    good_cases(tmp_path / "in")
    bad_file = make_bad(tmp_path / "in")
    result = build_shards(config(tmp_path / "in", tmp_path / "out"))
    assert [(r.case, r.file, r.reason) for r in result.rejected] == [("volume-7", str(bad_file), reason)]
    assert result.manifest["rejected"] == [{"case": "volume-7", "file": str(bad_file), "reason": reason}]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == [
        "volume-0.tar", "volume-1.tar", "volume-2.tar"]
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_integral_float_labels_are_accepted(tmp_path):
    good_cases(tmp_path / "in", 1)
    float_label_integral(tmp_path / "in")
    result = build_shards(config(tmp_path / "in", tmp_path / "out"))
    assert result.rejected == [] and len(result.manifest["shards"]) == 2


def test_cli_reports_one_line_per_bad_case_and_fails_unless_skip_bad(tmp_path):
    good_cases(tmp_path / "in", 2)
    bad = label_three(tmp_path / "in")
    args = ["build", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--size", "32"]
    failed = CliRunner().invoke(main, args)
    assert failed.exit_code == 1
    assert f"rejected {bad}: label values must be 0, 1 or 2, found 3" in failed.output
    assert "Error: 1 case(s) rejected (listed in manifest.json); pass --skip-bad" in failed.output
    assert "Traceback" not in failed.output and failed.exception is None or isinstance(failed.exception, SystemExit)
    skipped = CliRunner().invoke(main, args + ["--skip-bad"])
    assert skipped.exit_code == 0, skipped.output


@pytest.mark.parametrize("name, args, message", [
    ("missing input folder", ["--input", "nowhere"], "Error: nowhere: input folder not found"),
    ("empty input folder", ["--input", "."], "Error: no cases found under ."),
    ("bad window", ["--input", ".", "--window", "400,-100"], "Error: window: the HU window must have high > low"),
    ("bad split fractions", ["--input", ".", "--split-fractions", "0.5,0.1"], "expected TRAIN,VAL,TEST"),
    ("node rank out of range", ["--input", ".", "--num-nodes", "2", "--node-rank", "2"], "Error: --node-rank must be in [0, 2)"),
])
def test_cli_errors_are_one_line(tmp_path, monkeypatch, name, args, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["build", "--out", "out", *args])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
