"""Shared fixtures: tiny phantoms and hand-made NIfTI cases."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations as ornt

from shardgen.orientation import CANONICAL_AXCODES, affine_for


def save_canonical(path: Path, canonical: np.ndarray, spacing=(2.0, 0.8, 0.8),
                   axcodes=("L", "P", "S"), origin=(-170.0, -180.0, 0.0)) -> np.ndarray:
    """Store a (z, row, col) array as NIfTI with the given voxel axes; returns the affine."""
    affine, _ = affine_for(canonical.shape, spacing, axcodes, origin)
    transform = ornt.ornt_transform(ornt.axcodes2ornt(CANONICAL_AXCODES), ornt.axcodes2ornt(axcodes))
    nib.save(nib.Nifti1Image(ornt.apply_orientation(canonical, transform), affine), str(path))
    return affine


def blob_case(depth: int = 12, size: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small canonical image/label pair: an ellipse of 'liver' with a 'tumour' inside."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = rng.normal(0, 15, (depth, size, size)).astype(np.float32)
    label = np.zeros((depth, size, size), np.uint8)
    liver = ((yy - size * 0.4) / (size * 0.2)) ** 2 + ((xx - size * 0.35) / (size * 0.25)) ** 2 < 1
    for z in range(depth // 4, 3 * depth // 4):
        label[z][liver] = 1
        image[z][liver] += 110
    label[depth // 2][(yy - size * 0.4) ** 2 + (xx - size * 0.35) ** 2 < (size * 0.06) ** 2] = 2
    return np.rint(image).astype(np.int16), label


def write_blob_case(folder: Path, index: int, gz: bool = True, **kwargs) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    image, label = blob_case(seed=index)
    ext = ".nii.gz" if gz else ".nii"
    vol, seg = folder / f"volume-{index}{ext}", folder / f"segmentation-{index}{ext}"
    save_canonical(vol, image, **kwargs)
    save_canonical(seg, label, **kwargs)
    return vol, seg


def labels(shape, liver=(), tumour=()) -> np.ndarray:
    """A label volume: 0, then 1 in each ``liver`` box, then 2 in each ``tumour`` box."""
    out = np.zeros(shape, np.uint8)
    for box in liver:
        out[box] = 1
    for box in tumour:
        out[box] = 2
    return out


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Six tiny phantom cases (64 px, 10-16 slices), shared by the tests that only read them."""
    from shardgen.phantom import write_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    write_phantoms(out, 6, seed=3, size=64, slices=(10, 16))
    return out


@pytest.fixture(scope="session")
def train_shards(phantom_dir, tmp_path_factory) -> Path:
    """64 px shards of the six phantoms, half training and half validation cases, shared by
    the training tests (built once per run)."""
    from shardgen.build import BuildConfig, build_shards
    from shardgen.preprocess import Preprocessing

    out = tmp_path_factory.mktemp("train-shards")
    build_shards(BuildConfig(inputs=(phantom_dir,), out=out, preprocessing=Preprocessing(size=64),
                             fractions=(0.5, 0.5, 0.0)))
    return out
