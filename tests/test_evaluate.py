"""liverseg-eval end to end on CPU: an ensemble of two tiny trained checkpoints, every
output written, bad input reported case by case, and cases split over two processes."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from liverseg import lits, oracle, report
from liverseg.errors import ConfigError
from liverseg.eval_cli import main as eval_main
from liverseg.config import EvalConfig
from liverseg.evaluate import POSTPROCESSED, CaseResult, choose_panels, find_cases, pick_panels, run_evaluation
from liverseg.tune import candidate_dice, choose_filters, saved_result, tumour_dice, tune_postprocess
from liverseg.inference import load_members, predict_volume
from liverseg.postprocess import (MIN_LESION_CANDIDATES_MM3, MIN_PROBABILITY_CANDIDATES, Postprocess,
                                  RemoveSmallLesions, RemoveUnsureLesions, default_postprocess, with_lesion_filters)
from shardgen.manifest import read_manifest
from shardgen.nifti import load_case

from conftest import accelerate_launch, run_python, write_blob_case

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["unet", "resunet", "ensemble", POSTPROCESSED]


@pytest.fixture(scope="module")
def shards(train_shards):
    return train_shards


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
    card = html[html.index("<h2>lesion scorecard</h2>"):html.index("<h2>tumour detection and burden</h2>")]
    assert "".join(f"<th>{v}</th>" for v in VARIANTS) in card
    for row in ("found any overlap &lt;10 mm", "tumour-free w/o false lesion", "Dice per case / oracle"):
        assert f"<td>{row}</td>" in card, row


def test_run_reports_the_lesion_scorecard_of_every_variant(shards, checkpoints, tmp_path, monkeypatch):
    from liverseg import evaluate

    loaded = []

    def load_and_count(*args, **kwargs):
        loaded.append(load_case(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(evaluate, "load_case", load_and_count)
    out = tmp_path / "eval"
    done = CliRunner().invoke(eval_main, ["run", *[a for c in checkpoints for a in ("--checkpoint", c)],
                                          "--data", str(shards), "--out", str(out), "--batch-size", "8",
                                          "--no-report"])  # the HTML scorecard: the test above
    assert done.exit_code == 0, done.output
    test_cases = [c for c, s in read_manifest(shards)["split_assignment"].items() if s == "test"]
    assert len(loaded) == len(test_cases)  # the oracle measures the CT read for prediction, not a second copy
    summary = json.loads((out / "summary.json").read_text())
    cases = json.loads((out / "cases.json").read_text())
    fresh = [load_case(s.image, s.label) for s in find_cases(shards, "test", with_labels=True)[0]]
    oracle_dice = [oracle.case_oracle_dice(c.label, c.image, c.spacing) for c in fresh]
    assert summary["oracle"] == {"min_cm3": oracle.VISIBLE_MIN_CM3, "min_hu": oracle.VISIBLE_MIN_HU}
    assert sorted(c["oracle_dice"] for c in cases.values()) == pytest.approx(sorted(oracle_dice))
    for variant in VARIANTS:
        scores = summary["variants"][variant]
        det = scores["detection"]
        lesions = [lesion for c in cases.values() for lesion in c["scores"][variant]["lesions"]["lesions"]]
        assert [b["bin"] for b in det["by_size"]] == [name for *_, name in lits.SIZE_BINS]
        assert [sum(b[k] for b in det["by_size"]) for k in ("lesions", "detected", "touched")] == [
            len(lesions), sum(x["detected"] for x in lesions), sum(x["touched"] for x in lesions)]
        free = [c["scores"][variant]["lesions"] for c in cases.values()
                if c["scores"][variant]["lesions"]["ref_lesions"] == 0]
        assert det["tumour_free"]["cases"] == len(free)
        assert det["tumour_free"]["without_false_lesion"] == sum(d["pred_lesions"] == 0 for d in free)
        assert scores["oracle"]["dice_mean"] == pytest.approx(np.mean(oracle_dice))
        assert scores["oracle"]["tumour_dice_mean"] == pytest.approx(scores["tumour"]["dice"]["mean"])
    # the printed table: one scorecard column per variant, every row
    lines = done.output.splitlines()
    header = next(line for line in lines if line.startswith("lesion scorecard"))
    assert header.split()[2:] == VARIANTS
    for variant in VARIANTS:
        for name, text in report.scorecard_rows(summary["variants"][variant]):
            assert any(line.startswith(name) and text in line for line in lines), (variant, name)
    assert [name for name, _ in report.scorecard_rows(summary["variants"]["unet"])][:7] == [
        "found IoU>0.5 <10 mm", "found IoU>0.5 10-20 mm", "found IoU>0.5 >=20 mm", "found any overlap <10 mm",
        "found any overlap 10-20 mm", "found any overlap >=20 mm", "lesion precision IoU>0.5"]


def test_one_checkpoint_scores_its_ensemble_without_scoring_it_again(shards, checkpoints, tmp_path, monkeypatch):
    from liverseg import evaluate

    scored, score_case = [], lits.score_case

    def counted(labels, truth, spacing):
        scored.append(labels)
        return score_case(labels, truth, spacing)

    monkeypatch.setattr(evaluate.lits, "score_case", counted)
    out = tmp_path / "eval"
    result = run_evaluation(EvalConfig(checkpoints=(checkpoints[0],), data=str(shards), out=str(out), report=False))
    assert result.cases >= 2 and result.failed == []
    assert len(scored) == 2 * result.cases  # the checkpoint's (= the ensemble's) labels and the postprocessed ones
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["variants"]) == ["unet", "ensemble", POSTPROCESSED]
    assert summary["variants"]["ensemble"] == summary["variants"]["unet"]


def test_bad_cases_are_reported_and_the_others_still_evaluated(checkpoints, tmp_path):
    data = tmp_path / "lits"
    for i in (1, 2):
        write_blob_case(data, i)
    write_blob_case(data, 3)[0].unlink()
    (data / "volume-3.nii").write_bytes(b"")  # zero bytes, with a label
    write_blob_case(data, 4)[1].unlink()  # no label
    result = CliRunner().invoke(eval_main, ["run", "--checkpoint", checkpoints[0], "--data", str(data),
                                            "--out", str(tmp_path / "eval"), "--batch-size", "4", "--no-report"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "volume-3.nii: empty file (0 bytes)" in result.output
    assert "volume-4.nii.gz: missing label file" in result.output
    assert "2 case(s) done, 2 failed" in result.output
    rows = list(csv.DictReader(open(tmp_path / "eval" / "metrics.csv")))
    assert {r["case"] for r in rows} == {"volume-1", "volume-2"}
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert {f["case"] for f in summary["failed"]} == {"volume-3", "volume-4"}
    # --no-report: the metrics and the table, no figures, no page, no "report:" line
    assert "lesion scorecard" in result.output and "report:" not in result.output
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        "cases.json", "config.json", "metrics.csv", "predictions", "summary.json"]


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


def test_an_out_that_is_a_file_is_one_line(shards, checkpoints, tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("kept")
    result = CliRunner().invoke(eval_main, ["run", "--checkpoint", checkpoints[0], "--data", str(shards),
                                            "--out", str(taken)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"Error: {taken}: is a file, not a folder" in result.output and taken.read_text() == "kept"


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
    command = accelerate_launch("--config_file", ROOT / "accelerate_configs" / "cpu.yaml", "--num_processes", "2",
                                "-m", "liverseg.eval_cli", "run", "--checkpoint", checkpoints[0],
                                "--data", shards, "--out", out, "--postprocess", "none", "--no-report")
    done = run_python(command, timeout=220, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    test_cases = [c for c, s in read_manifest(shards)["split_assignment"].items() if s == "test"]
    assert summary["cases"] == len(test_cases)
    assert sum(line.startswith("lesion scorecard") for line in done.stdout.splitlines()) == 1


# --------------------------------------------------------------------------- tuning

def test_tumour_dice_is_lits_dice_with_both_empty_scoring_one():
    rng = np.random.default_rng(0)
    for _ in range(5):
        pred, ref = rng.random((2, 4, 6, 6)) < rng.random()
        assert tumour_dice(pred, ref) == pytest.approx(lits.binary_scores(pred, ref, (1, 1, 1))["dice"])
    empty = np.zeros((2, 3, 3), bool)
    some = empty.copy()
    some[0, 0, 0] = True
    assert tumour_dice(empty, empty) == 1.0 and tumour_dice(some, empty) == 0.0 and tumour_dice(empty, some) == 0.0


def test_a_false_blob_in_a_tumour_free_case_goes_only_above_its_volume_or_below_its_probability():
    labels = np.zeros((6, 20, 20), np.uint8)
    labels[:, 2:18, 2:18] = 1
    labels[1:4, 5:8, 5:8] = 2  # 27 voxels of 2 mm³: 54 mm³ of false tumour
    probability = np.zeros(labels.shape, np.uint8)
    probability[labels == 2] = 178  # a mean tumour probability of 0.698
    pairs = [(10.0, 0.0), (50.0, 0.0), (100.0, 0.0), (10.0, 0.6), (10.0, 0.7)]
    chains = {pair: with_lesion_filters(default_postprocess(), *pair) for pair in pairs}
    no_tumour = np.zeros(labels.shape, bool)
    assert candidate_dice(labels, probability, no_tumour, (2, 1, 1), chains) == dict(zip(pairs, [0.0, 0.0, 1.0, 0.0, 1.0]))
    truth = labels == 2  # the same blob, now real: every chain that keeps it scores 1
    assert candidate_dice(labels, probability, truth, (2, 1, 1), chains) == dict(zip(pairs, [1.0, 1.0, 0.0, 1.0, 0.0]))
    # the shared first steps run once: the same figures as each whole chain
    for pair, chain in chains.items():
        assert tumour_dice(chain(labels, (2, 1, 1), probability) == 2, truth) == candidate_dice(
            labels, probability, truth, (2, 1, 1), {pair: chain})[pair]


def test_the_best_pair_wins_and_of_equals_the_one_that_removes_the_least():
    means = {(10.0, 0.0): 0.5, (10.0, 0.8): 0.9, (200.0, 0.0): 0.6, (200.0, 0.8): 0.7, (200.0, 0.9): 0.8}
    assert choose_filters(means) == (10.0, 0.8)
    assert choose_filters({(10.0, 0.9): 0.5, (50.0, 0.5): 0.5, (10.0, 0.7): 0.5, (5.0, 0.0): 0.2}) == (10.0, 0.7)


def test_with_lesion_filters_replaces_or_appends_the_steps():
    chain = with_lesion_filters(default_postprocess(), 300)
    assert [s.name for s in chain.steps] == [s.name for s in default_postprocess().steps]
    assert chain.steps[-1] == RemoveSmallLesions(min_volume_mm3=300.0) and not chain.needs_probability
    assert with_lesion_filters(Postprocess([]), 50).steps == (RemoveSmallLesions(min_volume_mm3=50.0),)
    both = with_lesion_filters(Postprocess([RemoveUnsureLesions(0.3), RemoveSmallLesions(5.0),
                                            default_postprocess().steps[0]]), 50, 0.8)
    assert both.steps == (RemoveSmallLesions(50.0), RemoveUnsureLesions(0.8), default_postprocess().steps[0])
    assert both.needs_probability and with_lesion_filters(both, 50).steps == (RemoveSmallLesions(50.0),
                                                                            default_postprocess().steps[0])


def test_tune_measures_each_pair_of_filters_on_the_validation_cases_and_run_uses_the_choice(shards, checkpoints,
                                                                                           tmp_path):
    tuned = tmp_path / "tuned"
    done = CliRunner().invoke(eval_main, ["tune", *[a for c in checkpoints for a in ("--checkpoint", c)],
                                          "--data", str(shards), "--out", str(tuned), "--device", "cpu"])
    assert done.exit_code == 0, done.output
    report = json.loads((tuned / "tuning.json").read_text())
    val_cases = sorted(c for c, s in read_manifest(shards)["split_assignment"].items() if s == "val")
    assert sorted(report["cases"]) == val_cases and report["split"] == "val"
    # each figure is what the ensemble's labels score after that chain, recomputed here
    members = load_members(checkpoints, torch.device("cpu"))
    pairs = [(v, t) for v in MIN_LESION_CANDIDATES_MM3 for t in MIN_PROBABILITY_CANDIDATES]
    chains = {pair: with_lesion_filters(default_postprocess(), *pair) for pair in pairs}
    for source in find_cases(shards, "val", with_labels=True)[0]:
        case = load_case(source.image, source.label)
        prediction = predict_volume(members, case.image, case.spacing, torch.device("cpu"), 16,
                                    tumour_probability=True)
        for (v, t), chain in chains.items():
            expected = tumour_dice(chain(prediction.labels["ensemble"], case.spacing,
                                         prediction.tumour_probability) == 2, case.label == 2)
            assert report["cases"][source.case][f"{v:g}"][f"{t:g}"] == pytest.approx(expected)
    means = {(v, t): np.mean([report["cases"][c][f"{v:g}"][f"{t:g}"] for c in val_cases]) for v, t in pairs}
    chosen_pair = (report["chosen_min_volume_mm3"], report["chosen_min_mean_probability"])
    # tuning.json read back (a rerun of the demo shows it): the result tune returned
    again = saved_result(report, tuned)
    assert again.mean_dice == pytest.approx(means) and again.postprocess == tuned / "postprocess.json"
    assert (again.min_volume_mm3, again.min_mean_probability) == chosen_pair and again.cases == len(val_cases)
    assert chosen_pair == choose_filters(means)
    chosen = Postprocess.from_json(tuned / "postprocess.json")
    assert chosen == chains[chosen_pair] and done.output.count("*") == 2  # the legend's and the chosen cell's
    out = tmp_path / "eval"
    run_evaluation(EvalConfig(checkpoints=tuple(checkpoints), data=str(shards), out=str(out),
                              postprocess=str(tuned / "postprocess.json"), report=False))
    assert json.loads((out / "summary.json").read_text())["postprocess_steps"] == chosen.to_dict()["steps"]


def test_tune_refuses_negative_cut_offs(checkpoints, shards, tmp_path):
    config = EvalConfig(checkpoints=tuple(checkpoints), data=str(shards), out=str(tmp_path))
    with pytest.raises(ConfigError, match="volume candidates"):
        tune_postprocess(config, (10.0, -1.0))
    with pytest.raises(ConfigError, match="probability candidates"):
        tune_postprocess(config, (10.0,), (0.0, 1.5))


def test_help_needs_neither_torch_nor_the_models_and_lists_the_inference_tta_choices():
    from liverseg import eval_cli, inference

    assert eval_cli.TTA_CHOICES is inference.TTA_CHOICES
    code = ("import sys; from liverseg.eval_cli import main\n"
            "try:\n    main(['run', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'timm', 'segmentation_models_pytorch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "--tta [none|flips]" in done.stdout, done.stdout + done.stderr
    assert "HEAVY []" in done.stdout, done.stdout + done.stderr


def test_median_and_worst_panels_show_the_slice_a_case_gets_most_wrong():
    truth = np.zeros((4, 8, 8), np.uint8)
    truth[:, 1:7, 1:7] = 1  # liver on every slice, largest on slice 0
    truth[0, 0, :] = 1
    pred = truth.copy()
    pred[2, 2:5, 2:5] = 2  # slice 2: 9 voxels wrong
    pred[3, 2:4, 2:4] = 0  # slice 3: 4 voxels wrong
    image = np.zeros(truth.shape, np.float32)
    main, error, tumour = choose_panels(image, truth, pred, (-100, 400))
    assert (main["z"], error["z"], tumour) == (0, 2, None) and "(9)" in error["what"]
    results = []
    for name, dice in (("good", 0.9), ("mid", 0.6), ("bad", 0.2)):
        r = CaseResult(name, scores={POSTPROCESSED: {"liver": {"dice": dice}, "tumour": {"dice": math.nan}}})
        r.panel, r.error_panel = main, error
        results.append(r)
    panels = pick_panels(results)
    assert [p["z"] for p in panels] == [0, 2, 2]
    assert panels[0]["title"].startswith("best case good (mean of liver and tumour Dice 0.900), slice 0")
    assert "slice with the most wrong voxels" in panels[2]["title"] and "worst case bad" in panels[2]["title"]
