"""``liverseg-eval score``: score a folder of existing predictions against a folder of
references, under liverseg's convention or the LiTS challenge's (no model, no torch).

    liverseg-eval score --reference LiTS/labels --predictions submission --convention lits --out scored
"""

from __future__ import annotations

import csv
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shardgen.errors import InvalidCase, ShardgenError
from shardgen.io import atomic_path, write_json_atomic, write_text_atomic
from shardgen.labels import SCORED_CLASSES
from shardgen.nifti import check_3d, label_as_uint8, read_volume

from . import lits, lits_official
from .config import ScoreConfig
from .errors import LiversegError
from .vocabulary import METRICS

# segmentation-N, test-segmentation-N or volume-N (.nii or .nii.gz); the number pairs them
CASE_NAME = re.compile(r"(?:test-)?(segmentation|volume)-(\d+)\.nii(?:\.gz)?")
PREFERENCE = ("segmentation", "volume")  # a LiTS folder holds both: volume-N is then the CT


@dataclass
class ScoreResult:
    out: Path
    dataset: dict[str, Any]
    seconds: float
    cases: int = 0
    failed: list[dict] = field(default_factory=list)
    is_main: bool = True  # finish() in eval_cli reports only from the main process


# --------------------------------------------------------------------------- pairing

def label_files(folder: str | Path) -> tuple[dict[int, Path], list[dict]]:
    """Case number → label file of ``folder`` (searched recursively), and the files that
    cannot be told apart (two labels for one number). segmentation-N beats volume-N."""
    root = Path(folder)
    if not root.is_dir():
        raise LiversegError(f"{root}: not a folder")
    found: dict[int, dict[str, list[Path]]] = {}
    for path in sorted(root.rglob("*.nii*")):
        if m := CASE_NAME.fullmatch(path.name):
            found.setdefault(int(m.group(2)), {}).setdefault(m.group(1), []).append(path)
    files, failed = {}, []
    for number, kinds in found.items():
        paths = kinds[next(k for k in PREFERENCE if k in kinds)]
        if len(paths) > 1:
            failed.append({"case": case_name(number), "error": "more than one label file: "
                                                               + ", ".join(str(p) for p in paths)})
        else:
            files[number] = paths[0]
    return files, failed


def case_name(number: int) -> str:
    return f"segmentation-{number}"


def pair_files(config: ScoreConfig) -> tuple[list[tuple[str, Path, Path]], list[dict]]:
    """(case, reference, prediction) in case-number order, and one failure per file left
    without its partner."""
    refs, failed = label_files(config.reference)
    preds, failed_pred = label_files(config.predictions)
    failed += failed_pred
    for number in sorted(refs.keys() - preds.keys()):
        failed.append({"case": case_name(number), "error": f"no prediction in {config.predictions} "
                                                           f"(reference {refs[number]})"})
    for number in sorted(preds.keys() - refs.keys()):
        failed.append({"case": case_name(number), "error": f"no reference in {config.reference} "
                                                           f"(prediction {preds[number]})"})
    pairs = [(case_name(n), refs[n], preds[n]) for n in sorted(refs.keys() & preds.keys())]
    return pairs, failed


def read_labels(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A label map in file order as the LiTS scorer reads it, with its voxel size in mm
    (the header's float32 values: the lengths of the affine's columns)."""
    volume = read_volume(path)
    check_3d(volume)
    spacing = np.linalg.norm(volume.affine[:3, :3], axis=0)
    return label_as_uint8(volume), (float(spacing[0]), float(spacing[1]), float(spacing[2]))


def read_pair(reference: Path, prediction: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Prediction, reference and the reference's spacing; InvalidCase if the shapes differ."""
    ref, spacing = read_labels(reference)
    pred, _ = read_labels(prediction)
    if pred.shape != ref.shape:
        raise InvalidCase(prediction, f"shape {pred.shape} differs from the reference's {ref.shape} ({reference})")
    return pred, ref, spacing


# --------------------------------------------------------------------------- scoring

SCORERS = {"liverseg": lits.score_case, "lits": lits_official.score_case}


def score_pairs(pairs: list[tuple[str, Path, Path]], convention: str) -> tuple[dict[str, dict], list[dict]]:
    """Case → score_case of the convention; an unreadable pair is a failure, not a stop."""
    scored, failed = {}, []
    for case, reference, prediction in pairs:
        try:
            pred, ref, spacing = read_pair(reference, prediction)
        except ShardgenError as exc:
            failed.append({"case": case, "error": str(exc)})
            continue
        scored[case] = SCORERS[convention](pred, ref, spacing)
    return scored, failed


def dataset_figures(scored: dict[str, dict], convention: str) -> dict[str, Any]:
    cases = list(scored.values())
    return lits_official.aggregate(cases) if convention == "lits" else lits.aggregate(cases)


def headline(dataset: dict[str, Any], convention: str) -> dict[str, float]:
    """The figures to print: every official one for lits; for liverseg the means and
    pooled Dice per class, lesion precision and recall, and the tumour burden RMSE."""
    if convention == "lits":
        return dict(dataset)
    figures = {}
    for cls in SCORED_CLASSES:
        figures.update({f"{cls}_dice_mean": dataset[cls]["dice"]["mean"],
                        f"{cls}_dice_global": dataset[cls]["dice_global"],
                        f"{cls}_assd_mean": dataset[cls]["assd"]["mean"]})
    figures.update({f"lesion_{k}": dataset["detection"][k] for k in ("precision", "recall", "recall_any")})
    figures["burden_rmse"] = dataset["burden"]["rmse"]
    return figures


def score_folders(config: ScoreConfig) -> ScoreResult:
    """Score every prediction that has a reference; write scores.json (dataset figures: for
    the lits convention under the official scorer's names), cases.json, cases.csv and, for
    lits, scores.txt as the official scorer prints it."""
    start = time.perf_counter()
    pairs, failed = pair_files(config)
    scored, unreadable = score_pairs(pairs, config.convention)
    failed += unreadable
    if not scored:
        raise LiversegError(f"no case could be scored ({len(failed)} failed): "
                            + "; ".join(f"{f['case']}: {f['error']}" for f in failed[:3]))
    result = ScoreResult(Path(config.out), dataset_figures(scored, config.convention),
                         time.perf_counter() - start, len(scored), sorted(failed, key=lambda f: f["case"]))
    write_outputs(result, scored, config)
    return result


# --------------------------------------------------------------------------- outputs

def write_outputs(result: ScoreResult, scored: dict[str, dict], config: ScoreConfig) -> None:
    write_json_atomic(result.out / "scores.json", {
        "config": config.to_dict(), "cases": list(scored), "failed": result.failed,
        "seconds": result.seconds, "dataset": result.dataset})
    write_json_atomic(result.out / "cases.json", scored)
    rows = [{"case": case, **case_row(scores, config.convention)} for case, scores in scored.items()]
    write_csv(result.out / "cases.csv", rows)
    if config.convention == "lits":
        write_text_atomic(result.out / "scores.txt", "".join(f"{k}: {v:.3f}\n" for k, v in result.dataset.items()))


def case_row(scores: dict, convention: str) -> dict[str, Any]:
    """One flat CSV row of a case's scores."""
    if convention == "lits":
        row = {f"liver_{m}": scores["liver"][m] for m in lits_official.SEGMENTATION}
        for name, counts in scores["detection"].items():
            row.update({f"{k}_{name}": v for k, v in counts.items()})
        row.update({k: scores[k] for k in ("liver_dice_per_case", "lesion_dice_per_case", "tumor_burden_diff")})
        row["lesions_scored"] = len(scores["lesions_scored"])
        return row
    row = {f"{cls}_{m}": scores[cls][m] for cls in SCORED_CLASSES for m in METRICS}
    row.update({f"lesion_{k}": scores["lesions"][k] for k in ("tp", "fp", "fn")})
    row.update({f"burden_{k}": v for k, v in scores["burden"].items()})
    return row


def write_csv(path: Path, rows: list[dict]) -> None:
    """cases.csv: one row per case, an undefined metric (NaN) as an empty cell."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([{k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
                          for row in rows])
