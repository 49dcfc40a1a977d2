"""``liverseg-eval run --convention lits``: beside liverseg's scores, each variant's figures
as the LiTS challenge scorer gives them, the same as ``liverseg-eval score --convention
lits`` gives for the predictions the run wrote."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from liverseg import lits_official
from liverseg.errors import ConfigError
from liverseg.eval_cli import main as eval_main
from liverseg.config import EvalConfig
from liverseg.evaluate import POSTPROCESSED

from conftest import write_blob_case


@pytest.fixture(scope="module")
def checkpoint(checkpoints) -> str:
    return checkpoints[0]


def test_run_with_the_lits_convention_adds_the_official_figures(checkpoint, tmp_path):
    data = tmp_path / "lits"
    for i in (1, 2):
        write_blob_case(data, i)
    out = tmp_path / "eval"
    done = CliRunner().invoke(eval_main, ["run", "--checkpoint", checkpoint, "--data", str(data), "--out", str(out),
                                          "--batch-size", "8", "--convention", "lits", "--no-report"])
    assert done.exit_code == 0, done.output
    summary = json.loads((out / "summary.json").read_text())
    official = summary["lits_official"]
    assert list(official) == list(summary["variants"])
    assert all(list(figures) == list(lits_official.OFFICIAL_NAMES) for figures in official.values())
    assert summary["config"]["convention"] == "lits"
    assert any(line.startswith("LiTS official") for line in done.output.splitlines())
    # the written predictions, scored from their files, give the same figures
    rescored = CliRunner().invoke(eval_main, ["score", "--reference", str(data), "--predictions",
                                              str(out / "predictions"), "--convention", "lits", "--out",
                                              str(tmp_path / "scored")])
    assert rescored.exit_code == 0, rescored.output
    scores = json.loads((tmp_path / "scored" / "scores.json").read_text())
    assert scores["dataset"] == pytest.approx(official[POSTPROCESSED], rel=1e-9, abs=1e-12)


def test_an_unknown_convention_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown convention 'medpy'; valid: liverseg, lits"):
        EvalConfig(checkpoints=("x",), data="d", out="o", convention="medpy")
