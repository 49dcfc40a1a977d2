"""The lesion table and oracle behind `python launch/benchmark.py ceiling`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("liverseg_benchmark", ROOT / "launch" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def two_lesion_case():
    """A liver block at 120 HU (1 mm voxels) with a 14 mm ball at -50 HU and a 24 mm ball at -15 HU."""
    label = np.zeros((60, 80, 120), np.uint8)
    label[5:55, 5:75, 5:115] = 1
    image = np.full(label.shape, -100.0, np.float32)
    image[label == 1] = 120.0
    z, y, x = np.ogrid[:60, :80, :120]
    small = (z - 30) ** 2 + (y - 40) ** 2 + (x - 25) ** 2 <= 7 ** 2
    large = (z - 30) ** 2 + (y - 40) ** 2 + (x - 80) ** 2 <= 12 ** 2
    label[small | large] = 2
    image[small], image[large] = 70.0, 105.0
    return label, image, small, large


def test_lesion_table_measures_volume_and_contrast(bench):
    label, image, small, large = two_lesion_case()
    lesions = sorted(bench.lesion_table(label, image, (1.0, 1.0, 1.0)), key=lambda t: t[1])
    assert [n for n, _, _ in lesions] == [small.sum(), large.sum()]
    assert [round(v, 3) for _, v, _ in lesions] == [small.sum() / 1000, large.sum() / 1000]
    assert [c for _, _, c in lesions] == [-50.0, -15.0]


def test_oracle_keeps_only_the_lesions_it_may_find(bench):
    label, image, small, large = two_lesion_case()
    lesions = bench.lesion_table(label, image, (1.0, 1.0, 1.0))
    s, l = int(small.sum()), int(large.sum())
    assert bench.oracle_dice(lesions, 0, 0) == 1.0
    assert bench.oracle_dice(lesions, 2.0, 0) == pytest.approx(2 * l / (2 * l + s))  # the 1.4 cm³ ball is left out
    assert bench.oracle_dice(lesions, 0, 30) == pytest.approx(2 * s / (2 * s + l))  # the -15 HU ball is left out
    assert bench.oracle_dice(lesions, 10, 0) == 0.0
    tumour_free = np.where(label == 2, 1, label).astype(np.uint8)
    assert bench.oracle_dice(bench.lesion_table(tumour_free, image, (1.0, 1.0, 1.0)), 1, 30) == 1.0
