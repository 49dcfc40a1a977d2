"""LiTS metrics: hand-computed cases (anisotropic spacing, empty masks, lesion merging,
burden, dataset sums), agreement with MONAI's surface distances and with a deliberately
naive lesion-detection reference written here; the lesion scorecard (size bins, any overlap,
tumour-free cases, 6-connectivity) on hand-made masks."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage as ndi

from conftest import labels
from liverseg import lits
from liverseg import morphology
from liverseg.vocabulary import METRICS

NAN = math.nan


def cube(shape, *slices) -> np.ndarray:
    """A boolean volume with the given boxes set."""
    out = np.zeros(shape, bool)
    for box in slices:
        out[box] = True
    return out


def approx(expected: dict) -> dict:
    return {k: pytest.approx(v, nan_ok=True, rel=1e-12, abs=1e-12) for k, v in expected.items()}


# A 3×3×3 cube and the same cube one slice up, at 5 mm slices and 1 mm pixels. Surface
# voxels that lie on the other surface: 0 mm; the other cube's centre voxel: 1 mm (to its
# in-plane neighbour); the cap that sticks out: 5 mm. Both ways: 16 × 0, 1 × 1, 9 × 5 mm.
SHIFT_REF = cube((8, 5, 5), np.s_[2:5, 1:4, 1:4])
SHIFT_PRED = cube((8, 5, 5), np.s_[3:6, 1:4, 1:4])
SHIFT_DISTANCES = [0.0] * 16 + [1.0] + [5.0] * 9

# name, pred, ref, spacing, expected scores
BINARY_CASES = [
    ("z shift at 5 mm slices", SHIFT_PRED, SHIFT_REF, (5.0, 1.0, 1.0),
     {"dice": 2 / 3, "iou": 0.5, "voe": 0.5, "rvd": 0.0, "precision": 2 / 3, "recall": 2 / 3,
      "accuracy": (18 + 164) / 200, "assd": 92 / 52, "mssd": 5.0, "hd95": 5.0,
      "tp": 18, "fp": 9, "fn": 9, "tn": 164, "pred_voxels": 27, "ref_voxels": 27}),
    ("identical", SHIFT_REF, SHIFT_REF, (5.0, 1.0, 1.0),
     {"dice": 1.0, "iou": 1.0, "voe": 0.0, "rvd": 0.0, "assd": 0.0, "mssd": 0.0, "hd95": 0.0}),
    ("both empty", np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool), (1.0, 1.0, 1.0),
     {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0, "voe": 0.0, "rvd": 0.0, "accuracy": 1.0,
      "assd": 0.0, "mssd": 0.0, "hd95": 0.0, "tp": 0, "fp": 0, "fn": 0, "tn": 64}),
    ("reference empty", SHIFT_PRED, np.zeros_like(SHIFT_REF), (5.0, 1.0, 1.0),
     {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": NAN, "voe": 1.0, "rvd": NAN,
      "assd": NAN, "mssd": NAN, "hd95": NAN, "fp": 27, "tn": 173}),
    ("prediction empty", np.zeros_like(SHIFT_REF), SHIFT_REF, (5.0, 1.0, 1.0),
     {"dice": 0.0, "iou": 0.0, "precision": NAN, "recall": 0.0, "voe": 1.0, "rvd": -1.0,
      "assd": NAN, "mssd": NAN, "hd95": NAN, "fn": 27, "tn": 173}),
    ("half the reference, flush with the array border", cube((2, 2, 4), np.s_[:, :, :2]),
     cube((2, 2, 4), np.s_[:, :, :]), (1.0, 2.0, 3.0),
     # every voxel is surface (border); the uncovered half is 3 and 6 mm from the prediction
     {"dice": 2 / 3, "rvd": -0.5, "assd": (4 * 3 + 4 * 6) / 24, "mssd": 6.0}),
]


@pytest.mark.parametrize("pred, ref, spacing, expected", [c[1:] for c in BINARY_CASES],
                         ids=[c[0] for c in BINARY_CASES])
def test_binary_scores_hand_computed(pred, ref, spacing, expected):
    scores = lits.binary_scores(pred, ref, spacing)
    assert set(METRICS) | set(lits.COUNTS) <= set(scores)
    assert {k: scores[k] for k in expected} == approx(expected)
    assert not any(math.isinf(scores[m]) for m in METRICS)


def test_surface_distances_of_a_z_shift():
    to_ref, to_pred = lits.surface_distances(SHIFT_PRED, SHIFT_REF, (5.0, 1.0, 1.0))
    assert sorted(to_ref) == SHIFT_DISTANCES
    assert sorted(to_pred) == SHIFT_DISTANCES


@pytest.mark.parametrize("pred, ref, expected", [
    (np.zeros((3, 3, 3), bool), np.zeros((3, 3, 3), bool), (0, 0)),
    (np.ones((3, 3, 3), bool), np.zeros((3, 3, 3), bool), (26, 0)),
    (np.zeros((3, 3, 3), bool), np.ones((3, 3, 3), bool), (0, 26)),
], ids=["both empty", "reference empty", "prediction empty"])
def test_surface_distances_to_nothing_are_nan(pred, ref, expected):
    to_ref, to_pred = lits.surface_distances(pred, ref, (1.0, 1.0, 1.0))
    assert (to_ref.size, to_pred.size) == expected
    assert np.isnan(to_ref).all() and np.isnan(to_pred).all()


def test_array_border_is_surface():
    full = np.ones((4, 5, 6), bool)
    assert np.count_nonzero(morphology.surface(full)) == full.size - 2 * 3 * 4
    inner = np.pad(full, 1)
    assert np.array_equal(morphology.surface(inner)[1:-1, 1:-1, 1:-1], morphology.surface(full))


# --------------------------------------------------------------------------- vs MONAI

def blobs(seed: int, shape, far: bool = False) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Two seeded random blob masks (touching the array border) and an anisotropic spacing;
    ``far``: the two sit in opposite corners, beyond the neighbourhood search."""
    rng = np.random.default_rng(seed)
    spacing = tuple(float(s) for s in rng.uniform(0.5, 5.0, 3))
    a, b = (ndi.gaussian_filter(rng.normal(size=shape), 1.5) > 0.1 for _ in range(2))
    if far:
        half = tuple(s // 3 for s in shape)
        a[half[0]:] = False
        b[:shape[0] - half[0]] = False
    return a, b, spacing


MONAI_CASES = [(seed, shape, False) for seed, shape in enumerate([(20, 24, 18), (9, 30, 31), (26, 12, 20)])]
MONAI_CASES += [(7, (30, 16, 16), True)]


@pytest.mark.parametrize("seed, shape, far", MONAI_CASES,
                         ids=[f"seed{s}-{'x'.join(map(str, sh))}{'-far' if f else ''}"
                              for s, sh, f in MONAI_CASES])
def test_surface_distances_agree_with_monai(seed, shape, far):
    from monai.metrics.utils import get_mask_edges, get_surface_distance

    pred, ref, spacing = blobs(seed, shape, far)
    to_ref, to_pred = lits.surface_distances(pred, ref, spacing)
    edges_pred, edges_ref = get_mask_edges(pred, ref, crop=True)
    monai_to_ref = np.asarray(get_surface_distance(edges_pred, edges_ref, spacing=spacing), float)
    monai_to_pred = np.asarray(get_surface_distance(edges_ref, edges_pred, spacing=spacing), float)
    np.testing.assert_allclose(np.sort(to_ref), np.sort(monai_to_ref), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.sort(to_pred), np.sort(monai_to_pred), rtol=1e-6, atol=1e-6)
    both = np.concatenate([monai_to_ref, monai_to_pred])
    scores = lits.binary_scores(pred, ref, spacing)
    assert scores["assd"] == pytest.approx(both.mean(), rel=1e-6)
    assert scores["mssd"] == pytest.approx(both.max(), rel=1e-6)
    assert scores["hd95"] == pytest.approx(np.percentile(both, 95), rel=1e-6)


@pytest.mark.parametrize("seed, shape, far", MONAI_CASES[:2] + MONAI_CASES[-1:])
def test_surface_distances_are_the_edt_at_each_surface_voxel(seed, shape, far):
    """In C order, each distance is the EDT (sampling=spacing) of the other surface there."""
    pred, ref, spacing = blobs(seed, shape, far)
    surf_pred, surf_ref = morphology.surface(pred), morphology.surface(ref)
    to_ref, _ = lits.surface_distances(pred, ref, spacing)
    edt = ndi.distance_transform_edt(~surf_ref, sampling=spacing)
    np.testing.assert_allclose(to_ref, edt[surf_pred], rtol=1e-12)


# --------------------------------------------------------------------------- lesions

S = (10, 10, 10)


def chain_case() -> tuple[np.ndarray, np.ndarray]:
    """Along one row: reference A B C, prediction P1 over A and B, P2 over B and C; one
    group of 7 reference and 6 predicted voxels sharing 4 (IoU 4/9): one FN, one FP."""
    pred, ref = np.zeros(S, bool), np.zeros(S, bool)
    ref[1, 1, 0:2] = ref[1, 1, 3:6] = ref[1, 1, 7:9] = True
    pred[1, 1, 1:4] = pred[1, 1, 5:8] = True
    return pred, ref


# name, pred tumour, ref tumour, spacing, tp, fp, fn, ref lesions (volume mm3, detected, dice)
LESION_CASES = [
    ("nothing", np.zeros(S, bool), np.zeros(S, bool), (1, 1, 1), 0, 0, 0, []),
    ("face-touching lesions are one", cube(S, np.s_[2:4, 2:4, 2:6]),
     cube(S, np.s_[2:4, 2:4, 2:4], np.s_[2:4, 2:4, 4:6]), (1, 1, 1), 1, 0, 0, [(16, True, 1.0)]),
    ("one prediction over two lesions merges them", cube(S, np.s_[2:4, 2:4, 1:8]),
     cube(S, np.s_[2:4, 2:4, 1:4], np.s_[2:4, 2:4, 5:8]), (1, 1, 1), 1, 0, 0,
     [(24, True, 2 * 24 / (24 + 28))]),
    ("two predictions on one lesion count together", cube(S, np.s_[2, 2, 0:2], np.s_[2, 2, 3:6]),
     cube(S, np.s_[2, 2, 0:6]), (1, 1, 1), 1, 0, 0, [(6, True, 10 / 11)]),
    ("a missed lesion", cube(S, np.s_[1:3, 1:3, 1:3]), cube(S, np.s_[1:3, 1:3, 1:3], np.s_[6:8, 6:8, 6:8]),
     (2, 1, 1), 1, 0, 1, [(16, True, 1.0), (16, False, None)]),
    ("a false positive", cube(S, np.s_[1:3, 1:3, 1:3], np.s_[6:8, 6:8, 6:8]), cube(S, np.s_[1:3, 1:3, 1:3]),
     (1, 1, 1), 1, 1, 0, [(8, True, 1.0)]),
    ("IoU of exactly 0.5 is a miss and its prediction one false positive", cube(S, np.s_[1:3, 1:3, 1:2]),
     cube(S, np.s_[1:3, 1:3, 1:3]), (1, 1, 1), 0, 1, 1, [(8, False, None)]),
    ("a chain of overlaps is one group", *chain_case(), (1, 1, 1), 0, 1, 1, [(7, False, None)]),
    ("corner-touching lesions are two (6-connected)", cube(S, np.s_[1:3, 1:3, 1:3]),
     cube(S, np.s_[1:3, 1:3, 1:3], np.s_[3:5, 3:5, 3:5]), (1, 1, 1), 1, 0, 1, [(8, True, 1.0), (8, False, None)]),
    ("edge-touching lesions are two (6-connected)", cube(S, np.s_[1:3, 1:3, 1:3], np.s_[1:3, 3:5, 3:5]),
     cube(S, np.s_[1:3, 1:3, 1:3], np.s_[1:3, 3:5, 3:5]), (1, 1, 1), 2, 0, 0, [(8, True, 1.0), (8, True, 1.0)]),
]


@pytest.mark.parametrize("pred, ref, spacing, tp, fp, fn, lesions", [c[1:] for c in LESION_CASES],
                         ids=[c[0] for c in LESION_CASES])
def test_lesion_detection_hand_computed(pred, ref, spacing, tp, fp, fn, lesions):
    result = lits.lesion_detection(pred, ref, spacing)
    assert (result["tp"], result["fp"], result["fn"]) == (tp, fp, fn)
    def key(lesion):
        return lesion[:2]

    got = sorted(((d["volume_mm3"], d["detected"], d["dice"]) for d in result["lesions"]), key=key)
    assert [(v, det, dice if dice is None else pytest.approx(dice)) for v, det, dice in got] == sorted(
        lesions, key=key)


def naive_detection(pred: np.ndarray, ref: np.ndarray, spacing) -> dict:
    """The LiTS rule, written as plainly as possible: scipy labels (6-connected, scipy's
    default), every pair of components tested for overlap, union-find over the overlapping pairs."""
    ref_lab, n_ref = ndi.label(ref)
    pred_lab, n_pred = ndi.label(pred)
    parent = list(range(n_ref + n_pred))  # ref i → node i - 1, pred j → node n_ref + j - 1

    def find(a: int) -> int:
        while parent[a] != a:
            a = parent[a]
        return a

    for i in range(1, n_ref + 1):
        for j in range(1, n_pred + 1):
            if np.any((ref_lab == i) & (pred_lab == j)):
                parent[find(i - 1)] = find(n_ref + j - 1)
    groups: dict[int, list[int]] = {}
    for node in range(n_ref + n_pred):
        groups.setdefault(find(node), []).append(node)
    tp = fp = fn = 0
    lesions = []
    for members in groups.values():
        r = np.isin(ref_lab, [m + 1 for m in members if m < n_ref])
        p = np.isin(pred_lab, [m - n_ref + 1 for m in members if m >= n_ref])
        if not r.any():
            fp += 1
            continue
        inter = np.count_nonzero(r & p)
        volume = np.count_nonzero(r) * float(np.prod(spacing))
        if inter / np.count_nonzero(r | p) > 0.5:
            tp += 1
            lesions.append((volume, True, 2 * inter / (np.count_nonzero(r) + np.count_nonzero(p)), True))
        else:
            fn += 1
            fp += int(p.any())
            lesions.append((volume, False, -1.0, inter > 0))
    return {"tp": tp, "fp": fp, "fn": fn, "lesions": sorted(lesions)}


def random_lesions(seed: int, shape=(14, 26, 26)) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Reference balls, and a prediction that shifts, shrinks, drops, joins and adds some."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    ref, pred = np.zeros(shape, bool), np.zeros(shape, bool)

    def ball(centre, radius):
        return (((grid - centre) / (radius * np.array([0.5, 1, 1]))) ** 2).sum(-1) <= 1

    centres = []
    for _ in range(rng.integers(3, 8)):
        centre, radius = rng.uniform(0, shape), rng.uniform(1.0, 4.0)
        ref |= ball(centre, radius)
        centres.append(centre)
        action = rng.choice(["shift", "shrink", "drop", "split"])
        if action == "shift":
            pred |= ball(centre + rng.normal(0, 1.2, 3), radius * rng.uniform(0.8, 1.2))
        elif action == "shrink":
            pred |= ball(centre, radius * 0.6)
        elif action == "split":
            pred |= ball(centre, radius) & (grid[..., 2] != int(centre[2]))
    if len(centres) > 1 and rng.random() < 0.5:  # one prediction over two lesions
        a, b = centres[0], centres[1]
        pred |= ball((a + b) / 2, np.linalg.norm(b - a) / 2 + 1)
    for _ in range(rng.integers(0, 3)):
        pred |= ball(rng.uniform(0, shape), rng.uniform(0.8, 2.0))
    return pred, ref, tuple(float(s) for s in rng.uniform(0.6, 3.0, 3))


@pytest.mark.parametrize("seed", range(12))
def test_lesion_detection_agrees_with_naive_reference(seed):
    pred, ref, spacing = random_lesions(seed)
    expected = naive_detection(pred, ref, spacing)
    result = lits.lesion_detection(pred, ref, spacing)
    assert {k: result[k] for k in ("tp", "fp", "fn")} == {k: expected[k] for k in ("tp", "fp", "fn")}
    got = sorted((d["volume_mm3"], d["detected"], -1.0 if d["dice"] is None else d["dice"], d["touched"])
                 for d in result["lesions"])
    # field by field: newer pytest refuses approx over nested tuples
    assert len(got) == len(expected["lesions"])
    for (volume, detected, dice, touched), want in zip(got, expected["lesions"]):
        assert (volume, detected, dice, touched) == (pytest.approx(want[0]), want[1], pytest.approx(want[2]), want[3])
    assert result["ref_lesions"] == ndi.label(ref)[1]
    assert result["pred_lesions"] == ndi.label(pred)[1]



# --------------------------------------------------------------------------- cases and dataset



def test_score_case_classes_and_burden():
    shape = (6, 10, 10)
    ref = labels(shape, [np.s_[1:5, 0:5, 0:5]], [np.s_[1:3, 0:2, 0:5]])  # 100 liver, 20 tumour
    pred = labels(shape, [np.s_[1:5, 0:5, 0:5]], [np.s_[1:5, 0:5, 0:5]])  # all of it tumour
    scores = lits.score_case(pred, ref, (2.0, 1.0, 1.0))
    assert set(scores) == {"liver", "tumour", "lesions", "burden"}
    assert scores["liver"]["dice"] == 1.0  # liver = label >= 1: tumour counts as liver
    assert scores["tumour"]["dice"] == pytest.approx(2 * 20 / 120)
    assert scores["burden"] == {"pred": 1.0, "ref": pytest.approx(0.2)}
    empty = lits.score_case(np.zeros(shape, np.uint8), np.zeros(shape, np.uint8), (1, 1, 1))
    assert empty["burden"] == {"pred": 0.0, "ref": 0.0}
    assert empty["tumour"]["dice"] == 1.0 and empty["lesions"]["tp"] == 0


def test_score_case_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        lits.score_case(np.zeros((2, 3, 4), np.uint8), np.zeros((2, 3, 5), np.uint8), (1, 1, 1))


def fake_case(tp, pred_voxels, ref_voxels, dice, lesions=(), burden=(0.0, 0.0), det=(0, 0, 0)) -> dict:
    scores = {"tp": tp, "pred_voxels": pred_voxels, "ref_voxels": ref_voxels,
              **dict.fromkeys(METRICS, dice)}
    return {"liver": scores, "tumour": {**scores, "dice": NAN},
            "lesions": {"tp": det[0], "fp": det[1], "fn": det[2], "lesions": list(lesions),
                        "ref_lesions": len(lesions), "pred_lesions": det[0] + det[1]},
            "burden": {"pred": burden[0], "ref": burden[1]}}


def lesion(diameter_mm: float, detected: bool, dice=None, touched: bool | None = None) -> dict:
    return {"volume_mm3": math.pi / 6 * diameter_mm ** 3, "detected": detected,
            "touched": detected if touched is None else touched, "dice": dice}


def test_aggregate_sums_over_the_dataset():
    cases = [fake_case(90, 100, 100, 0.9, [lesion(5, True, 0.6), lesion(15, False, touched=True)], (0.1, 0.2),
                       (1, 2, 1)),
             fake_case(5, 10, 20, NAN, [lesion(30, True, 0.8), lesion(50, True, 0.9)], (0.3, 0.0), (2, 0, 0))]
    summary = lits.aggregate(cases)
    assert summary["liver"]["dice_global"] == pytest.approx(2 * 95 / 230)
    assert summary["liver"]["dice"] == approx({"mean": 0.9, "std": 0.0, "median": 0.9, "min": 0.9,
                                               "max": 0.9})
    assert all(math.isnan(v) for v in summary["tumour"]["dice"].values())  # all NaN → NaN
    det = summary["detection"]
    assert (det["tp"], det["fp"], det["fn"]) == (3, 2, 1)
    assert det["precision"] == pytest.approx(3 / 5) and det["recall"] == pytest.approx(3 / 4)
    assert det["lesion_dice_mean"] == pytest.approx((0.6 + 0.8 + 0.9) / 3)
    assert [(b["bin"], b["lesions"], b["detected"], b["touched"]) for b in det["by_size"]] == [
        ("<10 mm", 1, 1, 1), ("10-20 mm", 1, 0, 1), (">=20 mm", 2, 2, 2)]
    assert det["touched"] == 4 and det["recall_any"] == 1.0
    assert det["tumour_free"]["cases"] == 0 and math.isnan(det["tumour_free"]["fraction"])
    assert "oracle" not in summary  # only when the oracle's per-case Dice are given
    assert summary["burden"] == approx({"rmse": math.sqrt((0.01 + 0.09) / 2), "max": 0.3})


def test_aggregate_of_nothing_detected():
    summary = lits.aggregate([fake_case(0, 0, 0, 1.0)])
    assert summary["liver"]["dice_global"] == 1.0  # empty in both, as per case
    det = summary["detection"]
    assert math.isnan(det["precision"]) and math.isnan(det["recall"]) and math.isnan(det["lesion_dice_mean"])
    assert all(b["lesions"] == 0 and math.isnan(b["recall"]) for b in det["by_size"])


# --------------------------------------------------------------------------- lesion scorecard

SCORECARD_SHAPE = (22, 56, 56)  # 1 mm voxels; a cube of side a mm has diameter 1.24 a mm

# name, reference box, predicted box (or None), diameter bin, found at IoU > 0.5, found at any overlap
SCORECARD_LESIONS = [
    ("4 mm cube (5.0 mm) predicted exactly", np.s_[2:6, 2:6, 2:6], np.s_[2:6, 2:6, 2:6], "<10 mm", True, True),
    ("10 mm cube (12.4 mm) touched on 4 of its 10 columns (IoU 0.4)", np.s_[2:12, 10:20, 10:20],
     np.s_[2:12, 10:20, 10:14], "10-20 mm", False, True),
    ("17 mm cube (21.1 mm) missed", np.s_[2:19, 25:42, 25:42], None, ">=20 mm", False, False),
    ("corner-touching pair: the predicted one", np.s_[2:5, 45:48, 2:5], np.s_[2:5, 45:48, 2:5], "<10 mm",
     True, True),
    ("corner-touching pair: the missed one", np.s_[5:8, 48:51, 5:8], None, "<10 mm", False, False),
]


def scorecard_case() -> tuple[np.ndarray, np.ndarray]:
    """Label volumes (liver everywhere, tumour where SCORECARD_LESIONS put it)."""
    ref, pred = np.ones(SCORECARD_SHAPE, np.uint8), np.ones(SCORECARD_SHAPE, np.uint8)
    for _, ref_box, pred_box, *_ in SCORECARD_LESIONS:
        ref[ref_box] = 2
        if pred_box is not None:
            pred[pred_box] = 2
    return pred, ref


@pytest.mark.parametrize("name, ref_box, pred_box, size_bin, found_iou, found_any", SCORECARD_LESIONS,
                         ids=[c[0] for c in SCORECARD_LESIONS])
def test_each_lesion_is_found_by_its_rule(name, ref_box, pred_box, size_bin, found_iou, found_any):
    pred, ref = scorecard_case()
    result = lits.lesion_detection(pred == 2, ref == 2, (1.0, 1.0, 1.0))
    volume = float(cube(SCORECARD_SHAPE, ref_box).sum())
    bins = [name for lo, hi, name in lits.SIZE_BINS if lo <= lits.equivalent_diameter(volume) < hi]
    assert bins == [size_bin]
    # the two lesions of the pair have one volume and differ in being found
    matches = [(d["detected"], d["touched"]) for d in result["lesions"] if d["volume_mm3"] == volume]
    assert (found_iou, found_any) in matches


def test_scorecard_counts_by_size_bin():
    pred, ref = scorecard_case()
    det = lits.aggregate([lits.score_case(pred, ref, (1.0, 1.0, 1.0))])["detection"]
    expected = {name: [0, 0, 0] for *_, name in lits.SIZE_BINS}
    for _, _, _, size_bin, found_iou, found_any in SCORECARD_LESIONS:
        expected[size_bin] = [n + d for n, d in zip(expected[size_bin], (1, found_iou, found_any))]
    assert {b["bin"]: [b["lesions"], b["detected"], b["touched"]] for b in det["by_size"]} == expected
    assert expected == {"<10 mm": [3, 2, 2], "10-20 mm": [1, 0, 1], ">=20 mm": [1, 0, 0]}
    assert [b["recall_any"] for b in det["by_size"]] == [2 / 3, 1.0, 0.0]
    # the pair is two lesions only under 6-connectivity: under 26 it would be one, at IoU 0.5 a miss
    assert (det["tp"], det["fn"], det["fp"]) == (2, 3, 1)  # the partial prediction on the 10 mm cube is a FP
    assert det["precision"] == pytest.approx(2 / 3) and det["recall"] == pytest.approx(2 / 5)


def tumour_free_ref() -> np.ndarray:
    return np.ones((6, 12, 12), np.uint8)


def with_tumour(labels: np.ndarray, box) -> np.ndarray:
    out = labels.copy()
    out[box] = 2
    return out


# name, prediction, reference, (tumour-free cases, of them without a predicted tumour)
TUMOUR_FREE_CASES = [
    ("tumour-free, nothing predicted", tumour_free_ref(), tumour_free_ref(), (1, 1)),
    ("tumour-free, one false voxel", with_tumour(tumour_free_ref(), np.s_[3, 3, 3]), tumour_free_ref(), (1, 0)),
    ("tumour in the reference: not counted", tumour_free_ref(), with_tumour(tumour_free_ref(), np.s_[1:3, 1:3, 1:3]),
     (0, 0)),
]


@pytest.mark.parametrize("pred, ref, expected", [c[1:] for c in TUMOUR_FREE_CASES],
                         ids=[c[0] for c in TUMOUR_FREE_CASES])
def test_tumour_free_cases_without_a_false_lesion(pred, ref, expected):
    free = lits.aggregate([lits.score_case(pred, ref, (1, 1, 1))])["detection"]["tumour_free"]
    assert (free["cases"], free["without_false_lesion"]) == expected


def test_tumour_free_fraction_and_precision_over_cases():
    cases = [lits.score_case(pred, ref, (1, 1, 1)) for _, pred, ref, _ in TUMOUR_FREE_CASES]
    cases.append(lits.score_case(*scorecard_case(), (1, 1, 1)))
    det = lits.aggregate(cases)["detection"]
    assert det["tumour_free"] == {"cases": 2, "without_false_lesion": 1, "fraction": 0.5}
    assert det["precision"] == pytest.approx(2 / (2 + 2))  # TP / (TP + FP): the false voxel is a FP too


def test_oracle_summary_is_mean_dice_over_mean_oracle_dice():
    cases = [fake_case(1, 1, 1, 1.0), fake_case(1, 1, 1, 1.0)]
    cases[0]["tumour"]["dice"], cases[1]["tumour"]["dice"] = 0.2, 0.6
    oracle = lits.aggregate(cases, [0.5, 1.0])["oracle"]
    assert oracle == approx({"cases": 2, "dice_mean": 0.75, "tumour_dice_mean": 0.4, "fraction": 0.4 / 0.75})
    assert math.isnan(lits.aggregate(cases, [0.0, 0.0])["oracle"]["fraction"])
    with pytest.raises(ValueError, match="oracle"):
        lits.aggregate(cases, [0.5])


def test_lesions_are_counted_as_lits_counts_them():
    assert lits.LESION_CONNECTIVITY == 6  # scipy.ndimage.label's default, the official scorer's


def test_bounding_box():
    a = np.zeros((5, 6, 7), np.uint8)
    assert morphology.bounding_box(a) is None
    a[1, 2, 3] = a[2, 4, 6] = 2
    assert morphology.bounding_box(a) == (slice(1, 3), slice(2, 5), slice(3, 7))
    assert morphology.bounding_box(a, 1) == (slice(0, 4), slice(1, 6), slice(2, 7))
    assert morphology.bounding_box(a.astype(bool), (0, 2, 0)) == (slice(1, 3), slice(0, 6), slice(3, 7))


def test_scoring_modules_do_not_import_torch():
    code = "import sys, liverseg.lits, liverseg.postprocess; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
