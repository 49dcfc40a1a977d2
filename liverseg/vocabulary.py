"""The score vocabulary: every per-case metric evaluation reports, with its unit and
whether the printed table shows it, and what a score is when a mask is empty, in
training and in evaluation (docs/METRICS.md, "Empty masks"). Computing code (metrics.py,
lits.py) and every consumer (metrics.csv, report.html, the printed table, W&B) read these.

Adding a metric: add it to ``METRIC_LIST`` and its function to ``lits.OVERLAP_SCORES``
(or ``lits.distance_scores``); every output then has it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str = ""  # shown on chart axes; "" for a ratio
    in_table: bool = False  # printed by `liverseg-eval run` (all are in metrics.csv and report.html)


METRIC_LIST = (
    Metric("dice", in_table=True), Metric("iou", in_table=True), Metric("accuracy"),
    Metric("precision", in_table=True), Metric("recall", in_table=True), Metric("voe"), Metric("rvd"),
    Metric("assd", "mm", in_table=True), Metric("mssd", "mm"), Metric("hd95", "mm"),
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

BOTH_EMPTY = {"dice": 1.0, "iou": 1.0, "accuracy": 1.0, "precision": 1.0, "recall": 1.0,
              "voe": 0.0, "rvd": 0.0, "assd": 0.0, "mssd": 0.0, "hd95": 0.0}
ONE_SIDE_EMPTY = {"training": 0.0, "evaluation": math.nan}


def empty_score(metric: str, both_empty: bool, stage: str = "evaluation") -> float:
    """The value of ``metric`` when its denominator is 0: the rule above."""
    return BOTH_EMPTY[metric] if both_empty else ONE_SIDE_EMPTY[stage]
