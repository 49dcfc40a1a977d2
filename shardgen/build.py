"""Building shards: one shard per case, written volume by volume, resumable and deterministic.

Each case is validated completely before anything is written for it; its shard is written
under a temporary name and renamed when complete, then a small record of it is saved, so a
re-run after a crash skips finished cases and redoes the rest. Splits are assigned once
every case has been validated, over the valid ones. Output bytes depend only on the
inputs and settings, never on the number of workers or nodes, nor on the split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from . import __version__
from .discover import CaseSource, Rejection, apply_split_rule, discover, split_rule
from .errors import InvalidCase, ShardgenError
from .format import ShardWriter, class_counts, encode_sample
from .io import atomic_path, remove_leftovers, write_json_atomic
from .manifest import assemble_manifest, manifest_name
from .nifti import Case, load_case
from .preprocess import Preprocessing, context_indices, preprocess_image, preprocess_label

log = logging.getLogger(__name__)
RECORDS = ".records"


@dataclass(frozen=True)
class Selection:
    """Which slices become training targets: every slice within ``margin_mm`` of the
    liver, plus a seeded ``background_fraction`` of the others."""

    margin_mm: float = 20.0
    background_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.margin_mm < 0 or not 0 <= self.background_fraction <= 1:
            raise ShardgenError("margin must be >= 0 and background fraction within [0, 1]")


@dataclass(frozen=True)
class BuildConfig:
    inputs: tuple[Path, ...]
    out: Path
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    selection: Selection = field(default_factory=Selection)
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    split_file: Path | None = None
    stratify: bool = True  # tumour-free cases spread over the splits in proportion
    workers: int = 1
    num_nodes: int = 1
    node_rank: int = 0
    zstd_level: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.node_rank < self.num_nodes:
            raise ShardgenError(f"--node-rank must be in [0, {self.num_nodes}), got {self.node_rank}")
        if self.workers < 1:
            raise ShardgenError(f"--workers must be >= 1, got {self.workers}")

    def settings(self) -> dict[str, Any]:
        """Everything that shapes the shard bytes (resume refuses to mix settings)."""
        return {"preprocessing": self.preprocessing.to_dict(),
                "selection": {"margin_mm": self.selection.margin_mm,
                              "background_fraction": self.selection.background_fraction,
                              "seed": self.seed},
                "zstd_level": self.zstd_level, "format_version": 1}


@dataclass(frozen=True)
class BuildResult:
    manifest_path: Path
    manifest: dict[str, Any]
    rejected: list[Rejection]


def select_slices(label: np.ndarray, z_spacing: float, selection: Selection, seed: int,
                  case: str) -> np.ndarray:
    """Target slice indices (sorted) of a canonical label volume (z, row, col)."""
    depth = label.shape[0]
    has_liver = label.reshape(depth, -1).max(axis=1) >= 1
    chosen = np.zeros(depth, bool)
    if has_liver.any():
        zs = np.flatnonzero(has_liver)
        margin = int(np.ceil(selection.margin_mm / z_spacing))
        chosen[max(zs[0] - margin, 0):zs[-1] + margin + 1] = True
    rest = np.flatnonzero(~chosen)
    rng = np.random.default_rng([seed, zlib.crc32(case.encode())])
    n_rest = int(round(selection.background_fraction * len(rest)))
    chosen[rng.choice(rest, size=n_rest, replace=False)] = True
    return np.flatnonzero(chosen)


def with_context(targets: np.ndarray, depth: int, context: int) -> np.ndarray:
    """The slices to write: targets plus the neighbours their stacks need."""
    needed = {z for t in targets for z in context_indices(int(t), depth, context)}
    return np.array(sorted(needed), dtype=np.int64)


def write_case_shard(case: Case, case_id: str, path: Path, config: BuildConfig) -> dict[str, Any]:
    """Preprocess and write one validated case; returns its record (counts, bytes, sha256)."""
    settings = config.preprocessing
    targets = select_slices(case.label, case.spacing[0], config.selection, config.seed, case_id)
    written = with_context(targets, case.shape[0], settings.context)
    target_set = set(targets.tolist())
    compressor = zstandard.ZstdCompressor(level=config.zstd_level)
    pixels = np.zeros(3, np.int64)
    liver_slices = tumour_slices = 0
    with atomic_path(path) as tmp, ShardWriter(tmp) as writer:
        for z in written.tolist():
            image = preprocess_image(case.image[z], settings, case.spacing[1:])
            mask = preprocess_label(case.label[z], settings, case.spacing[1:])
            counts = class_counts(mask)
            target = z in target_set
            writer.write(encode_sample(case_id, z, case.shape[0], target, image, mask, compressor, counts))
            if target:
                pixels += counts
                liver_slices += int(counts[1] + counts[2] > 0)
                tumour_slices += int(counts[2] > 0)
    return {"case": case_id, "shard": path.name, "samples": writer.samples,
            "targets": len(targets), "bytes": writer.bytes, "sha256": writer.sha256,
            "liver_slices": liver_slices, "tumour_slices": tumour_slices,
            "pixels": pixels.tolist(), "depth": case.shape[0],
            "spacing_mm": list(case.spacing), "input_shape": list(case.shape)}


def shard_path(out: Path, case_id: str) -> Path:
    # No split in the name: splits are assigned after every case is validated (see
    # build_shards), and a shard's bytes do not depend on its split.
    return out / f"{case_id}.tar"


def record_path(out: Path, case_id: str) -> Path:
    return out / RECORDS / f"{case_id}.json"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def finished_record(out: Path, source: CaseSource, settings: dict) -> dict | None:
    """The saved record of a case whose shard is complete with these settings and
    inputs, else None. The shard is hashed, not only sized: a damaged shard of the right
    size (a bad copy, a disk error) would otherwise be kept."""
    try:
        saved = json.loads(record_path(out, source.case).read_text())
        record = saved["record"]
        shard = shard_path(out, source.case)
        if (saved["settings"] != settings or record["shard"] != shard.name
                or (record["image"], record["label"]) != (str(source.image), str(source.label))):
            return None
        if shard.stat().st_size != record["bytes"] or file_sha256(shard) != record["sha256"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):  # no record or shard, or a damaged record
        return None
    return record


def process_case(source: CaseSource, config: BuildConfig) -> dict[str, Any]:
    """Worker entry: reuse a finished shard, or validate and write it. Returns
    ``{"record": ...}`` or ``{"rejection": ...}``; only bugs raise."""
    settings = config.settings()
    record = finished_record(config.out, source, settings)
    if record is not None:
        return {"record": record, "reused": True}
    for path in (shard_path(config.out, source.case), record_path(config.out, source.case)):
        remove_leftovers(path)  # of a build killed while writing this case
    try:
        case = load_case(source.image, source.label)
    except InvalidCase as exc:
        return {"rejection": Rejection(source.case, exc.path, exc.reason)}
    record = write_case_shard(case, source.case, shard_path(config.out, source.case), config)
    record.update(image=str(source.image), label=str(source.label))
    write_json_atomic(record_path(config.out, source.case), {"settings": settings, "record": record})
    return {"record": record, "reused": False}


def run_cases(sources: list[CaseSource], config: BuildConfig) -> Iterator[dict[str, Any]]:
    if config.workers == 1 or len(sources) <= 1:
        for source in sources:
            yield process_case(source, config)
        return
    with ProcessPoolExecutor(max_workers=config.workers) as pool:
        futures = [pool.submit(process_case, source, config) for source in sources]
        for future in futures:
            yield future.result()


@dataclass(frozen=True)
class Plan:
    cases: list[str]  # every case discovered, on every node
    mine: list[CaseSource]  # this node's share
    rejected: list[Rejection]  # by discovery
    split_rule: dict[str, Any]


def plan(config: BuildConfig) -> Plan:
    """Discover, check the split rule (before hours of work), keep this node's share."""
    sources, rejected = discover(config.inputs)
    if not sources:
        raise ShardgenError("no cases found under " + ", ".join(map(str, config.inputs))
                            + " (expected volume-N.nii[.gz] files, an MSD dataset.json or DICOM series folders)")
    ids = [s.case for s in sources]
    rule = split_rule(config.fractions, config.seed, config.split_file, ids, config.stratify)
    mine = [s for i, s in enumerate(sources) if i % config.num_nodes == config.node_rank]
    return Plan(ids, mine, rejected, rule)


def build_shards(config: BuildConfig, on_case: Callable[[dict[str, Any]], None] | None = None,
                 on_plan: Callable[[int], None] | None = None) -> BuildResult:
    """Build (or finish building) this node's shards and write its manifest.

    Every case is validated and written first; splits are then assigned over the cases
    that are valid, so a rejected case takes no split's place and junk beside the data
    does not change the split. A node knows only its own rejections: its manifest's split
    is provisional, and ``merge`` assigns it again over the valid cases of all nodes.
    ``on_plan(n)`` is told the number of results to come, then ``on_case(result)`` gets
    each: discovery's rejections first, then one per case.
    """
    planned = plan(config)
    if on_plan:
        on_plan(len(planned.rejected) + len(planned.mine))
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / RECORDS).mkdir(exist_ok=True)
    for rejection in planned.rejected:
        if on_case:
            on_case({"rejection": rejection})
    records, failed = [], []
    for result in run_cases(planned.mine, config):
        if "rejection" in result:
            failed.append(result["rejection"])
            log.info("rejected %s: %s", result["rejection"].file, result["rejection"].reason)
        else:
            records.append(result["record"])
        if on_case:
            on_case(result)
    return write_manifest(config, planned, records, failed)


def write_manifest(config: BuildConfig, planned: Plan, records: list[dict[str, Any]],
                   failed: list[Rejection]) -> BuildResult:
    """Assign splits over the cases not rejected (on this node) and write the manifest."""
    bad = {r.case for r in failed}
    splits = apply_split_rule(planned.split_rule, [c for c in planned.cases if c not in bad], records)
    records = [{**r, "split": splits[r["case"]]} for r in records]
    rejected = planned.rejected + failed
    manifest = assemble_manifest(records, rejected, splits, config.settings(), __version__,
                                 split_rule=planned.split_rule, nodes=(config.node_rank, config.num_nodes))
    path = config.out / manifest_name(config.node_rank, config.num_nodes)
    write_json_atomic(path, manifest)
    return BuildResult(path, manifest, rejected)
