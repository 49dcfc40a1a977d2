"""``liverseg-eval tune``: choose the postprocessing's smallest-lesion cut-off on labelled
validation cases, by the mean per-case tumour Dice of the ensemble's prediction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shardgen.discover import CaseSource, natural_key
from shardgen.io import write_json_atomic
from shardgen.labels import TUMOUR
from shardgen.nifti import load_case

from . import lits
from .config import EvalConfig
from .errors import ConfigError
from .evaluate import ensemble_members, find_cases, load_postprocess, map_cases, resolve_device
from .inference import ENSEMBLE, predict_volume
from .postprocess import MIN_LESION_CANDIDATES_MM3, Postprocess, with_min_lesion_volume
from .runtime import make_accelerator


def tumour_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two tumour masks, the scores' own (``lits.dice``: 1 when both are empty)."""
    return lits.dice(lits.overlap_counts(pred, ref))


def cutoff_dice(labels: np.ndarray, truth_tumour: np.ndarray, spacing, chains: dict[float, Postprocess]
                ) -> dict[float, float]:
    """Tumour Dice of one case's labels after each candidate chain."""
    return {volume: tumour_dice(chain(labels, spacing) == TUMOUR, truth_tumour) for volume, chain in chains.items()}


def choose_min_lesion_volume(means: dict[float, float]) -> float:
    """The cut-off with the highest mean per-case tumour Dice (``means``: cut-off → mean);
    of equal means (to 1e-9), the smallest, which removes the least."""
    best = max(means.values())
    return min(volume for volume, mean in means.items() if mean >= best - 1e-9)


@dataclass(frozen=True)
class TuneResult:
    postprocess: Path  # the chosen chain, for --postprocess
    min_volume_mm3: float
    mean_dice: dict[float, float]  # candidate → mean per-case tumour Dice
    cases: int
    failed: list[dict]
    is_main: bool = True

    @property
    def out(self) -> Path:
        return self.postprocess.parent


def tune_postprocess(config: EvalConfig, candidates: tuple[float, ...] = MIN_LESION_CANDIDATES_MM3
                     ) -> TuneResult:
    """Choose the postprocessing's smallest-lesion cut-off on labelled cases (a validation
    split, never the test cases): the ensemble predicts each case once, the chain
    (``config.postprocess``) runs with every candidate ``min_volume_mm3``, and the one with
    the best mean per-case tumour Dice wins. Writes OUT/postprocess.json (the chain, for
    ``--postprocess``) and OUT/tuning.json (every candidate's Dice per case).

    A small blob of tumour in a tumour-free case costs that case its whole tumour Dice
    (1 → 0), while a lesion of that size that is really there adds little to a case's
    Dice; where the balance lies depends on the model, so it is measured, not assumed.
    """
    if not candidates or any(v < 0 for v in candidates):
        raise ConfigError(f"min lesion volume candidates must be >= 0 mm³, got {candidates}")
    accelerator = make_accelerator()
    device = resolve_device(config, accelerator)
    members = ensemble_members(config, device)
    base = load_postprocess(config.postprocess)
    chains = {float(v): with_min_lesion_volume(base, v) for v in candidates}
    sources, failed = find_cases(config.data, config.split, with_labels=True)

    def score(source: CaseSource) -> dict:
        case = load_case(source.image, source.label)
        labels = predict_volume(members, case.image, case.spacing, device, config.batch_size, config.tta).labels
        ensemble = labels[ENSEMBLE] if ENSEMBLE in labels else labels[members[0].name]
        return {"case": source.case, "dice": cutoff_dice(ensemble, case.label == TUMOUR, case.spacing, chains)}

    rows = map_cases(accelerator, sources, "tuning", score, lambda case, error: {"case": case, "error": error})
    if not accelerator.is_main_process:
        return TuneResult(Path(config.out) / "postprocess.json", math.nan, {}, len(rows), failed, is_main=False)
    failed = failed + [{"case": r["case"], "error": r["error"]} for r in rows if "error" in r]
    done = sorted((r for r in rows if "error" not in r), key=lambda r: natural_key(r["case"]))
    if not done:
        raise ConfigError(f"{config.data}: no {config.split!r} case could be used for tuning")
    means = {volume: float(np.mean([r["dice"][volume] for r in done])) for volume in chains}
    chosen = choose_min_lesion_volume(means)
    out = Path(config.out)
    write_json_atomic(out / "postprocess.json", chains[chosen].to_dict())
    write_json_atomic(out / "tuning.json", {
        "chosen_min_volume_mm3": chosen, "split": config.split, "config": config.to_dict(),
        "mean_tumour_dice": {f"{v:g}": m for v, m in means.items()},
        "cases": {r["case"]: {f"{v:g}": d for v, d in r["dice"].items()} for r in done}, "failed": failed})
    return TuneResult(out / "postprocess.json", chosen, means, len(done), failed)
