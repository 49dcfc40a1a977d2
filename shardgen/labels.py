"""The label vocabulary of shardgen and liverseg: voxel labels, class names, the two
classes LiTS scores, their colours, and the one way a label mask is drawn over a slice."""

from __future__ import annotations

import numpy as np

BACKGROUND, LIVER, TUMOUR = 0, 1, 2
CLASS_NAMES = ("background", "liver", "tumour")  # label i is CLASS_NAMES[i], in shards, models and predictions
NUM_CLASSES = len(CLASS_NAMES)
# The classes LiTS scores: liver = label >= LIVER (a tumour lies inside the liver, so it
# counts as liver), tumour = label == TUMOUR.
SCORED_CLASSES = ("liver", "tumour")
CLASS_RGB = {"liver": (0.17, 0.63, 0.17), "tumour": (0.84, 0.15, 0.16)}  # RGB in [0, 1]
OVERLAY_ALPHA = 0.45


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """A grey uint8 slice (H, W) with liver and tumour labels tinted in their colours,
    as RGB floats in [0, 1] (H, W, 3)."""
    rgb = np.repeat(np.asarray(image)[..., None].astype(np.float32) / 255.0, 3, axis=-1)
    for value, name in ((LIVER, "liver"), (TUMOUR, "tumour")):
        chosen = labels == value
        rgb[chosen] = (1 - alpha) * rgb[chosen] + alpha * np.array(CLASS_RGB[name], np.float32)
    return rgb
