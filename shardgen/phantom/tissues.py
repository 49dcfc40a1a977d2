"""Tissue codes, the portal-venous HU table and the label of each tissue."""

from __future__ import annotations

import numpy as np

TISSUES = (
    "air", "lung", "skin", "fat", "muscle", "visceral_fat",
    "cortical_bone", "cancellous_bone", "cartilage", "disc", "csf",
    "table_shell", "table_foam",
    "liver", "portal_branch", "hepatic_vein",
    "portal_vein", "ivc", "aorta", "heart_blood", "myocardium",
    "spleen", "pancreas", "kidney_cortex", "kidney_medulla", "urine",
    "gut_wall", "gut_fluid", "feces", "gas", "bile",
    "lesion",
)


TISSUE_CODES: dict[str, int] = {name: code for code, name in enumerate(TISSUES)}
LIVER_TISSUES = ("liver", "portal_branch", "hepatic_vein")  # label 1, as LiTS labels vessels in the liver

# Portal-venous HU ranges, one value drawn per case (sources in docs/PHANTOMS.md).
# Spleen and lesions are drawn relative to the liver instead.
HU_RANGES: dict[str, tuple[float, float]] = {
    "air": (-1000, -1000), "lung": (-880, -820), "skin": (20, 50), "fat": (-115, -95),
    "muscle": (40, 60), "visceral_fat": (-105, -85),
    "cortical_bone": (700, 1000), "cancellous_bone": (200, 350), "cartilage": (100, 160),
    "disc": (70, 100), "csf": (5, 20), "table_shell": (150, 350), "table_foam": (-960, -900),
    "liver": (100, 130), "portal_branch": (160, 200), "hepatic_vein": (145, 185),
    "portal_vein": (160, 200), "ivc": (120, 160), "aorta": (150, 200),
    "heart_blood": (140, 180), "myocardium": (90, 120),
    "pancreas": (90, 120), "kidney_cortex": (150, 200), "kidney_medulla": (115, 150),
    "urine": (0, 15), "gut_wall": (60, 85), "gut_fluid": (0, 20), "feces": (-60, 30),
    "gas": (-1000, -950), "bile": (0, 20),
}
SPLEEN_MINUS_LIVER = (-5.0, 12.0)
def _codes(*names: str) -> np.ndarray:
    """A 256-entry boolean table selecting tissue codes, for fast `table[tissue]` masks."""
    table = np.zeros(256, dtype=bool)
    table[[TISSUE_CODES[n] for n in names]] = True
    return table


_SOFT = ("visceral_fat", "gut_wall", "gut_fluid", "feces", "gas", "pancreas", "spleen")
_ONTO_FAT = _codes("visceral_fat")
_ONTO_SOFT = _codes(*_SOFT)
_ONTO_LIVER = _codes("liver")
_IN_LIVER = _codes(*LIVER_TISSUES, "lesion")

_LABELS = np.zeros(256, dtype=np.uint8)
_LABELS[[TISSUE_CODES[n] for n in LIVER_TISSUES]] = 1
_LABELS[TISSUE_CODES["lesion"]] = 2


def _sample_hu(rng: np.random.Generator) -> np.ndarray:
    """Per-case lookup table tissue code → HU."""
    lut = np.zeros(256, dtype=np.float32)
    for name in TISSUES:
        if name in HU_RANGES:
            lut[TISSUE_CODES[name]] = rng.uniform(*HU_RANGES[name])
    liver = lut[TISSUE_CODES["liver"]]
    lut[TISSUE_CODES["spleen"]] = liver + rng.uniform(*SPLEEN_MINUS_LIVER)
    lut[TISSUE_CODES["lesion"]] = liver - 40.0  # lesions are painted individually
    return lut


# ----------------------------------------------------------------------------- body wall, thorax, bone
