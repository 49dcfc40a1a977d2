"""``liverseg-eval score`` as a user runs it: the golden folders scored under the LiTS
convention give the official names and numbers; pairing by case number; a missing or
unreadable file is one line and exit 1; no torch is imported."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from liverseg import eval_cli, scoring
from liverseg.config import CONVENTIONS

GOLDEN = Path(__file__).parents[2] / "shared" / "lits-golden"
pytestmark = pytest.mark.skipif(not (GOLDEN / "golden.json").exists(),
                                reason=f"the LiTS golden set is not at {GOLDEN} (CI clones it beside the repo)")
TOL = {"rel": 1e-9, "abs": 1e-12}


def score(*args):
    return CliRunner().invoke(eval_cli.main, ["score", *(str(a) for a in args)])


def golden() -> dict:
    return json.loads((GOLDEN / "golden.json").read_text())


def copy_set(tmp_path: Path, cases: list[int], pred_name: str = "segmentation-{}.nii.gz") -> tuple[Path, Path]:
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    for n in cases:
        shutil.copy(GOLDEN / "ref" / f"segmentation-{n}.nii.gz", ref)
        shutil.copy(GOLDEN / "pred" / f"segmentation-{n}.nii.gz", pred / pred_name.format(n))
    return ref, pred


def test_lits_convention_writes_the_official_figures(tmp_path):
    result = score("--reference", GOLDEN / "ref", "--predictions", GOLDEN / "pred", "--convention", "lits",
                   "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "out" / "scores.json").read_text())
    expected = golden()["dataset"]
    assert written["cases"] == expected["cases"] and written["failed"] == []
    assert list(written["dataset"]) == list(expected["scores"])
    assert written["dataset"] == pytest.approx(expected["scores"], **TOL)
    assert (tmp_path / "out" / "scores.txt").read_text() == "".join(
        f"{k}: {v}\n" for k, v in expected["scores_txt"].items())
    assert "liver_assd: 750.464" in result.output and "12 case(s) done, 0 failed" in result.output
    rows = (tmp_path / "out" / "cases.csv").read_text().splitlines()
    assert len(rows) == 13 and rows[9].startswith("segmentation-109,0.0,0.0,1.0,9001.0,9001.0")
    assert set(json.loads((tmp_path / "out" / "cases.json").read_text())) == set(expected["cases"])


def test_liverseg_convention_is_the_default(tmp_path):
    result = score("--reference", GOLDEN / "ref", "--predictions", GOLDEN / "pred", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "scores.json").read_text())
    assert written["config"]["convention"] == "liverseg"
    pooled = golden()["dataset"]["scores"]["lesion_dice_global"]  # the one figure both conventions share
    assert written["dataset"]["tumour"]["dice_global"] == pytest.approx(pooled)
    assert not (tmp_path / "scores.txt").exists()


def test_a_missing_prediction_is_one_line_and_exit_1(tmp_path):
    ref, pred = copy_set(tmp_path, [101, 102, 103])
    (pred / "segmentation-102.nii.gz").unlink()
    result = score("--reference", ref, "--predictions", pred, "--convention", "lits", "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    failed = [line for line in result.output.splitlines() if line.startswith("failed:")]
    reference = ref / "segmentation-102.nii.gz"
    assert failed == [f"failed: segmentation-102: no prediction in {pred} (reference {reference})"]
    assert json.loads((tmp_path / "out" / "scores.json").read_text())["cases"] == ["segmentation-101",
                                                                                   "segmentation-103"]


def test_an_unreadable_prediction_is_one_line_and_exit_1(tmp_path):
    ref, pred = copy_set(tmp_path, [101, 103])
    (pred / "segmentation-103.nii.gz").write_bytes(b"not a nifti file")
    result = score("--reference", ref, "--predictions", pred, "--out", tmp_path / "out")
    assert result.exit_code == 1 and "Traceback" not in result.output
    failed = [line for line in result.output.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and failed[0].startswith(f"failed: segmentation-103: {pred / 'segmentation-103.nii.gz'}")
    assert "1 case(s) done, 1 failed" in result.output


def test_nothing_to_score_is_one_error_line(tmp_path):
    ref, pred = copy_set(tmp_path, [101])
    (pred / "segmentation-101.nii.gz").rename(pred / "segmentation-7.nii.gz")
    result = score("--reference", ref, "--predictions", pred, "--out", tmp_path / "out")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("Error: no case could be scored (2 failed)")


@pytest.mark.parametrize("pred_name", ["test-segmentation-{}.nii.gz", "volume-{}.nii.gz", "segmentation-{}.nii"])
def test_predictions_pair_by_case_number(tmp_path, pred_name):
    ref, pred = copy_set(tmp_path, [104, 105], pred_name)
    if pred_name.endswith(".nii"):  # an uncompressed file, as the official scorer reads them
        for n in (104, 105):
            path = pred / pred_name.format(n)
            path.write_bytes(gzip.decompress(path.read_bytes()))
    shutil.copy(GOLDEN / "ref" / "segmentation-104.nii.gz", ref / "volume-104.nii.gz")  # a LiTS CT beside it
    result = score("--reference", ref, "--predictions", pred, "--convention", "lits", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert written["cases"] == ["segmentation-104", "segmentation-105"]
    assert written["dataset"]["lesion_recall"] == pytest.approx(6 / 7)  # 104: TP 2, FN 1; 105: TP 4


def test_a_reference_that_is_not_a_folder_is_one_error_line(tmp_path):
    result = score("--reference", tmp_path / "nowhere", "--predictions", GOLDEN / "pred", "--out", tmp_path / "out")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output == f"Error: {tmp_path / 'nowhere'}: not a folder\n"


def test_two_files_for_one_case_are_one_failure(tmp_path):
    ref, pred = copy_set(tmp_path, [101, 103])
    shutil.copy(pred / "segmentation-101.nii.gz", pred / "test-segmentation-101.nii.gz")
    result = score("--reference", ref, "--predictions", pred, "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert "failed: segmentation-101: more than one label file" in result.output


def test_the_cli_knows_every_convention():
    """One list of conventions (liverseg.config), offered by the CLI and scored by scoring."""
    choices = {p.name: tuple(p.type.choices) for command in (eval_cli.score, eval_cli.run)
               for p in command.params if p.name == "convention"}
    assert choices == {"convention": CONVENTIONS} and set(scoring.SCORERS) == set(CONVENTIONS)


def test_scoring_does_not_import_torch(tmp_path):
    code = ("import sys\n"
            "from liverseg.eval_cli import main\n"
            f"main(['score', '--reference', {str(GOLDEN / 'ref')!r}, '--predictions', {str(GOLDEN / 'pred')!r},"
            f" '--convention', 'lits', '--out', {str(tmp_path)!r}], standalone_mode=False)\n"
            "print('torch' in sys.modules, 'liverseg.evaluate' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "False False"
    assert (tmp_path / "scores.json").exists()
