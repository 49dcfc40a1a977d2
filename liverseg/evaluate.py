"""Evaluation behind ``liverseg-eval``: every checkpoint, their ensemble and the
postprocessed ensemble, scored per case the way LiTS scores, then reported.

Cases are split across processes when launched with ``accelerate launch``; each process
predicts and scores its own cases, and the main process gathers the per-case results and
writes metrics.csv, summary.json, the charts, the panels and report.html.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from shardgen.discover import CaseSource, discover, discover_unlabelled, natural_key
from shardgen.errors import InvalidCase
from shardgen.io import write_json_atomic
from shardgen.labels import SCORED_CLASSES
from shardgen.manifest import read_manifest
from shardgen.nifti import is_series, load_case, load_image

from . import __version__, lits, lits_official, oracle, report, tracking
from .config import EvalConfig
from .errors import ConfigError
from .inference import (ENSEMBLE, Member, load_members, predict_volume, prediction_name, tta_note,
                        write_prediction)
from .postprocess import Postprocess, default_postprocess
from .runtime import make_accelerator
from .vocabulary import METRICS

log = logging.getLogger(__name__)
POSTPROCESSED = "ensemble+postprocess"


@dataclass
class CaseResult:
    """What one process found for one case; gathered on the main process."""

    case: str
    scores: dict[str, dict] = field(default_factory=dict)  # variant → lits.score_case(...)
    official: dict[str, dict] = field(default_factory=dict)  # variant → lits_official.score_case(...), if lits
    seconds: dict[str, float] = field(default_factory=dict)
    panel: dict | None = None  # the slice with the most liver, for the best case's panel
    error_panel: dict | None = None  # the slice with the most wrong voxels, for median and worst
    tumour_panel: dict | None = None  # the slice with the most tumour
    oracle_dice: float = math.nan  # tumour Dice of the visible-lesion oracle (liverseg.oracle)
    prediction: str = ""
    error: str = ""


# --------------------------------------------------------------------------- cases

def find_cases(data: str | Path, split: str, with_labels: bool) -> tuple[list[CaseSource], list[dict]]:
    """Cases of a LiTS/MSD folder, or of one split of a shard manifest (read from their
    source NIfTI). Returns the cases and the ones already known to be unusable."""
    data = Path(data)
    manifest = data / "manifest.json" if data.is_dir() else data
    if manifest.name.endswith(".json") and manifest.is_file():
        return cases_from_manifest(manifest, split), []
    if not data.is_dir():
        raise ConfigError(f"{data}: no such folder or shard manifest")
    sources, rejected = discover([data], unlabelled=not with_labels)
    failed = [{"case": r.case, "error": f"{r.file}: {r.reason}"} for r in rejected]
    if with_labels:
        unlabelled = [s for s in sources if s.label is None]
        sources = [s for s in sources if s.label is not None]
        if not sources and (unlabelled or discover_unlabelled(data)):
            raise ConfigError(f"{data}: no image here has a label to score against; "
                              "`liverseg-eval predict` predicts unlabelled images")
        failed += [{"case": s.case, "error": f"{s.image}: missing label file"} for s in unlabelled]
    if not sources and not failed:
        raise ConfigError(f"{data}: no LiTS (volume-N.nii) or MSD Task03 cases found")
    return sorted(sources, key=lambda s: natural_key(s.case)), failed


def cases_from_manifest(path: Path, split: str) -> list[CaseSource]:
    manifest = read_manifest(path)
    chosen = [(case, info) for case, info in manifest.get("cases", {}).items() if info["split"] == split]
    if not chosen:
        raise ConfigError(f"{path}: the manifest has no {split!r} cases")
    return [CaseSource(case, locate(info["image"], path), locate(info.get("label"), path))
            for case, info in sorted(chosen, key=lambda c: natural_key(c[0]))]


def locate(file: str | None, manifest: Path) -> Path | None:
    """A source path from the manifest: as written, or relative to the manifest's folder."""
    if not file or file == "None":
        return None
    path = Path(file)
    if path.exists() or path.is_absolute():
        return path
    return manifest.parent / path


# --------------------------------------------------------------------------- one case

def choose_panels(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, window
                  ) -> tuple[dict, dict, dict | None]:
    """The slice with the most liver (shown for the best case), the one with the most
    voxels whose label is wrong (what makes a case median or worst) and the one with the
    most tumour."""
    liver_area = (truth >= 1).sum(axis=(1, 2))
    tumour_area = (truth == 2).sum(axis=(1, 2))
    wrong = (truth != pred).sum(axis=(1, 2))

    def panel(z: int, what: str) -> dict:
        return {"z": z, "what": what, "ct": image[z].astype(np.float32), "truth": truth[z].copy(),
                "pred": pred[z].copy(), "window": tuple(window), "area": int(tumour_area[z])}

    main = panel(int(liver_area.argmax()), "largest liver slice")
    error = panel(int(wrong.argmax()), f"slice with the most wrong voxels ({int(wrong.max())})")
    tumour = panel(int(tumour_area.argmax()), "largest tumour slice") if tumour_area.max() > 0 else None
    return main, error, tumour


def evaluate_case(source: CaseSource, members: list[Member], postprocess: Postprocess,
                  config: EvalConfig, device: torch.device) -> CaseResult:
    """Predict, postprocess, write and (with labels) score one case."""
    result = CaseResult(source.case)
    start = time.perf_counter()
    case = load_case(source.image, source.label) if config.with_labels else load_image(source.image)
    image, truth, affine, spacing = case.image, case.label, case.affine, case.spacing
    result.seconds["load"] = time.perf_counter() - start
    prediction = predict_volume(members, image, spacing, device, config.batch_size, config.tta,
                                tumour_probability=postprocess.needs_probability)
    result.seconds.update({f"infer/{k}": v for k, v in prediction.seconds.items()})
    variants = dict(prediction.labels)
    tick = time.perf_counter()
    variants[POSTPROCESSED] = postprocess(variants[ENSEMBLE], spacing, prediction.tumour_probability)
    result.seconds["postprocess"] = time.perf_counter() - tick
    tick = time.perf_counter()
    final = variants[POSTPROCESSED]
    out = Path(config.out) / "predictions" / prediction_name(source.case, compressed=config.with_labels)
    written = write_prediction(out, final, affine, case.spatial, source.image, config.output_format)
    result.prediction = str(written[0])
    result.seconds["write"] = time.perf_counter() - tick
    if truth is not None:
        tick = time.perf_counter()
        result.scores = score_once(variants, lambda labels: lits.score_case(labels, truth, spacing))
        if config.convention == "lits":
            result.official = score_once(variants, lambda labels: lits_official.score_case(labels, truth, spacing))
        result.seconds["metrics"] = time.perf_counter() - tick
        tick = time.perf_counter()
        result.oracle_dice = oracle.case_oracle_dice(truth, image, spacing)  # the image loaded above
        result.seconds["oracle"] = time.perf_counter() - tick
        if config.report:
            result.panel, result.error_panel, result.tumour_panel = choose_panels(
                image, truth, final, members[0].preprocessing.window)
    result.seconds["total"] = time.perf_counter() - start
    return result


def score_once(variants: dict[str, np.ndarray], score: Callable[[np.ndarray], dict]) -> dict[str, dict]:
    """``score`` of each variant's labels, computed once per distinct array: with one
    checkpoint the ensemble's labels are that checkpoint's (the same array)."""
    scores: dict[str, dict] = {}
    for name, labels in variants.items():
        same = next((other for other in scores if variants[other] is labels), None)
        scores[name] = scores[same] if same is not None else score(labels)
    return scores


def variant_seconds(result: CaseResult, variant: str, members: list[Member]) -> float:
    """Inference time of a variant on one case: its member, all members, + postprocessing."""
    infer = {m.name: result.seconds.get(f"infer/{m.name}", math.nan) for m in members}
    if variant in infer:
        return infer[variant]
    total = sum(infer.values()) + result.seconds.get("infer/preprocess", 0.0)
    return total + (result.seconds.get("postprocess", 0.0) if variant == POSTPROCESSED else 0.0)


# --------------------------------------------------------------------------- whole runs

def resolve_device(config: EvalConfig, accelerator) -> torch.device:
    if config.device is None:
        return accelerator.device
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {config.device}: no CUDA device on this machine")
    return device


def ensemble_members(config: EvalConfig, device: torch.device) -> list[Member]:
    """The checkpoints of ``config``, loaded; a warning when ``--tta`` would do nothing."""
    members = load_members(list(config.checkpoints), device)
    if note := tta_note(members, config.tta):
        log.warning(note)
    return members


def load_postprocess(spec: str) -> Postprocess:
    if spec == "default":
        return default_postprocess()
    if spec == "none":
        return Postprocess([])
    return Postprocess.from_json(spec)


@dataclass(frozen=True)
class EvalResult:
    out: Path
    cases: int
    failed: list[dict]
    summary: dict | None
    report: Path | None
    is_main: bool = True


def run_evaluation(config: EvalConfig) -> EvalResult:
    """Evaluate (or, without labels, only predict) every case; one bad case is reported
    and skipped, the others still run. Returns what was written and what failed."""
    accelerator = make_accelerator()
    device = resolve_device(config, accelerator)
    members = ensemble_members(config, device)
    postprocess = load_postprocess(config.postprocess)
    sources, failed = find_cases(config.data, config.split, config.with_labels)
    if config.output_format == "dicom-seg" and sources and not any(is_series(s.image) for s in sources):
        raise ConfigError(f"{config.data}: --format dicom-seg writes DICOM SEG for DICOM series inputs, "
                          "and none of these cases is one (their NIfTI predictions need no SEG)")
    out = Path(config.out)
    if accelerator.is_main_process:
        write_json_atomic(out / "config.json", config.to_dict())
    results = map_cases(accelerator, sources, "cases",
                        lambda source: evaluate_case(source, members, postprocess, config, device),
                        lambda case, error: CaseResult(case, error=error))
    if not accelerator.is_main_process:
        return EvalResult(out, len(results), failed, None, None, is_main=False)
    failed = failed + [{"case": r.case, "error": r.error} for r in results if r.error]
    done = sorted((r for r in results if not r.error), key=lambda r: natural_key(r.case))
    summary = report_path = None
    if config.with_labels and done:
        summary, report_path = write_outputs(done, failed, members, config, postprocess)
    elif not config.with_labels:  # a run whose every case failed has no summary: the failures are printed
        write_json_atomic(out / "summary.json", {"cases": len(done), "failed": failed,
                                          "predictions": [r.prediction for r in done],
                                          "timings": timings(done), "config": config.to_dict()})
    return EvalResult(out, len(done), failed, summary, report_path)


def map_cases(accelerator, sources: list[CaseSource], desc: str, work: Callable[[CaseSource], Any],
              failure: Callable[[str, str], Any]) -> list:
    """``work(source)`` for this process's share of ``sources``, with a progress bar; an
    InvalidCase is logged and becomes ``failure(case, message)``. Returns every process's
    results, gathered."""
    results = []
    with accelerator.split_between_processes(sources) as mine:
        bar = tqdm(mine, desc=desc, unit="case", disable=not accelerator.is_local_main_process)
        for source in bar:
            bar.set_postfix_str(source.case)
            try:
                results.append(work(source))
            except InvalidCase as exc:
                # not an error line here: the CLI prints each failure once, at the end,
                # gathered from every process
                log.info("%s", exc)
                results.append(failure(source.case, str(exc)))
    return gather(accelerator, results)


def gather(accelerator, results: list) -> list:
    if accelerator.num_processes == 1:
        return results
    from accelerate.utils import gather_object

    return list(gather_object(results))


def timings(results: list[CaseResult]) -> dict[str, float]:
    keys = sorted({k for r in results for k in r.seconds})
    means = {f"{k}_s_mean": float(np.mean([r.seconds.get(k, 0.0) for r in results])) for k in keys}
    return {**means, "cases": len(results), "total_s": float(sum(r.seconds["total"] for r in results))}


def variants_of(members: list[Member]) -> list[str]:
    return [m.name for m in members] + [ENSEMBLE, POSTPROCESSED]


def metric_rows(results: list[CaseResult], members: list[Member]) -> list[dict]:
    rows = []
    for r in results:
        for variant in variants_of(members):
            seconds = variant_seconds(r, variant, members)
            for cls in SCORED_CLASSES:
                scores = r.scores[variant][cls]
                rows.append({"case": r.case, "variant": variant, "class": cls,
                             **{m: float(scores[m]) for m in METRICS}, "seconds": seconds})
    return rows


def build_summary(results: list[CaseResult], failed: list[dict], members: list[Member],
                  config: EvalConfig, postprocess: Postprocess) -> dict:
    oracle_dice = [r.oracle_dice for r in results]
    variants = {v: lits.aggregate([r.scores[v] for r in results], oracle_dice) for v in variants_of(members)}
    official = {}
    if config.convention == "lits":  # the challenge's figures under its own names (docs/METRICS.md)
        official = {"lits_official": {v: lits_official.aggregate([r.official[v] for r in results])
                                      for v in variants_of(members)}}
    return {"variants": variants, **official, "cases": len(results), "failed": failed,
            "oracle": {"min_cm3": oracle.VISIBLE_MIN_CM3, "min_hu": oracle.VISIBLE_MIN_HU},
            "timings": timings(results), "config": config.to_dict(),
            "checkpoints": {m.name: str(m.path) for m in members},
            "postprocess_steps": postprocess.to_dict()["steps"],
            "preprocessing": members[0].preprocessing.to_dict(), "liverseg_version": __version__}


def pick_panels(results: list[CaseResult]) -> list[dict]:
    """Best, median and worst case by the postprocessed ensemble's mean of liver and tumour
    Dice (the best at its largest liver slice, the others at the slice they get most
    wrong), and the slice with the largest tumour of all cases."""
    def score(r: CaseResult) -> float:
        values = [r.scores[POSTPROCESSED][c]["dice"] for c in SCORED_CLASSES]
        return float(np.nanmean(values)) if not all(math.isnan(v) for v in values) else -1.0

    ranked = sorted(results, key=score, reverse=True)
    picks = [("best", ranked[0]), ("median", ranked[len(ranked) // 2]), ("worst", ranked[-1])]
    panels, seen = [], set()
    for label, r in picks:
        if r.case in seen:
            continue
        seen.add(r.case)
        shown = r.panel if label == "best" else r.error_panel
        panels.append({**shown, "case": r.case, "title": f"{label} case {r.case} (mean of liver and tumour Dice "
                                          f"{score(r):.3f}), slice {shown['z']}: {shown['what']}"})
    tumours = [r for r in results if r.tumour_panel is not None]
    if tumours:
        r = max(tumours, key=lambda r: r.tumour_panel["area"])
        panels.append({**r.tumour_panel, "case": r.case, "title": f"largest tumour: case {r.case}, slice {r.tumour_panel['z']}"})
    return panels


def write_outputs(results: list[CaseResult], failed: list[dict], members: list[Member],
                  config: EvalConfig, postprocess: Postprocess) -> tuple[dict, Path | None]:
    """metrics.csv, summary.json and cases.json; with ``config.report`` also the charts,
    the panels and report.html (returned; None without). W&B gets what was drawn."""
    out = Path(config.out)
    rows = metric_rows(results, members)
    summary = build_summary(results, failed, members, config, postprocess)
    report.write_csv(rows, out / "metrics.csv")
    write_json_atomic(out / "summary.json", summary)
    write_json_atomic(out / "cases.json", {r.case: {"scores": r.scores, "oracle_dice": r.oracle_dice,
                                             "seconds": r.seconds, "prediction": r.prediction,
                                             **({"lits_official": r.official} if r.official else {})}
                                    for r in results})
    charts, panels, html = [], [], None
    if config.report:
        charts = report.write_charts(rows, summary, out / "charts")
        panels = [report.write_panel(p, out / "panels" / f"{i:02d}-{report.slug(p['title'])}.png")
                  for i, p in enumerate(pick_panels(results))]
        html = report.write_html(summary, rows, charts, panels, out / "report.html")
    if config.report_to == "wandb":
        tracking.log_wandb(summary, rows, charts, panels, out)
    return summary, html
