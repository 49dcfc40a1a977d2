"""One vocabulary: label values and class names (shardgen.labels), the metric list and
the empty-mask rules (liverseg.vocabulary), read the same way by training and evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from liverseg import lits, metrics, report
from liverseg.vocabulary import BOTH_EMPTY, METRIC_LIST, METRICS, TABLE_METRICS, UNITS
from shardgen.labels import CLASS_NAMES, CLASS_RGB, LIVER, NUM_CLASSES, SCORED_CLASSES, TUMOUR, overlay

EMPTY = np.zeros((3, 4, 4), bool)
SOME = EMPTY.copy()
SOME[1, 1:3, 1:3] = True


@pytest.mark.parametrize("pred, ref", [(EMPTY, EMPTY), (SOME, EMPTY), (EMPTY, SOME)],
                         ids=["both empty", "reference empty", "prediction empty"])
def test_training_and_evaluation_follow_the_one_empty_mask_table(pred, ref):
    evaluation = lits.binary_scores(pred, ref, (1.0, 1.0, 1.0))
    counts = metrics.confusion_counts(torch.from_numpy(pred).long(), torch.from_numpy(ref).long(), 2)[1]
    for name, score in metrics.SCORES.items():
        training = float(score(counts))
        if math.isnan(evaluation[name]):
            assert training == 0.0, name  # undefined: NaN in evaluation, 0 in training
        else:
            assert training == pytest.approx(evaluation[name]), name
    if not pred.any() and not ref.any():
        assert {m: evaluation[m] for m in METRICS} == BOTH_EMPTY


def test_every_listed_metric_is_computed_and_reported():
    scores = lits.binary_scores(SOME, SOME, (1.0, 1.0, 1.0))
    assert set(METRICS) <= set(scores)
    assert set(TABLE_METRICS) <= set(METRICS) and set(UNITS) <= set(METRICS)
    # the formulas live in the list: evaluation scores every one, training those it logs
    assert list(lits.OVERLAP_SCORES) == [m.name for m in METRIC_LIST if m.ratio]
    assert list(metrics.SCORES) == [m.name for m in METRIC_LIST if m.in_training]
    assert [m.name for m in METRIC_LIST if not m.ratio] == list(lits.DISTANCES)
    assert report.CSV_COLUMNS == ("case", "variant", "class", *METRICS, "seconds")


def test_a_column_the_csv_does_not_know_is_refused_not_dropped(tmp_path):
    row = {"case": "volume-1", "variant": "unet", "class": "liver", **dict.fromkeys(METRICS, 0.5),
           "seconds": 1.0, "new_metric": 0.3}
    with pytest.raises(ValueError, match="new_metric"):
        report.write_csv([row], tmp_path / "metrics.csv")


def test_labels():
    assert CLASS_NAMES[LIVER] == "liver" and CLASS_NAMES[TUMOUR] == "tumour" and NUM_CLASSES == 3
    assert SCORED_CLASSES == ("liver", "tumour") and set(CLASS_RGB) == set(SCORED_CLASSES)


def test_overlay_tints_each_class_in_its_colour_and_leaves_the_rest_grey():
    image = np.full((2, 3), 100, np.uint8)
    labels = np.array([[0, LIVER, TUMOUR], [0, 0, 0]], np.uint8)
    rgb = overlay(image, labels, alpha=1.0)
    assert rgb.shape == (2, 3, 3) and np.allclose(rgb[0, 0], 100 / 255)
    assert np.allclose(rgb[0, 1], CLASS_RGB["liver"]) and np.allclose(rgb[0, 2], CLASS_RGB["tumour"])
