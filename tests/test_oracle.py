"""The visible-lesion oracle (liverseg.oracle): lesions measured on a hand-made case, and
the Dice of a prediction that is exactly the lesions large and contrasted enough."""

from __future__ import annotations

import math

import numpy as np
import pytest

from liverseg import oracle

SPACING = (1.0, 1.0, 1.0)


def faint_and_bright_case():
    """A liver block at 120 HU (1 mm voxels) with a 14 mm ball at 170 HU (bright, +50 HU)
    and a 24 mm ball at 105 HU (faint, -15 HU)."""
    label = np.zeros((60, 80, 120), np.uint8)
    label[5:55, 5:75, 5:115] = 1
    image = np.full(label.shape, -100.0, np.float32)
    image[label == 1] = 120.0
    z, y, x = np.ogrid[:60, :80, :120]
    bright = (z - 30) ** 2 + (y - 40) ** 2 + (x - 25) ** 2 <= 7 ** 2
    faint = (z - 30) ** 2 + (y - 40) ** 2 + (x - 80) ** 2 <= 12 ** 2
    label[bright | faint] = 2
    image[bright], image[faint] = 170.0, 105.0
    return label, image, bright, faint


@pytest.fixture(scope="module")
def case():
    return faint_and_bright_case()


@pytest.fixture(scope="module")
def lesions(case):
    label, image, _, _ = case
    return oracle.lesion_table(label, image, SPACING)


def test_lesion_table_measures_volume_and_contrast(case, lesions):
    _, _, bright, faint = case
    by_size = sorted(lesions, key=lambda lesion: lesion.voxels)
    assert [lesion.voxels for lesion in by_size] == [bright.sum(), faint.sum()]
    assert [lesion.volume_cm3 for lesion in by_size] == pytest.approx([bright.sum() / 1000, faint.sum() / 1000])
    assert [lesion.contrast_hu for lesion in by_size] == [50.0, -15.0]


# name, min cm³, min |HU|, which balls the oracle finds
ORACLE_CASES = [
    ("everything", 0.0, 0.0, ("bright", "faint")),
    ("defaults: the faint ball is not visible", oracle.VISIBLE_MIN_CM3, oracle.VISIBLE_MIN_HU, ("bright",)),
    ("2 cm³: the 1.4 cm³ bright ball is too small", 2.0, 0.0, ("faint",)),
    ("|contrast| 30 HU, both signs: the bright ball", 0.0, 30.0, ("bright",)),
    ("10 cm³: nothing", 10.0, 0.0, ()),
]


@pytest.mark.parametrize("min_cm3, min_hu, found", [c[1:] for c in ORACLE_CASES], ids=[c[0] for c in ORACLE_CASES])
def test_oracle_finds_only_the_visible_lesions(case, lesions, min_cm3, min_hu, found):
    _, _, bright, faint = case
    balls = {"bright": int(bright.sum()), "faint": int(faint.sum())}
    hit = sum(balls[name] for name in found)
    expected = 2 * hit / (hit + sum(balls.values()))
    assert oracle.oracle_dice(lesions, min_cm3, min_hu) == pytest.approx(expected)


def test_case_oracle_uses_the_default_thresholds(case, lesions):
    label, image, _, _ = case
    assert oracle.case_oracle_dice(label, image, SPACING) == oracle.oracle_dice(
        lesions, oracle.VISIBLE_MIN_CM3, oracle.VISIBLE_MIN_HU) < 1.0


def test_a_tumour_free_case_scores_one_and_a_lesion_without_liver_is_not_visible(case):
    label, image, _, _ = case
    tumour_free = np.where(label == 2, 1, label).astype(np.uint8)
    assert oracle.case_oracle_dice(tumour_free, image, SPACING, 1, 30) == 1.0
    no_liver = np.where(label == 1, 0, label).astype(np.uint8)
    assert all(math.isnan(lesion.contrast_hu) for lesion in oracle.lesion_table(no_liver, image, SPACING))
    assert oracle.case_oracle_dice(no_liver, image, SPACING, 0, 0) == 0.0
