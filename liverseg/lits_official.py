"""The LiTS challenge's own scoring conventions (lits-challenge-scoring @090307d with MedPy
0.2.2), rebuilt from liverseg's pieces so that ``--convention lits`` reproduces its numbers;
docs/METRICS.md lists where they differ from liverseg's default.

Pure numpy/scipy/cc3d, like :mod:`liverseg.lits`. Label volumes in any axis order, with
``spacing`` in mm along the same axes: 0 background, 1 liver, 2 tumour.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from shardgen.labels import LIVER, TUMOUR

from . import lits
from .morphology import bounding_box, union_box

LARGE = 9001.0  # the scorer's value for what it cannot measure (no liver, no lesion detected)
SURFACE_CONNECTIVITY = 18  # the scorer erodes with scipy's 18-neighbour structure
THRESHOLDS = {"iou_gt_0": 0.0, "iou_gt_0.5": 0.5}
SEGMENTATION = ("dice", "jaccard", "voe", "rvd", "assd", "msd", "rmsd")
DISTANCES = ("rvd", "assd", "msd", "rmsd")
# the figures scores.txt prints, under its names and in its order
OFFICIAL_NAMES = (
    "lesion_recall", "lesion_precision_greater_zero", "lesion_precision", "lesion_recall_greater_zero",
    "lesion_voe", "lesion_dice_global", "lesion_dice", "lesion_rmsd", "lesion_rvd", "lesion_assd",
    "lesion_jaccard", "lesion_dice_per_case", "lesion_msd", "liver_voe", "liver_dice_global", "liver_dice",
    "liver_rmsd", "liver_rvd", "liver_assd", "liver_jaccard", "liver_dice_per_case", "liver_msd",
    "RMSE_Tumorburden", "MAXERROR_Tumorburden")
# what the scorer reports for a segmentation it cannot measure
UNMEASURED = {"dice": 0.0, "jaccard": 0.0, "voe": 1.0, **dict.fromkeys(DISTANCES, LARGE)}


# --------------------------------------------------------------------------- one object

def relative_volume_difference(pred_voxels: int, ref_voxels: int) -> float:
    """(|pred| − |ref|) / |ref|, positive for a larger prediction: what MedPy 0.2.2's ravd
    returns for the scorer's call ravd(reference, prediction) (MedPy 0.4 swaps both the sign
    and the denominator). LARGE without a reference, where MedPy raises."""
    return (pred_voxels - ref_voxels) / ref_voxels if ref_voxels else LARGE


def segmentation_scores(pred: np.ndarray, ref: np.ndarray, spacing) -> dict[str, float]:
    """dice, jaccard = dice / (2 − dice), voe = 1 − jaccard, rvd, and assd, msd (the largest
    distance) and rmsd in mm between the 18-neighbour surfaces of two boolean masks.

    An empty mask has no surface to measure: its distances (and rvd, for an empty
    reference) are LARGE."""
    inter = int(np.count_nonzero(pred & ref))
    npred, nref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    dice = 2 * inter / (npred + nref) if npred + nref else 1.0
    jaccard = dice / (2 - dice)
    scores = {"dice": dice, "jaccard": jaccard, "voe": 1 - jaccard,
              "rvd": relative_volume_difference(npred, nref)}
    if npred == 0 or nref == 0:
        return {**scores, **dict.fromkeys(DISTANCES[1:], LARGE)}
    d_pred, d_ref = lits.surface_distances(pred, ref, spacing, SURFACE_CONNECTIVITY)
    both = np.concatenate([d_pred, d_ref])
    return {**scores, "assd": float(both.mean()), "msd": float(both.max()),
            "rmsd": float(math.sqrt(np.mean(both ** 2)))}


# --------------------------------------------------------------------------- lesions

def _overlaps(ref_lab: np.ndarray, n_ref: int, pred_lab: np.ndarray, n_pred: int) -> np.ndarray:
    """(n_ref + 1, n_pred + 1) voxel counts of each reference component on each predicted
    one (row and column 0: background)."""
    pairs = ref_lab.astype(np.int64) * (n_pred + 1) + pred_lab
    return np.bincount(pairs.ravel(), minlength=(n_ref + 1) * (n_pred + 1)).reshape(n_ref + 1, n_pred + 1)


def match_lesions(ref_lab: np.ndarray, n_ref: int, pred_lab: np.ndarray, n_pred: int
                  ) -> list[tuple[list[int], list[int]]]:
    """Lesion objects as (reference components, predicted components), by the scorer's
    rule: each reference component goes to the predicted one it overlaps most, and those
    sharing one are merged into one object; then each overlapping predicted component goes
    to the object it overlaps most, and those sharing one are merged. Ties go to the lower
    label (scipy's raster order)."""
    if n_ref == 0 or n_pred == 0:
        return []
    overlap = _overlaps(ref_lab, n_ref, pred_lab, n_pred)[1:, 1:]
    touching = overlap.any(axis=1)
    key = overlap.argmax(axis=1)
    by_pred = {p: [r + 1 for r in np.flatnonzero(touching & (key == p))] for p in np.unique(key[touching])}
    objects = list(by_pred.values())
    if not objects:  # no reference component touches a prediction
        return []
    on_object = np.stack([overlap[[r - 1 for r in refs]].sum(axis=0) for refs in objects])  # (objects, n_pred)
    preds: list[list[int]] = [[] for _ in objects]
    for p in np.flatnonzero(on_object.any(axis=0)):
        preds[int(on_object[:, p].argmax())].append(int(p) + 1)
    return list(zip(objects, preds))


def lesion_detection(pred_tumour: np.ndarray, ref_tumour: np.ndarray, spacing) -> dict:
    """TP, FP and FN at IoU > 0 and > 0.5 ({"iou_gt_0": {...}, "iou_gt_0.5": {...}}) and the
    segmentation_scores of each object detected at IoU > 0.5 ("lesions_scored", with its
    components and voxel counts).

    Lesions are 6-connected components, grouped into objects by match_lesions; an object is
    detected when the IoU of its two unions is > the threshold. TP = detected objects, FN =
    reference components − TP, FP = predicted components − TP: a lesion split in two is one
    TP and one FP, two lesions bridged by one prediction one TP and one FN. (The official
    code miscounts an undetected bridge and can take the wrong union; this does not:
    docs/METRICS.md.)"""
    box = union_box(bounding_box(pred_tumour, 1), bounding_box(ref_tumour, 1))
    if box is None:
        return {"detection": {name: {"TP": 0, "FP": 0, "FN": 0} for name in THRESHOLDS},
                "lesions_scored": [], "components": {"reference": 0, "prediction": 0}}
    (ref_lab, n_ref), (pred_lab, n_pred) = lits.lesion_components(ref_tumour[box]), lits.lesion_components(pred_tumour[box])
    detection, scored, ious = {}, [], []
    objects = match_lesions(ref_lab, n_ref, pred_lab, n_pred)
    for refs, preds in objects:
        pred, ref = np.isin(pred_lab, preds), np.isin(ref_lab, refs)
        inter = np.count_nonzero(pred & ref)
        ious.append(inter / np.count_nonzero(pred | ref))
        if ious[-1] > THRESHOLDS["iou_gt_0.5"]:
            scored.append({"reference_components": refs, "prediction_components": preds,
                           "reference_voxels": int(ref.sum()), "prediction_voxels": int(pred.sum()),
                           **segmentation_scores(pred, ref, spacing)})
    for name, threshold in THRESHOLDS.items():
        tp = int(sum(iou > threshold for iou in ious))
        detection[name] = {"TP": tp, "FP": n_pred - tp, "FN": n_ref - tp}
    return {"detection": detection, "lesions_scored": scored,
            "components": {"reference": n_ref, "prediction": n_pred}}


# --------------------------------------------------------------------------- cases

def _dice(inter: int, size: int) -> float:
    """2I / S; 1 when both masks are empty."""
    return 2 * inter / size if size else 1.0


def tumour_burden(labels: np.ndarray) -> float:
    """|label 2| / |label ≥ 1|; 0 without liver (LiTS has no such case; the scorer divides by 0)."""
    liver = int(np.count_nonzero(labels))
    return int(np.count_nonzero(labels == TUMOUR)) / liver if liver else 0.0


def liver_scores(pred: np.ndarray, ref: np.ndarray, spacing) -> tuple[dict[str, float], dict[str, int]]:
    """The liver's segmentation_scores (liver = label ≥ 1) and its Dice-global counts I, S.

    A prediction without any voxel labelled 1 is not measured (UNMEASURED: dice 0, the
    distances 9001) and adds I = 0, S = |reference liver|, even where its tumour lies on the
    reference liver."""
    ref_liver = ref >= LIVER
    if not np.any(pred == LIVER):
        return dict(UNMEASURED), {"I": 0, "S": int(np.count_nonzero(ref_liver))}
    pred_liver = pred >= LIVER
    counts = {"I": int(np.count_nonzero(pred_liver & ref_liver)),
              "S": int(np.count_nonzero(pred_liver) + np.count_nonzero(ref_liver))}
    return segmentation_scores(pred_liver, ref_liver, spacing), counts


def score_case(pred: np.ndarray, ref: np.ndarray, spacing) -> dict:
    """One case as the LiTS scorer sees it: {"liver": segmentation_scores,
    "liver_dice_per_case", "lesion_dice_per_case", "dice_global_counts": {"liver": {"I",
    "S"}, "lesion": {...}}, "detection", "lesions_scored", "tumor_burden_diff"}.

    The burden diff is reference − prediction (positive: under-estimated); the predicted
    burden is LARGE when the prediction has no label 1."""
    if pred.shape != ref.shape or pred.ndim != 3:
        raise ValueError(f"pred {pred.shape} and ref {ref.shape} must be 3D label volumes of one shape")
    spacing = tuple(float(s) for s in spacing)
    liver, liver_counts = liver_scores(pred, ref, spacing)
    pred_tumour, ref_tumour = pred == TUMOUR, ref == TUMOUR
    inter = int(np.count_nonzero(pred_tumour & ref_tumour))
    size = int(np.count_nonzero(pred_tumour) + np.count_nonzero(ref_tumour))
    lesions = lesion_detection(pred_tumour, ref_tumour, spacing)
    pred_burden = tumour_burden(pred) if np.any(pred == LIVER) else LARGE
    return {"liver": liver, "liver_dice_per_case": liver["dice"], "lesion_dice_per_case": _dice(inter, size),
            "dice_global_counts": {"liver": liver_counts, "lesion": {"I": inter, "S": size}},
            **lesions, "tumor_burden_diff": tumour_burden(ref) - pred_burden}


# --------------------------------------------------------------------------- dataset

def _fraction(num: int, den: int) -> float:
    """num / den; 0 for an empty denominator, as the scorer reports (recall with no lesion)."""
    return num / den if den else 0.0


def _dice_global(cases: list[dict], cls: str) -> float:
    """2ΣI / ΣS; 1 when no case has a voxel of the class (the scorer raises ZeroDivisionError)."""
    inter = sum(c["dice_global_counts"][cls]["I"] for c in cases)
    return _dice(inter, sum(c["dice_global_counts"][cls]["S"] for c in cases))


def _detection_figures(cases: list[dict]) -> dict[str, float]:
    out = {}
    for name, suffix in (("iou_gt_0.5", ""), ("iou_gt_0", "_greater_zero")):
        tp, fp, fn = (sum(c["detection"][name][k] for c in cases) for k in ("TP", "FP", "FN"))
        out[f"lesion_recall{suffix}"] = _fraction(tp, tp + fn)
        out[f"lesion_precision{suffix}"] = _fraction(tp, tp + fp)
    return out


def _mean_scores(rows: Sequence[dict], prefix: str) -> dict[str, float]:
    """Mean of each segmentation score over rows (cases or lesion objects); UNMEASURED for none."""
    return {f"{prefix}_{m}": float(np.mean([r[m] for r in rows])) if rows else UNMEASURED[m]
            for m in SEGMENTATION}


def aggregate(cases: list[dict]) -> dict[str, float]:
    """The dataset figures under the scorer's names, in scores.txt's order (OFFICIAL_NAMES).

    Detection: TP, FP, FN summed before dividing. Lesion segmentation: the mean over every
    object detected at IoU > 0.5 in the dataset (pooled, not per case). Liver: the mean over
    cases. Dice per case: the mean; Dice global 2ΣI / ΣS. Tumour burden: RMSE of the diffs
    and MAXERROR, their largest signed value."""
    if not cases:
        raise ValueError("no cases to aggregate")
    diffs = np.array([c["tumor_burden_diff"] for c in cases])
    figures = {**_detection_figures(cases),
               **_mean_scores([lesion for c in cases for lesion in c["lesions_scored"]], "lesion"),
               **_mean_scores([c["liver"] for c in cases], "liver"),
               "lesion_dice_global": _dice_global(cases, "lesion"), "liver_dice_global": _dice_global(cases, "liver"),
               "lesion_dice_per_case": float(np.mean([c["lesion_dice_per_case"] for c in cases])),
               "liver_dice_per_case": float(np.mean([c["liver_dice_per_case"] for c in cases])),
               "RMSE_Tumorburden": float(np.sqrt(np.mean(diffs ** 2))),
               "MAXERROR_Tumorburden": float(diffs.max())}
    return {name: figures[name] for name in OFFICIAL_NAMES}
