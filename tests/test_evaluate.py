"""liverseg-eval end to end on CPU: an ensemble of two tiny trained checkpoints, every
output written, bad input reported case by case, and cases split over two processes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from liverseg.config import TrainConfig
from liverseg.eval_cli import main as eval_main
from liverseg.evaluate import POSTPROCESSED, EvalConfig, find_cases, run_evaluation
from liverseg.train import train
from shardgen.build import BuildConfig, build_shards
from shardgen.manifest import read_manifest
from shardgen.preprocess import Preprocessing

from conftest import write_blob_case

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["unet", "resunet", "ensemble", POSTPROCESSED]


@pytest.fixture(scope="module")
def shards(phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-shards")
    build_shards(BuildConfig(inputs=(phantom_dir,), out=out, preprocessing=Preprocessing(size=64),
                             fractions=(0.5, 0.17, 0.33)))
    return out


@pytest.fixture(scope="module")
def checkpoints(shards, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    for arch in ("unet", "resunet"):
        train(TrainConfig(shards=str(shards), out=str(runs / arch), arch=arch, encoder="resnet18",
                          steps=3, batch_size=2, val_every=3, save_every=3, workers=0,
                          shuffle_buffer=8, warmup_steps=1))
    return [str(runs / "unet" / "best"), str(runs / "resunet" / "best")]


def test_ensemble_of_two_checkpoints_writes_every_output(shards, checkpoints, tmp_path):
    out = tmp_path / "eval"
    result = run_evaluation(EvalConfig(checkpoints=tuple(checkpoints), data=str(shards), out=str(out),
                                       batch_size=8, tta="flips"))
    test_cases = sorted(c for c, s in read_manifest(shards)["split_assignment"].items() if s == "test")
    assert result.cases == len(test_cases) >= 2 and result.failed == []
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(test_cases) * len(VARIANTS) * 2
    assert {r["variant"] for r in rows} == set(VARIANTS) and {r["class"] for r in rows} == {"liver", "tumour"}
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["variants"]) == VARIANTS
    assert set(summary["variants"]["ensemble"]["liver"]) >= {"dice_global", "dice", "assd", "hd95", "voe"}
    assert summary["timings"]["total_s"] > 0
    manifest = read_manifest(shards)
    for case in test_cases:
        source = nib.load(manifest["cases"][case]["image"])
        pred = nib.load(out / "predictions" / f"segmentation-{case.split('-')[1]}.nii.gz")
        assert pred.shape == source.shape and np.allclose(pred.affine, source.affine)
    charts = list((out / "charts").glob("*.png"))
    panels = list((out / "panels").glob("*.png"))
    assert len(charts) >= 10 and len(panels) >= 2
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= len(charts) + len(panels)
    assert all(v in html for v in VARIANTS)


def test_bad_cases_are_reported_and_the_others_still_evaluated(checkpoints, tmp_path):
    data = tmp_path / "lits"
    for i in (1, 2):
        write_blob_case(data, i)
    write_blob_case(data, 3)[0].unlink()
    (data / "volume-3.nii").write_bytes(b"")  # zero bytes, with a label
    write_blob_case(data, 4)[1].unlink()  # no label
    result = CliRunner().invoke(eval_main, ["run", "--checkpoint", checkpoints[0], "--data", str(data),
                                            "--out", str(tmp_path / "eval"), "--batch-size", "4"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "volume-3.nii: empty file (0 bytes)" in result.output
    assert "volume-4.nii.gz: missing label file" in result.output
    assert "2 case(s) done, 2 failed" in result.output
    rows = list(csv.DictReader(open(tmp_path / "eval" / "metrics.csv")))
    assert {r["case"] for r in rows} == {"volume-1", "volume-2"}
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert {f["case"] for f in summary["failed"]} == {"volume-3", "volume-4"}


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "no/such/run"], "no/such/run: checkpoint folder not found"),
    (["--tta", "rotations"], "Invalid value for '--tta'"),
], ids=["missing-checkpoint", "bad-tta"])
def test_bad_arguments_are_one_line(checkpoints, tmp_path, args, message):
    base = ["run", "--data", str(tmp_path), "--out", str(tmp_path / "eval")]
    if "--checkpoint" not in args:
        base += ["--checkpoint", checkpoints[0]]
    result = CliRunner().invoke(eval_main, base + args)
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_corrupt_checkpoint_names_the_file(checkpoints, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoints[0], bad)
    (bad / "model.safetensors").write_bytes(b"garbage")
    result = CliRunner().invoke(eval_main, ["run", "--checkpoint", str(bad), "--data", str(tmp_path),
                                            "--out", str(tmp_path / "eval")])
    assert result.exit_code == 1 and f"{bad / 'model.safetensors'}: not a readable safetensors" in result.output


def test_predict_writes_lits_submission_names_without_labels(checkpoints, tmp_path):
    data = tmp_path / "test-data"
    vol, seg = write_blob_case(data, 5)
    vol.rename(data / "test-volume-5.nii.gz")
    seg.unlink()
    result = CliRunner().invoke(eval_main, ["predict", "--checkpoint", checkpoints[0], "--checkpoint",
                                            checkpoints[1], "--data", str(data), "--out", str(tmp_path / "sub")])
    assert result.exit_code == 0, result.output
    pred = nib.load(tmp_path / "sub" / "predictions" / "test-segmentation-5.nii")
    source = nib.load(data / "test-volume-5.nii.gz")
    assert pred.shape == source.shape and np.array_equal(pred.affine, source.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}


def test_manifest_split_reads_cases_from_their_source_files(shards):
    cases, failed = find_cases(shards / "manifest.json", "val", with_labels=True)
    manifest = read_manifest(shards)
    assert failed == [] and [c.case for c in cases] == sorted(
        c for c, s in manifest["split_assignment"].items() if s == "val")
    assert all(c.image.exists() and c.label.exists() for c in cases)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_processes_split_the_cases_and_the_main_one_reports(shards, checkpoints, tmp_path):
    out = tmp_path / "eval"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / "cpu.yaml"), "--num_processes", "2",
               "-m", "liverseg.eval_cli", "run", "--checkpoint", checkpoints[0],
               "--data", str(shards), "--out", str(out), "--postprocess", "none"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=220, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    test_cases = [c for c, s in read_manifest(shards)["split_assignment"].items() if s == "test"]
    assert summary["cases"] == len(test_cases)
    assert done.stdout.count("report:") == 1
