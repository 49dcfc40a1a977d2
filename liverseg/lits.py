"""Per-case LiTS metrics of 3D label volumes (overlap, surface distances in mm, lesion
detection, tumour burden) and their dataset summary; docs/METRICS.md defines each one.

Pure numpy/scipy/cc3d (no torch), so that scoring runs in any worker. Labels are uint8
(z, y, x) arrays, 0 background, 1 liver, 2 tumour; the LiTS classes are liver = label >= 1
and tumour = label == 2. Everything is computed inside the bounding box of the two masks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import cc3d
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from shardgen.labels import LIVER, TUMOUR
from shardgen.stats import CONNECTIVITY as LESION_CONNECTIVITY
from shardgen.stats import equivalent_diameter

from .morphology import bounding_box, surface, union_box
from .vocabulary import METRIC_LIST, METRICS, Metric, empty_score

COUNTS = ("tp", "fp", "fn", "tn", "pred_voxels", "ref_voxels")
SURFACE_CONNECTIVITY = 6  # liverseg's surface: a voxel with a face neighbour outside (the LiTS scorer: 18)
# LESION_CONNECTIVITY (from shardgen.stats): LiTS counts lesions as 6-connected components
# lesion size bins by equivalent-sphere diameter: below RECIST's 10 mm measurable size, up to 2 cm, larger
SIZE_BINS = ((0.0, 10.0, "<10 mm"), (10.0, 20.0, "10-20 mm"), (20.0, math.inf, ">=20 mm"))
NAN = float("nan")

# --------------------------------------------------------------------------- surfaces

def _points(surf: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """(n, 3) coordinates in mm of the voxels of ``surf``."""
    return np.column_stack(np.unravel_index(np.flatnonzero(surf), surf.shape)) * np.asarray(spacing, float)


def _shells(spacing: Sequence[float], count: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (n, 3) of the ~count voxels nearest the centre, sorted by length in mm (the
    centre first), and their lengths; they fill the ball of the largest length exactly."""
    sp = np.asarray(spacing, float)
    radius = (count * 3 / (4 * math.pi) * sp.prod()) ** (1 / 3)
    reach = np.floor(radius / sp).astype(int)
    grid = np.stack(np.meshgrid(*(np.arange(-r, r + 1) for r in reach), indexing="ij"), -1).reshape(-1, 3)
    length = np.sqrt(((grid * sp) ** 2).sum(axis=1))
    order = np.argsort(length, kind="stable")
    grid, length = grid[order], length[order]
    inside = length <= radius
    return grid[inside], length[inside]


def _near(query: tuple[np.ndarray, ...], to_surf: np.ndarray, spacing: Sequence[float]
          ) -> tuple[np.ndarray, np.ndarray]:
    """Distances from the voxels at ``query`` (index arrays) to the nearest voxel of
    ``to_surf`` found among their ~250 nearest neighbours, visited nearest first; NaN where
    none is that near. Exact: the neighbours fill a ball, so a hit has no nearer rival."""
    offsets, lengths = _shells(spacing)
    reach = np.abs(offsets).max(axis=0)
    target = np.pad(to_surf, [(r, r) for r in reach]).ravel()
    shape = [s + 2 * r for s, r in zip(to_surf.shape, reach)]
    flat = np.ravel_multi_index(tuple(c + r for c, r in zip(query, reach)), shape)
    steps = offsets @ np.array([shape[1] * shape[2], shape[2], 1])
    out = np.full(flat.size, NAN)
    rest = np.arange(flat.size)
    for step, length in zip(steps, lengths):
        hit = target[flat + step]
        if hit.any():
            out[rest[hit]] = length
            rest, flat = rest[~hit], flat[~hit]
            if rest.size == 0:
                break
    return out, rest


def _directed(from_surf: np.ndarray, to_surf: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance in mm from each voxel of ``from_surf`` (in C order) to the nearest voxel of
    ``to_surf``: the value an exact EDT of ~to_surf with sampling=spacing has there.

    Surface voxels are ~1 % of the box, so rather than an EDT of the whole box (0.6-1.8 s
    for a liver), each voxel looks at its neighbours nearest first (nearly all meet the
    other surface within a few voxels) and a k-d tree answers the rest; exact either way.
    """
    query = np.unravel_index(np.flatnonzero(from_surf), from_surf.shape)
    if not to_surf.any():
        return np.full(query[0].size, NAN)
    out, rest = _near(query, to_surf, spacing)
    if rest.size:
        far = np.column_stack([c[rest] for c in query]) * np.asarray(spacing, float)
        tree = cKDTree(_points(to_surf, spacing), leafsize=16, balanced_tree=False, compact_nodes=False)
        out[rest] = tree.query(far, k=1)[0]
    return out


def _surface_distances(pred: np.ndarray, ref: np.ndarray, spacing, connectivity: int = SURFACE_CONNECTIVITY
                       ) -> tuple[np.ndarray, np.ndarray]:
    """surface_distances of two masks already cropped (each face zero or the array border)."""
    sp, sr = surface(pred, connectivity), surface(ref, connectivity)
    return _directed(sp, sr, spacing), _directed(sr, sp, spacing)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing, connectivity: int = SURFACE_CONNECTIVITY
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from every surface voxel of pred to the surface of ref, and from ref's
    to pred's (surface voxels in C order).

    A surface voxel has a neighbour outside the mask (6-neighbours, or ``connectivity`` 18
    or 26, see surface); the array border counts as outside.
    Distances to an empty mask are NaN (one per surface voxel); both empty gives two empty
    arrays.
    """
    pred, ref = _check_masks(pred, ref)
    box = union_box(bounding_box(pred, 1), bounding_box(ref, 1))
    if box is None:
        return np.zeros(0), np.zeros(0)
    return _surface_distances(pred[box], ref[box], spacing, connectivity)


def distance_scores(d_pred: np.ndarray, d_ref: np.ndarray) -> dict[str, float]:
    """assd, mssd and hd95 in mm from the two directed distance arrays.

    assd = (Σd(pred→ref) + Σd(ref→pred)) / (|∂pred| + |∂ref|) (LiTS, Heimann et al.),
    mssd = the largest of both (symmetric Hausdorff), hd95 = 95th percentile (linear) of
    both together (medpy's hd95). Empty masks: vocabulary.empty_score (both empty → 0;
    one empty → NaN).
    """
    both = np.concatenate([d_pred, d_ref])
    if both.size == 0 or np.isnan(both).any():  # no surface at all, or an empty side to measure to
        return {m: empty_score(m, both_empty=both.size == 0) for m in DISTANCES}
    return {"assd": float(both.mean()), "mssd": float(both.max()), "hd95": float(np.percentile(both, 95))}


# --------------------------------------------------------------------------- overlap scores

# Each score takes the counts of ``overlap_counts``; a zero denominator gives the
# evaluation's empty-mask value (vocabulary.empty_score, docs/METRICS.md).

def overlap_counts(pred: np.ndarray, ref: np.ndarray, total: int | None = None) -> dict[str, int]:
    """tp, fp, fn, tn, pred_voxels, ref_voxels of two boolean masks; ``total`` is the
    volume's voxel count when the masks are a crop of it."""
    tp = int(np.count_nonzero(pred & ref))
    npred, nref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    total = pred.size if total is None else total
    return {"tp": tp, "fp": npred - tp, "fn": nref - tp, "tn": total - npred - nref + tp,
            "pred_voxels": npred, "ref_voxels": nref}


def _overlap_score(metric: Metric) -> Callable[[dict], float]:
    """The score of ``overlap_counts``'s counts by ``metric``'s formula; a zero denominator
    gives the evaluation's empty-mask value."""
    def score(c: dict) -> float:
        num, den = metric.ratio(c["tp"], c["fp"], c["fn"], c["tn"])
        return num / den if den else empty_score(metric.name, both_empty=c["pred_voxels"] == c["ref_voxels"] == 0)

    score.__name__ = score.__qualname__ = metric.name
    return score


OVERLAP_SCORES: dict[str, Callable[[dict], float]] = {m.name: _overlap_score(m) for m in METRIC_LIST if m.ratio}
dice = OVERLAP_SCORES["dice"]
DISTANCES = tuple(m.name for m in METRIC_LIST if m.ratio is None)  # from distance_scores


def _check_masks(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if pred.shape != ref.shape or pred.ndim != 3:
        raise ValueError(f"pred {pred.shape} and ref {ref.shape} must be 3D arrays of one shape")
    return pred.astype(bool, copy=False), ref.astype(bool, copy=False)


def _binary_scores(pred: np.ndarray, ref: np.ndarray, spacing, total: int) -> dict[str, float]:
    """binary_scores of two cropped masks (faces zero or the array border) of a volume
    of ``total`` voxels."""
    counts = overlap_counts(pred, ref, total)
    scores = {name: fn(counts) for name, fn in OVERLAP_SCORES.items()}
    if counts["pred_voxels"] == counts["ref_voxels"] == 0:
        return {**scores, **distance_scores(np.zeros(0), np.zeros(0)), **counts}
    box = union_box(bounding_box(pred, 1), bounding_box(ref, 1))
    scores.update(distance_scores(*_surface_distances(pred[box], ref[box], spacing)))
    return {**scores, **counts}


def binary_scores(pred: np.ndarray, ref: np.ndarray, spacing) -> dict[str, float]:
    """All METRICS for two boolean masks, plus integer counts "tp","fp","fn","tn",
    "pred_voxels","ref_voxels".

    dice = 2tp/(2tp+fp+fn), iou = tp/(tp+fp+fn), voe = 1 - iou, rvd = (|pred|-|ref|)/|ref|,
    accuracy = (tp+tn)/all, precision = tp/(tp+fp), recall = tp/(tp+fn); assd, mssd, hd95
    in mm (see distance_scores). Empty masks: both empty → dice = iou = precision = recall
    = 1, voe = rvd = 0, distances 0; ref empty → dice = iou = precision = 0, recall = rvd
    = NaN, voe = 1, distances NaN; pred empty → dice = iou = recall = 0, precision = NaN,
    voe = 1, rvd = -1, distances NaN.
    """
    pred, ref = _check_masks(pred, ref)
    return _binary_scores(pred, ref, spacing, pred.size)


# --------------------------------------------------------------------------- lesions

def lesion_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    labels, n = cc3d.connected_components(mask, connectivity=LESION_CONNECTIVITY, return_N=True)
    return labels, int(n)


def _lesion_groups(ref_lab: np.ndarray, n_ref: int, pred_lab: np.ndarray, n_pred: int
                   ) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """Connected groups of the bipartite graph ref component ↔ pred component (sharing a
    voxel): group of each ref component, of each pred component (index 0 = background,
    unused), the number of groups, and the voxels where both are foreground (their ref label)."""
    both = (ref_lab != 0) & (pred_lab != 0)
    r, p = ref_lab[both].astype(np.int64), pred_lab[both].astype(np.int64)
    pairs = np.unique(r * (n_pred + 1) + p)
    nodes = n_ref + n_pred  # ref component i is node i-1, pred component j is node n_ref+j-1
    graph = coo_matrix((np.ones(pairs.size), (pairs // (n_pred + 1) - 1, n_ref + pairs % (n_pred + 1) - 1)),
                       shape=(nodes, nodes))
    n_groups, group = connected_components(graph, directed=False)
    ref_group = np.concatenate([[-1], group[:n_ref]])
    pred_group = np.concatenate([[-1], group[n_ref:]])
    return ref_group, pred_group, n_groups, r


def lesion_detection(pred_tumour: np.ndarray, ref_tumour: np.ndarray, spacing) -> dict:
    """LiTS lesion detection: {"tp": int, "fp": int, "fn": int, "lesions": [{"volume_mm3":
    float, "detected": bool, "touched": bool, "dice": float | None}, ...], "pred_lesions": int,
    "ref_lesions": int}.

    Lesions are 6-connected components (LESION_CONNECTIVITY). Reference and predicted
    components that share a voxel are linked; each connected group of links is one merged
    reference lesion (the union of its reference components) against one merged prediction
    (the union of its predicted components). A group with reference voxels is a TP when the
    IoU of the two unions is > 0.5, else a FN, and then its prediction (if any) counts as ONE
    FP; a group of prediction only is a FP. ``lesions`` has one entry per merged reference
    lesion, with the Dice of the two unions when detected; it is "touched" (found at any
    overlap) when its prediction is not empty, i.e. a predicted voxel lies on it.
    pred_lesions and ref_lesions count the components before merging.
    """
    pred, ref = _check_masks(pred_tumour, ref_tumour)
    box = union_box(bounding_box(pred), bounding_box(ref))
    if box is None:
        return {"tp": 0, "fp": 0, "fn": 0, "lesions": [], "pred_lesions": 0, "ref_lesions": 0}
    (ref_lab, n_ref), (pred_lab, n_pred) = lesion_components(ref[box]), lesion_components(pred[box])
    ref_group, pred_group, n_groups, overlap = _lesion_groups(ref_lab, n_ref, pred_lab, n_pred)
    ref_size = np.bincount(ref_lab.ravel(), minlength=n_ref + 1)[1:]
    pred_size = np.bincount(pred_lab.ravel(), minlength=n_pred + 1)[1:]
    ref_vox = np.bincount(ref_group[1:], weights=ref_size, minlength=n_groups)
    pred_vox = np.bincount(pred_group[1:], weights=pred_size, minlength=n_groups)
    inter = np.bincount(ref_group[overlap], minlength=n_groups).astype(float)
    union = ref_vox + pred_vox - inter
    voxel_mm3 = float(np.prod(spacing))
    lesions, tp, fp = [], 0, 0
    for g in range(n_groups):
        if ref_vox[g] == 0:
            fp += 1
            continue
        detected = bool(inter[g] / union[g] > 0.5)
        tp += detected
        fp += (not detected) and pred_vox[g] > 0
        lesions.append({"volume_mm3": float(ref_vox[g]) * voxel_mm3, "detected": detected,
                        "touched": bool(inter[g] > 0),
                        "dice": float(2 * inter[g] / (ref_vox[g] + pred_vox[g])) if detected else None})
    return {"tp": tp, "fp": int(fp), "fn": len(lesions) - tp, "lesions": lesions,
            "pred_lesions": n_pred, "ref_lesions": n_ref}


# --------------------------------------------------------------------------- cases

def _burden(liver_voxels: int, tumour_voxels: int) -> float:
    """Tumour volume / liver volume (liver incl. tumour); 0 without liver (so without tumour)."""
    return tumour_voxels / liver_voxels if liver_voxels else 0.0


def score_case(pred: np.ndarray, ref: np.ndarray, spacing) -> dict:
    """{"liver": binary_scores(...), "tumour": binary_scores(...), "lesions":
    lesion_detection(...), "burden": {"pred": float, "ref": float}} of two label volumes.

    liver = label >= 1, tumour = label == 2; burden = tumour volume / liver volume.
    """
    if pred.shape != ref.shape or pred.ndim != 3:
        raise ValueError(f"pred {pred.shape} and ref {ref.shape} must be 3D label volumes of one shape")
    spacing = tuple(float(s) for s in spacing)
    box = union_box(bounding_box(pred, 1), bounding_box(ref, 1)) or (slice(0, 1),) * 3
    p, r = pred[box], ref[box]
    liver = _binary_scores(p >= LIVER, r >= LIVER, spacing, pred.size)
    pt, rt = p == TUMOUR, r == TUMOUR
    tumour = _binary_scores(pt, rt, spacing, pred.size)
    return {"liver": liver, "tumour": tumour, "lesions": lesion_detection(pt, rt, spacing),
            "burden": {"pred": _burden(liver["pred_voxels"], tumour["pred_voxels"]),
                       "ref": _burden(liver["ref_voxels"], tumour["ref_voxels"])}}


# --------------------------------------------------------------------------- dataset

def _stats(values: Sequence[float]) -> dict[str, float]:
    """mean, std, median, min, max skipping NaN; all NaN (or none) → NaN."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return dict.fromkeys(("mean", "std", "median", "min", "max"), NAN)
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)),
            "min": float(v.min()), "max": float(v.max())}


def _class_summary(scores: list[dict]) -> dict:
    tp = sum(s["tp"] for s in scores)
    size = sum(s["pred_voxels"] + s["ref_voxels"] for s in scores)
    summary: dict = {"dice_global": 2 * tp / size if size else 1.0}
    summary.update({m: _stats([s[m] for s in scores]) for m in METRICS})
    return summary


def _fraction(part: float, whole: float) -> float:
    """part / whole; NaN for nothing to count (an empty size bin, no lesions)."""
    return part / whole if whole else NAN


def _size_bins(lesions: list[dict]) -> list[dict]:
    """Per SIZE_BINS: reference lesions, found at IoU > 0.5 ("detected", "recall") and found
    at any overlap ("touched", "recall_any")."""
    out = []
    for lo, hi, name in SIZE_BINS:
        inside = [lesion for lesion in lesions if lo <= equivalent_diameter(lesion["volume_mm3"]) < hi]
        found = sum(lesion["detected"] for lesion in inside)
        touched = sum(lesion["touched"] for lesion in inside)
        out.append({"bin": name, "lesions": len(inside), "detected": found, "recall": _fraction(found, len(inside)),
                    "touched": touched, "recall_any": _fraction(touched, len(inside))})
    return out


def _tumour_free(detections: list[dict]) -> dict:
    """Cases without reference tumour, and those of them whose prediction has no tumour."""
    free = [d for d in detections if d["ref_lesions"] == 0]
    clean = sum(d["pred_lesions"] == 0 for d in free)
    return {"cases": len(free), "without_false_lesion": clean, "fraction": _fraction(clean, len(free))}


def _detection_summary(detections: list[dict]) -> dict:
    tp, fp, fn = (sum(d[k] for d in detections) for k in ("tp", "fp", "fn"))
    lesions = [lesion for d in detections for lesion in d["lesions"]]
    dices = [lesion["dice"] for lesion in lesions if lesion["detected"]]
    touched = sum(lesion["touched"] for lesion in lesions)
    return {"tp": tp, "fp": fp, "fn": fn, "precision": _fraction(tp, tp + fp), "recall": _fraction(tp, tp + fn),
            "touched": touched, "recall_any": _fraction(touched, len(lesions)),
            "lesion_dice_mean": float(np.mean(dices)) if dices else NAN, "by_size": _size_bins(lesions),
            "tumour_free": _tumour_free(detections)}


def _oracle_summary(tumour_dice_mean: float, oracle_dice: Sequence[float]) -> dict:
    """Mean per-case tumour Dice against the mean per-case Dice of the visible-lesion oracle."""
    oracle = _stats(oracle_dice)["mean"]
    return {"cases": len(oracle_dice), "dice_mean": oracle, "tumour_dice_mean": tumour_dice_mean,
            "fraction": tumour_dice_mean / oracle if oracle > 0 else NAN}


def _burden_summary(burdens: list[dict]) -> dict:
    err = np.array([b["pred"] - b["ref"] for b in burdens], dtype=float)
    err = err[~np.isnan(err)]
    if err.size == 0:
        return {"rmse": NAN, "max": NAN}
    return {"rmse": float(np.sqrt(np.mean(err ** 2))), "max": float(np.abs(err).max())}


def aggregate(cases: list[dict], oracle_dice: Sequence[float] | None = None) -> dict:
    """Dataset summary of score_case results: per class dice_global = 2Σtp / Σ(|pred|+|ref|)
    (1 when every case is empty in both) and mean/std/median/min/max of each metric over
    cases (NaN skipped; all NaN → NaN); lesion detection tp/fp/fn, precision and recall
    (IoU > 0.5) and lesions touched (any overlap) summed over the dataset, mean Dice of
    detected lesions, both recalls by equivalent-sphere diameter (SIZE_BINS), and the
    tumour-free cases without a predicted tumour; tumour burden error as RMSE and max |error|.

    With ``oracle_dice`` (each case's visible-lesion oracle Dice, liverseg.oracle, in the
    order of ``cases``), "oracle" has its mean and the mean per-case tumour Dice as a
    fraction of it."""
    summary = {"liver": _class_summary([c["liver"] for c in cases]),
               "tumour": _class_summary([c["tumour"] for c in cases]),
               "detection": _detection_summary([c["lesions"] for c in cases]),
               "burden": _burden_summary([c["burden"] for c in cases])}
    if oracle_dice is not None:
        if len(oracle_dice) != len(cases):
            raise ValueError(f"{len(oracle_dice)} oracle Dice values for {len(cases)} cases")
        summary["oracle"] = _oracle_summary(summary["tumour"]["dice"]["mean"], oracle_dice)
    return summary
