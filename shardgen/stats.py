"""Lesion and image statistics of a LiTS-style folder (phantoms or real data), measured one
way for both, so that the phantoms can be calibrated against LiTS.

``liverseg-shards stats DIR`` runs :func:`measure_folder`, :func:`summarise` and
:func:`format_table`; ``python -m benchmarks.ceiling`` uses :func:`measure_lesions` through liverseg.oracle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cc3d
import numpy as np
from scipy import ndimage

from .discover import CaseSource, Rejection, discover
from .errors import InvalidCase, ShardgenError
from .io import write_json_atomic
from .nifti import load_case

CONNECTIVITY = 6  # LiTS counts lesions as 6-connected components of label 2
SHELL_MM = (2.0, 10.0)  # the liver "around" a lesion: further than 2 mm, closer than 10 mm
MIN_MEASURABLE_VOXELS = 10  # fewer voxels give no meaningful quartiles
HETEROGENEOUS_IQR_HU = 40.0
LOW_CONTRAST_HU = 20.0
DIAMETER_BINS_MM = (10.0, 20.0, 60.0)  # < 10, [10, 20), [20, 60], > 60
DIAMETER_NAMES = ("<10", "10-20", "20-60", ">60")
NOISE_EROSION_VOXELS = 3


@dataclass(frozen=True)
class Lesion:
    """One lesion: a 6-connected component of label 2."""

    voxels: int
    diameter_mm: float  # of the sphere of the lesion's volume
    contrast_hu: float | None  # median HU inside minus median HU of the liver around; None without liver
    iqr_hu: float | None  # interquartile HU range inside; None below MIN_MEASURABLE_VOXELS


def equivalent_diameter(volume_mm3: float) -> float:
    """Diameter in mm of the sphere of that volume (how lesion sizes are binned here and in
    liverseg's scores)."""
    return (6.0 * volume_mm3 / math.pi) ** (1.0 / 3.0)


def measure_lesions(label: np.ndarray, image: np.ndarray, spacing) -> list[Lesion]:
    """Every lesion of a canonical case (label 0/1/2, image in HU, spacing in mm along
    (z, row, col)), in cc3d's order. Contrast: the lesion's median HU minus the median HU of
    the liver (label 1) voxels 2-10 mm from it (distance between voxel centres), or of the
    whole liver when none lies there."""
    components = cc3d.connected_components(label == 2, connectivity=CONNECTIVITY)
    reach = [int(math.ceil(SHELL_MM[1] / s)) + 1 for s in spacing]
    whole_liver: list[float | None] = []  # computed once, only if some lesion needs it
    lesions = []
    for i, box in enumerate(ndimage.find_objects(components), 1):
        if box is None:
            continue
        # The crop holds every voxel within 10 mm, so distances in it are exact.
        box = tuple(slice(max(b.start - r, 0), b.stop + r) for b, r in zip(box, reach))
        mask = components[box] == i
        inside = image[box][mask]
        distance = ndimage.distance_transform_edt(~mask, sampling=spacing)
        around = (label[box] == 1) & (distance > SHELL_MM[0]) & (distance < SHELL_MM[1])
        if around.any():
            background = float(np.median(image[box][around]))
        else:
            if not whole_liver:
                liver = image[label == 1]
                whole_liver.append(float(np.median(liver)) if liver.size else None)
            background = whole_liver[0]
        lesions.append(Lesion(
            voxels=int(inside.size),
            diameter_mm=equivalent_diameter(inside.size * float(np.prod(spacing))),
            contrast_hu=None if background is None else float(np.median(inside)) - background,
            iqr_hu=iqr(inside) if inside.size >= MIN_MEASURABLE_VOXELS else None))
    return lesions


def iqr(values: np.ndarray) -> float:
    q25, q75 = np.percentile(values, [25, 75])
    return float(q75 - q25)


def liver_noise(image: np.ndarray, label: np.ndarray) -> float | None:
    """SD of (image − its 3×3 in-plane mean) over the liver (label ≥ 1) eroded in-plane by 3
    voxels (8-connected steps, slice by slice: thick slices would lose whole livers to a
    through-plane erosion, and the filter is in-plane anyway). For white noise of SD σ this
    is σ·sqrt(8/9). None when nothing is left after the erosion."""
    liver = label >= 1
    box = ndimage.find_objects(liver.astype(np.uint8))
    if not box:
        return None
    liver = liver[box[0]]
    core = ndimage.binary_erosion(liver, structure=np.ones((1, 3, 3), bool), iterations=NOISE_EROSION_VOXELS)
    if not core.any():
        return None
    crop = image[box[0]].astype(np.float32)
    residual = crop - ndimage.uniform_filter(crop, size=(1, 3, 3), mode="nearest")
    return float(np.std(residual[core], dtype=np.float64))


def liver_whole_in_z(label: np.ndarray) -> bool | None:
    """Whether the liver (label ≥ 1) touches neither the first nor the last slice; None
    without liver."""
    if not (label >= 1).any():
        return None
    return not ((label[0] >= 1).any() or (label[-1] >= 1).any())


def case_stats(image: np.ndarray, label: np.ndarray, spacing) -> dict[str, Any]:
    """The statistics of one canonical case, as plain numbers and lists (JSON-ready)."""
    spacing = tuple(round(float(s), 6) for s in spacing)  # NIfTI's float32 0.8 is 0.800000011920929
    return {
        "shape": [int(n) for n in label.shape],
        "spacing_mm": list(spacing),
        "lesions": [asdict(lesion) for lesion in measure_lesions(label, image, spacing)],
        "liver_whole_z": liver_whole_in_z(label),
        "noise_sd_hu": liver_noise(image, label),
    }


def measure_source(source: CaseSource) -> dict[str, Any]:
    """Worker entry: ``{"case": id, **case_stats}`` or ``{"rejection": Rejection}``; only
    bugs raise (an InvalidCase is not picklable, so it never crosses a process boundary)."""
    try:
        case = load_case(source.image, source.label)
    except InvalidCase as exc:
        return {"rejection": Rejection(source.case, exc.path, exc.reason)}
    return {"case": source.case, **case_stats(case.image, case.label, case.spacing)}


def run_sources(sources: list[CaseSource], workers: int) -> Iterator[dict[str, Any]]:
    if workers == 1 or len(sources) <= 1:
        yield from map(measure_source, sources)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(measure_source, sources)


def measure_folder(folder: Path, workers: int = 1,
                   on_plan: Callable[[int], None] | None = None,
                   on_result: Callable[[dict[str, Any]], None] | None = None
                   ) -> tuple[list[dict[str, Any]], list[Rejection]]:
    """Per-case statistics of every case :func:`discover` finds under ``folder``, and the
    cases skipped (discovery's rejections, then unreadable cases). ``on_plan(n)`` is told
    the number of results to come, ``on_result`` gets each."""
    sources, rejected = discover([folder])
    if not sources:
        raise ShardgenError(f"no cases found under {folder} "
                            "(expected volume-N.nii[.gz] files or an MSD dataset.json)")
    if on_plan:
        on_plan(len(rejected) + len(sources))
    cases, skipped = [], list(rejected)
    for result in [{"rejection": r} for r in rejected]:
        if on_result:
            on_result(result)
    for result in run_sources(sources, workers):
        if on_result:
            on_result(result)
        if "rejection" in result:
            skipped.append(result["rejection"])
        else:
            cases.append(result)
    return cases, skipped


def fraction(flags: list[bool]) -> float | None:
    return float(np.mean(flags)) if flags else None


def median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def diameter_bin(diameter_mm: float) -> str:
    low, mid, high = DIAMETER_BINS_MM
    if diameter_mm < low:
        return DIAMETER_NAMES[0]
    if diameter_mm < mid:
        return DIAMETER_NAMES[1]
    return DIAMETER_NAMES[2] if diameter_mm <= high else DIAMETER_NAMES[3]


def lesion_summary(cases: list[dict[str, Any]]) -> dict[str, Any]:
    counts = [len(c["lesions"]) for c in cases if c["lesions"]]
    lesions = [lesion for c in cases for lesion in c["lesions"]]
    bins = [diameter_bin(lesion["diameter_mm"]) for lesion in lesions]
    contrasts = [lesion["contrast_hu"] for lesion in lesions if lesion["contrast_hu"] is not None]
    spreads = [lesion["iqr_hu"] for lesion in lesions if lesion["iqr_hu"] is not None]
    return {
        "lesions": len(lesions),
        "lesions_per_tumour_case": None if not counts else {
            "mean": float(np.mean(counts)), "median": float(np.median(counts)),
            "p90": float(np.percentile(counts, 90)), "max": int(max(counts))},
        "diameter_fractions": {name: fraction([b == name for b in bins]) for name in DIAMETER_NAMES},
        "contrast": {
            "lesions": len(contrasts),
            "median_abs_hu": median([abs(c) for c in contrasts]),
            "fraction_below_20_hu": fraction([abs(c) < LOW_CONTRAST_HU for c in contrasts]),
            "fraction_hyperdense": fraction([c > 0 for c in contrasts])},
        "heterogeneous": {
            "fraction": fraction([s > HETEROGENEOUS_IQR_HU for s in spreads]),
            "measurable": len(spreads), "not_measurable": len(lesions) - len(spreads)},
    }


def image_summary(cases: list[dict[str, Any]]) -> dict[str, Any]:
    whole = [c["liver_whole_z"] for c in cases if c["liver_whole_z"] is not None]
    noisy = [c for c in cases if c["noise_sd_hu"] is not None]
    in_plane = [s for c in cases for s in c["spacing_mm"][1:]]
    slices = [c["spacing_mm"][0] for c in cases]
    return {
        "liver_whole_z_fraction": fraction(whole),
        "liver_noise": {
            "cases": len(noisy),
            "median_sd_hu": median([c["noise_sd_hu"] for c in noisy]),
            "median_pixel_mm": median([float(np.mean(c["spacing_mm"][1:])) for c in noisy])},
        "pixel_mm": [min(in_plane), max(in_plane)] if in_plane else None,
        "slice_mm": [min(slices), max(slices)] if slices else None,
    }


def summarise(cases: list[dict[str, Any]], skipped: int = 0) -> dict[str, Any]:
    """The folder's statistics from :func:`case_stats` results (see docs/PHANTOMS.md)."""
    return {
        "cases": len(cases), "skipped": skipped,
        "tumour_free_fraction": fraction([not c["lesions"] for c in cases]),
        **lesion_summary(cases), **image_summary(cases),
    }


def show(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a plain-text table (quantity | measured)."""
    per_case = summary["lesions_per_tumour_case"] or dict.fromkeys(("mean", "median", "p90", "max"))
    sizes, contrast = summary["diameter_fractions"], summary["contrast"]
    het, noise = summary["heterogeneous"], summary["liver_noise"]
    rows = [
        ("cases (skipped)", f"{summary['cases']} ({summary['skipped']})"),
        ("tumour-free cases", show(summary["tumour_free_fraction"])),
        ("lesions (6-connected)", str(summary["lesions"])),
        ("lesions per tumour case: mean / median / p90 / max",
         " / ".join(show(per_case[k], ".1f") if k != "max" else show(per_case[k], "d")
                    for k in ("mean", "median", "p90", "max"))),
        ("equivalent diameter < 10 / 10–20 / 20–60 / > 60 mm",
         " / ".join(show(sizes[name]) for name in DIAMETER_NAMES)),
        ("median |contrast| to the liver 2–10 mm around (HU)", show(contrast["median_abs_hu"], ".1f")),
        ("|contrast| < 20 HU", show(contrast["fraction_below_20_hu"])),
        ("hyperdense (contrast > 0)", show(contrast["fraction_hyperdense"])),
        (f"heterogeneous (IQR > 40 HU; of {het['measurable']} lesions ≥ {MIN_MEASURABLE_VOXELS} voxels)",
         show(het["fraction"])),
        ("liver whole in z", show(summary["liver_whole_z_fraction"])),
        ("liver noise SD of x − mean3×3 (HU), median over cases",
         f"{show(noise['median_sd_hu'], '.1f')} at {show(noise['median_pixel_mm'])} mm pixels"),
        ("pixel spacing (mm)", span(summary["pixel_mm"])),
        ("slice spacing (mm)", span(summary["slice_mm"])),
    ]
    width = max(len(q) for q, _ in rows)
    return "\n".join(f"{q:<{width}}  {v}" for q, v in [("quantity", "measured"), *rows])


def span(pair: list[float] | None) -> str:
    return "–" if pair is None else f"{pair[0]:.3g}–{pair[1]:.3g}"


def write_json(path: Path, summary: dict[str, Any], cases: list[dict[str, Any]],
               skipped: list[Rejection]) -> None:
    write_json_atomic(path, {"summary": summary, "cases": cases, "skipped": [r.to_dict() for r in skipped]})
