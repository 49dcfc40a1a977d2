"""Segmentation metrics: count tp/fp/fn/tn once (a confusion matrix, summed over batches
and processes), then score the counts with tiny functions.

Counts add up, scores do not: accumulate `confusion_matrix` (or counts) per batch, reduce
across processes once after the loop, and only then call `dice`, `iou`, ...
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from shardgen.labels import LIVER, NUM_CLASSES, TUMOUR

from .vocabulary import METRIC_LIST, Metric, empty_score


# --------------------------------------------------------------------------- counting

def confusion_matrix(pred: torch.Tensor, target: torch.Tensor,
                     classes: int = NUM_CLASSES) -> torch.Tensor:
    """(K, K) int64 pixel counts, rows = target label, columns = predicted label.

    `pred` and `target` hold labels in [0, classes) of the same shape; labels outside
    that range are not checked.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    # One bincount of the (target, pred) pair index counts every cell in one pass. On CUDA
    # torch sizes bincount's output from the input's max, read back to the host: one sync
    # per call, so count once per batch rather than per image or per class.
    cells = target.reshape(-1).long() * classes + pred.reshape(-1).long()
    return torch.bincount(cells, minlength=classes * classes).reshape(classes, classes)


def counts_from_matrix(matrix: torch.Tensor) -> torch.Tensor:
    """(K, K) confusion matrix → (K, 4) one-vs-rest counts, columns (tp, fp, fn, tn)."""
    tp = matrix.diagonal()
    fp = matrix.sum(dim=0) - tp  # predicted k, truly something else
    fn = matrix.sum(dim=1) - tp  # truly k, predicted something else
    tn = matrix.sum() - tp - fp - fn
    return torch.stack([tp, fp, fn, tn], dim=-1)


def confusion_counts(pred: torch.Tensor, target: torch.Tensor,
                     classes: int = NUM_CLASSES) -> torch.Tensor:
    """(K, 4) int64 counts (tp, fp, fn, tn) per class, each class against all the others."""
    return counts_from_matrix(confusion_matrix(pred, target, classes))


def liver_tumour_from_matrix(matrix: torch.Tensor) -> torch.Tensor:
    """3×3 confusion matrix → (2, 4) counts for LiTS's two binary problems.

    Row 0 is liver = label ≥ 1 (a tumour lies inside the liver, so it counts as liver),
    row 1 is tumour = label 2. Deriving both from the 3×3 matrix lets training accumulate
    one matrix and report every score from it.
    """
    background, foreground = slice(0, LIVER), slice(LIVER, None)
    liver = torch.stack([
        matrix[foreground, foreground].sum(),  # tp: liver or tumour, predicted either
        matrix[background, foreground].sum(),  # fp
        matrix[foreground, background].sum(),  # fn
        matrix[background, background].sum(),  # tn
    ])
    return torch.stack([liver, counts_from_matrix(matrix)[TUMOUR]])


def liver_tumour_counts(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(2, 4) counts (tp, fp, fn, tn): row 0 liver (label ≥ 1), row 1 tumour (label 2)."""
    return liver_tumour_from_matrix(confusion_matrix(pred, target, NUM_CLASSES))


# --------------------------------------------------------------------------- scores
# Each score takes counts (..., 4) and returns float32 (...). An empty denominator means
# the class was absent where the score looks: vocabulary.empty_score's training rule
# (docs/METRICS.md, "Empty masks") gives 1 when the other side is empty too (nothing
# there, nothing claimed: right) and 0 otherwise, so no NaN ever appears.

def _unpack(counts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(counts[..., i].to(torch.float32) for i in range(4))


def _ratio(metric: str, numerator: torch.Tensor, denominator: torch.Tensor,
           both_empty: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, or the empty-mask value of ``metric`` where the
    denominator is 0 (``both_empty``: whether the other side is empty as well)."""
    if_empty = torch.where(both_empty, empty_score(metric, True, "training"), empty_score(metric, False, "training"))
    # clamp keeps the unused branch of torch.where finite, so no NaN reaches gradients or logs
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1), if_empty.to(torch.float32))


def _training_score(metric: Metric) -> Callable[[torch.Tensor], torch.Tensor]:
    """``metric``'s formula (vocabulary.METRIC_LIST) on counts (..., 4) → float32 (...)."""
    def score(counts: torch.Tensor) -> torch.Tensor:
        tp, fp, fn, tn = _unpack(counts)
        num, den = metric.ratio(tp, fp, fn, tn)
        return _ratio(metric.name, num, den, (tp + fp == 0) & (tp + fn == 0))

    score.__name__ = score.__qualname__ = metric.name
    return score


SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    m.name: _training_score(m) for m in METRIC_LIST if m.in_training}
dice, iou, precision, recall, accuracy = (SCORES[name] for name in ("dice", "iou", "precision", "recall", "accuracy"))
