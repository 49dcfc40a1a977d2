"""`python launch/benchmark.py ceiling` prints the library's oracle (liverseg.oracle,
tested in test_oracle.py) for each threshold pair."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from liverseg import oracle

from test_oracle import faint_and_bright_case

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("liverseg_benchmark", ROOT / "launch" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ceiling_prints_the_library_oracle(bench, tmp_path):
    label, image, _, _ = faint_and_bright_case()
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    # NIfTI axes are (x, y, z): the same cube read back in any orientation has the same lesions
    nib.save(nib.Nifti1Image(image.astype(np.int16), affine), tmp_path / "volume-0.nii")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "segmentation-0.nii")
    done = CliRunner().invoke(bench.main, ["ceiling", str(tmp_path), "--min-cm3", "0,2", "--min-hu", "0,20"])
    assert done.exit_code == 0, done.output
    lesions = oracle.lesion_table(label, image, (1.0, 1.0, 1.0))
    table = done.output.splitlines()[-2:]
    for line, v in zip(table, (0.0, 2.0)):
        assert line.split() == [f"{v:g}", *(f"{oracle.oracle_dice(lesions, v, c):.3f}" for c in (0.0, 20.0))]
