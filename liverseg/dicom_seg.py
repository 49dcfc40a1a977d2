"""A prediction for a DICOM series as a DICOM Segmentation object (highdicom): liver and
tumour segments, coded in SNOMED CT, referencing the source series' instances, so that
3D Slicer, OHIF or a PACS shows it over the CT it came from.

The segments do not overlap, as the labels do not: segment 1 "Liver" holds the voxels
labelled 1 (liver without its lesions), segment 2 "Liver tumour" those labelled 2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.sr.codedict import codes

from shardgen.dicom import check_grid, read_slices, slice_order
from shardgen.errors import InvalidCase
from shardgen.io import atomic_path

from . import __version__

SEG_SUFFIX = ".seg.dcm"


def segment_descriptions() -> list:
    import highdicom as hd

    algorithm = hd.AlgorithmIdentificationSequence(name="liverseg", family=codes.DCM.ArtificialIntelligence,
                                                   version=__version__)
    automatic = hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    return [
        hd.seg.SegmentDescription(1, "Liver", codes.SCT.AnatomicalStructure, codes.SCT.Liver,
                                  automatic, algorithm),
        hd.seg.SegmentDescription(2, "Liver tumour", codes.SCT.MorphologicallyAbnormalStructure,
                                  codes.SCT.Neoplasm, automatic, algorithm, anatomic_regions=[codes.SCT.Liver]),
    ]


def write_dicom_seg(labels: np.ndarray, series: str | Path, out: str | Path) -> Path:
    """Write ``labels`` (0 background, 1 liver, 2 tumour; voxels (column, row, slice) as
    :func:`shardgen.dicom.read_series` gives the series) as a DICOM SEG at ``out``."""
    import highdicom as hd

    series, out = Path(series), Path(out)
    slices = read_slices(series)
    check_grid(series, slices)
    order, _ = slice_order(series, slices)
    frames = np.ascontiguousarray(np.asarray(labels, dtype=np.uint8).transpose(2, 1, 0))
    expected = (len(order), *order[0].shape)
    if frames.shape != expected:
        raise InvalidCase(series, f"a prediction of {frames.shape[::-1]} voxels does not fit the series "
                                  f"({expected[::-1]} voxels)")
    sources = [s.dataset for s in order]
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segment_descriptions(), series_instance_uid=hd.UID(), series_number=900,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="liverseg",
            manufacturer_model_name="liverseg", software_versions=__version__, device_serial_number="0",
            series_description="liverseg liver and tumour", omit_empty_frames=bool(frames.any()))
    except (AttributeError, ValueError, TypeError) as exc:  # a source lacking what a SEG must copy
        raise InvalidCase(series, f"cannot make a DICOM SEG for this series ({exc})") from None
    with atomic_path(out) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return out


def read_dicom_seg(path: str | Path, series: str | Path) -> np.ndarray:
    """A SEG written by :func:`write_dicom_seg` back as labels in the series' voxel order."""
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    slices = read_slices(Path(series))
    order, _ = slice_order(Path(series), slices)
    uids = [s.dataset.SOPInstanceUID for s in order]
    masks = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2],
                                              combine_segments=True, skip_overlap_checks=True)
    return np.asarray(masks, dtype=np.uint8).transpose(2, 1, 0)
