"""Reading NIfTI: our one-shot reader agrees with nibabel's on every encoding we meet."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from shardgen.nifti import read_volume


def sample_image(dtype=np.int16, shape=(20, 18, 7)):
    data = np.random.default_rng(0).integers(-1000, 1500, shape).astype(dtype)
    affine = np.diag([-0.7, -0.7, 2.5, 1.0])
    affine[:3, 3] = [170, 180, -300]
    return nib.Nifti1Image(data, affine)


def scaled(path):
    img = sample_image()
    img.header.set_slope_inter(0.5, -1024)
    nib.save(img, str(path))


def big_endian(path):
    img = sample_image()
    hdr = img.header.as_byteswapped(">")
    nib.save(nib.Nifti1Image(img.get_fdata().astype(">i2"), img.affine, hdr), str(path))


def float_volume(path):
    nib.save(sample_image(np.float32), str(path))


def nifti2(path):
    img = sample_image()
    nib.save(nib.Nifti2Image(np.asanyarray(img.dataobj), img.affine), str(path))


def two_gzip_members(path):
    nib.save(sample_image(), str(path))
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))


def nifti2_big_endian(path):
    img = sample_image()
    header = nib.Nifti2Header().as_byteswapped(">")
    nib.save(nib.Nifti2Image(np.asanyarray(img.dataobj).astype(">i2"), img.affine, header), str(path))


def data_past_the_header_size(path):
    """More bytes in the gzip stream than the header's shape needs: read as nibabel does."""
    nib.save(sample_image(), str(path))
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()) + bytes(1000)))


def plain(path):
    nib.save(sample_image(), str(path))


@pytest.mark.parametrize("name, write, suffix", [
    ("plain .nii", plain, ".nii"),
    ("plain .nii.gz", plain, ".nii.gz"),
    ("scaled (slope/inter)", scaled, ".nii.gz"),
    ("big-endian", big_endian, ".nii"),
    ("float32", float_volume, ".nii.gz"),
    ("NIfTI-2", nifti2, ".nii"),
    ("gzip with two members", two_gzip_members, ".nii.gz"),
    ("big-endian NIfTI-2", nifti2_big_endian, ".nii.gz"),
    ("gzip with data past the header's size", data_past_the_header_size, ".nii.gz"),
])
def test_reader_agrees_with_nibabel(tmp_path, name, write, suffix):
    path = tmp_path / f"volume-0{suffix}"
    write(path)
    ours = read_volume(path)
    img = nib.load(str(path))
    np.testing.assert_array_equal(ours.data, img.get_fdata())
    np.testing.assert_array_equal(ours.affine, img.affine)
    assert ours.data.dtype.isnative
