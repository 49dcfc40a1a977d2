"""The demo's chain really learns: a reduced run (phantoms → shards → two models → ensemble
evaluation) must segment the liver of held-out phantom cases well above chance, so a silent
break anywhere (orientation, labels, normalisation, reconstruction) fails it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import run_python

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_demo_learns_the_liver_of_held_out_cases(tmp_path):
    out = tmp_path / "demo"
    command = [ROOT / "launch" / "demo.py", "--quick", "--device", "cpu", "--out", out]
    done = run_python(command, timeout=580, cwd=tmp_path, env={**os.environ, "WANDB_MODE": "disabled"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    summary = json.loads(next(out.glob("*/eval/summary.json")).read_text())
    assert summary["cases"] >= 2 and summary["failed"] == []
    final = summary["variants"]["ensemble+postprocess"]
    assert final["liver"]["dice"]["mean"] >= 0.8, final["liver"]["dice"]
    assert "report:" in done.stdout and "ensemble+postprocess" in done.stdout
    # the test cases are postprocessed with the cut-off chosen on the validation cases
    tuned = json.loads(next(out.glob("*/tuning/tuning.json")).read_text())
    tested = json.loads(next(out.glob("*/eval/cases.json")).read_text())
    assert tuned["split"] == "val" and tuned["cases"] and not set(tuned["cases"]) & set(tested)
    filters = [{"name": "remove_small_lesions", "min_volume_mm3": tuned["chosen_min_volume_mm3"]}]
    if tuned["chosen_min_mean_probability"] > 0:
        filters.append({"name": "remove_unsure_lesions", "min_mean_probability": tuned["chosen_min_mean_probability"]})
    assert summary["postprocess_steps"][-len(filters):] == filters
    # a second run reuses the phantoms, the shards and both trained models
    again = run_python(command, timeout=300, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("reusing") == 3, again.stdout[-2000:]
    assert "training " not in again.stderr, again.stderr[-2000:]  # no empty progress bar when nothing trains


def test_an_out_folder_that_cannot_be_made_is_one_line(tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    done = run_python([ROOT / "launch" / "demo.py", "--quick", "--device", "cpu", "--out", taken], timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and f"Error: {taken}/" in done.stderr, done.stderr
    assert taken.read_text() == "not a folder"
