"""The score vocabulary: every per-case metric evaluation reports, with its unit, whether
the printed table and training show it, its formula from the overlap counts, and what a
score is when a mask is empty, in training and in evaluation (docs/METRICS.md, "Empty
masks"). Computing code (metrics.py for training, lits.py for evaluation) and every consumer
(metrics.csv, report.html, the printed table, W&B) read these.

Adding a metric: add it to ``METRIC_LIST``. One computed from the overlap counts needs
nothing else (its ``ratio``); a surface distance is computed in ``lits.distance_scores``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# (tp, fp, fn, tn) → (numerator, denominator); plain arithmetic, so that the same formula
# scores Python ints (evaluation) and torch tensors (training)
Ratio = Callable[[Any, Any, Any, Any], tuple[Any, Any]]


@dataclass(frozen=True)
class Metric:
    name: str
    both_empty: float  # the score when prediction and reference are both empty (see below)
    unit: str = ""  # shown on chart axes; "" for a ratio
    in_table: bool = False  # printed by `liverseg-eval run` (all are in metrics.csv and report.html)
    in_training: bool = False  # logged by training's validation
    ratio: Ratio | None = None  # None for a surface distance (lits.distance_scores)


METRIC_LIST = (
    Metric("dice", 1.0, in_table=True, in_training=True, ratio=lambda tp, fp, fn, tn: (2 * tp, 2 * tp + fp + fn)),
    Metric("iou", 1.0, in_table=True, in_training=True, ratio=lambda tp, fp, fn, tn: (tp, tp + fp + fn)),
    Metric("accuracy", 1.0, in_training=True, ratio=lambda tp, fp, fn, tn: (tp + tn, tp + fp + fn + tn)),
    Metric("precision", 1.0, in_table=True, in_training=True, ratio=lambda tp, fp, fn, tn: (tp, tp + fp)),
    Metric("recall", 1.0, in_table=True, in_training=True, ratio=lambda tp, fp, fn, tn: (tp, tp + fn)),
    Metric("voe", 0.0, ratio=lambda tp, fp, fn, tn: (fp + fn, tp + fp + fn)),  # 1 - iou
    Metric("rvd", 0.0, ratio=lambda tp, fp, fn, tn: (fp - fn, tp + fn)),  # (|pred| - |ref|) / |ref|
    Metric("assd", 0.0, "mm", in_table=True), Metric("mssd", 0.0, "mm"), Metric("hd95", 0.0, "mm"),
)
METRICS = tuple(m.name for m in METRIC_LIST)
TABLE_METRICS = tuple(m.name for m in METRIC_LIST if m.in_table)
UNITS = {m.name: m.unit for m in METRIC_LIST if m.unit}

# ----------------------------------------------------------------------------- empty masks
# A score whose denominator is 0 looks at a mask that is empty. When both masks are empty
# (nothing there, nothing claimed) the prediction is right and scores BOTH_EMPTY. When only
# the side the score divides by is empty (precision with nothing predicted, recall with
# nothing present, rvd and the surface distances with an empty reference), the score is
# undefined: evaluation reports NaN, which dataset means skip; training reports 0, so
# that no NaN reaches a loss, a log or a best-checkpoint comparison.

BOTH_EMPTY = {m.name: m.both_empty for m in METRIC_LIST}
ONE_SIDE_EMPTY = {"training": 0.0, "evaluation": math.nan}


def empty_score(metric: str, both_empty: bool, stage: str = "evaluation") -> float:
    """The value of ``metric`` when its denominator is 0: the rule above."""
    return BOTH_EMPTY[metric] if both_empty else ONE_SIDE_EMPTY[stage]
