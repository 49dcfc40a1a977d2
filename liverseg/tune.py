"""``liverseg-eval tune``: choose the postprocessing's lesion filters on labelled validation
cases, by the mean per-case tumour Dice of the ensemble's prediction: the smallest lesion
kept (``remove_small_lesions``) and the least mean tumour probability a lesion needs
(``remove_unsure_lesions``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shardgen.discover import CaseSource, natural_key
from shardgen.io import write_json_atomic
from shardgen.labels import TUMOUR
from shardgen.nifti import load_case

from . import __version__, lits
from .config import EvalConfig
from .errors import ConfigError
from .evaluate import ensemble_members, find_cases, load_postprocess, map_cases, resolve_device
from .inference import ENSEMBLE, predict_volume
from .postprocess import (MIN_LESION_CANDIDATES_MM3, MIN_PROBABILITY_CANDIDATES, Postprocess,
                          with_lesion_filters)
from .runtime import make_accelerator

Filters = tuple[float, float]  # (min_volume_mm3, min_mean_probability)


def tumour_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two tumour masks, the scores' own (``lits.dice``: 1 when both are empty)."""
    return lits.dice(lits.overlap_counts(pred, ref))


def shared_steps(chains: Sequence[Postprocess]) -> int:
    """How many leading steps every chain of ``chains`` has in common."""
    count = 0
    for steps in zip(*(chain.steps for chain in chains)):
        if any(step != steps[0] for step in steps):
            break
        count += 1
    return count


def candidate_dice(labels: np.ndarray, probability: np.ndarray | None, truth_tumour: np.ndarray, spacing,
                   chains: dict[Filters, Postprocess]) -> dict[Filters, float]:
    """Tumour Dice of one case's labels after each candidate chain (``probability``: the
    ensemble's tumour probability, as the postprocessing takes it). The steps all chains
    begin with run once."""
    first = shared_steps(list(chains.values()))
    common = Postprocess(next(iter(chains.values())).steps[:first])(labels, spacing, probability)
    return {key: tumour_dice(Postprocess(chain.steps[first:])(common, spacing, probability) == TUMOUR, truth_tumour)
            for key, chain in chains.items()}


def choose_filters(means: dict[Filters, float]) -> Filters:
    """The pair with the highest mean (``means``: pair → mean per-case tumour Dice); of
    equal means (to 1e-9), the smallest cut-off, then the smallest probability: the pair
    that removes the least."""
    best = max(means.values())
    return min(pair for pair, mean in means.items() if mean >= best - 1e-9)


@dataclass(frozen=True)
class TuneResult:
    postprocess: Path  # the chosen chain, for --postprocess
    min_volume_mm3: float
    min_mean_probability: float
    mean_dice: dict[Filters, float]  # candidate pair → mean per-case tumour Dice
    cases: int
    failed: list[dict]
    is_main: bool = True

    @property
    def out(self) -> Path:
        return self.postprocess.parent


def _check(name: str, values: tuple[float, ...], upper: float = math.inf) -> None:
    if not values or any(not 0 <= v <= upper for v in values):
        raise ConfigError(f"{name} candidates must lie in [0, {upper:g}], got {values}")


def tune_postprocess(config: EvalConfig, volumes: tuple[float, ...] = MIN_LESION_CANDIDATES_MM3,
                     probabilities: tuple[float, ...] = MIN_PROBABILITY_CANDIDATES) -> TuneResult:
    """Choose the postprocessing's lesion filters on labelled cases (a validation split,
    never the test cases): the ensemble predicts each case once, the chain
    (``config.postprocess``) runs with every pair of candidate ``min_volume_mm3`` and
    ``min_mean_probability`` (`with_lesion_filters`), and `choose_filters` picks by the
    mean per-case tumour Dice. Writes OUT/postprocess.json (the chain, for
    ``--postprocess``) and OUT/tuning.json (every pair's Dice per case).

    A false blob of tumour in a tumour-free case costs that case its whole tumour Dice
    (1 → 0), while a lesion of that size that is really there adds little to a case's
    Dice; where the balance lies depends on the models, so it is measured, not assumed.
    """
    _check("min lesion volume", volumes)
    _check("min mean probability", probabilities, 1.0)
    accelerator = make_accelerator()
    device = resolve_device(config, accelerator)
    members = ensemble_members(config, device)
    base = load_postprocess(config.postprocess)
    chains = {(float(v), float(t)): with_lesion_filters(base, v, t) for v in volumes for t in probabilities}
    sources, failed = find_cases(config.data, config.split, with_labels=True)

    def score(source: CaseSource) -> dict:
        case = load_case(source.image, source.label)
        prediction = predict_volume(members, case.image, case.spacing, device, config.batch_size, config.tta,
                                    tumour_probability=True)
        dice = candidate_dice(prediction.labels[ENSEMBLE], prediction.tumour_probability, case.label == TUMOUR,
                              case.spacing, chains)
        return {"case": source.case, "dice": dice}

    rows = map_cases(accelerator, sources, "tuning", score, lambda case, error: {"case": case, "error": error})
    if not accelerator.is_main_process:
        return TuneResult(Path(config.out) / "postprocess.json", math.nan, math.nan, {}, len(rows), failed,
                          is_main=False)
    failed = failed + [{"case": r["case"], "error": r["error"]} for r in rows if "error" in r]
    done = sorted((r for r in rows if "error" not in r), key=lambda r: natural_key(r["case"]))
    if not done:
        raise ConfigError(f"{config.data}: no {config.split!r} case could be used for tuning")
    means = {key: float(np.mean([r["dice"][key] for r in done])) for key in chains}
    chosen = choose_filters(means)
    out = Path(config.out)
    write_json_atomic(out / "postprocess.json", chains[chosen].to_dict())
    write_json_atomic(out / "tuning.json", {
        "chosen_min_volume_mm3": chosen[0], "chosen_min_mean_probability": chosen[1], "split": config.split,
        "config": config.to_dict(), "liverseg_version": __version__, "mean_tumour_dice": by_volume(means),
        "cases": {r["case"]: by_volume(r["dice"]) for r in done}, "failed": failed})
    return TuneResult(out / "postprocess.json", *chosen, means, len(done), failed)


def by_volume(values: dict[Filters, float]) -> dict[str, dict[str, float]]:
    """{"volume": {"probability": value}}, the layout of tuning.json."""
    out: dict[str, dict[str, float]] = {}
    for (volume, probability), value in values.items():
        out.setdefault(f"{volume:g}", {})[f"{probability:g}"] = value
    return out


def saved_result(saved: dict, out: Path) -> TuneResult:
    """The result that OUT/tuning.json (``saved``, as read) records, as `tune_postprocess` returned it."""
    means = {(float(v), float(t)): dice for v, row in saved["mean_tumour_dice"].items() for t, dice in row.items()}
    return TuneResult(Path(out) / "postprocess.json", saved["chosen_min_volume_mm3"],
                      saved["chosen_min_mean_probability"], means, len(saved["cases"]), saved["failed"])
