"""In-plane geometry: slices keep their physical aspect in the shards, and inference maps
the network's grid back onto the input's exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from conftest import save_canonical
from liverseg.inference import ToInputGrid
from shardgen.build import BuildConfig, build_shards
from shardgen.format import decode_sample
from shardgen.preprocess import (AxisMap, Preprocessing, SliceGeometry, preprocess_image, preprocess_label,
                                 quantise, slice_geometry, window_scaled)


def sphere_case(folder: Path, radius_mm: float = 60.0) -> tuple[tuple[float, float, float], float]:
    """A 384×320 volume of 0.6×0.9 mm pixels (5 mm slices, stored RAS), soft tissue
    (40 HU) holding a sphere of liver (150 HU) with a tumour at its centre; returns the
    spacing and the sphere's diameter."""
    spacing = (5.0, 0.6, 0.9)
    zz, yy, xx = np.mgrid[:9, :384, :320].astype(np.float32)
    r2 = ((zz - 4) * spacing[0]) ** 2 + ((yy - 191.5) * spacing[1]) ** 2 + ((xx - 159.5) * spacing[2]) ** 2
    label = (r2 < radius_mm ** 2).astype(np.uint8)
    label[r2 < 15.0 ** 2] = 2
    image = np.where(label > 0, 150, 40).astype(np.int16)
    kwargs = dict(spacing=spacing, axcodes=("R", "A", "S"), origin=(-140.0, -110.0, 20.0))
    folder.mkdir(parents=True)
    save_canonical(folder / "volume-0.nii.gz", image, **kwargs)
    save_canonical(folder / "segmentation-0.nii.gz", label, **kwargs)
    return spacing, 2 * radius_mm


def central_slice(shards: Path) -> tuple[np.ndarray, np.ndarray]:
    samples = [decode_sample(s) for s in wds.WebDataset([str(shards / "volume-0.tar")], shardshuffle=False)]
    middle = next(s for s in samples if s.z == 4)
    return middle.image, middle.mask


def extents_mm(mask: np.ndarray, pixel_mm: float) -> tuple[float, float]:
    """Extent along rows (front to back) and along columns (right to left), in mm."""
    return mask.any(axis=1).sum() * pixel_mm, mask.any(axis=0).sum() * pixel_mm


@pytest.mark.parametrize("spacing_mm, pixel_mm", [(None, 288.0 / 128), (1.5, 1.5)],
                         ids=["fit-field-of-view", "chosen-pixel-size"])
def test_a_sphere_stays_round_in_the_shard(tmp_path, spacing_mm, pixel_mm):
    """Stretching the 230 × 288 mm field of view to a square slice made the sphere 1.25×
    deeper than wide. Fitted, the 288 mm fill the slice and the 230 mm are padded; at
    1.5 mm both are cropped to the slice's 192 mm."""
    spacing, diameter = sphere_case(tmp_path / "in")
    settings = Preprocessing(size=128, spacing_mm=spacing_mm)
    result = build_shards(BuildConfig(inputs=(tmp_path / "in",), out=tmp_path / "shards", preprocessing=settings))
    assert result.rejected == [] and result.manifest["preprocessing"]["spacing_mm"] == spacing_mm
    image, mask = central_slice(tmp_path / "shards")
    for what, shape in (("label", mask >= 1), ("image", image > 100)):
        rows, cols = extents_mm(shape, pixel_mm)
        assert abs(rows / diameter - 1) < 0.03 and abs(cols / diameter - 1) < 0.03, (what, rows, cols)
    rows, cols = extents_mm(mask == 2, pixel_mm)
    assert abs(rows - 30.0) <= pixel_mm and abs(cols - 30.0) <= pixel_mm  # the tumour, to a pixel
    # padding is air-like (the window's low end) and unlabelled; the field of view is not
    geometry = slice_geometry((384, 320), spacing[1:], settings)
    seen = np.outer(geometry.rows.inside(), geometry.cols.inside())
    assert (~seen).sum() == (0 if spacing_mm else 128 * (128 - 102))
    assert image[~seen].max(initial=0) == 0 and mask[~seen].max(initial=0) == 0 and image[seen].min() > 60


def one_hot(labels: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.from_numpy(labels).long(), 3).permute(0, 3, 1, 2).float()


def random_labels(shape: tuple[int, int, int], seed: int, border: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Nested 0/1/2 labels down to single pixels: liver blobs with noisy edges and tumours."""
    rng = np.random.default_rng(seed)
    depth, h, w = shape
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros(shape, np.uint8)
    for z in range(depth):
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        blob = ((yy - cy) / (0.25 * h)) ** 2 + ((xx - cx) / (0.3 * w)) ** 2 < rng.uniform(0.6, 1.2, (h, w))
        out[z][blob] = 1
        out[z][blob & (rng.random((h, w)) < 0.1)] = 2
    by, bx = border
    out[:, :by], out[:, h - by:], out[:, :, :bx], out[:, :, w - bx:] = 0, 0, 0, 0
    return out


@pytest.mark.parametrize("name, shape, pixel_mm, size, spacing_mm, border", [
    ("square grid, square pixels", (3, 64, 64), (0.7, 0.7), 64, None, (0, 0)),
    ("wide grid: rows padded", (3, 40, 64), (0.8, 0.8), 64, None, (0, 0)),
    ("tall grid, odd difference: columns padded", (3, 64, 47), (0.8, 0.8), 64, None, (0, 0)),
    ("the issue's 122 x 101 grid of 3 mm", (2, 122, 101), (3.0, 3.0), 122, None, (0, 0)),
    ("pixels twice as deep as wide, at the finer size", (3, 32, 64), (1.0, 0.5), 64, 0.5, (0, 0)),
    ("larger than the slice: cropped, nothing outside", (3, 80, 70), (0.8, 0.8), 64, 0.8, (8, 3)),
])
def test_oracle_round_trip_is_exact_at_native_size(name, shape, pixel_mm, size, spacing_mm, border):
    """Labels → shard labels → one-hot "probabilities" → back on the input's grid: the
    labels come back voxel for voxel when the slice's pixels are the input's own (or an
    exact subdivision of them)."""
    labels = random_labels(shape, seed=sum(shape), border=border)
    settings = Preprocessing(size=size, spacing_mm=spacing_mm)
    shard = preprocess_label(labels, settings, pixel_mm)
    assert shard.shape == (shape[0], size, size)
    back = ToInputGrid(slice_geometry(shape[1:], pixel_mm, settings), torch.device("cpu"))(one_hot(shard))
    assert tuple(back.shape) == (shape[0], 3, *shape[1:])
    assert np.array_equal(back.argmax(1).numpy(), labels), name


def test_the_inverse_covers_every_input_pixel_and_cropped_ones_are_background():
    settings = Preprocessing(size=64, spacing_mm=1.0)
    geometry = slice_geometry((100, 50), (1.0, 1.0), settings)  # rows: 18 cropped each side; cols: padded
    assert geometry.rows == AxisMap(100, 64, 1.0, 18.0) and geometry.cols == AxisMap(50, 64, 1.0, -7.0)
    probs = torch.zeros(1, 3, 64, 64)
    probs[:, 2] = 1.0  # the model says tumour everywhere it looked
    back = ToInputGrid(geometry, torch.device("cpu"))(probs)
    assert torch.allclose(back.sum(1), torch.ones(1, 100, 50))
    labels = back.argmax(1)[0].numpy()
    assert (labels[:18] == 0).all() and (labels[-18:] == 0).all() and (labels[18:-18] == 2).all()


@pytest.mark.parametrize("shape, pixel_mm, size", [
    ((384, 384), (0.7, 0.7), 64),     # shrinking
    ((48, 40), (0.75, 0.9), 64),      # equal fields of view: both axes plainly resized, growing
    ((384, 320), (0.75, 0.9), 352),   # rows shrink, columns grow
])
def test_the_inverse_of_a_plain_resize_is_torchs_bilinear_with_shardgens_weights(shape, pixel_mm, size):
    geometry = slice_geometry(shape, pixel_mm, Preprocessing(size=size))
    assert geometry == SliceGeometry.resize(shape, (size, size))
    probs = torch.rand(2, 3, size, size).softmax(1)
    back = geometry.inverse()
    rows, cols = torch.from_numpy(back.rows.matrix().copy()), torch.from_numpy(back.cols.matrix().copy())
    torch.testing.assert_close(ToInputGrid(geometry, torch.device("cpu"))(probs), rows @ probs @ cols.T,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("n, size", [(100, 64), (512, 256), (97, 97), (48, 64), (333, 512)])
def test_a_square_grid_of_square_pixels_is_resized_as_plainly_as_ever(n, size):
    """The default pixel size fits the field of view, so a square matrix of square pixels
    is a plain resize: the same bytes as the stretch-to-size resize (written out here)."""
    def plain(n_in: int, n_out: int) -> np.ndarray:
        scale = n_in / n_out
        support = max(scale, 1.0)
        centres = (np.arange(n_out) + 0.5) * scale - 0.5
        weights = np.clip(1.0 - np.abs(np.arange(n_in)[None, :] - centres[:, None]) / support, 0.0, None)
        weights /= weights.sum(axis=1, keepdims=True)
        return weights.astype(np.float32)

    settings = Preprocessing(size=size)
    assert slice_geometry((n, n), (0.781, 0.781), settings) == SliceGeometry.resize((n, n), (size, size))
    hu = np.random.default_rng(n).normal(100, 300, (2, n, n)).astype(np.int16)
    matrix = plain(n, size)
    expected = quantise(matrix @ window_scaled(hu, settings.window) @ matrix.T)
    assert np.array_equal(preprocess_image(hu, settings, (0.781, 0.781)), expected)


@pytest.mark.parametrize("shape, pixel_mm, size, spacing_mm, covered_mm", [
    ((384, 320), (0.6, 0.9), 128, None, (230.4, 288.0)),
    ((122, 101), (3.0, 3.0), 128, None, (366.0, 303.0)),
    ((512, 512), (0.7, 0.8), 256, None, (358.4, 409.6)),
    ((300, 200), (0.5, 0.5), 64, 2.0, (128.0, 100.0)),   # rows cropped to the slice's 128 mm
])
def test_slice_pixels_are_square_and_the_field_of_view_centred(shape, pixel_mm, size, spacing_mm, covered_mm):
    settings = Preprocessing(size=size, spacing_mm=spacing_mm)
    geometry = slice_geometry(shape, pixel_mm, settings)
    mm = [axis.scale * d for axis, d in zip((geometry.rows, geometry.cols), pixel_mm)]
    assert mm[0] == pytest.approx(mm[1], rel=1e-9)
    assert mm[0] == pytest.approx(spacing_mm or max(n * d for n, d in zip(shape, pixel_mm)) / size)
    for axis, want in zip((geometry.rows, geometry.cols), covered_mm):
        inside = axis.inside()
        assert inside.sum() * mm[0] == pytest.approx(want, abs=mm[0])  # whole pixels on the input
        first, last = np.flatnonzero(inside)[[0, -1]]
        assert abs(first - (size - 1 - last)) <= 1  # centred: the padding splits evenly
