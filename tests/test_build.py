"""Building shards end to end: round trip, determinism, resume, nodes, splits, no torch."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import webdataset as wds

from conftest import write_blob_case
from shardgen.build import BuildConfig, build_shards
from shardgen.errors import ShardgenError
from shardgen.format import decode_sample, stack_stream
from shardgen.manifest import merge_manifests, read_manifest
from shardgen.orientation import canonical_spacing, to_canonical
from shardgen.preprocess import Preprocessing, preprocess_image, preprocess_label, stack_context


def tars(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def shard_stream(folder: Path, manifest: dict, split: str):
    urls = [str(folder / s["path"]) for s in manifest["shards"] if s["split"] == split]
    return (decode_sample(s) for s in wds.WebDataset(urls, shardshuffle=False))


def source_slices(manifest: dict, case: str, settings: Preprocessing):
    """The case's preprocessed slices, read with nibabel's own loader (not shardgen's)."""
    entry = manifest["cases"][case]
    img, seg = nib.load(entry["image"]), nib.load(entry["label"])
    image = to_canonical(np.asanyarray(img.dataobj), img.affine)
    label = to_canonical(np.asanyarray(seg.dataobj), img.affine)
    pixel_mm = canonical_spacing(img.affine)[1:]
    return preprocess_image(image, settings, pixel_mm), preprocess_label(label, settings, pixel_mm)


def test_round_trip_phantom_to_webdataset_reader(phantom_dir, tmp_path):
    settings = Preprocessing(size=48, context=1)
    result = build_shards(BuildConfig(inputs=(phantom_dir,), out=tmp_path, preprocessing=settings,
                                      fractions=(0.5, 0.25, 0.25)))
    manifest = result.manifest
    checked = 0
    for split in ("train", "val", "test"):
        cache = {}
        for sample, stack in stack_stream(shard_stream(tmp_path, manifest, split), settings.context):
            if sample.case not in cache:
                cache[sample.case] = source_slices(manifest, sample.case, settings)
            images, labels = cache[sample.case]
            assert (stack == stack_context(images, sample.z, settings.context)).all()
            assert (sample.mask == labels[sample.z]).all()
            checked += 1
        assert checked and len(cache) == manifest["totals"][split]["cases"]
    assert checked == sum(t["targets"] for t in manifest["totals"].values())


def test_phantom_shards_hold_liver_and_tumour_slices(phantom_dir, tmp_path):
    result = build_shards(BuildConfig(inputs=(phantom_dir,), out=tmp_path,
                                      preprocessing=Preprocessing(size=32)))
    fr = result.manifest["class_fractions"]["all"]
    assert 0.02 < fr["liver"] < 0.6 and fr["tumour"] > 0
    assert sum(t["tumour_slices"] for t in result.manifest["totals"].values()) > 0


def test_manifest_counts_match_the_tars(phantom_dir, tmp_path):
    manifest = build_shards(BuildConfig(inputs=(phantom_dir,), out=tmp_path,
                                        preprocessing=Preprocessing(size=32))).manifest
    for shard in manifest["shards"]:
        samples = [decode_sample(s) for s in wds.WebDataset(str(tmp_path / shard["path"]), shardshuffle=False)]
        assert len(samples) == shard["samples"]
        assert sum(s.target for s in samples) == shard["targets"]
        assert {s.case for s in samples} == {shard["case"]}
        assert [s.z for s in samples] == sorted(s.z for s in samples)
        assert (tmp_path / shard["path"]).stat().st_size == shard["bytes"]


def test_split_is_by_case_and_recorded(tmp_path):
    for i in range(10):
        write_blob_case(tmp_path / "in", i)
    manifest = build_shards(BuildConfig(inputs=(tmp_path / "in",), out=tmp_path / "out",
                                        preprocessing=Preprocessing(size=16), seed=5)).manifest
    assignment = manifest["split_assignment"]
    assert sorted(assignment.values()).count("val") == 1 and sorted(assignment.values()).count("test") == 1
    for shard in manifest["shards"]:
        assert shard["split"] == assignment[shard["case"]] and shard["path"] == f"{shard['case']}.tar"
    other = build_shards(BuildConfig(inputs=(tmp_path / "in",), out=tmp_path / "out2",
                                     preprocessing=Preprocessing(size=16), seed=6)).manifest
    assert other["split_assignment"] != assignment


def test_split_file_is_followed(tmp_path):
    for i in range(3):
        write_blob_case(tmp_path / "in", i)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["volume-2"], "val": ["volume-0"], "test": ["volume-1"]}))
    manifest = build_shards(BuildConfig(inputs=(tmp_path / "in",), out=tmp_path / "out",
                                        preprocessing=Preprocessing(size=16), split_file=split)).manifest
    assert manifest["split_assignment"] == {"volume-0": "val", "volume-1": "test", "volume-2": "train"}


def test_same_inputs_give_byte_identical_shards_whatever_the_workers(phantom_dir, tmp_path):
    common = dict(inputs=(phantom_dir,), preprocessing=Preprocessing(size=32))
    one = build_shards(BuildConfig(out=tmp_path / "a", workers=1, **common))
    two = build_shards(BuildConfig(out=tmp_path / "b", workers=2, **common))
    assert tars(tmp_path / "a") == tars(tmp_path / "b") and len(tars(tmp_path / "a")) == 6
    assert one.manifest["shards"] == two.manifest["shards"]


def test_nodes_partition_cases_and_merge_equals_a_single_build(phantom_dir, tmp_path):
    common = dict(inputs=(phantom_dir,), preprocessing=Preprocessing(size=32))
    single = build_shards(BuildConfig(out=tmp_path / "single", **common)).manifest
    parts = [build_shards(BuildConfig(out=tmp_path / "multi", num_nodes=2, node_rank=r, **common))
             for r in (0, 1)]
    cases = [set(p.manifest["cases"]) for p in parts]
    assert cases[0] and cases[1] and not cases[0] & cases[1]
    merged = merge_manifests([p.manifest_path for p in parts], tmp_path / "multi" / "manifest.json")
    assert merged["shards"] == single["shards"] and merged["totals"] == single["totals"]
    assert read_manifest(tmp_path / "multi") == merged
    assert tars(tmp_path / "multi") == tars(tmp_path / "single")


def test_merge_refuses_shards_outside_the_merged_manifests_folder(phantom_dir, tmp_path):
    common = dict(inputs=(phantom_dir,), preprocessing=Preprocessing(size=32), num_nodes=2)
    parts = [build_shards(BuildConfig(out=tmp_path / f"node{r}", node_rank=r, **common)) for r in (0, 1)]
    with pytest.raises(ShardgenError, match="refused shard path '../node0/"):
        merge_manifests([p.manifest_path for p in parts], tmp_path / "node1" / "manifest.json")
    assert not (tmp_path / "node1" / "manifest.json").exists()


@pytest.mark.parametrize("key, forged", [("tumour_slices", "3"), ("tumour_slices", None), ("tumour_slices", -1),
                                         ("tumour_slices", True), ("samples", 2.5), ("pixels", [1, "x", 3])])
def test_merge_refuses_a_node_manifest_with_forged_counts(phantom_dir, tmp_path, key, forged):
    # a node's manifest is untrusted: its counts feed the stratified split, the totals and the loader
    common = dict(inputs=(phantom_dir,), preprocessing=Preprocessing(size=32), num_nodes=2)
    parts = [build_shards(BuildConfig(out=tmp_path / "multi", node_rank=r, **common)) for r in (0, 1)]
    manifest = json.loads(parts[1].manifest_path.read_text())
    manifest["shards"][0][key] = forged
    parts[1].manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ShardgenError, match=rf"{parts[1].manifest_path}: shard '.*': {key} must be counts"):
        merge_manifests([p.manifest_path for p in parts], tmp_path / "multi" / "manifest.json")
    assert not (tmp_path / "multi" / "manifest.json").exists()


def test_rerun_reuses_finished_shards(phantom_dir, tmp_path):
    config = BuildConfig(inputs=(phantom_dir,), out=tmp_path, preprocessing=Preprocessing(size=32))
    first = build_shards(config)
    reused = []
    second = build_shards(config, on_case=lambda r: reused.append(r["reused"]))
    assert reused == [True] * 6 and second.manifest == first.manifest


def test_changed_settings_rewrite_instead_of_mixing(phantom_dir, tmp_path):
    build_shards(BuildConfig(inputs=(phantom_dir,), out=tmp_path, preprocessing=Preprocessing(size=32)))
    reused = []
    build_shards(BuildConfig(inputs=(phantom_dir,), out=tmp_path, preprocessing=Preprocessing(size=24)),
                 on_case=lambda r: reused.append(r["reused"]))
    assert reused == [False] * 6
    assert read_manifest(tmp_path)["preprocessing"]["size"] == 24


def damage_one_byte(out: Path, inputs: Path) -> Path:
    """Flip a byte in the middle of a shard: same size, different sha256."""
    shard = out / read_manifest(out)["cases"]["volume-0"]["shard"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return inputs


def move_the_inputs(out: Path, inputs: Path) -> Path:
    """The same case ids from another folder: their shards may not be reused."""
    moved = inputs.with_name("moved")
    inputs.rename(moved)
    return moved


@pytest.mark.parametrize("name, change", [
    ("a damaged shard of the right size", damage_one_byte),
    ("inputs from another folder", move_the_inputs),
], ids=["damaged shard", "moved inputs"])
def test_resume_rewrites_what_it_cannot_trust(tmp_path, name, change):
    for i in range(2):
        write_blob_case(tmp_path / "in", i)
    first = build_shards(BuildConfig(inputs=(tmp_path / "in",), out=tmp_path / "out",
                                     preprocessing=Preprocessing(size=16)))
    before = tars(tmp_path / "out")
    inputs = change(tmp_path / "out", tmp_path / "in")
    reused = {}
    second = build_shards(BuildConfig(inputs=(inputs,), out=tmp_path / "out", preprocessing=Preprocessing(size=16)),
                          on_case=lambda r: reused.update({r["record"]["case"]: r["reused"]}))
    expected = {"volume-0": False, "volume-1": change is damage_one_byte}
    assert reused == expected and tars(tmp_path / "out") == before
    assert second.manifest["shards"] == first.manifest["shards"]


def cli_build(inp: Path, out: Path) -> list[str]:
    return ["build", "--input", str(inp), "--out", str(out), "--size", "128", "--background-fraction", "1"]


# Runs `liverseg-shards build` in this process after arranging a SIGKILL of it at a chosen
# point: when the Nth sample of the run is about to be written (a shard half written), or
# right after the Nth shard file is closed (complete, not yet renamed into place).
KILLER = """
import os, runpy, signal, sys
from shardgen.format import ShardWriter

where, at = sys.argv[1], int(sys.argv[2])
sys.argv = ["liverseg-shards", *sys.argv[3:]]
calls = {"n": 0}

def count():
    calls["n"] += 1
    if calls["n"] == at:
        os.kill(os.getpid(), signal.SIGKILL)

if where == "sample":
    write = ShardWriter.write
    def counted_write(self, sample):
        count()
        return write(self, sample)
    ShardWriter.write = counted_write
else:
    close = ShardWriter.__exit__
    def counted_close(self, *exc):
        close(self, *exc)
        count()
    ShardWriter.__exit__ = counted_close
runpy.run_module("shardgen.cli", run_name="__main__")
"""


@pytest.fixture(scope="module")
def clean_build(tmp_path_factory) -> tuple[Path, Path]:
    """Eight cases and their shards built without interruption: (inputs, shards)."""
    root = tmp_path_factory.mktemp("kill")
    for i in range(8):
        write_blob_case(root / "in", i)
    subprocess.run([sys.executable, "-m", "shardgen.cli", *cli_build(root / "in", root / "clean")], check=True,
                   capture_output=True)
    return root / "in", root / "clean"


@pytest.mark.parametrize("where, at", [("sample", 30), ("shard", 3)], ids=["mid-shard", "before-rename"])
def test_kill_and_resume_ends_with_the_same_shards(clean_build, tmp_path, where, at):
    inputs, clean = clean_build
    killed = tmp_path / "killed"
    done = subprocess.run([sys.executable, "-c", KILLER, where, str(at), *cli_build(inputs, killed)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert not (killed / "manifest.json").exists() and 0 < len(tars(killed)) < len(tars(clean))
    assert [p for p in killed.iterdir() if p.name.endswith(".tmp")], "the kill should leave a shard unfinished"
    subprocess.run([sys.executable, "-m", "shardgen.cli", *cli_build(inputs, killed)], check=True, capture_output=True)
    assert tars(killed) == tars(clean)
    assert read_manifest(killed)["shards"] == read_manifest(clean)["shards"]
    assert not [p for p in killed.rglob("*") if p.name.endswith(".tmp")], "unfinished files are cleared"


def test_shardgen_never_imports_torch(tmp_path):
    write_blob_case(tmp_path / "in", 0)
    code = (
        "import sys, pkgutil, importlib, shardgen\n"
        "for m in pkgutil.iter_modules(shardgen.__path__): importlib.import_module('shardgen.' + m.name)\n"
        "from shardgen.build import BuildConfig, build_shards\n"
        "from shardgen.preprocess import Preprocessing\n"
        "from shardgen.inspect import inspect_shards\n"
        f"build_shards(BuildConfig(inputs=({str(tmp_path / 'in')!r},), out=__import__('pathlib').Path({str(tmp_path / 'out')!r}), preprocessing=Preprocessing(size=16)))\n"
        f"inspect_shards({str(tmp_path / 'out')!r}, __import__('pathlib').Path({str(tmp_path / 'g.png')!r}), 2)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'webdataset' not in sys.modules\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr
