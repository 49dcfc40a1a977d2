"""`liverseg-shards stats`: lesion and image statistics of a LiTS-style folder, checked on
hand-made cases whose every number is known by construction."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import save_canonical
from shardgen.cli import main
from shardgen.discover import CaseSource
from shardgen.stats import (case_stats, diameter_bin, equivalent_diameter, liver_noise,
                            liver_whole_in_z, measure_folder, measure_lesions, measure_source,
                            summarise)

LIVER_HU, FAT_HU = 100, -100
NOISE_SD = 20.0


def ball(shape, spacing, centre, radius_mm):
    """Voxels whose centres lie within ``radius_mm`` of voxel ``centre`` (physical mm)."""
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing)) <= radius_mm ** 2


def lesion_case():
    """Liver block at +100 HU, 2×1×1 mm voxels, whole in z, noise-free, five 6-connected lesions:
    A r 8 mm at −50 HU (contrast −150), B r 4 mm at +150 (+50, hyperdense), C r 6 mm at −50
    with a 2 mm rim at +200 (heterogeneous), and D: two single voxels touching only at a
    corner (one lesion under 26-connectivity)."""
    shape, spacing = (24, 64, 64), (2.0, 1.0, 1.0)
    label = np.zeros(shape, np.uint8)
    label[2:22, 4:60, 4:60] = 1
    image = np.where(label == 1, LIVER_HU, FAT_HU).astype(np.int16)
    masks = {"A": ball(shape, spacing, (12, 18, 18), 8), "B": ball(shape, spacing, (12, 18, 46), 4),
             "C": ball(shape, spacing, (12, 46, 18), 6)}
    for name, hu in (("A", -50), ("B", 150), ("C", 200)):
        label[masks[name]], image[masks[name]] = 2, hu
    image[ball(shape, spacing, (12, 46, 18), 4)] = -50
    for voxel in ((12, 46, 46), (13, 47, 47)):
        label[voxel], image[voxel] = 2, -50
    return image, label, spacing, masks


def noise_case(seed=0):
    """Tumour-free liver block at +100 HU with white Gaussian noise of SD 20, stored as int16;
    the liver reaches the last slice."""
    shape = (16, 64, 64)
    label = np.zeros(shape, np.uint8)
    label[3:, 4:60, 4:60] = 1
    rng = np.random.default_rng(seed)
    image = np.where(label == 1, LIVER_HU, FAT_HU) + rng.normal(0, NOISE_SD, shape)
    return np.rint(image).astype(np.int16), label, (2.5, 0.8, 0.8)


def faint_case():
    """Liver (+80 HU) with a faint 12 mm-radius lesion at +90 (contrast +10, 20-60 mm) and a
    3 mm-radius lesion at 0 HU more than 10 mm from any liver (contrast to the whole liver, −80)."""
    shape, spacing = (14, 64, 64), (3.0, 0.9, 0.9)
    label = np.zeros(shape, np.uint8)
    label[1:13, 2:62, 2:41] = 1
    image = np.where(label == 1, 80, FAT_HU).astype(np.int16)
    faint, isolated = ball(shape, spacing, (6, 32, 21), 12), ball(shape, spacing, (6, 32, 56), 3)
    label[faint], image[faint] = 2, 90
    label[isolated], image[isolated] = 2, 0
    return image, label, spacing


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The three cases above as LiTS files (in three storage orientations), a corrupt case
    and a volume without a segmentation."""
    out = tmp_path_factory.mktemp("stats")
    cases = [(lesion_case()[:3], ("L", "P", "S")), (noise_case(), ("R", "A", "S")),
             (faint_case(), ("L", "P", "I"))]
    for i, ((image, label, spacing), axcodes) in enumerate(cases):
        save_canonical(out / f"volume-{i}.nii.gz", image, spacing, axcodes)
        save_canonical(out / f"segmentation-{i}.nii.gz", label, spacing, axcodes)
    (out / "volume-3.nii.gz").write_bytes(b"\x1f\x8bnot really gzip")
    (out / "segmentation-3.nii.gz").write_bytes(b"\x1f\x8bnot really gzip")
    save_canonical(out / "volume-4.nii", noise_case()[0])
    return out


def test_lesions_are_6_connected_components():
    image, label, spacing, masks = lesion_case()
    lesions = measure_lesions(label, image, spacing)
    expected = sorted([masks["A"].sum(), masks["B"].sum(), masks["C"].sum(), 1, 1])
    assert sorted(lesion.voxels for lesion in lesions) == expected  # the corner pair is two lesions


def test_the_oracle_uses_the_same_lesions():
    from liverseg.oracle import lesion_table  # what `python -m benchmarks.ceiling` prints

    image, label, spacing, _ = lesion_case()
    table = lesion_table(label, image, spacing)
    assert sorted(table) == sorted((lesion.voxels, lesion.voxels * 2e-3, lesion.contrast_hu)
                                   for lesion in measure_lesions(label, image, spacing))
    assert len(table) == 5


def test_contrast_is_to_the_liver_2_to_10_mm_around():
    image, label, spacing, masks = lesion_case()
    by_size = {lesion.voxels: lesion for lesion in measure_lesions(label, image, spacing)}
    assert by_size[masks["A"].sum()].contrast_hu == -150.0
    assert by_size[masks["B"].sum()].contrast_hu == 50.0
    assert by_size[masks["C"].sum()].contrast_hu == float(np.median(image[masks["C"]])) - LIVER_HU == 100.0
    assert by_size[1].contrast_hu == -150.0


def test_contrast_uses_only_liver_between_2_and_10_mm():
    """Liver at +300 HU within 2 mm of a ball, at +40 HU from 10 mm on (most of it), and
    between the two only in a small cap at +100 HU, smaller than the inner band."""
    from scipy import ndimage

    shape, spacing = (24, 48, 48), (1.0, 1.0, 1.0)
    lesion = ball(shape, spacing, (12, 24, 24), 4)
    distance = ndimage.distance_transform_edt(~lesion)
    inner, shell, outer = distance <= 2, (distance > 2) & (distance < 10), distance >= 10
    cap = shell & (np.arange(48) >= 35)
    assert 0 < cap.sum() < (inner & ~lesion).sum()
    label = np.where(lesion, 2, np.where(inner | cap | outer, 1, 0)).astype(np.uint8)
    image = np.select([lesion, inner, cap, outer], [-20, 300, 100, 40], -100).astype(np.int16)
    assert [lesion.contrast_hu for lesion in measure_lesions(label, image, spacing)] == [-120.0]


def test_other_lesions_are_not_liver():
    """A small lesion inside a hollow one (4-12 mm from its centre, +300 HU): all that lies
    2-10 mm around the small one is tumour, so it is compared with the whole liver (+100)."""
    shape, spacing = (24, 48, 48), (2.0, 1.0, 1.0)
    centre = (12, 24, 24)
    small, hollow = ball(shape, spacing, centre, 2), ball(shape, spacing, centre, 12) & ~ball(shape, spacing, centre, 4)
    label = np.where(small | hollow, 2, 1).astype(np.uint8)
    image = np.select([small, hollow], [0, 300], LIVER_HU).astype(np.int16)
    contrasts = {lesion.voxels: lesion.contrast_hu for lesion in measure_lesions(label, image, spacing)}
    assert contrasts == {int(small.sum()): -100.0, int(hollow.sum()): 200.0}


def test_contrast_falls_back_to_the_whole_liver():
    image, label, spacing = faint_case()
    contrasts = sorted(lesion.contrast_hu for lesion in measure_lesions(label, image, spacing))
    assert contrasts == [-80.0, 10.0]


def test_contrast_is_none_without_liver():
    image, label, spacing = faint_case()
    label[label == 1] = 0
    assert [lesion.contrast_hu for lesion in measure_lesions(label, image, spacing)] == [None, None]


def test_heterogeneity_is_the_interquartile_range_of_lesions_of_ten_voxels_or_more():
    image, label, spacing, masks = lesion_case()
    by_size = {lesion.voxels: lesion for lesion in measure_lesions(label, image, spacing)}
    assert by_size[masks["A"].sum()].iqr_hu == 0.0 and by_size[masks["B"].sum()].iqr_hu == 0.0
    assert by_size[masks["C"].sum()].iqr_hu == 250.0  # a quarter of C is its -50 HU core
    assert by_size[1].iqr_hu is None  # single voxels are not measurable


@pytest.mark.parametrize("radius_mm, spacing", [(4, (2.0, 1.0, 1.0)), (8, (2.0, 1.0, 1.0)),
                                                 (12, (3.0, 0.9, 0.9)), (6, (1.0, 0.7, 0.7))])
def test_equivalent_diameter_of_a_ball(radius_mm, spacing):
    shape = tuple(int(3 * radius_mm / s) for s in spacing)
    mask = ball(shape, spacing, tuple(n // 2 for n in shape), radius_mm)
    n = int(mask.sum())
    volume = n * np.prod(spacing)
    assert equivalent_diameter(volume) == pytest.approx((6 * n * np.prod(spacing) / math.pi) ** (1 / 3))
    assert equivalent_diameter(volume) == pytest.approx(2 * radius_mm, rel=0.08)


@pytest.mark.parametrize("diameter, name", [(0.5, "<10"), (9.99, "<10"), (10.0, "10-20"), (19.99, "10-20"),
                                            (20.0, "20-60"), (60.0, "20-60"), (60.01, ">60")])
def test_diameter_bins(diameter, name):
    assert diameter_bin(diameter) == name


def test_liver_noise_of_white_noise():
    """x − mean3×3(x) = (8/9)·x0 − (1/9)·(the 8 neighbours): for independent voxels of variance
    v its variance is (64/81 + 8/81)·v = (8/9)·v. Rounding to int16 adds independent uniform
    noise of variance 1/12, so v = σ² + 1/12."""
    image, label, _ = noise_case()
    expected = math.sqrt(8 / 9 * (NOISE_SD ** 2 + 1 / 12))
    assert liver_noise(image, label) == pytest.approx(expected, rel=0.02)
    assert abs(liver_noise(image, label) - NOISE_SD) > 0.04 * NOISE_SD  # it is not the plain SD


def test_liver_noise_erodes_in_plane_only():
    """A liver three 5 mm slices thick still has a noise measure (a 3-voxel erosion through
    the plane would leave nothing)."""
    image, label, _ = noise_case()
    label[:5], label[8:] = 0, 0
    assert liver_noise(image, label) == pytest.approx(math.sqrt(8 / 9 * (NOISE_SD ** 2 + 1 / 12)), rel=0.05)


def test_liver_noise_ignores_the_liver_edge():
    image, label, _ = noise_case()
    image[label == 1] = LIVER_HU  # noise outside the liver only: the eroded liver sees none
    assert liver_noise(image, label) == 0.0
    assert liver_noise(image, np.zeros_like(label)) is None


@pytest.mark.parametrize("slices, whole", [((2, 20), True), ((0, 20), False), ((2, 24), False),
                                           ((0, 24), False), ((0, 0), None)])
def test_liver_whole_in_z(slices, whole):
    label = np.zeros((24, 8, 8), np.uint8)
    label[slices[0]:slices[1], 2:6, 2:6] = 1
    assert liver_whole_in_z(label) is whole


def test_tumour_at_the_edge_counts_as_liver_for_coverage():
    label = np.zeros((24, 8, 8), np.uint8)
    label[2:23, 2:6, 2:6] = 1
    label[23, 3, 3] = 2
    assert liver_whole_in_z(label) is False


def test_case_read_back_from_files(folder):
    """Through load_case: the canonical arrays whatever the storage orientation."""
    stats = measure_source(CaseSource("volume-2", folder / "volume-2.nii.gz", folder / "segmentation-2.nii.gz"))
    image, label, spacing = faint_case()
    assert stats == {"case": "volume-2", **case_stats(image, label, spacing)}
    assert stats["spacing_mm"] == [3.0, 0.9, 0.9] and stats["liver_whole_z"] is True


def test_summary_of_the_folder(folder):
    cases, skipped = measure_folder(folder)
    assert [c["case"] for c in cases] == ["volume-0", "volume-1", "volume-2"]
    assert sorted(r.case for r in skipped) == ["volume-3", "volume-4"]
    summary = summarise(cases, skipped=len(skipped))
    assert summary["cases"] == 3 and summary["skipped"] == 2
    assert summary["tumour_free_fraction"] == pytest.approx(1 / 3)
    assert summary["lesions"] == 7
    assert summary["lesions_per_tumour_case"] == {"mean": 3.5, "median": 3.5, "p90": pytest.approx(4.7), "max": 5}
    # < 10 mm: B (8), the corner voxels (1.6 each), the isolated ball (5.7); 10-20: A, C; 20-60: the faint one
    assert summary["diameter_fractions"] == pytest.approx({"<10": 4 / 7, "10-20": 2 / 7, "20-60": 1 / 7, ">60": 0})
    # contrasts -150, +50, +100, -150, -150, +10, -80
    assert summary["contrast"] == pytest.approx({"lesions": 7, "median_abs_hu": 100.0,
                                                 "fraction_below_20_hu": 1 / 7, "fraction_hyperdense": 3 / 7})
    assert summary["heterogeneous"] == pytest.approx({"fraction": 1 / 5, "measurable": 5, "not_measurable": 2})
    assert summary["liver_whole_z_fraction"] == pytest.approx(2 / 3)
    assert cases[1]["noise_sd_hu"] == pytest.approx(math.sqrt(8 / 9 * (NOISE_SD ** 2 + 1 / 12)), rel=0.02)
    assert summary["pixel_mm"] == [0.8, 1.0] and summary["slice_mm"] == [2.0, 3.0]  # float32 0.8 rounded


def test_summary_of_noise_and_spacing():
    def case(noise, spacing):
        return {"lesions": [], "liver_whole_z": None, "noise_sd_hu": noise, "spacing_mm": spacing}

    summary = summarise([case(10.0, [5.0, 0.6, 0.6]), case(30.0, [1.0, 0.8, 0.8]),
                         case(12.0, [2.5, 0.7, 0.7]), case(None, [0.7, 0.9, 0.9])])
    assert summary["liver_noise"] == {"cases": 3, "median_sd_hu": 12.0, "median_pixel_mm": 0.7}
    assert summary["pixel_mm"] == [0.6, 0.9] and summary["slice_mm"] == [0.7, 5.0]
    assert summary["liver_whole_z_fraction"] is None and summary["lesions_per_tumour_case"] is None
    assert summary["contrast"]["median_abs_hu"] is None


def test_cli(folder, tmp_path):
    result = CliRunner().invoke(main, ["stats", str(folder), "--json", str(tmp_path / "s.json"),
                                       "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    # the progress bar (stderr, mixed in here) may precede a line, but each case is one line
    rejected = [line for line in result.output.splitlines() if "rejected " in line]
    assert len(rejected) == 2
    assert any("volume-3.nii.gz: truncated or corrupt gzip data" in line for line in rejected)
    assert any("volume-4.nii: missing label file" in line for line in rejected)
    assert "cases (skipped)" in result.output and "3 (2)" in result.output
    written = json.loads((tmp_path / "s.json").read_text())
    assert written["summary"] == summarise(written["cases"], skipped=2)
    assert written["summary"]["lesions"] == 7 and len(written["skipped"]) == 2


def test_cli_on_a_folder_without_cases(tmp_path):
    result = CliRunner().invoke(main, ["stats", str(tmp_path)])
    assert result.exit_code == 1 and "no cases found" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
