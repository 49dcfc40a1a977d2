"""The evaluation report: metrics.csv read back through csv, PNG charts and panels,
a self-contained escaped report.html, and an offline W&B run holding the summary."""

from __future__ import annotations

import csv
import json
import math
import re
import struct

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from PIL import Image

from liverseg import report, tracking
from liverseg.vocabulary import METRICS

NAN = math.nan
VARIANTS = ("unet", "ensemble+postprocess")
CASES = ("volume-1", "volume-2", "<b>bold</b>")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def scores(seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    return {m: float(v) for m, v in zip(METRICS, rng.uniform(0.1, 0.95, len(METRICS)))}


def make_rows() -> list[dict]:
    rows = []
    for i, case in enumerate(CASES):
        for j, variant in enumerate(VARIANTS):
            for cls in ("liver", "tumour"):
                row = {"case": case, "variant": variant, "class": cls, **scores(10 * i + j), "seconds": 1.5 + i}
                if cls == "tumour" and case == "volume-2":  # no tumour: surface distances undefined
                    row.update(dice=NAN, hd95=NAN, assd=NAN)
                rows.append(row)
    return rows


def stats(mean: float, std: float) -> dict[str, float]:
    return {"mean": mean, "std": std, "median": mean, "min": mean - std, "max": mean + std}


def make_summary() -> dict:
    variants = {}
    for j, variant in enumerate(VARIANTS):
        classes = {cls: {"dice_global": 0.9 - 0.3 * k,
                         **{m: stats(0.8 - 0.1 * k + 0.01 * j, 0.05) for m in METRICS}}
                   for k, cls in enumerate(("liver", "tumour"))}
        classes["tumour"]["hd95"] = stats(NAN, NAN)  # undefined everywhere: a skipped bar
        by_size = [{"bin": "<10 mm", "lesions": 4, "detected": 1 + j, "recall": (1 + j) / 4,
                    "touched": 3, "recall_any": 0.75},
                   {"bin": "10-20 mm", "lesions": 0, "detected": 0, "recall": NAN, "touched": 0, "recall_any": NAN},
                   {"bin": ">=20 mm", "lesions": 2, "detected": 2, "recall": 1.0, "touched": 2, "recall_any": 1.0}]
        variants[variant] = {**classes,
                             "detection": {"tp": 3 + j, "fp": 1, "fn": 3 - j, "precision": (3 + j) / (4 + j),
                                           "recall": 0.5, "touched": 5, "recall_any": 5 / 6,
                                           "lesion_dice_mean": NAN, "by_size": by_size,
                                           "tumour_free": {"cases": 2, "without_false_lesion": 1 + j,
                                                           "fraction": (1 + j) / 2}},
                             "oracle": {"cases": 3, "dice_mean": 0.8, "tumour_dice_mean": 0.6 + 0.1 * j,
                                        "fraction": (0.6 + 0.1 * j) / 0.8},
                             "burden": {"rmse": 0.012, "max": 0.03}}
    return {"variants": variants, "cases": len(CASES), "oracle": {"min_cm3": 0.5, "min_hu": 20.0},
            "failed": [{"case": "volume-9", "error": "InvalidCase: shape mismatch <image>"}],
            "timings": {"predict_s_mean": 1.25, "total_s": 12.0},
            "config": {"checkpoints": ["a", "b"], "tta": "flip"}}


def make_panel(height: int = 40, width: int = 48, case: str | None = None) -> dict:
    yy, xx = np.mgrid[:height, :width]
    truth = np.zeros((height, width), np.uint8)
    truth[(yy - 20) ** 2 + (xx - 24) ** 2 < 150] = 1
    truth[(yy - 20) ** 2 + (xx - 24) ** 2 < 20] = 2
    pred = np.roll(truth, 2, axis=1)
    ct = np.where(truth > 0, 100.0, -50.0) + np.random.default_rng(0).normal(0, 10, (height, width))
    panel = {"title": f"best case {case or 'volume-1'}, slice 41", "ct": ct, "truth": truth, "pred": pred,
             "window": (-100, 200)}
    return panel if case is None else {**panel, "case": case}


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Everything written once: the report functions are the slow part of these tests."""
    out = tmp_path_factory.mktemp("eval")
    rows, summary = make_rows(), make_summary()
    charts = report.write_charts(rows, summary, out / "charts")
    panels = [report.write_panel(make_panel(case="volume-1"), out / "panels" / "00-best.png"),
              report.write_panel(make_panel(), out / "panels" / "01-best-case-volume-1.png")]
    html = report.write_html(summary, rows, charts, panels, out / "report.html")
    return {"out": out, "rows": rows, "summary": summary, "charts": charts, "panels": panels, "html": html}


def test_csv_round_trips_with_the_columns_and_nan(tmp_path):
    rows = make_rows()
    report.write_csv(rows, tmp_path / "sub" / "metrics.csv")
    with (tmp_path / "sub" / "metrics.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        back = list(reader)
    assert reader.fieldnames == ["case", "variant", "class", *METRICS, "seconds"]
    assert len(back) == len(rows)
    for original, read in zip(rows, back):
        assert (read["case"], read["variant"], read["class"]) == (original["case"], original["variant"],
                                                                   original["class"])
        for key in (*METRICS, "seconds"):
            value = float(read[key])
            assert (math.isnan(value) and math.isnan(original[key])) or value == original[key], key
    assert sum(read["dice"] == "nan" for read in back) == 2


def test_charts_are_pngs_one_per_metric_plus_per_case_and_detection(outputs):
    charts = outputs["charts"]
    names = [p.name for p in charts]
    assert names == [f"metric-{m}.png" for m in METRICS] + ["dice-per-case.png", "detection-by-size.png"]
    for path in charts:
        assert path.parent == outputs["out"] / "charts"
        width, height = png_size(path)
        assert 300 < width <= 2400 and 200 < height <= 1000, path.name


def test_charts_survive_missing_summary_parts(tmp_path):
    rows = [r for r in make_rows() if r["variant"] == "unet"]
    summary = {"variants": {"unet": {"liver": {"dice": stats(NAN, NAN)}}}, "cases": 3}
    names = [p.name for p in report.write_charts(rows, summary, tmp_path)]
    assert names == [f"metric-{m}.png" for m in METRICS] + ["dice-per-case.png"]  # no size bins, no chart


@pytest.mark.parametrize("height, width", [(40, 48), (64, 32)], ids=["landscape", "portrait"])
def test_panel_is_four_images_side_by_side(tmp_path, height, width):
    path = report.write_panel(make_panel(height, width), tmp_path / "p.png")
    png_w, png_h = png_size(path)
    image_aspect = 4 * width / height  # four images in a row
    assert 0.6 * image_aspect < png_w / png_h < image_aspect * 1.1


LABEL_RGB = np.array([(0.0, 0.0, 0.0), to_rgb("#2ca02c"), to_rgb("#d62728")])  # background, liver, tumour


def panel_images(path, shape: tuple[int, int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The four images of a panel PNG, each sampled at the centre of every slice pixel
    (RGB in 0..1, ``shape`` + (3,)), and each image's area of the PNG at full resolution.
    The label images are found by their black background; the other two lie beside them
    at the same spacing."""
    png = np.asarray(Image.open(path).convert("RGB")).astype(float) / 255
    black = png.max(axis=2) == 0
    per_column = black.sum(axis=0)
    columns = np.flatnonzero(per_column > 0.25 * per_column.max())
    runs = np.split(columns, np.flatnonzero(np.diff(columns) > 1) + 1)
    assert len(runs) == 2, f"{len(runs)} black-background images, expected truth and prediction"
    per_row = black[:, runs[0][0]:runs[0][-1] + 1].sum(axis=1)
    rows = np.flatnonzero(per_row > 0.25 * per_row.max())
    step = runs[1][0] - runs[0][0]
    left = [runs[0][0] - step, runs[0][0], runs[1][0], runs[1][0] + step]
    width, height = runs[0][-1] - runs[0][0] + 1, rows[-1] - rows[0] + 1
    centres_y = (rows[0] + (np.arange(shape[0]) + 0.5) * height / shape[0]).astype(int)
    sampled = [png[centres_y][:, (x + (np.arange(shape[1]) + 0.5) * width / shape[1]).astype(int)] for x in left]
    areas = [png[rows[0]:rows[-1] + 1, x:x + width] for x in left]
    return sampled, areas


def two_masks() -> dict:
    """A slice where truth and prediction disagree: each has liver and a tumour elsewhere."""
    truth, pred = np.zeros((2, 40, 48), np.uint8)
    truth[8:32, 4:28] = 1
    truth[14:22, 8:16] = 2  # missed: the prediction has background there
    pred[8:32, 20:44] = 1
    pred[18:26, 32:40] = 2  # a false tumour, where the truth has background
    return {"title": "t", "ct": np.where(truth > 0, 100.0, -50.0), "truth": truth, "pred": pred,
            "window": (-100, 200)}


def near_edges(labels: np.ndarray) -> np.ndarray:
    """Pixels within one pixel of a class boundary, where outlines are drawn."""
    from scipy import ndimage

    edges = np.zeros(labels.shape, bool)
    for k in (1, 2):
        mask = labels >= k
        edges |= ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)
    return ndimage.binary_dilation(edges)


def test_panel_shows_ct_truth_prediction_and_the_prediction_over_the_ct(tmp_path):
    panel = two_masks()
    (ct, truth, pred, overlay), areas = panel_images(report.write_panel(panel, tmp_path / "p.png"), (40, 48))
    grey = np.clip((panel["ct"] + 100) / 300, 0, 1)[..., None]  # the CT in its window
    assert np.abs(ct - grey).max() < 0.01
    assert np.abs(truth - LABEL_RGB[panel["truth"]]).max() < 0.01
    assert np.abs(pred - LABEL_RGB[panel["pred"]]).max() < 0.01
    # the overlay: the CT where nothing is predicted, the class colour blended in where it is
    plain = (panel["pred"] == 0) & ~near_edges(panel["truth"])
    assert np.abs(overlay[plain] - grey[plain]).max() < 0.01
    liver = overlay[(panel["pred"] == 1) & ~near_edges(panel["truth"])]
    tumour = overlay[(panel["pred"] == 2) & ~near_edges(panel["truth"])]
    assert (liver[:, 1] > liver[:, [0, 2]].max(axis=1) + 0.1).all()
    assert (tumour[:, 0] > tumour[:, 1:].max(axis=1) + 0.1).all()
    # the missed tumour is outlined in the tumour colour over plain CT
    rows, cols = slice(13 * areas[3].shape[0] // 40, 23 * areas[3].shape[0] // 40), \
        slice(7 * areas[3].shape[1] // 48, 17 * areas[3].shape[1] // 48)
    missed = areas[3][rows, cols]
    assert ((missed[..., 0] > missed[..., 1] + 0.3) & (missed[..., 0] > missed[..., 2] + 0.3)).any()


def test_panel_of_an_empty_slice_shows_no_class(tmp_path):
    empty = {**make_panel(), "truth": np.zeros((40, 48), np.uint8), "pred": np.zeros((40, 48), np.uint8)}
    (ct, truth, pred, overlay), areas = panel_images(report.write_panel(empty, tmp_path / "empty.png"), (40, 48))
    assert not truth.any() and not pred.any()
    assert np.abs(overlay - ct).max() < 0.01 and np.ptp(areas[3], axis=2).max() < 0.01  # grey only


def test_html_is_self_contained_and_escaped(outputs):
    text = outputs["html"].read_text(encoding="utf-8")
    for path in outputs["charts"] + outputs["panels"]:
        assert report.image_figure(path, path.stem) in text, path.name
    assert text.count("data:image/png;base64,") == len(outputs["charts"]) + len(outputs["panels"])
    assert 'src="http' not in text and "<script" not in text and "<link" not in text
    for name in (*VARIANTS, "volume-9", "InvalidCase: shape mismatch &lt;image&gt;", "predict_s_mean"):
        assert name in text, name
    assert "&lt;b&gt;bold&lt;/b&gt;" in text and "<b>bold</b>" not in text
    readable = re.sub(r"data:image/png;base64,[^\"]*", "", text)
    assert "nan" not in readable.lower()
    assert "–" in text  # the NaN cells
    assert "&quot;tta&quot;: &quot;flip&quot;" in text  # the config as escaped JSON


def test_summary_table_shows_mean_and_std(outputs):
    text = outputs["html"].read_text(encoding="utf-8")
    assert "<td>0.810 ± 0.050</td>" in text  # ensemble+postprocess liver mean ± std
    assert "<td>0.250 (1/4)</td>" in text  # unet detection recall in the smallest size bin


def test_scorecard_rows_of_one_variant():
    rows = report.scorecard_rows(make_summary()["variants"]["unet"])
    assert rows == [
        ("found IoU>0.5 <10 mm", "0.250 (1/4)"), ("found IoU>0.5 10-20 mm", "– (0/0)"),
        ("found IoU>0.5 >=20 mm", "1.000 (2/2)"),
        ("found any overlap <10 mm", "0.750 (3/4)"), ("found any overlap 10-20 mm", "– (0/0)"),
        ("found any overlap >=20 mm", "1.000 (2/2)"),
        ("lesion precision IoU>0.5", "0.750 (3/4)"), ("tumour-free w/o false lesion", "0.500 (1/2)"),
        ("tumour Dice pooled", "0.600"), ("tumour Dice per case", "0.700"),
        ("oracle Dice per case", "0.800"), ("Dice per case / oracle", "0.750")]


def test_scorecard_rows_of_a_summary_without_it_are_dashes():
    rows = dict(report.scorecard_rows({"tumour": {"dice_global": 0.5}}))
    assert rows["lesion precision IoU>0.5"] == "–" and rows["Dice per case / oracle"] == "–"
    assert rows["tumour Dice pooled"] == "0.500"


def test_html_has_the_scorecard_of_every_variant(outputs):
    text = outputs["html"].read_text(encoding="utf-8")
    table = text[text.index("<h2>lesion scorecard</h2>"):text.index("<h2>tumour detection and burden</h2>")]
    assert "<th>unet</th><th>ensemble+postprocess</th>" in table
    # precision, then tumour-free cases without a false lesion: unet, then ensemble+postprocess
    assert "<td>lesion precision IoU&gt;0.5</td><td>0.750 (3/4)</td><td>0.800 (4/5)</td>" in table
    assert "<td>tumour-free w/o false lesion</td><td>0.500 (1/2)</td><td>1.000 (2/2)</td>" in table
    assert "<td>found any overlap &lt;10 mm</td><td>0.750 (3/4)</td>" in table
    assert "<td>Dice per case / oracle</td><td>0.750</td><td>0.875</td>" in table
    assert "≥ 0.5 cm³" in table and "≥ 20 HU" in table


def test_flattened_summary_keys():
    flat = tracking.flatten_summary(make_summary())
    assert flat["ensemble+postprocess/liver/dice_mean"] == pytest.approx(0.81)
    assert flat["unet/liver/dice_global"] == 0.9
    assert flat["unet/detection/recall_<10 mm"] == 0.25
    assert flat["unet/detection/recall_any_<10 mm"] == 0.75
    assert flat["unet/detection/tumour_free_fraction"] == 0.5
    assert flat["unet/oracle/fraction"] == pytest.approx(0.75)
    assert flat["unet/burden/rmse"] == 0.012
    assert flat["timings/total_s"] == 12.0 and flat["cases"] == 3 and flat["failed"] == 1
    assert math.isnan(flat["unet/tumour/hd95_mean"])


def test_panels_are_matched_to_their_case(outputs):
    found = tracking.panels_by_case(outputs["panels"], list(CASES) + ["volume-10"])
    assert found == {"volume-1": outputs["panels"][0]}
    by_name = tracking.panels_by_case(outputs["panels"][1:], ["volume-1", "volume-10"])
    assert by_name == {"volume-1": outputs["panels"][1]}  # by the title, not volume-10


def test_wandb_offline_run_holds_the_summary_and_table(outputs, tmp_path, monkeypatch):
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HOME", str(tmp_path))
    run = tracking.log_wandb(outputs["summary"], outputs["rows"], outputs["charts"], outputs["panels"],
                           tmp_path / "eval", mode="offline")
    assert run is not None and run.parent == tmp_path / "eval" / "wandb" and run.name.startswith("offline-run-")
    raw = b"".join(p.read_bytes() for p in run.glob("run-*.wandb"))
    for key in ("ensemble+postprocess/liver/dice_mean", "unet/detection/recall_<10 mm", "timings/total_s",
                "charts/metric-dice", "panels/00-best", "cases_table"):
        assert key.encode() in raw, key
    # W&B stages a table holding images as a run artifact, outside the run folder until synced
    staged = [json.loads(p.read_text()) for p in (tmp_path / "wandb_data_dir").rglob("*")
              if p.is_file() and p.read_bytes()[:1] == b"{"]
    table = next(t for t in staged if t.get("columns", [])[-1:] == ["panel"])
    assert len(table["data"]) == len(outputs["rows"])
    panels = {row[0]: row[-1] for row in table["data"]}
    assert panels["volume-1"]["_type"] == "image-file" and panels["volume-2"] is None
    media = list((run / "files" / "media").rglob("*"))
    assert any(p.name.startswith("cases_table") and p.suffix == ".json" for p in media)
    assert sum(p.suffix == ".png" for p in media) == len(outputs["charts"]) + len(outputs["panels"])


def test_html_gives_the_units_of_distances_and_timings(outputs):
    text = outputs["html"].read_text(encoding="utf-8")
    assert "<th>assd (mm, mean ± std)</th>" in text and "<th>dice (mean ± std)</th>" in text
    assert "<td>predict_s_mean</td><td>1.250 s</td>" in text and "<td>total_s</td><td>12.000 s</td>" in text
