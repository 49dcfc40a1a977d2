"""Finding cases on disk (LiTS, MSD Task03, 3D-IRCADb and plain DICOM series folders) and
assigning them to splits by case."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ShardgenError

SPLITS = ("train", "val", "test")
LITS_VOLUME = re.compile(r"^volume-(\d+)\.nii(\.gz)?$")
LITS_LABEL = re.compile(r"^segmentation-(\d+)\.nii(\.gz)?$")
LITS_TEST_VOLUME = re.compile(r"^test-volume-(\d+)\.nii(\.gz)?$")  # LiTS's test set: no labels
MSD_TEST_IMAGES = "imagesTs"  # MSD's test images: no labels
NIFTI = re.compile(r"^(?!\._)(.+)\.nii(\.gz)?$")  # "._x" files are macOS resource forks
IRCADB_IMAGE, IRCADB_MASKS = "PATIENT_DICOM", "MASKS_DICOM"
IRCADB_LIVER, IRCADB_TUMOURS = "liver", "livertumor*"  # mask series inside MASKS_DICOM
NOT_DICOM_SLICES = {"DICOMDIR"}  # an index of a disc's files, not an image
SERIES_LABELS = ("segmentation.nii.gz", "segmentation.nii")  # a plain series' label, in its folder
# Case ids name shard files, which reach a shell through `pipe:` shard locations: nothing
# a shell or a command line reads specially (no leading '-' either, an option to `cat`).
SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
UNSAFE_ID_REASON = ("case id {!r} may hold only letters, digits, '.', '_' and '-', "
                    "and may not start with '.' or '-'")


@dataclass(frozen=True)
class CaseSource:
    case: str
    image: Path
    label: Path | None


@dataclass(frozen=True)
class Rejection:
    case: str
    file: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"case": self.case, "file": self.file, "reason": self.reason}


def discover(inputs: Iterable[str | Path], unlabelled: bool = False) -> tuple[list[CaseSource], list[Rejection]]:
    """All cases under ``inputs``, sorted by case id; duplicates and unsafe case ids
    (:data:`SAFE_ID`) rejected, images without a label kept with ``label`` None. With
    ``unlabelled``, also the test images that have no label by design, to predict
    (:func:`discover_unlabelled`)."""
    found: list[CaseSource] = []
    for root in map(Path, inputs):
        if not root.is_dir():
            raise ShardgenError(f"{root}: input folder not found")
        msd_roots = [p.parent for p in root.rglob("dataset.json") if (p.parent / "imagesTr").is_dir()]
        for msd in msd_roots:
            found.extend(discover_msd(msd))
        found.extend(discover_lits(root, exclude=msd_roots))
        found.extend(discover_dicom(root, exclude=msd_roots))
        if unlabelled:
            found.extend(discover_unlabelled(root))
    cases, rejected = deduplicate([s for s in found if is_safe_id(s.case)])
    return cases, [unsafe_id(s) for s in found if not is_safe_id(s.case)] + rejected


def is_safe_id(case: str) -> bool:
    return SAFE_ID.fullmatch(case) is not None


def unsafe_id(source: CaseSource) -> Rejection:
    return Rejection(source.case, str(source.image), UNSAFE_ID_REASON.format(source.case))


def discover_lits(root: Path, exclude: list[Path] = ()) -> list[CaseSource]:  # type: ignore[assignment]
    volumes: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    for path in sorted(root.rglob("*.nii*")):
        if any(path.is_relative_to(e) for e in exclude):
            continue
        if m := LITS_VOLUME.match(path.name):
            volumes.setdefault(m.group(1), path)
        elif m := LITS_LABEL.match(path.name):
            labels.setdefault(m.group(1), path)
    return [CaseSource(f"volume-{n}", volumes[n], labels.get(n))
            for n in sorted(volumes, key=int)]


def discover_unlabelled(root: Path) -> list[CaseSource]:
    """LiTS test volumes (test-volume-N) and MSD test images (imagesTs/*), ``label`` None."""
    return [CaseSource(case_id(path), path, None) for path in sorted(root.rglob("*.nii*"))
            if LITS_TEST_VOLUME.match(path.name) or (path.parent.name == MSD_TEST_IMAGES and NIFTI.match(path.name))]


def discover_msd(root: Path) -> list[CaseSource]:
    """MSD layout: dataset.json's ``training`` list, else imagesTr/labelsTr paired by name."""
    try:
        entries = json.loads((root / "dataset.json").read_text()).get("training", [])
        pairs = [(root / e["image"], root / e["label"]) for e in entries]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ShardgenError(f"{root / 'dataset.json'}: unreadable MSD dataset.json ({exc})") from None
    if not pairs:
        pairs = [(p, root / "labelsTr" / p.name) for p in sorted((root / "imagesTr").iterdir())
                 if NIFTI.match(p.name)]
    return [CaseSource(case_id(image), image, label if label.exists() else None)
            for image, label in pairs]


def discover_dicom(root: Path, exclude: list[Path] = ()) -> list[CaseSource]:  # type: ignore[assignment]
    """DICOM layouts, each case named after its folder:

    - 3D-IRCADb: ``<patient>/PATIENT_DICOM/`` (image series) with ``<patient>/MASKS_DICOM/``
      (``liver``, ``livertumor*`` mask series) as the label; nothing else under the patient
      folder (LABELLED_DICOM, ...) is a case of its own;
    - any other folder holding DICOM files: one series, labelled by a NIfTI
      ``segmentation.nii[.gz]`` in the same folder on the series' voxel grid, if there is one.
    """
    found = []
    for folder, subfolders, files in os.walk(root):
        here = Path(folder)
        subfolders.sort()
        if any(here.is_relative_to(e) for e in exclude):
            subfolders.clear()
        elif IRCADB_IMAGE in subfolders:
            masks = here / IRCADB_MASKS
            found.append(CaseSource(here.name, here / IRCADB_IMAGE, masks if (masks / IRCADB_LIVER).is_dir() else None))
            subfolders.clear()
        elif any(is_dicom_file(here / f) for f in sorted(files) if not NIFTI.match(f)):
            label = next((here / n for n in SERIES_LABELS if (here / n).is_file()), None)
            found.append(CaseSource(here.name, here, label))
    return found


def is_dicom_file(path: Path) -> bool:
    """A Part-10 file (``DICM`` after the 128-byte preamble), or any ``*.dcm`` file; told
    without pydicom, so that discovery of NIfTI trees never loads it."""
    if path.name in NOT_DICOM_SLICES or path.name.startswith("._") or not path.is_file():
        return False
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def case_id(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".nii"):
        name = name.removesuffix(suffix)
    return name


def deduplicate(found: list[CaseSource]) -> tuple[list[CaseSource], list[Rejection]]:
    cases: dict[str, CaseSource] = {}
    rejected = []
    for source in found:
        if source.case in cases:
            rejected.append(Rejection(source.case, str(source.image),
                                      f"duplicate case id (also {cases[source.case].image})"))
        else:
            cases[source.case] = source
    return [cases[c] for c in sorted(cases, key=natural_key)], rejected


def natural_key(text: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def assign_splits(cases: list[str], fractions: tuple[float, float, float], seed: int,
                  strata: Mapping[str, object] | None = None) -> dict[str, str]:
    """Case → split, by a seeded permutation of the sorted ids (never by slice).

    Validation and test get ``round(n * fraction)`` cases, at least one each when their
    fraction is positive and there are enough cases; training gets the rest. With
    ``strata`` (case → group, e.g. whether it holds tumour; a case not in it is a group of
    its own kind), each group is spread over the splits in proportion to its size: the
    permuted cases are ordered by their relative position within their group, so any
    leading run of the order, and so each split, holds each group's share. The split sizes
    are the same either way.
    """
    check_fractions(fractions)
    order = sorted(cases, key=natural_key)
    order = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    if strata is not None:
        order = stratified_order(order, [strata.get(c, "unknown") for c in order])
    n = len(order)
    counts = [round(n * f) if f == 0 or n < 3 else max(1, round(n * f)) for f in fractions[1:]]
    n_val, n_test = counts
    splits = {c: "val" for c in order[:n_val]}
    splits.update({c: "test" for c in order[n_val:n_val + n_test]})
    splits.update({c: "train" for c in order[n_val + n_test:]})
    return splits


def stratified_order(order: list[str], groups: list[object]) -> list[str]:
    """``order`` interleaved by group: the k-th of a group of m sits at (k + 0.5) / m, ties
    kept in ``order``'s sequence, so every prefix holds each group in proportion."""
    sizes = Counter(groups)
    seen: Counter = Counter()
    keyed = []
    for index, (case, group) in enumerate(zip(order, groups)):
        keyed.append(((seen[group] + 0.5) / sizes[group], index, case))
        seen[group] += 1
    return [case for _, _, case in sorted(keyed)]


def check_fractions(fractions: tuple[float, float, float]) -> None:
    if any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ShardgenError(f"split fractions must be >= 0 and sum to 1, got {fractions}")


def split_rule(fractions: tuple[float, float, float], seed: int, split_file: Path | None,
               cases: list[str], stratify: bool = True) -> dict[str, Any]:
    """How cases get their split: a seeded draw, or a split file's assignment of ``cases``
    (each must be named). Checked now, applied once the valid cases are known
    (:func:`apply_split_rule`), and recorded in the manifest so that ``merge`` can apply
    it to the valid cases of all nodes together. ``stratify``: tumour-free cases are
    spread over the splits in proportion (a test split without one cannot show whether
    a model finds lesions where there are none)."""
    if split_file is not None:
        return {"file": str(split_file), "assignment": read_split_file(split_file, cases)}
    check_fractions(fractions)
    rule: dict[str, Any] = {"seed": seed, "fractions": list(fractions)}
    if stratify:
        rule["stratify"] = "tumour"
    return rule


def apply_split_rule(rule: dict[str, Any], cases: list[str],
                     records: list[dict[str, Any]] | None = None) -> dict[str, str]:
    """Case → split of ``cases`` (the valid ones: a rejected case takes no split's place).
    A stratified rule reads each case's ``tumour_slices`` from ``records`` (shard records);
    a case without a record (another node's, before ``merge``) is a group of its own."""
    if "assignment" in rule:
        return {c: rule["assignment"][c] for c in cases}
    strata = None
    if rule.get("stratify") == "tumour":
        strata = {r["case"]: r["tumour_slices"] > 0 for r in records or []}  # counts checked by read_manifest
    elif rule.get("stratify") is not None:
        raise ShardgenError(f"unknown split stratification {rule['stratify']!r} (known: 'tumour')")
    return assign_splits(cases, tuple(rule["fractions"]), rule["seed"], strata)  # type: ignore[arg-type]


def read_split_file(path: Path, cases: list[str]) -> dict[str, str]:
    """A JSON split file: ``{"train": [ids], "val": [...], "test": [...]}`` or ``{id: split}``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ShardgenError(f"{path}: unreadable split file ({exc})") from None
    if isinstance(data, dict) and set(data) <= set(SPLITS) and all(isinstance(v, list) for v in data.values()):
        data = {case: split for split, ids in data.items() for case in ids}
    if not isinstance(data, dict) or not set(data.values()) <= set(SPLITS):
        raise ShardgenError(f"{path}: split file must map case ids to one of {SPLITS}")
    missing = [c for c in cases if c not in data]
    if missing:
        raise ShardgenError(f"{path}: split file does not assign {len(missing)} case(s): "
                            + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    return {c: data[c] for c in cases}
