"""Postprocessing steps: one named case per behaviour, anisotropic radii, morphology equal
to scipy's, a chain equal to its steps one by one, and JSON configs (round trip, errors)."""

from __future__ import annotations

import doctest
import json

import numpy as np
import pytest
from scipy import ndimage as ndi

from liverseg import postprocess as pp
from liverseg import morphology
from liverseg.errors import ConfigError
from liverseg.postprocess import (FillLiverHoles, LargestLiverComponent, LiverClosing, LiverOpening,
                                  Postprocess, RemoveSmallLesions, RemoveUnsureLesions, TumourInsideLiver,
                                  default_postprocess)

ISO = (1.0, 1.0, 1.0)


def volume(shape=(9, 12, 12), liver=(), tumour=(), background=()) -> np.ndarray:
    """uint8 labels: the liver boxes set to 1, then background boxes to 0, then tumour boxes to 2."""
    out = np.zeros(shape, np.uint8)
    for value, boxes in ((1, liver), (0, background), (2, tumour)):
        for box in boxes:
            out[box] = value
    return out


LIVER = np.s_[2:7, 2:10, 2:10]


def changed(before: np.ndarray, after: np.ndarray) -> dict[tuple, tuple[int, int]]:
    """{voxel: (before, after)} where the labels differ."""
    return {tuple(int(i) for i in v): (int(before[tuple(v)]), int(after[tuple(v)]))
            for v in np.argwhere(before != after)}


# name, step, spacing, labels before, {voxel: (before, after)} expected to change
CASES = [
    ("a speck away from the liver is removed", LargestLiverComponent(), ISO,
     volume(liver=[LIVER, np.s_[0, 0, 0]], tumour=[np.s_[8, 11, 11]]),
     {(0, 0, 0): (1, 0), (8, 11, 11): (2, 0)}),
    ("a speck in a notch of the liver is removed (no empty plane between them)", LargestLiverComponent(), ISO,
     volume(liver=[LIVER], background=[np.s_[2:7, 2:6, 2:6]], tumour=[np.s_[4, 3, 3]]),
     {(4, 3, 3): (2, 0)}),
    ("tumour in the liver is part of it", LargestLiverComponent(), ISO,
     volume(liver=[LIVER], tumour=[np.s_[2:7, 2:4, 2:4]]), {}),
    ("a hole is filled with liver, tumour kept", FillLiverHoles(), ISO,
     volume(liver=[LIVER], tumour=[np.s_[3, 3, 3]], background=[np.s_[4, 5, 5:7]]),
     {(4, 5, 5): (0, 1), (4, 5, 6): (0, 1)}),
    ("a tunnel to the outside is not a hole", FillLiverHoles(), ISO,
     volume(liver=[LIVER], background=[np.s_[4, 5, 0:6]]), {}),
    ("a cavity open to the array border is not a hole", FillLiverHoles(), ISO,
     volume(liver=[np.s_[0:4, 2:10, 2:10]], background=[np.s_[0, 5:7, 5:7]]), {}),
    ("opening removes a thin bridge", LiverOpening(radius_mm=1), ISO,
     volume((9, 12, 14), liver=[np.s_[2:7, 2:6, 2:5], np.s_[2:7, 2:6, 8:12], np.s_[4, 3, 5:8]]),
     None),  # the boxes' edges and the bridge's middle go (the 6-neighbour ball does not fit)
    ("opening keeps the liver flush with the array border", LiverOpening(radius_mm=1), ISO,
     volume(liver=[np.s_[0:4, 0:12, 0:12]]), {}),  # the organ goes on past the border
    ("closing fills a narrow notch but its mouth", LiverClosing(radius_mm=1), ISO,
     volume(liver=[LIVER], background=[np.s_[3:6, 5, 2:5]]),
     {(z, 5, x): (0, 1) for z in range(3, 6) for x in (3, 4)}),
    ("closing keeps the liver at the array border", LiverClosing(radius_mm=2), ISO,
     volume(liver=[np.s_[0:4, 0:12, 0:12]]), {}),
    ("anisotropic closing: 3 mm bridges 2 pixels of 1 mm, not one 5 mm slice",
     LiverClosing(radius_mm=3), (5.0, 1.0, 1.0),
     volume(liver=[np.s_[1:3, 2:10, 2:4], np.s_[1:3, 2:10, 6:8], np.s_[4:6, 2:10, 2:4]]),
     # the ends of the gap stay open: the 3 mm disk does not fit past them
     {(z, y, x): (0, 1) for z in (1, 2) for y in range(3, 9) for x in (4, 5)}),
    ("a tumour outside the liver is removed", TumourInsideLiver(dilate_mm=1), ISO,
     volume(liver=[np.s_[2:7, 2:6, 2:10]], tumour=[np.s_[3, 3, 3], np.s_[4, 6:8, 4]]),
     {(4, 7, 4): (2, 0)}),  # (4, 6, 4) is 1 mm from the liver: kept
    ("a lesion enclosed by the liver stays", TumourInsideLiver(dilate_mm=0), ISO,
     volume(liver=[LIVER], tumour=[np.s_[3:6, 3:9, 3:9]]), {}),
    ("a tiny lesion in the liver becomes liver", RemoveSmallLesions(min_volume_mm3=10), (2.0, 1.0, 1.0),
     volume(liver=[LIVER], tumour=[np.s_[3, 3, 3:7], np.s_[5, 6:8, 6:9]]),  # 8 and 12 mm³
     {(3, 3, x): (2, 1) for x in range(3, 7)}),
    ("a tiny tumour island becomes background", RemoveSmallLesions(min_volume_mm3=2), ISO,
     volume(liver=[LIVER], tumour=[np.s_[0, 0, 0]]), {(0, 0, 0): (2, 0)}),
]


@pytest.mark.parametrize("step, spacing, before, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_step(step, spacing, before, expected):
    original = before.copy()
    after = step(before, spacing)
    assert after.dtype == np.uint8 and after.shape == before.shape
    assert np.array_equal(before, original), "the input must not change"
    if expected is None:  # compare with scipy's opening instead
        ball = ndi.generate_binary_structure(3, 1)
        expected_liver = ndi.binary_opening(np.pad(before >= 1, 2), ball)[2:-2, 2:-2, 2:-2]
        assert np.array_equal(after >= 1, expected_liver) and not after[4, 3, 6]
    else:
        assert changed(before, after) == expected


@pytest.mark.parametrize("radius, spacing, count", [
    (0.0, (1, 1, 1), 1), (0.5, (1, 1, 1), 1), (1.0, (1, 1, 1), 7), (2.0, (5, 1, 1), 13),
    (3.0, (2.5, 0.75, 0.75), 49 + 2 * 13)], ids=["zero", "below a voxel", "6-neighbours",
                                                     "one slice", "anisotropic"])
def test_ellipsoid_offsets(radius, spacing, count):
    offsets = morphology.ellipsoid(radius, spacing)
    assert len(offsets) == count
    assert ((offsets * spacing) ** 2).sum(axis=1).max() <= radius ** 2 + 1e-9
    assert [0, 0, 0] in offsets.tolist()


@pytest.mark.parametrize("radius, spacing", [(2.0, (1.0, 0.75, 0.75)), (3.0, (5.0, 0.7, 0.7)),
                                             (4.2, (2.0, 1.0, 0.5)), (1.0, (1.0, 1.0, 1.0))])
def test_morphology_equals_scipy(radius, spacing):
    offsets = morphology.ellipsoid(radius, spacing)
    reach = np.abs(offsets).max(axis=0)
    structure = np.zeros(2 * reach + 1, bool)
    structure[tuple((offsets + reach).T)] = True
    mask = np.random.default_rng(0).random((14, 20, 20)) > 0.6
    assert np.array_equal(morphology.dilate(mask, offsets), ndi.binary_dilation(mask, structure))
    assert np.array_equal(morphology.erode(mask, offsets), ndi.binary_erosion(mask, structure, border_value=1))


def random_labels(seed: int, shape=(12, 20, 20)) -> np.ndarray:
    """Noisy liver and tumour blobs that reach the array border, with specks and holes."""
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.normal(size=shape), 2.0)
    labels = (field > -0.05).astype(np.uint8)
    labels[(field > 0.12) | (rng.random(shape) > 0.995)] = 2
    labels[rng.random(shape) > 0.98] = 0
    labels[rng.random(shape) > 0.995] = 1
    return labels


ALL_STEPS = [LargestLiverComponent(), FillLiverHoles(), LiverOpening(radius_mm=1.5),
             LiverClosing(radius_mm=2), TumourInsideLiver(dilate_mm=1), RemoveSmallLesions(min_volume_mm3=6)]


@pytest.mark.parametrize("seed", range(4))
def test_chain_equals_its_steps_one_by_one(seed):
    labels, spacing = random_labels(seed), (2.0, 1.0, 0.8)
    expected = labels
    for step in ALL_STEPS:
        expected = step(expected, spacing)
    assert np.array_equal(Postprocess(ALL_STEPS)(labels, spacing), expected)
    assert not np.array_equal(expected, labels)


def test_unsure_lesions_go_by_their_mean_probability_and_become_what_they_touch():
    labels = volume(liver=[LIVER], tumour=[np.s_[3:5, 3:5, 3:5], np.s_[3:5, 7:9, 7:9], np.s_[0:1, 0:2, 0:2]])
    probability = np.zeros(labels.shape, np.uint8)
    probability[3:5, 3:5, 3:5] = 230  # 0.90: kept
    probability[3:5, 7:9, 7:9] = [[[240, 140]]]  # mean 190 = 0.745: liver at 0.8, kept at 0.7
    probability[0:1, 0:2, 0:2] = 100  # 0.39, outside the liver: background
    out = RemoveUnsureLesions(min_mean_probability=0.8)(labels, ISO, probability)
    assert changed(labels, out) == {**{(z, y, x): (2, 1) for z in (3, 4) for y in (7, 8) for x in (7, 8)},
                                    **{(0, y, x): (2, 0) for y in (0, 1) for x in (0, 1)}}
    assert changed(labels, RemoveUnsureLesions(min_mean_probability=0.7)(labels, ISO, probability)) == {
        (0, y, x): (2, 0) for y in (0, 1) for x in (0, 1)}


@pytest.mark.parametrize("seed", range(3))
def test_a_chain_crops_the_probability_with_the_labels(seed):
    labels, spacing = random_labels(seed), (2.0, 1.0, 0.8)
    probability = np.random.default_rng(seed).integers(0, 256, labels.shape, dtype=np.uint8)
    steps = [LargestLiverComponent(), RemoveUnsureLesions(min_mean_probability=0.5), FillLiverHoles()]
    expected = labels
    for step in steps:
        expected = step(expected, spacing, probability)
    chain = Postprocess(steps)
    assert chain.needs_probability and np.array_equal(chain(labels, spacing, probability), expected)
    assert not np.array_equal(expected, Postprocess(steps[::2])(labels, spacing))


def test_a_step_that_needs_the_probability_refuses_labels_alone():
    labels = random_labels(0)
    with pytest.raises(ConfigError, match="'remove_unsure_lesions' needs the ensemble's tumour probabilities"):
        Postprocess([RemoveUnsureLesions()])(labels, ISO)
    with pytest.raises(ValueError, match="uint8 of the labels' shape"):
        RemoveUnsureLesions()(labels, ISO, np.zeros(labels.shape, np.float32))


def test_empty_chain_and_empty_volume():
    labels = random_labels(0)
    out = Postprocess([])(labels, ISO)
    assert np.array_equal(out, labels) and out is not labels
    empty = np.zeros((4, 5, 6), np.uint8)
    assert np.array_equal(default_postprocess()(empty, ISO), empty)
    for step in ALL_STEPS:
        assert np.array_equal(step(empty, ISO), empty)


def test_json_round_trip(tmp_path):
    chain = Postprocess(ALL_STEPS)
    path = tmp_path / "post.json"
    path.write_text(json.dumps(chain.to_dict()))
    again = Postprocess.from_json(path)
    assert again == chain and again.to_dict() == chain.to_dict()
    assert chain.to_dict()["steps"][3] == {"name": "liver_closing", "radius_mm": 2}


def test_default_postprocess():
    assert default_postprocess().to_dict() == {"steps": [
        {"name": "largest_liver_component"}, {"name": "fill_liver_holes"},
        {"name": "remove_small_lesions", "min_volume_mm3": 10.0}]}


@pytest.mark.parametrize("content, message", [
    ({"steps": [{"name": "largest_component"}]},
     "unknown postprocessing step 'largest_component'; valid names: largest_liver_component, "
     "fill_liver_holes, liver_opening, liver_closing, tumour_inside_liver, remove_small_lesions, "
     "remove_unsure_lesions"),
    ({"steps": [{"name": "liver_closing", "radius": 3}]},
     "unknown parameters of step 'liver_closing' ['radius']; valid: radius_mm"),
    ({"steps": [{"name": "liver_closing", "radius_mm": -1}]}, "radius_mm must be a number >= 0"),
    ({"steps": [{"name": "remove_small_lesions", "min_volume_mm3": "10"}]}, "must be a number >= 0"),
    ({"steps": [{"name": "remove_unsure_lesions", "min_mean_probability": 80}]}, "must be at most 1"),
    ({"steps": ["largest_liver_component"]}, "each step must be an object with a \"name\""),
    ({"step": []}, "expected {\"steps\": "),
    ("not json", "not valid JSON"),
], ids=["unknown step", "unknown parameter", "negative radius", "string volume", "percent", "bare name",
        "misspelt key", "bad json"])
def test_config_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "post.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError) as err:
        Postprocess.from_json(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        Postprocess.from_json(tmp_path / "absent.json")


def test_docstring_examples():
    assert doctest.testmod(pp, raise_on_error=False).failed == 0
