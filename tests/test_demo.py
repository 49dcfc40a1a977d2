"""The demo's chain really learns: a reduced run (phantoms → shards → two models → ensemble
evaluation) must segment the liver of held-out phantom cases well above chance, so a silent
break anywhere (orientation, labels, normalisation, reconstruction) fails it."""

from __future__ import annotations

import dataclasses
import json
import os
import runpy
from pathlib import Path
from types import SimpleNamespace

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
    # a second run reuses the phantoms, the shards, both trained models, the tuning and the
    # evaluation, and shows the same results
    again = run_python(command, timeout=300, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("reusing") == 5, again.stdout[-2000:]
    assert "training " not in again.stderr, again.stderr[-2000:]  # no empty progress bar when nothing trains
    assert "cases" not in again.stderr, again.stderr[-2000:]  # nothing evaluated again
    for shown in (lambda out: [line for line in out.splitlines() if "tumour components under" in line],
                  lambda out: out.split("] done\n", 1)[1]):  # the tuning's line; the table and the report
        assert shown(again.stdout) == shown(done.stdout)


def load_demo() -> SimpleNamespace:
    return SimpleNamespace(**runpy.run_path(str(ROOT / "launch" / "demo.py"), run_name="demo"))


def test_a_result_is_reused_only_if_written_after_its_inputs_with_the_same_settings(tmp_path):
    from liverseg import __version__
    from liverseg.config import EvalConfig

    demo = load_demo()
    checkpoint = tmp_path / "best"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    postprocess = tmp_path / "postprocess.json"
    postprocess.write_text("{}")
    config = EvalConfig(checkpoints=(str(checkpoint),), data="shards", out=str(tmp_path / "eval"))
    result = tmp_path / "summary.json"
    result.write_text(json.dumps({"config": config.to_dict(), "liverseg_version": __version__}))
    os.utime(checkpoint / "model.safetensors", (1000, 1000))
    os.utime(postprocess, (1000, 1000))
    held = json.loads(result.read_text())
    assert demo.reusable(result, config, [checkpoint], (postprocess,)) == held
    assert demo.reusable(result, dataclasses.replace(config, batch_size=1), [checkpoint]) is None  # other settings
    os.utime(postprocess)  # an input written after the result
    assert demo.reusable(result, config, [checkpoint]) == held
    assert demo.reusable(result, config, [checkpoint], (postprocess,)) is None
    os.utime(checkpoint / "model.safetensors")  # a model trained again
    assert demo.reusable(result, config, [checkpoint]) is None
    os.utime(checkpoint / "model.safetensors", (1000, 1000))
    result.write_text(json.dumps({"config": config.to_dict(), "liverseg_version": "0.0.1"}))
    assert demo.reusable(result, config, [checkpoint]) is None  # another liverseg
    result.write_text("{not json")
    assert demo.reusable(result, config, [checkpoint]) is None
    # a file with the right settings that cannot be read back (a key missing) is computed again
    result.write_text(json.dumps({"config": config.to_dict(), "liverseg_version": __version__}))
    assert demo.reusable(result, config, [checkpoint], read=lambda saved: saved["cases"]) is None
    assert demo.reusable(tmp_path / "missing.json", config, [checkpoint]) is None


def test_an_out_folder_that_cannot_be_made_is_one_line(tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    done = run_python([ROOT / "launch" / "demo.py", "--quick", "--device", "cpu", "--out", taken], timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and f"Error: {taken}/" in done.stderr, done.stderr
    assert taken.read_text() == "not a folder"
