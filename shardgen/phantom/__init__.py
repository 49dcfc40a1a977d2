"""Synthetic portal-venous abdominal CT volumes with liver/tumour labels, stored like LiTS files;
docs/PHANTOMS.md describes the anatomy, the HU table, the lesion and noise calibration, the
ranges and what is not modelled.

One module per concern, in the order a case is made: ``tissues`` (codes, HU table),
``geometry`` (grid, fields, shapes, the canvas), ``scan`` (acquisition geometry), ``body``
(habitus, body wall, bone, organs), ``liver`` (liver, vessels, lesions), ``imaging`` (HU,
blur, noise), ``synthesis`` (one case) and ``writer`` (LiTS files).
"""

from .synthesis import Phantom, make_phantom
from .tissues import HU_RANGES, LIVER_TISSUES, SPLEEN_MINUS_LIVER, TISSUE_CODES, TISSUES
from .writer import write_phantom_case, write_phantoms

__all__ = ["HU_RANGES", "LIVER_TISSUES", "SPLEEN_MINUS_LIVER", "TISSUES", "TISSUE_CODES", "Phantom",
           "make_phantom", "write_phantom_case", "write_phantoms"]
