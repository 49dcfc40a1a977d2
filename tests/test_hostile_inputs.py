"""Hostile inputs (issue #16), built here beside a few good cases: each is rejected by name in
one line, the good cases are still sharded (or evaluated), and nothing crashes, allocates
what a forged header or trailer asks for, or reaches a shell."""

from __future__ import annotations

import builtins
import errno
import gzip
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import blob_case, save_canonical, write_blob_case
from liverseg.eval_cli import main as eval_main
from shardgen.build import BuildConfig, build_shards
from shardgen.cli import main
from shardgen.discover import assign_splits
from shardgen.manifest import merge_manifests, read_manifest
from shardgen.preprocess import Preprocessing

GOOD = ["volume-0", "volume-1", "volume-2"]
MARKER = "injected"  # the file the command in the hostile file name would create


# --------------------------------------------------------------------------- hostile cases
# Each writes case ``i`` into ``folder`` and returns the file its rejection must name.

def shell_in_the_name(folder: Path, i: int) -> Path:
    """An MSD case whose file name runs a command where a shell expands the shard name."""
    msd = folder / "Task03_Liver"
    name = f"liver_{i};touch {MARKER};#.nii.gz"
    image, label = blob_case(seed=i)
    for sub, data in (("imagesTr", image), ("labelsTr", label)):
        (msd / sub).mkdir(parents=True, exist_ok=True)
        save_canonical(msd / sub / name, data)
    (msd / "dataset.json").write_text("{}")  # no training list: imagesTr/labelsTr paired by name
    return msd / "imagesTr" / name


def unreadable(folder: Path, i: int) -> Path:
    """Permission denied: made so by deny_reading(), since root may read anything."""
    return write_blob_case(folder, i)[0]


def folder_named_like_a_volume(folder: Path, i: int) -> Path:
    vol, _ = write_blob_case(folder, i)
    vol.unlink()
    vol.mkdir()
    return vol


def fifo_named_like_a_volume(folder: Path, i: int) -> Path:  # opening it would wait forever
    vol, _ = write_blob_case(folder, i)
    vol.unlink()
    os.mkfifo(vol)
    return vol


def patch_header(path: Path, edit: Callable[[nib.Nifti1Header], None]) -> None:
    """Change NIfTI-1 header fields of a .nii.gz in place, past nibabel's checks and fixes."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    header = nib.Nifti1Header(bytes(raw[:348]), check=False)
    edit(header)
    raw[:348] = header.binaryblock
    path.write_bytes(gzip.compress(bytes(raw)))


def zero_length_axis(folder: Path, i: int) -> Path:  # image and label agree: 48×48×0
    vol, seg = write_blob_case(folder, i)
    for path in (vol, seg):
        patch_header(path, lambda h: h["dim"].__setitem__(3, 0))
    return vol


def negative_axis(folder: Path, i: int) -> Path:
    vol, _ = write_blob_case(folder, i)
    patch_header(vol, lambda h: h["dim"].__setitem__(1, -48))
    return vol


def nifti2_overflowing_dims(folder: Path, i: int) -> Path:
    """A NIfTI-2 header of 2^62×4×1 voxels, whose byte count overflows int64."""
    vol, _ = write_blob_case(folder, i)
    header = nib.Nifti2Header()
    header.set_data_dtype(np.int16)
    header["dim"][:4] = [3, 2**62, 4, 1]
    header["pixdim"][1:4] = 1
    header["vox_offset"] = 544
    vol.write_bytes(gzip.compress(header.binaryblock + bytes(4 + 64)))
    return vol


def patched_pair(folder: Path, i: int, edit) -> Path:
    """A good case whose image and label headers both get ``edit`` (so their affines agree)."""
    vol, seg = write_blob_case(folder, i)
    for path in (vol, seg):
        patch_header(path, edit)
    return vol


def zero_voxel_size(folder: Path, i: int) -> Path:
    """pixdim 0 and no sform or qform, in image and label alike (so their affines agree)."""
    def edit(h: nib.Nifti1Header) -> None:
        h["pixdim"][1:4] = 0
        h["qform_code"] = h["sform_code"] = 0

    return patched_pair(folder, i, edit)


def infinite_intercept(folder: Path, i: int) -> Path:
    vol, _ = write_blob_case(folder, i)
    patch_header(vol, lambda h: h.__setitem__("scl_inter", np.inf))
    return vol


def qform_not_a_rotation(folder: Path, i: int) -> Path:
    """No sform, and a qform whose quaternion (b, c, d) is longer than 1: no rotation."""
    def edit(h: nib.Nifti1Header) -> None:
        h["qform_code"], h["sform_code"], h["quatern_b"] = 1, 0, 5.0

    return patched_pair(folder, i, edit)


def forged_gzip_size(folder: Path, i: int) -> Path:
    """A valid .nii.gz whose gzip trailer claims just under 4 GiB of content."""
    vol, _ = write_blob_case(folder, i)
    data = bytearray(vol.read_bytes())
    data[-4:] = (0xFFFFFFF0).to_bytes(4, "little")
    vol.write_bytes(bytes(data))
    return vol


def deny_reading(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        if isinstance(file, (str, Path)) and Path(file) == path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)


# (name, writer, case id, reason): the id and reason of case i, with {i} for i
HOSTILE = [
    ("shell command in an MSD file name", shell_in_the_name, "liver_{i};touch injected;#",
     "case id 'liver_{i};touch injected;#' may hold only letters, digits, '.', '_' and '-', "
     "and may not start with '.' or '-'"),
    ("permission denied", unreadable, "volume-{i}", "cannot read (Permission denied)"),
    ("a folder named like a volume", folder_named_like_a_volume, "volume-{i}", "not a regular file"),
    ("a fifo named like a volume", fifo_named_like_a_volume, "volume-{i}", "not a regular file"),
    ("zero-length axis", zero_length_axis, "volume-{i}",
     "empty volume: dimensions 48×48×0 include a zero-length axis"),
    ("negative axis", negative_axis, "volume-{i}", "implausible dimensions -48×48×12: negative"),
    ("NIfTI-2 dims overflowing int64", nifti2_overflowing_dims, "volume-{i}",
     "implausible dimensions 4611686018427387904×4×1: more than 2^34 voxels"),
    ("pixdim 0 without sform or qform", zero_voxel_size, "volume-{i}",
     "voxel size (pixdim) 0×0×0 without an sform: the spacing is unknown"),
    ("infinite intercept", infinite_intercept, "volume-{i}",
     "bad scaling (Valid slope but invalid intercept inf)"),
    ("qform quaternion not a rotation", qform_not_a_rotation, "volume-{i}",
     "bad qform (w2 should be positive, but is -2.500000e+01)"),
]


def make_hostile(make_bad: Callable[[Path, int], Path], folder: Path, i: int,
                 monkeypatch: pytest.MonkeyPatch) -> Path:
    bad = make_bad(folder, i)
    if make_bad is unreadable:
        deny_reading(monkeypatch, bad)
    return bad


# --------------------------------------------------------------------------- build

def good_cases(folder: Path) -> None:
    for i in range(len(GOOD)):
        write_blob_case(folder, i)


def cli_build(inp: Path, out: Path, *extra: str):
    args = ["build", "--input", str(inp), "--out", str(out), "--size", "16", *extra]
    return CliRunner().invoke(main, args)


def rejection_lines(stdout: str) -> list[str]:
    # stdout alone: the progress bar (stderr) shares lines with it in the mixed output
    return [line for line in stdout.splitlines() if line.startswith("rejected ")]


def run_like_a_pipe_location(out: Path, manifest: dict, cwd: Path) -> None:
    """What training does with `--shards "pipe:cat OUT/{}"`: each shard name goes into a
    shell command line (liverseg.data.ShardSource.url, then WebDataset's pipe: opener)."""
    for shard in manifest["shards"]:
        subprocess.run(f"cat {out}/{shard['path']} > /dev/null", shell=True, cwd=cwd, check=True)


@pytest.mark.parametrize("name, make_bad, case, reason", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_build_rejects_the_hostile_case_by_name_and_shards_the_rest(tmp_path, monkeypatch, name, make_bad,
                                                                     case, reason):
    good_cases(tmp_path / "in")
    bad = make_hostile(make_bad, tmp_path / "in", 7, monkeypatch)
    case, reason = case.format(i=7), reason.format(i=7)
    for extra, exit_code in (((), 1), (("--skip-bad",), 0)):  # the second run resumes the first
        result = cli_build(tmp_path / "in", tmp_path / "out", *extra)
        assert result.exit_code == exit_code, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert rejection_lines(result.stdout) == [f"rejected {bad}: {reason}"]
        assert "Traceback" not in result.output
    manifest = read_manifest(tmp_path / "out")
    assert sorted(manifest["cases"]) == GOOD
    assert manifest["rejected"] == [{"case": case, "file": str(bad), "reason": reason}]
    run_like_a_pipe_location(tmp_path / "out", manifest, cwd=tmp_path)
    assert not (tmp_path / MARKER).exists(), "the command in the file name ran"


def test_a_forged_gzip_size_is_rejected_without_allocating_it(tmp_path):
    limit = "ulimit -v 3000000; "  # 2.9 GiB of address space: less than the trailer claims
    fits = subprocess.run(["bash", "-c", limit + f"{sys.executable} -c 'import shardgen.cli, shardgen.build'"],
                          capture_output=True, text=True)
    assert fits.returncode == 0, f"shardgen no longer imports within the limit: {fits.stderr[-500:]}"
    good_cases(tmp_path / "in")
    bad = forged_gzip_size(tmp_path / "in", 7)
    command = f"{sys.executable} -m shardgen.cli build --input in --out out --size 16"
    done = subprocess.run(["bash", "-c", limit + command], cwd=tmp_path, capture_output=True, text=True)
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in output, output[-2000:]
    reason = "truncated or corrupt gzip data (Incorrect length of data produced)"
    assert f"rejected in/volume-7.nii.gz: {reason}" in output
    manifest = read_manifest(tmp_path / "out")
    assert sorted(manifest["cases"]) == GOOD
    assert manifest["rejected"] == [{"case": "volume-7", "file": f"in/{bad.name}", "reason": reason}]


def test_nifti2_inputs_log_nothing_from_nibabel(tmp_path):
    good_cases(tmp_path / "in")
    vol = tmp_path / "in" / "volume-1.nii.gz"
    img = nib.load(vol)
    nib.save(nib.Nifti2Image(np.asanyarray(img.dataobj), img.affine), vol)
    command = [sys.executable, "-m", "shardgen.cli", "build", "--input", "in", "--out", "out", "--size", "16"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nibabel" not in done.stdout + done.stderr
    assert sorted(read_manifest(tmp_path / "out")["cases"]) == GOOD


# --------------------------------------------------------------------------- splits
# A rejected case must take no split's place: the same seed gives the good cases the same
# split whatever junk sits beside them, however the build was run.

CLEAN = [f"volume-{i}" for i in range(4)]
JUNK = "volume-4"


def seed_putting_junk_in_val() -> int:
    """A seed for which a split over all five ids (the old rule) puts the junk in val."""
    return next(s for s in range(100) if assign_splits(CLEAN + [JUNK], (0.6, 0.2, 0.2), s)[JUNK] == "val")


def folders(tmp_path: Path) -> tuple[Path, Path]:
    clean, junk = tmp_path / "clean", tmp_path / "junk"
    for i in range(4):
        write_blob_case(clean, i)
        write_blob_case(junk, i)
    write_blob_case(junk, 4)[1].write_bytes(b"not a label")
    return clean, junk


def config(inp: Path, out: Path, **changes) -> BuildConfig:
    return BuildConfig(inputs=(inp,), out=out, preprocessing=Preprocessing(size=16),
                       fractions=(0.6, 0.2, 0.2), seed=seed_putting_junk_in_val(), **changes)


def single(inp: Path, out: Path) -> dict:
    return build_shards(config(inp, out)).manifest


def two_workers(inp: Path, out: Path) -> dict:
    return build_shards(config(inp, out, workers=2)).manifest


def two_nodes_merged(inp: Path, out: Path) -> dict:
    parts = [build_shards(config(inp, out, num_nodes=2, node_rank=r)).manifest_path for r in (0, 1)]
    return merge_manifests(parts, out / "manifest.json")


def resumed(inp: Path, out: Path) -> dict:
    first = build_shards(config(inp, out)).manifest
    reused = []
    again = build_shards(config(inp, out), on_case=lambda r: reused.append(r.get("reused")))
    assert reused == [True] * len(CLEAN) + [None] and again.manifest == first
    return again.manifest


BUILDS = [("single node", single), ("two workers", two_workers), ("two nodes, merged", two_nodes_merged),
          ("resumed", resumed)]


@pytest.mark.parametrize("name, build", BUILDS, ids=[b[0] for b in BUILDS])
def test_junk_beside_the_data_does_not_change_the_split(tmp_path, name, build):
    clean, junk = folders(tmp_path)
    expected = single(clean, tmp_path / "expected")
    got = build(junk, tmp_path / "out")
    assert got["split_assignment"] == expected["split_assignment"]
    assert got["totals"]["val"]["cases"] == 1
    assert got["shards"] == expected["shards"] and got["totals"] == expected["totals"]
    assert [r["case"] for r in got["rejected"]] == [JUNK]
    tars = {p.name: p.read_bytes() for p in sorted((tmp_path / "out").glob("*.tar"))}
    assert tars == {p.name: p.read_bytes() for p in sorted((tmp_path / "expected").glob("*.tar"))}


def test_a_split_file_naming_a_rejected_case_still_assigns_the_others(tmp_path):
    _, junk = folders(tmp_path)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["volume-0", "volume-1"], "val": ["volume-2", JUNK],
                                 "test": ["volume-3"]}))
    manifest = build_shards(config(junk, tmp_path / "out", split_file=split)).manifest
    assert manifest["split_assignment"] == {"volume-0": "train", "volume-1": "train", "volume-2": "val",
                                            "volume-3": "test"}
    assert [r["case"] for r in manifest["rejected"]] == [JUNK]


# --------------------------------------------------------------------------- evaluation

@pytest.fixture(scope="module")
def checkpoint(checkpoints) -> str:
    """A tiny trained U-Net: enough for liverseg-eval to load and run."""
    return checkpoints[0]


EVAL_HOSTILE = [h for h in HOSTILE if h[1] in (shell_in_the_name, unreadable, zero_length_axis,
                                                 nifti2_overflowing_dims, zero_voxel_size)]


@pytest.mark.parametrize("command", ["run", "predict"])
def test_eval_reports_each_hostile_case_once_and_does_the_rest(checkpoint, tmp_path, monkeypatch, command):
    data = tmp_path / "data"
    write_blob_case(data, 1)
    bad = {make_hostile(make, data, i, monkeypatch): reason.format(i=i)
           for i, (_, make, _, reason) in enumerate(EVAL_HOSTILE, start=2)}
    result = CliRunner().invoke(eval_main, [command, "--checkpoint", checkpoint, "--data", str(data),
                                            "--out", str(tmp_path / "eval"), *(["--no-report"] if command == "run" else [])])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    failed = [line for line in result.output.splitlines() if line.startswith("failed: ")]
    assert len(failed) == len(bad), failed
    for file, reason in bad.items():
        assert sum(f"{file}: {reason}" in line for line in failed) == 1, (file, failed)
    assert f"1 case(s) done, {len(bad)} failed" in result.output
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["cases"] == 1 and len(summary["failed"]) == len(bad)
