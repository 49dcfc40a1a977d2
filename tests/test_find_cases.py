"""Evaluation finds its cases through shardgen's discovery: labelled cases to score,
unlabelled test images (LiTS test-volume-N, MSD imagesTs) to predict."""

from __future__ import annotations

from pathlib import Path

import pytest

from liverseg.errors import ConfigError
from liverseg.evaluate import find_cases
from shardgen.discover import discover


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")  # discovery goes by names; nothing is read
    return path


def test_unlabelled_test_images_are_found_only_when_asked_for(tmp_path):
    touch(tmp_path / "volume-1.nii.gz")
    touch(tmp_path / "segmentation-1.nii.gz")
    touch(tmp_path / "test" / "test-volume-7.nii")
    touch(tmp_path / "msd" / "imagesTs" / "liver_200.nii.gz")
    touch(tmp_path / "msd" / "imagesTs" / "._liver_200.nii.gz")  # a macOS resource fork
    labelled, _ = discover([tmp_path])
    assert [s.case for s in labelled] == ["volume-1"]
    everything, rejected = discover([tmp_path], unlabelled=True)
    assert {s.case: s.label is None for s in everything} == {
        "volume-1": False, "test-volume-7": True, "liver_200": True} and rejected == []


def test_predict_takes_every_image_and_run_only_the_labelled_ones(tmp_path):
    touch(tmp_path / "volume-1.nii.gz")
    touch(tmp_path / "segmentation-1.nii.gz")
    touch(tmp_path / "volume-2.nii.gz")  # no label
    touch(tmp_path / "test-volume-3.nii.gz")
    cases, failed = find_cases(tmp_path, "test", with_labels=False)
    assert [c.case for c in cases] == ["test-volume-3", "volume-1", "volume-2"] and failed == []
    cases, failed = find_cases(tmp_path, "test", with_labels=True)
    assert [c.case for c in cases] == ["volume-1"]
    assert failed == [{"case": "volume-2", "error": f"{tmp_path / 'volume-2.nii.gz'}: missing label file"}]


@pytest.mark.parametrize("names", [["test-volume-3.nii.gz"], ["volume-2.nii.gz"]],
                         ids=["LiTS test volumes", "volumes without labels"])
def test_run_on_unlabelled_images_points_to_predict(tmp_path, names):
    for name in names:
        touch(tmp_path / name)
    with pytest.raises(ConfigError, match="liverseg-eval predict"):
        find_cases(tmp_path, "test", with_labels=True)
