"""The visible-lesion oracle: the per-case tumour Dice of a prediction that is exactly the
reference lesions large and contrasted enough to be seen, and nothing else. It says what
a case's tumour Dice can be expected to reach (docs/METRICS.md, "Visible-lesion oracle").

Lesions are measured by shardgen.stats.measure_lesions, the one implementation also behind
``liverseg-shards stats`` and ``python -m benchmarks.ceiling``. No torch here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

# A lesion of 0.5 cm³ is a ball ~10 mm across, the smallest size radiologists measure
# (RECIST); 20 HU is the |contrast| below which shardgen.stats counts a lesion as low-contrast.
VISIBLE_MIN_CM3 = 0.5
VISIBLE_MIN_HU = 20.0


class OracleLesion(NamedTuple):
    """One reference lesion (a 6-connected component of label 2)."""

    voxels: int
    volume_cm3: float
    contrast_hu: float  # median HU inside minus the liver's around it; NaN without liver


def lesion_table(label: np.ndarray, image: np.ndarray, spacing) -> list[OracleLesion]:
    """Each reference lesion of a case: voxels, volume in cm³ and contrast in HU (the lesion's
    median HU minus the median HU of the liver, label 1, 2-10 mm around it; of the whole
    liver when nothing lies there; NaN without liver)."""
    from shardgen.stats import measure_lesions

    voxel_cm3 = float(np.prod(spacing)) / 1000.0
    return [OracleLesion(lesion.voxels, lesion.voxels * voxel_cm3,
                         math.nan if lesion.contrast_hu is None else lesion.contrast_hu)
            for lesion in measure_lesions(label, image, spacing)]


def is_visible(lesion: OracleLesion, min_cm3: float, min_hu: float) -> bool:
    """At least ``min_cm3`` and ``|contrast| >= min_hu`` (a NaN contrast is never visible)."""
    return lesion.volume_cm3 >= min_cm3 and abs(lesion.contrast_hu) >= min_hu


def oracle_dice(lesions: list[OracleLesion], min_cm3: float = VISIBLE_MIN_CM3,
                min_hu: float = VISIBLE_MIN_HU) -> float:
    """Tumour Dice of a case (LiTS rule: 1 when both are empty) for a prediction that is
    exactly its visible lesions: the lesions are disjoint parts of the reference, so the
    voxel counts decide it."""
    found = sum(lesion.voxels for lesion in lesions if is_visible(lesion, min_cm3, min_hu))
    total = found + sum(lesion.voxels for lesion in lesions)
    return 1.0 if total == 0 else 2.0 * found / total


def case_oracle_dice(label: np.ndarray, image: np.ndarray, spacing, min_cm3: float = VISIBLE_MIN_CM3,
                     min_hu: float = VISIBLE_MIN_HU) -> float:
    """oracle_dice of one case from its reference labels (0/1/2), CT in HU and spacing in mm."""
    return oracle_dice(lesion_table(label, image, spacing), min_cm3, min_hu)
