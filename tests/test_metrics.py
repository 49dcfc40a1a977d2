"""Confusion counts and the scores over them: hand-computed cases, the LiTS liver/tumour
convention, agreement with a naive count, and counts that add up across batches."""

from __future__ import annotations

import pytest
import torch

from liverseg.metrics import (SCORES, accuracy, confusion_counts, confusion_matrix,
                              counts_from_matrix, dice, iou, liver_tumour_counts,
                              liver_tumour_from_matrix, precision, recall)


def labels(values: list[int]) -> torch.Tensor:
    """A row of pixel labels as a (1, 1, N) batch."""
    return torch.tensor(values).view(1, 1, -1)


# name, pred, target, class scored, (tp, fp, fn, tn), dice, iou, precision, recall, accuracy
CASES = [
    ("all correct", [0, 1, 2, 1], [0, 1, 2, 1], 1, (2, 0, 0, 2), 1, 1, 1, 1, 1),
    ("all wrong", [1, 1, 0, 0], [0, 0, 1, 1], 1, (0, 2, 2, 0), 0, 0, 0, 0, 0),
    ("half right", [1, 1, 0, 0], [1, 0, 1, 0], 1, (1, 1, 1, 1), 1 / 2, 1 / 3, 1 / 2, 1 / 2, 1 / 2),
    ("absent from both", [0, 1, 1, 0], [0, 1, 1, 0], 2, (0, 0, 0, 4), 1, 1, 1, 1, 1),
    ("empty target, false positive", [2, 0, 0, 0], [0, 0, 0, 0], 2, (0, 1, 0, 3), 0, 0, 0, 0, 3 / 4),
    ("empty prediction, missed", [0, 0, 0, 0], [2, 2, 0, 0], 2, (0, 0, 2, 2), 0, 0, 0, 0, 1 / 2),
    ("other classes confused", [1, 2, 2, 0], [2, 1, 2, 0], 2, (1, 1, 1, 1), 1 / 2, 1 / 3, 1 / 2, 1 / 2, 1 / 2),
]


@pytest.mark.parametrize("pred, target, cls, counts, d, j, p, r, a",
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_hand_computed_counts_and_scores(pred, target, cls, counts, d, j, p, r, a):
    c = confusion_counts(labels(pred), labels(target))
    assert c.dtype == torch.long and c.shape == (3, 4)
    assert c[cls].tolist() == list(counts)
    for score, expected in ((dice, d), (iou, j), (precision, p), (recall, r), (accuracy, a)):
        value = score(c)[cls]
        assert value.dtype == torch.float32
        assert value.item() == pytest.approx(expected), score.__name__


# name, pred, target, liver (tp, fp, fn, tn), tumour (tp, fp, fn, tn)
LITS_CASES = [
    ("tumour predicted as liver is still a liver hit",
     [1, 1, 0, 0], [2, 1, 0, 0], (2, 0, 0, 2), (0, 0, 1, 3)),
    ("liver predicted as tumour is still a liver hit",
     [2, 2, 0, 0], [1, 1, 0, 0], (2, 0, 0, 2), (0, 2, 0, 2)),
    ("tumour predicted as background misses both",
     [0, 1, 0, 0], [2, 1, 0, 0], (1, 0, 1, 2), (0, 0, 1, 3)),
    ("background predicted as tumour is a false positive for both",
     [2, 1, 0, 0], [0, 1, 0, 0], (1, 1, 0, 2), (0, 1, 0, 3)),
]


@pytest.mark.parametrize("pred, target, liver, tumour",
                         [case[1:] for case in LITS_CASES], ids=[case[0] for case in LITS_CASES])
def test_lits_liver_counts_tumour_as_liver(pred, target, liver, tumour):
    pred, target = labels(pred), labels(target)
    counts = liver_tumour_counts(pred, target)
    assert counts.tolist() == [list(liver), list(tumour)]
    plain = confusion_counts(pred, target)
    assert counts[1].tolist() == plain[2].tolist()  # tumour is plain class 2
    assert counts[0].tolist() != plain[1].tolist()  # liver is not plain class 1


def random_labels(seed: int, shape=(4, 12, 12), classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, classes, shape, generator=generator),
            torch.randint(0, classes, shape, generator=generator))


@pytest.mark.parametrize("classes, seed", [(3, 0), (3, 1), (2, 2), (5, 3)])
def test_bincount_matches_naive_counting(classes, seed):
    pred, target = random_labels(seed, classes=classes)
    naive_matrix = torch.zeros(classes, classes, dtype=torch.long)
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
        naive_matrix[t, p] += 1
    assert torch.equal(confusion_matrix(pred, target, classes), naive_matrix)
    naive_counts = torch.tensor([
        [((pred == k) & (target == k)).sum(), ((pred == k) & (target != k)).sum(),
         ((pred != k) & (target == k)).sum(), ((pred != k) & (target != k)).sum()]
        for k in range(classes)])
    assert torch.equal(confusion_counts(pred, target, classes), naive_counts)


def test_lits_counts_match_naive_binary_counting():
    pred, target = random_labels(4)
    expected = []
    for pred_bin, target_bin in ((pred >= 1, target >= 1), (pred == 2, target == 2)):
        expected.append([(pred_bin & target_bin).sum().item(), (pred_bin & ~target_bin).sum().item(),
                         (~pred_bin & target_bin).sum().item(), (~pred_bin & ~target_bin).sum().item()])
    assert liver_tumour_counts(pred, target).tolist() == expected


@pytest.mark.parametrize("count", [confusion_counts, liver_tumour_counts],
                         ids=["per class", "liver/tumour"])
def test_counts_add_up_to_the_pixel_count(count):
    pred, target = random_labels(5)
    assert (count(pred, target).sum(dim=1) == pred.numel()).all()


@pytest.mark.parametrize("count", [confusion_matrix, confusion_counts, liver_tumour_counts],
                         ids=["matrix", "per class", "liver/tumour"])
def test_counts_of_two_halves_sum_to_counts_of_the_whole(count):
    # what makes summing per batch, and reducing across processes once, correct
    pred, target = random_labels(6)
    halves = count(pred[:2], target[:2]) + count(pred[2:], target[2:])
    assert torch.equal(halves, count(pred, target))


def test_counts_and_lits_counts_derive_from_one_accumulated_matrix():
    pred, target = random_labels(7)
    matrix = confusion_matrix(pred[:2], target[:2]) + confusion_matrix(pred[2:], target[2:])
    assert torch.equal(counts_from_matrix(matrix), confusion_counts(pred, target))
    assert torch.equal(liver_tumour_from_matrix(matrix), liver_tumour_counts(pred, target))


@pytest.mark.parametrize("name", sorted(SCORES))
def test_scores_of_no_pixels_are_one_not_nan(name):
    assert torch.equal(SCORES[name](torch.zeros(3, 4, dtype=torch.long)), torch.ones(3))


@pytest.mark.parametrize("name", sorted(SCORES))
def test_scores_keep_leading_dimensions(name):
    pred, target = random_labels(8)
    per_image = torch.stack([confusion_counts(p, t) for p, t in zip(pred, target)])
    scores = SCORES[name](per_image)
    assert scores.shape == (4, 3)
    assert torch.equal(scores[1], SCORES[name](per_image[1]))


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="differ"):
        confusion_counts(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 5, dtype=torch.long))
