"""The preprocessing definition: window, resize, context stacking, settings as data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shardgen.errors import ShardgenError
from shardgen.preprocess import (Preprocessing, SliceGeometry, context_indices, preprocess_image,
                                 interpolation_matrix, preprocess_label, resize_labels, resize_linear,
                                 window_scaled)


@pytest.mark.parametrize("name, hu, expected", [
    ("air clipped to 0", -1000, 0),
    ("window low", -100, 0),
    ("window high", 400, 255),
    ("bone clipped to 255", 1500, 255),
    ("liver", 110, 107),        # (110 + 100) * 255 / 500 = 107.1
    ("water", 0, 51),           # 100 * 0.51
])
def test_window_to_uint8(name, hu, expected):
    settings = Preprocessing(size=8)
    out = preprocess_image(np.full((8, 8), hu, np.int16), settings, (1.0, 1.0))
    assert out.dtype == np.uint8 and (out == expected).all()


def test_window_same_for_int_and_float_input():
    hu = np.arange(-300, 600, dtype=np.int16).reshape(30, 30)
    settings = Preprocessing(size=30)
    assert (preprocess_image(hu, settings, (0.8, 0.8))
            == preprocess_image(hu.astype(np.float32), settings, (0.8, 0.8))).all()


@pytest.mark.parametrize("shape, size", [((64, 64), 32), ((48, 80), 64), ((30, 30), 90)])
def test_linear_resize_matches_torch_antialiased_bilinear(shape, size):
    img = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    ours = resize_linear(img, SliceGeometry.resize(shape, (size, size)))
    ref = F.interpolate(torch.from_numpy(img)[None, None], size=(size, size), mode="bilinear",
                        align_corners=False, antialias=True)[0, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_resize_is_identity_at_same_size():
    img = np.random.default_rng(1).normal(size=(3, 16, 16)).astype(np.float32)
    assert (resize_linear(img, SliceGeometry.resize((16, 16), (16, 16))) == img).all()


def test_label_resize_keeps_label_values_and_geometry():
    label = np.zeros((64, 64), np.uint8)
    label[16:48, 8:24] = 1
    label[30:34, 12:16] = 2
    small = resize_labels(label, SliceGeometry.resize((64, 64), (32, 32)))
    assert set(np.unique(small)) == {0, 1, 2}
    assert (small[8:24, 4:12] >= 1).all() and small[:8].max() == 0
    big = preprocess_label(small, Preprocessing(size=64), (1.0, 1.0))
    assert (big == label).mean() > 0.98


def centroid(mask: np.ndarray) -> np.ndarray:
    return np.array(np.nonzero(mask), float).mean(axis=1)


@pytest.mark.parametrize("size", [256, 128])
def test_labels_stay_on_the_resized_images_grid(size):
    """A disc's label centroid after resizing lies where the disc's centre maps to on the
    output grid (input pixel centre c -> (c + 0.5) / scale - 0.5): nearest neighbour was
    half an input pixel off, i.e. -0.25 px at 512 -> 256."""
    yy, xx = np.mgrid[:512, :512]
    offsets = []
    for cy, cx in ((200.3, 250.7), (301.0, 190.5), (255.5, 255.5), (140.25, 330.8)):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 70.0 ** 2
        label = disc.astype(np.uint8)
        label[(yy - cy) ** 2 + (xx - cx) ** 2 < 20.0 ** 2] = 2
        small = preprocess_label(label, Preprocessing(size=size), (0.7, 0.7))
        scale = 512 / size
        for mask_in, mask_out in ((label >= 1, small >= 1), (label == 2, small == 2)):
            expected = (centroid(mask_in) + 0.5) / scale - 0.5
            offsets.append(centroid(mask_out) - expected)
    assert np.abs(np.mean(offsets, axis=0)).max() < 0.05, np.mean(offsets, axis=0)
    assert np.abs(offsets).max() < 0.15, offsets


def test_label_resize_matches_the_whole_slice_computation_and_keeps_empty_slices_empty():
    label = np.zeros((2, 96, 80), np.uint8)
    label[0, 30:61, 20:47] = 1
    label[0, 40:45, 25:33] = 2
    halves = SliceGeometry.resize((96, 80), (48, 40))
    small = resize_labels(label, halves)
    rows, cols = interpolation_matrix(96, 48), interpolation_matrix(80, 40)
    for level in (1, 2):
        whole = rows @ (label >= level).astype(np.float32) @ cols.T
        differ = (small >= level) != (whole > 0.5)
        assert not differ[np.abs(whole - 0.5) > 1e-5].any()  # up to rounding at exactly half
    assert small[1].max() == 0 and resize_labels(np.zeros((96, 80), np.uint8), halves).max() == 0


@pytest.mark.parametrize("name, z, depth, context, expected", [
    ("middle", 5, 10, 1, [4, 5, 6]),
    ("bottom edge replicated", 0, 10, 1, [0, 0, 1]),
    ("top edge replicated", 9, 10, 2, [7, 8, 9, 9, 9]),
    ("single-slice volume", 0, 1, 1, [0, 0, 0]),
    ("no context", 3, 10, 0, [3]),
])
def test_context_indices(name, z, depth, context, expected):
    assert context_indices(z, depth, context) == expected


def test_settings_round_trip_and_fingerprint():
    settings = Preprocessing(window=(-50, 250), size=128, context=2, spacing_mm=1.5)
    again = Preprocessing.from_dict(settings.to_dict())
    assert again == settings and again.channels == 5 and again.spacing_mm == 1.5
    assert again.fingerprint() != Preprocessing().fingerprint()
    assert Preprocessing(spacing_mm=1).fingerprint() != Preprocessing().fingerprint()


def test_settings_recorded_before_the_pixel_size_setting_fit_the_field_of_view():
    recorded = {"window": [-100.0, 400.0], "size": 64, "context": 1, "orientation": "SPL"}
    assert Preprocessing.from_dict(recorded).spacing_mm is None


@pytest.mark.parametrize("kwargs, message", [
    ({"window": (400, -100)}, "window: .*high > low"),
    ({"window": (float("nan"), 400)}, "window: .*two finite numbers"),
    ({"window": (True, 400)}, "window: .*two finite numbers"),
    ({"size": 4}, "size: .*at least 8"),
    ({"size": 10**6}, r"size: .*8\.\.4096"),
    ({"size": 64.0}, "size: .*whole number"),
    ({"context": -1}, r"context: .*0\.\.16"),
    ({"context": True}, "context: .*whole number"),
    ({"spacing_mm": 0}, r"spacing_mm: .*\(0, 100\]"),
    ({"spacing_mm": -1.0}, "spacing_mm: .*pixel size in mm"),
    ({"spacing_mm": float("inf")}, "spacing_mm: .*pixel size in mm"),
    ({"spacing_mm": "1"}, "spacing_mm: .*pixel size in mm"),
    ({"spacing_mm": True}, "spacing_mm: .*pixel size in mm"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ShardgenError, match=message):
        Preprocessing(**kwargs)


def test_unknown_setting_is_refused():
    with pytest.raises(ShardgenError, match="unknown preprocessing"):
        Preprocessing.from_dict({"size": 64, "spacing": 1.0})
    with pytest.raises(ShardgenError, match="must be a mapping"):
        Preprocessing.from_dict([64])


def test_window_scaled_is_float_in_range():
    out = window_scaled(np.array([-2000, 150, 3000], np.int16), (-100.0, 400.0))
    assert out.dtype == np.float32 and out.tolist() == [0.0, 127.5, 255.0]
