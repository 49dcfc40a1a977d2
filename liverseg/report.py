"""The evaluation's outputs for people: metrics.csv, bar charts, slice panels and one
self-contained report.html (the W&B run: ``liverseg.tracking``). No torch here.

Figures are built as ``matplotlib.figure.Figure`` on an Agg canvas rather than through
pyplot, so nothing global (the backend, pyplot's figure registry) is touched and the
functions are safe to call from threads.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from shardgen.io import atomic_path, write_text_atomic
from shardgen.labels import CLASS_RGB, OVERLAY_ALPHA, SCORED_CLASSES, overlay
from shardgen.preprocess import quantise, window_scaled

from .vocabulary import METRICS, UNITS

CSV_COLUMNS = ("case", "variant", "class", *METRICS, "seconds")
NUMERIC_COLUMNS = frozenset((*METRICS, "seconds"))
CLASS_COLOURS = {name: to_hex(rgb) for name, rgb in CLASS_RGB.items()}
LABEL_CMAP = ListedColormap(["black", CLASS_COLOURS["liver"], CLASS_COLOURS["tumour"]])
DPI = 100
NA = "–"


# ---------------------------------------------------------------- small helpers

def is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(float(value))


def as_float(value: Any) -> float:
    """A number, or NaN for anything missing or not a number."""
    return float(value) if is_number(value) else math.nan


def dig(data: Any, *keys: str) -> Any:
    """``data[k1][k2]...``, or None where any level is missing."""
    for key in keys:
        if not isinstance(data, Mapping) or key not in data:
            return None
        data = data[key]
    return data


def variant_order(summary: Mapping, rows: Iterable[Mapping]) -> list[str]:
    """Variants in the order given: the summary's first, then any only seen in rows."""
    names = list(dig(summary, "variants") or {})
    return names + [v for v in dict.fromkeys(str(r["variant"]) for r in rows) if v not in names]


def case_order(rows: Iterable[Mapping]) -> list[str]:
    return list(dict.fromkeys(str(r["case"]) for r in rows))


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Path, metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, metadata=metadata)
    return path


# ---------------------------------------------------------------- CSV

def write_csv(rows: Sequence[Mapping], path: Path) -> None:
    """metrics.csv: one line per case x variant x class, columns ``CSV_COLUMNS``.
    Numbers are written exactly (``repr``); an undefined metric (NaN), a missing one or
    None is written as ``nan``, which ``float()`` reads back. A row with a key that is not
    a column is refused (ValueError), so that no metric can be dropped unnoticed."""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, restval="nan")  # a key not in the columns raises
        writer.writeheader()
        for row in rows:
            writer.writerow({k: repr(as_float(v)) if k in NUMERIC_COLUMNS else v for k, v in row.items()})


# ---------------------------------------------------------------- charts

Series = tuple[str, Sequence[float], "Sequence[float] | None", Any]  # label, heights, errors, colour


def grouped_bars(ax, groups: Sequence[str], series: Sequence[Series], mark_missing: bool = True) -> list[Patch]:
    """One group of bars per entry of ``groups``, one bar per series (label, heights,
    errors or None, colour). NaN heights are skipped and, if asked, marked "n/a".
    Returns legend handles: a series with no bar at all still gets its own colour."""
    x = np.arange(len(groups), dtype=float)
    width = 0.8 / max(len(series), 1)
    for i, (label, heights, errors, colour) in enumerate(series):
        pos = x - 0.4 + width * (i + 0.5)
        h = np.array([as_float(v) for v in heights])
        ok = np.isfinite(h)
        yerr = None
        if errors is not None:
            yerr = np.nan_to_num(np.array([as_float(e) for e in errors])[ok], nan=0.0)
        ax.bar(pos[ok], h[ok], width, yerr=yerr, capsize=3 if yerr is not None else 0,
               color=colour, label=label)
        if mark_missing:
            for p in pos[~ok]:
                ax.text(p, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90, color="grey",
                        clip_on=True)
    ax.set_xlim(-0.6, len(groups) - 0.4)  # all-NaN data would otherwise leave the limits collapsed
    crowded = len(groups) > 3
    ax.set_xticks(x, [str(g) for g in groups], rotation=30 if crowded else 0, ha="right" if crowded else "center")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.grid(axis="y", alpha=0.3)
    return [Patch(color=colour, label=label) for label, _, _, colour in series]


def variant_colours(variants: Sequence[str]) -> dict[str, Any]:
    cmap = colormaps["tab10"]
    return {v: cmap(i % 10) for i, v in enumerate(variants)}


def metric_chart(summary: Mapping, variants: Sequence[str], metric: str, path: Path) -> Path:
    """Mean ± std of one metric over cases, liver and tumour bars side by side per variant."""
    fig = new_figure(max(6.0, 1.4 * len(variants) + 2.5), 4.5)
    ax = fig.add_subplot()
    series = [(cls, [as_float(dig(summary, "variants", v, cls, metric, "mean")) for v in variants],
               [as_float(dig(summary, "variants", v, cls, metric, "std")) for v in variants],
               CLASS_COLOURS[cls]) for cls in SCORED_CLASSES]
    handles = grouped_bars(ax, variants, series)
    ax.set_title(f"{metric}: mean ± std over cases")
    ax.set_ylabel(f"{metric} ({UNITS[metric]})" if metric in UNITS else metric)
    ax.legend(handles=handles, fontsize=8)
    return save_figure(fig, path)


def per_case_dice_chart(rows: Sequence[Mapping], variants: Sequence[str], path: Path) -> Path:
    """Dice of every case, one bar per variant, one panel per class."""
    cases = case_order(rows)
    dice = {(str(r["case"]), str(r["variant"]), r["class"]): as_float(r.get("dice")) for r in rows}
    width = min(24.0, max(8.0, 1.5 + len(cases) * (0.12 * len(variants) + 0.15)))
    fig = new_figure(width, 7.5)
    colours = variant_colours(variants)
    for i, cls in enumerate(SCORED_CLASSES):
        ax = fig.add_subplot(len(SCORED_CLASSES), 1, i + 1)
        series = [(v, [dice.get((c, v, cls), math.nan) for c in cases], None, colours[v]) for v in variants]
        handles = grouped_bars(ax, cases, series, mark_missing=False)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(f"{cls} Dice")
        ax.tick_params(axis="x", labelsize=7 if len(cases) > 20 else 9)
        if i == 0:
            ax.set_title("Dice per case (no bar: 0 or undefined)")
            ax.legend(handles=handles, fontsize=8, ncols=min(len(variants), 5))
    return save_figure(fig, path)


DETECTION_RULES = (("recall", "found at IoU > 0.5"), ("recall_any", "found at any overlap"))


def detection_chart(summary: Mapping, variants: Sequence[str], path: Path) -> Path | None:
    """Tumour lesions found by lesion size, at IoU > 0.5 and at any overlap (one panel each),
    one bar per variant; None without size bins."""
    by_size = {v: dig(summary, "variants", v, "detection", "by_size") or [] for v in variants}
    bins = list(dict.fromkeys(str(b["bin"]) for v in variants for b in by_size[v]))
    if not bins:
        return None
    fig = new_figure(max(6.0, 1.2 * len(bins) * max(len(variants), 2) / 2 + 2.5), 7.5)
    colours = variant_colours(variants)
    lookup = {(v, str(b["bin"])): b for v in variants for b in by_size[v]}
    # the lesion count is the ground truth's, the same for every variant
    lesions = {b: e.get("lesions") for (_, b), e in reversed(lookup.items())}
    labels = [f"{b}\n({lesions[b]} lesions)" if lesions.get(b) is not None else b for b in bins]
    for i, (key, rule) in enumerate(DETECTION_RULES):
        ax = fig.add_subplot(len(DETECTION_RULES), 1, i + 1)
        series = [(v, [as_float(dig(lookup.get((v, b)), key)) for b in bins], None, colours[v]) for v in variants]
        handles = grouped_bars(ax, labels, series)
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("fraction of lesions")
        ax.set_title(f"tumour lesions {rule}, by equivalent diameter")
        if i == 0:
            ax.legend(handles=handles, fontsize=8)
    return save_figure(fig, path)


def write_charts(rows: Sequence[Mapping], summary: Mapping, out_dir: Path) -> list[Path]:
    """PNG charts in ``out_dir``: ``metric-<name>.png`` for each of ``METRICS``, then
    ``dice-per-case.png`` and, when the summary has lesion size bins, ``detection-by-size.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = variant_order(summary, rows)
    charts = [metric_chart(summary, variants, m, out_dir / f"metric-{m}.png") for m in METRICS]
    if rows:
        charts.append(per_case_dice_chart(rows, variants, out_dir / "dice-per-case.png"))
    detection = detection_chart(summary, variants, out_dir / "detection-by-size.png")
    return charts + ([detection] if detection else [])


# ---------------------------------------------------------------- panels

def outline(ax, mask: np.ndarray, colour: str) -> None:
    if mask.any() and not mask.all():  # contour() warns on a constant image
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.2)


def write_panel(panel: Mapping, path: Path) -> Path:
    """One PNG, four images side by side: CT in its window | truth | prediction | CT with the
    true outlines and the prediction filled in. ``panel["case"]``, if given, is stored in the
    PNG's text metadata so ``log_wandb`` can put the panel next to that case."""
    ct, truth, pred = (np.asarray(panel[k]) for k in ("ct", "truth", "pred"))
    lo, hi = panel["window"]
    height, width = ct.shape
    side = 3.6
    fig = new_figure(4 * side * width / height + 0.4, side + 1.1)
    axes = fig.subplots(1, 4)
    grey = {"cmap": "gray", "vmin": lo, "vmax": hi, "interpolation": "nearest"}
    labels = {"cmap": LABEL_CMAP, "vmin": 0, "vmax": 2, "interpolation": "nearest"}
    axes[0].imshow(ct, **grey)
    axes[1].imshow(truth, **labels)
    axes[2].imshow(pred, **labels)
    axes[3].imshow(overlay(quantise(window_scaled(ct, (lo, hi))), pred), interpolation="nearest")
    outline(axes[3], truth >= 1, CLASS_COLOURS["liver"])
    outline(axes[3], truth == 2, CLASS_COLOURS["tumour"])
    for ax, name in zip(axes, ("CT", "ground truth", "prediction", "overlay")):
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()
    fig.suptitle(str(panel.get("title", "")), fontsize=11)
    fig.legend(handles=panel_legend(), loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    metadata = {"Title": str(panel.get("title", ""))}
    if panel.get("case") is not None:
        metadata["Case"] = str(panel["case"])
    return save_figure(fig, Path(path), metadata)


def panel_legend() -> list:
    return [Patch(color=CLASS_COLOURS["liver"], alpha=OVERLAY_ALPHA, label="liver (predicted, filled)"),
            Patch(color=CLASS_COLOURS["tumour"], alpha=OVERLAY_ALPHA, label="tumour (predicted, filled)"),
            Line2D([], [], color=CLASS_COLOURS["liver"], label="liver (truth, outline)"),
            Line2D([], [], color=CLASS_COLOURS["tumour"], label="tumour (truth, outline)")]


# ---------------------------------------------------------------- HTML

def fmt(value: Any) -> str:
    """A table cell: NaN/None as "–", integers as such, floats to 3 decimals."""
    if value is None or (is_number(value) and not math.isfinite(float(value))):
        return NA
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    if is_number(value):
        v = float(value)
        return f"{v:.3f}" if abs(v) < 1e4 else f"{v:.4g}"
    return str(value)


def timing_cell(key: str, value: Any) -> str:
    """A timings entry with its unit: keys ending in ``_s`` (or ``_s_mean``) are seconds."""
    return f"{fmt(value)} s" if key.endswith(("_s", "_s_mean")) else fmt(value)


def mean_std(stats: Any) -> str:
    mean, std = dig(stats, "mean"), dig(stats, "std")
    if not finite(mean):
        return NA
    return fmt(mean) + (f" ± {fmt(std)}" if finite(std) else "")


def table(header: Sequence[str], body: Iterable[Sequence[Any]], cls: str = "") -> str:
    """An HTML table; every cell goes through ``fmt`` and ``html.escape``."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in row) + "</tr>\n"
                   for row in body)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>\n{rows}</tbody></table>\n"


def class_table(summary: Mapping, variants: Sequence[str], cls: str) -> str:
    header = ["variant", "global Dice", *(f"{m} ({UNITS[m] + ', ' if m in UNITS else ''}mean ± std)" for m in METRICS)]
    body = [[v, dig(summary, "variants", v, cls, "dice_global"),
             *(mean_std(dig(summary, "variants", v, cls, m)) for m in METRICS)] for v in variants]
    return table(header, body)


def detection_table(summary: Mapping, variants: Sequence[str]) -> str:
    bins = list(dict.fromkeys(str(b["bin"]) for v in variants
                              for b in dig(summary, "variants", v, "detection", "by_size") or []))
    keys = ("tp", "fp", "fn", "precision", "recall", "touched", "recall_any", "lesion_dice_mean")
    header = ["variant", *keys, *(f"recall {b}" for b in bins), "burden RMSE", "burden max"]
    body = []
    for v in variants:
        det = dig(summary, "variants", v, "detection") or {}
        size = {str(b["bin"]): b for b in det.get("by_size") or []}
        body.append([v, *(det.get(k) for k in keys), *(size_cell(size.get(b)) for b in bins),
                     dig(summary, "variants", v, "burden", "rmse"), dig(summary, "variants", v, "burden", "max")])
    return table(header, body)


def size_cell(entry: Mapping | None, found: str = "detected", fraction: str = "recall") -> str:
    if entry is None:
        return NA
    return f"{fmt(entry.get(fraction))} ({fmt(entry.get(found))}/{fmt(entry.get('lesions'))})"


def count_cell(fraction: Any, part: Any, whole: Any) -> str:
    """"0.750 (3/4)"; "–" without a whole."""
    if not is_number(whole):
        return NA
    return f"{fmt(fraction)} ({fmt(part)}/{fmt(whole)})"


def scorecard_rows(variant: Mapping) -> list[tuple[str, str]]:
    """The lesion scorecard of one variant's summary (``summary["variants"][name]``) as
    (row, text) pairs, the rows both the printed table and report.html show; docs/METRICS.md
    defines each. Parts missing from an older summary show as "–"."""
    det = dig(variant, "detection") or {}
    bins = det.get("by_size") or []
    rows = [(f"found IoU>0.5 {b['bin']}", size_cell(b)) for b in bins]
    rows += [(f"found any overlap {b['bin']}", size_cell(b, "touched", "recall_any")) for b in bins]
    tp, fp = det.get("tp"), det.get("fp")
    free = det.get("tumour_free") or {}
    rows += [("lesion precision IoU>0.5",
              count_cell(det.get("precision"), tp, tp + fp if is_number(tp) and is_number(fp) else None)),
             ("tumour-free w/o false lesion",
              count_cell(free.get("fraction"), free.get("without_false_lesion"), free.get("cases"))),
             ("tumour Dice pooled", fmt(dig(variant, "tumour", "dice_global"))),
             ("tumour Dice per case", fmt(dig(variant, "tumour", "dice", "mean"))),
             ("oracle Dice per case", fmt(dig(variant, "oracle", "dice_mean"))),
             ("Dice per case / oracle", fmt(dig(variant, "oracle", "fraction")))]
    return rows


def scorecard_table(summary: Mapping, variants: Sequence[str]) -> str:
    """One row per scorecard line, one column per variant."""
    cards = [dict(scorecard_rows(dig(summary, "variants", v) or {})) for v in variants]
    names = list(dict.fromkeys(name for card in cards for name, _ in card.items()))
    return table(["lesion scorecard", *variants], [[n, *(card.get(n, NA) for card in cards)] for n in names])


def oracle_note(summary: Mapping) -> str:
    """What the scorecard's oracle is, with the thresholds the run used."""
    visible = summary.get("oracle") or {}
    if not all(finite(visible.get(k)) for k in ("min_cm3", "min_hu")):
        return ""
    return (f"<p>Oracle: a prediction of exactly the reference lesions of ≥ {float(visible['min_cm3']):g} cm³ "
            f"whose median HU differs from the liver around them by ≥ {float(visible['min_hu']):g} HU; "
            "lesions are 6-connected (docs/METRICS.md).</p>\n")


def image_figure(path: Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>\n")


def json_block(data: Any) -> str:
    text = json.dumps(data, indent=2, default=str, ensure_ascii=False)
    return f"<pre>{html.escape(text)}</pre>\n"


STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f2f2f2}
td:first-child,th:first-child{text-align:left}
img{max-width:100%;height:auto}figure{margin:1em 0}pre{background:#f7f7f7;padding:.8em;overflow:auto}"""


def html_sections(summary: Mapping, rows: Sequence[Mapping], charts: Sequence[Path],
                  panels: Sequence[Path]) -> list[str]:
    variants = variant_order(summary, rows)
    failed = summary.get("failed") or []
    parts = [f"<p>{html.escape(fmt(summary.get('cases')))} cases evaluated, {len(failed)} failed; "
             f"variants: {html.escape(', '.join(variants))}.</p>\n"]
    for cls in SCORED_CLASSES:
        parts += [f"<h2>{cls}</h2>\n", class_table(summary, variants, cls)]
    parts += ["<h2>lesion scorecard</h2>\n", scorecard_table(summary, variants), oracle_note(summary)]
    parts += ["<h2>tumour detection and burden</h2>\n", detection_table(summary, variants)]
    parts += ["<h2>failed cases</h2>\n",
              table(["case", "error"], [[f.get("case"), f.get("error")] for f in failed]) if failed
              else "<p>none</p>\n"]
    timings = summary.get("timings") or {}
    parts += ["<h2>timings</h2>\n", table(["what", "value"], [(k, timing_cell(k, v)) for k, v in timings.items()])]
    parts += ["<h2>charts</h2>\n", *(image_figure(p, Path(p).stem) for p in charts)]
    parts += ["<h2>panels</h2>\n", *(image_figure(p, Path(p).stem) for p in panels)]
    parts += ["<h2>per case</h2>\n<details><summary>every case, variant and class</summary>\n",
              table(CSV_COLUMNS, [[r.get(k) for k in CSV_COLUMNS] for r in rows], "cases"), "</details>\n"]
    shown = {"variants", "cases", "failed", "timings", "config", "oracle"}
    parts += ["<h2>config</h2>\n", json_block(summary.get("config", {}))]
    rest = {k: v for k, v in summary.items() if k not in shown}
    if rest:
        parts += ["<h2>run</h2>\n", json_block(rest)]
    return parts


def write_html(summary: Mapping, rows: Sequence[Mapping], charts: Sequence[Path], panels: Sequence[Path],
               path: Path, title: str = "liverseg evaluation") -> Path:
    """One self-contained report.html: tables, charts and panels (PNG as base64 data URIs),
    no scripts, no external files. All text is escaped; NaN shows as "–"."""
    body = "".join(html_sections(summary, rows, charts, panels))
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n"
            f"<body><h1>{html.escape(title)}</h1>\n{body}</body></html>\n")
    path = Path(path)
    return write_text_atomic(path, page)


def slug(text: str) -> str:
    """Lower-case letters and digits, runs of anything else as one "-": the file names of
    the panels, and how ``panels_by_case`` finds a case's name in them."""
    return "-".join(re.findall(r"[a-z0-9]+", str(text).lower()))
