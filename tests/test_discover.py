"""Finding cases: LiTS and MSD layouts, pairing, duplicates, splits by case."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from shardgen.discover import apply_split_rule, assign_splits, discover, split_rule
from shardgen.errors import ShardgenError


def touch(path, content=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def test_lits_nested_batches_and_mixed_extensions(tmp_path):
    touch(tmp_path / "Training Batch 1" / "volume-0.nii")
    touch(tmp_path / "Training Batch 1" / "segmentation-0.nii")
    touch(tmp_path / "Training Batch 2" / "volume-10.nii.gz")
    touch(tmp_path / "labels" / "segmentation-10.nii.gz")
    touch(tmp_path / "Training Batch 2" / "volume-2.nii.gz")
    cases, rejected = discover([tmp_path])
    assert [(c.case, c.image.name, c.label and c.label.name) for c in cases] == [
        ("volume-0", "volume-0.nii", "segmentation-0.nii"),
        ("volume-2", "volume-2.nii.gz", None),
        ("volume-10", "volume-10.nii.gz", "segmentation-10.nii.gz"),
    ]
    assert rejected == []


def msd(root, with_json=True):
    for i in (1, 3):
        touch(root / "imagesTr" / f"liver_{i}.nii.gz")
        touch(root / "labelsTr" / f"liver_{i}.nii.gz")
    touch(root / "imagesTr" / "._liver_1.nii.gz")  # macOS resource fork in the MSD tarball
    touch(root / "imagesTs" / "liver_200.nii.gz")
    if with_json:
        touch(root / "dataset.json", json.dumps({"training": [
            {"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"} for i in (1, 3)],
            "test": ["./imagesTs/liver_200.nii.gz"]}).encode())


@pytest.mark.parametrize("with_json", [True, False], ids=["training list", "empty dataset.json"])
def test_msd_task03_layout(tmp_path, with_json):
    msd(tmp_path / "Task03_Liver", with_json)
    if not with_json:  # a dataset.json without a training list: pair imagesTr/labelsTr by name
        touch(tmp_path / "Task03_Liver" / "dataset.json", b"{}")
    cases, _ = discover([tmp_path])
    assert [(c.case, c.image.parent.name, c.label.parent.name) for c in cases] == [
        ("liver_1", "imagesTr", "labelsTr"), ("liver_3", "imagesTr", "labelsTr")]


def test_duplicate_case_ids_across_inputs_are_rejected(tmp_path):
    for name in ("a", "b"):
        touch(tmp_path / name / "volume-5.nii.gz")
        touch(tmp_path / name / "segmentation-5.nii.gz")
    cases, rejected = discover([tmp_path / "a", tmp_path / "b"])
    assert [c.image.parent.name for c in cases] == ["a"]
    assert rejected[0].case == "volume-5" and rejected[0].reason.startswith("duplicate case id")


def test_unreadable_dataset_json_is_an_error(tmp_path):
    msd(tmp_path, with_json=False)
    touch(tmp_path / "dataset.json", b"{not json")
    with pytest.raises(ShardgenError, match="unreadable MSD dataset.json"):
        discover([tmp_path])


@pytest.mark.parametrize("name, stem, safe", [
    ("a shell command", "liver_0;touch x;#", False),
    ("command substitution", "liver_$(id)", False),
    ("a space", "liver 0", False),
    ("a leading dot", ".liver_0", False),
    ("a leading dash, an option to cat", "-rf", False),
    ("letters, digits, dots, dashes, underscores", "Liver_0.v2-b", True),
])
def test_case_ids_must_be_safe_on_a_command_line(tmp_path, name, stem, safe):
    root = tmp_path / "Task03_Liver"
    for sub in ("imagesTr", "labelsTr"):
        touch(root / sub / f"{stem}.nii.gz")
    touch(root / "dataset.json", b"{}")
    cases, rejected = discover([tmp_path])
    if safe:
        assert [c.case for c in cases] == [stem] and rejected == []
    else:
        assert cases == [] and [(r.case, r.file) for r in rejected] == [(stem, str(root / "imagesTr" / f"{stem}.nii.gz"))]
        assert rejected[0].reason.startswith(f"case id {stem!r} may hold only letters, digits")


@pytest.mark.parametrize("name, count, fractions, expected", [
    ("ten cases", 10, (0.8, 0.1, 0.1), {"train": 8, "val": 1, "test": 1}),
    ("few cases keep val and test", 5, (0.9, 0.05, 0.05), {"train": 3, "val": 1, "test": 1}),
    ("no test", 10, (0.8, 0.2, 0.0), {"train": 8, "val": 2, "test": 0}),
])
def test_split_sizes(name, count, fractions, expected):
    splits = assign_splits([f"c{i}" for i in range(count)], fractions, seed=0)
    assert {s: list(splits.values()).count(s) for s in expected} == expected


def test_split_is_deterministic_and_independent_of_input_order():
    ids = [f"volume-{i}" for i in range(20)]
    assert assign_splits(ids, (0.8, 0.1, 0.1), 3) == assign_splits(ids[::-1], (0.8, 0.1, 0.1), 3)


def test_bad_fractions_are_refused():
    with pytest.raises(ShardgenError, match="sum to 1"):
        assign_splits(["a"], (0.5, 0.1, 0.1), 0)


@pytest.mark.parametrize("seed", range(5))
def test_stratified_split_spreads_each_group_in_proportion(seed):
    ids = [f"volume-{i}" for i in range(100)]
    free = set(ids[::10])  # ten tumour-free cases
    strata = {c: c in free for c in ids}
    plain = assign_splits(ids, (0.7, 0.1, 0.2), seed)
    splits = assign_splits(ids, (0.7, 0.1, 0.2), seed, strata)
    count = Counter(splits.values())
    assert count == Counter(plain.values()) == {"train": 70, "val": 10, "test": 20}
    assert Counter(splits[c] for c in free) == {"train": 7, "val": 1, "test": 2}
    assert assign_splits(ids[::-1], (0.7, 0.1, 0.2), seed, strata) == splits


def test_a_stratified_rule_reads_tumour_presence_from_the_shard_records():
    ids = [f"c{i}" for i in range(20)]
    records = [{"case": c, "tumour_slices": 0 if i < 5 else 3} for i, c in enumerate(ids)]
    rule = split_rule((0.6, 0.2, 0.2), 0, None, ids)
    assert rule["stratify"] == "tumour"
    splits = apply_split_rule(rule, ids, records)
    assert Counter(splits[c] for c in ids[:5]) == {"train": 3, "val": 1, "test": 1}
    assert "stratify" not in split_rule((0.6, 0.2, 0.2), 0, None, ids, stratify=False)
    with pytest.raises(ShardgenError, match="unknown split stratification"):
        apply_split_rule({**rule, "stratify": "size"}, ids, records)
    # a node manifest's counts are checked when it is read (tests/test_build.py, forged counts)
