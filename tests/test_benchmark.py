"""Every benchmark in benchmarks/ runs end to end at a tiny size and prints what its
docs/PERFORMANCE.md table is made of; the ceiling prints the library's oracle
(liverseg.oracle, tested in test_oracle.py) and the metrics benchmark agrees with its
reference implementation."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from liverseg import oracle

from conftest import run_python
from test_oracle import faint_and_bright_case

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is run from the repository root, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import ceiling, evaluation, loader, shards, train  # noqa: E402

NUMBER = r"[0-9.]+(?:e[-+]?[0-9]+)?"
TINY = ["--cases", "1", "--slices", "12", "--size", "64"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> list[str]:
    """One cache of tiny phantoms and shards for the benchmarks that read them."""
    return ["--work", str(tmp_path_factory.mktemp("bench"))]


@pytest.fixture
def process_settings():
    """The benchmarks pin the process to one core and torch to one thread: undo both."""
    import torch

    threads = torch.get_num_threads()
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    yield
    torch.set_num_threads(threads)
    if affinity is not None:
        os.sched_setaffinity(0, affinity)


def run(command, args: list[str]) -> str:
    done = CliRunner().invoke(command, args)
    assert done.exit_code == 0, f"{done.output}\n{done.exception!r}"
    return done.output


@pytest.mark.parametrize("module", ["shards", "loader", "train", "evaluation", "ceiling"])
def test_each_module_runs_as_a_script(module):
    done = run_python(["-m", f"benchmarks.{module}", "--help"], cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"Usage: python -m benchmarks.{module}" in done.stdout


def test_shard_writing_codecs_and_reading(work):
    rows = run(shards.main, ["write", *TINY, *work]).splitlines()[3:]
    assert [row.split()[:2] for row in rows] == [["nii.gz", "all"], ["nii.gz", "default"],
                                                 ["nii", "all"], ["nii", "default"]]
    for row in rows:
        assert all(float(v) > 0 for v in row.split()[2:5])

    table = [row.split() for row in run(shards.main, ["codecs", *TINY, *work]).splitlines()[2:]]
    codecs = {(data, name): float(kb) for data, name, _, _, kb in table}
    assert {("image", "raw"), ("image", "zstd-1"), ("mask", "zstd-1")} <= codecs.keys()
    assert codecs["image", "raw"] == pytest.approx(64 * 64 / 1e3, abs=0.05)  # one uint8 slice
    assert codecs["mask", "zstd-1"] < codecs["mask", "raw"]

    line = run(shards.main, ["read", *TINY, *work]).splitlines()[-1]
    rate, targets = re.search(rf"({NUMBER}) training samples/s in one process \((\d+) targets\)", line).groups()
    assert float(rate) > 0 and 0 < int(targets) <= 12


def test_loader(work, process_settings):
    line = run(loader.main, [*TINY, *work, "--batch-size", "2", "--samples", "8"]).splitlines()[-1]
    assert re.fullmatch(rf"64x64, 3 channels, batch 2, .*: ({NUMBER}) training samples/s on one core", line)


def test_training_throughput_benchmark_on_a_cpu(work, process_settings):
    # the first bf16 step on a CPU costs seconds whatever the size: one step of each
    out = run(train.main, ["gpu", *TINY, *work, "--device", "cpu", "--encoder", "resnet18",
                           "--batch-size", "2", "--steps", "1", "--warmup", "0", "--workers", "0"])
    assert re.search(rf"synthetic tensors on the device: {NUMBER} img/s; real loader \+ augmentation: "
                     rf"{NUMBER} img/s \(\d+ %\)", out)


def test_cpu_step_and_augmentation_benchmarks(process_settings):
    out = run(train.main, ["cpu-step", "--arch", "unet", "--arch", "resunet", "--encoder", "resnet18",
                           "--size", "32", "--batch-size", "2", "--steps", "1"])
    assert [line.split()[:2] for line in out.splitlines()[1:]] == [["unet", "resnet18"], ["resunet", "resnet18"]]

    out = run(train.main, ["augment", "--case", "64,32,2", "--repeat", "1"])
    assert re.search(rf"64² slices → 32² windows, batch 2: whole slice warped then cut +{NUMBER} ms, "
                     rf"window warped +{NUMBER} ms", out)


def test_startup_benchmark_times_both_imports_of_a_fresh_process():
    # a light module: the model stack's import is what the benchmark measures, not what
    # this test checks (fresh interpreters, ~10 s of CPU each); launch/train.py runs in
    # test_multinode.py
    out = run(train.main, ["startup", "--repeat", "1", "--module", "json", "--no-train-run"])
    lines = out.splitlines()[1:]
    assert [line[:18].strip() for line in lines] == ["plain import", "heavy_imports()"], out
    for line in lines:
        assert re.search(rf"process +{NUMBER} s CPU, import +{NUMBER} s CPU, exit +{NUMBER} s$", line), line
    # --module is pasted into code: anything but a dotted name is one line, nothing run
    done = CliRunner().invoke(train.main, ["startup", "--module", "os; import this", "--no-train-run"])
    assert done.exit_code == 2 and "is not a dotted module name" in done.output and "Zen" not in done.output


def test_metrics_agree_with_the_reference(process_settings):
    out = run(evaluation.main, ["metrics", "--slices", "100", "--size", "128", "--spacing", "4", "3", "3",
                                "--repeat", "1"])
    agree, counts = re.search(rf"metrics agree to ({NUMBER}), detection agrees \(tp/fp/fn ([0-9/]+)\)", out).groups()
    assert float(agree) < 1e-4
    tp, fp, fn = (int(n) for n in counts.split("/"))
    assert tp > 0 and fn > 0 and fp > 0  # the case has found, missed and false lesions


def test_inference_on_a_cpu(process_settings):
    out = run(evaluation.main, ["infer", "--device", "cpu", "--slices", "2", "--batch-size", "2",
                                "--encoder", "resnet18", "--size", "32"])
    assert re.search(rf"bare model on device tensors: {NUMBER} slices/s; whole-volume inference: "
                     rf"{NUMBER} slices/s \(\d+ %\)", out)


def test_ceiling_prints_the_library_oracle(tmp_path):
    label, image, _, _ = faint_and_bright_case()
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    # NIfTI axes are (x, y, z): the same cube read back in any orientation has the same lesions
    nib.save(nib.Nifti1Image(image.astype(np.int16), affine), tmp_path / "volume-0.nii")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "segmentation-0.nii")
    output = run(ceiling.main, [str(tmp_path), "--min-cm3", "0,2", "--min-hu", "0,20"])
    lesions = oracle.lesion_table(label, image, (1.0, 1.0, 1.0))
    table = output.splitlines()[-2:]
    for line, v in zip(table, (0.0, 2.0)):
        assert line.split() == [f"{v:g}", *(f"{oracle.oracle_dice(lesions, v, c):.3f}" for c in (0.0, 20.0))]


def test_ceiling_names_an_unreadable_case_in_one_line(tmp_path):
    (tmp_path / "volume-0.nii").write_bytes(b"not a nifti")
    (tmp_path / "segmentation-0.nii").write_bytes(b"not a nifti")
    done = CliRunner().invoke(ceiling.main, [str(tmp_path)])
    assert done.exit_code == 1 and done.output.startswith("Error: ") and "volume-0.nii" in done.output, done.output
    assert done.output.count("\n") == 1 and not isinstance(done.exception, (TypeError, ValueError))
