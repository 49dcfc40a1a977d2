"""manifest.json: what the shards hold, so readers never have to scan the tars."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from .discover import SPLITS, Rejection, apply_split_rule
from .errors import ShardgenError
from .format import FORMAT_NAME, FORMAT_VERSION
from .io import write_json_atomic
from .labels import CLASS_NAMES
from .preprocess import Preprocessing

MANIFEST = "manifest.json"
SHARD_KEYS = ("split", "case", "samples", "targets", "bytes", "sha256",
              "liver_slices", "tumour_slices", "pixels")
CASE_KEYS = ("split", "image", "label", "depth", "spacing_mm", "input_shape", "shard")


def manifest_name(node_rank: int, num_nodes: int) -> str:
    return MANIFEST if num_nodes == 1 else f"manifest.node-{node_rank}-of-{num_nodes}.json"


def assemble_manifest(records: list[dict[str, Any]], rejected: list[Rejection],
                      splits: dict[str, str], settings: dict[str, Any], version: str,
                      split_rule: dict[str, Any], nodes: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """The manifest of ``records`` (each with its ``split``, from ``splits``)."""
    records = sorted(records, key=lambda r: (SPLITS.index(r["split"]), r["shard"]))
    shards = [{"path": r["shard"], **{k: r[k] for k in SHARD_KEYS}} for r in records]
    cases = {r["case"]: {k: r[k] for k in CASE_KEYS} for r in records}
    manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "tool_version": version,
        **settings,
        "totals": totals(shards), "class_fractions": class_fractions(shards),
        "split_assignment": dict(sorted(splits.items())),
        "split_rule": split_rule,
        "cases": dict(sorted(cases.items())),
        "shards": shards,
        "rejected": [r.to_dict() for r in rejected],
    }
    if nodes[1] > 1:
        manifest["node"] = {"rank": nodes[0], "count": nodes[1]}
    return manifest


def totals(shards: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    out = {}
    for split in SPLITS:
        mine = [s for s in shards if s["split"] == split]
        out[split] = {"cases": len(mine), "shards": len(mine),
                      **{k: sum(s[k] for s in mine) for k in
                         ("samples", "targets", "bytes", "liver_slices", "tumour_slices")}}
    return out


def class_fractions(shards: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Pixel fraction of each class over the target slices, per split and overall."""
    groups = {split: [s for s in shards if s["split"] == split] for split in SPLITS}
    groups["all"] = shards
    out = {}
    for name, mine in groups.items():
        counts = [sum(s["pixels"][c] for s in mine) for c in range(len(CLASS_NAMES))]
        total = sum(counts) or 1
        out[name] = {cls: n / total for cls, n in zip(CLASS_NAMES, counts)}
    return out


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Load a manifest (or the manifest.json inside a folder) and check it is ours."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    try:
        text = path.read_text()
    except OSError as exc:
        hint = ("; shards and their manifest are made by `liverseg-shards build --input DATA --out DIR`"
                if isinstance(exc, FileNotFoundError) else "")
        raise ShardgenError(f"{path}: cannot read manifest ({exc.strerror}){hint}") from None
    return parse_manifest(text, str(path))


def parse_manifest(text: str, where: str) -> dict[str, Any]:
    """Check a manifest's text (``where`` names it in errors) and return its data."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ShardgenError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ShardgenError(f"{where}: not a {FORMAT_NAME} manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise ShardgenError(f"{where}: format version {data.get('format_version')} is not "
                            f"supported (this shardgen reads version {FORMAT_VERSION})")
    shards = data.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
        raise ShardgenError(f"{where}: \"shards\" must be a list of shard entries")
    for shard in shards:
        check_shard_path(shard.get("path"), where)
        check_counts(shard, where)
    return data


COUNT_KEYS = ("samples", "targets", "bytes", "liver_slices", "tumour_slices")  # of a shard entry


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_counts(shard: dict[str, Any], where: str) -> None:
    """A shard entry's counts (``COUNT_KEYS`` and ``pixels``, one per class) are whole
    numbers >= 0: the loader, the totals and a stratified merge compute with them."""
    bad = [k for k in COUNT_KEYS if not is_count(shard.get(k))]
    pixels = shard.get("pixels")
    if not isinstance(pixels, list) or not pixels or not all(is_count(n) for n in pixels):
        bad.append("pixels")
    if bad:
        raise ShardgenError(f"{where}: shard {shard.get('path')!r}: {', '.join(bad)} must be counts "
                            "(whole numbers >= 0)")


SAFE_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def check_shard_path(path: Any, where: str) -> None:
    """A shard path must stay inside the shard folder and be harmless in a shell command:
    relative, '/'-separated parts of letters, digits, '_', '.', '-' (none starting with '.')."""
    if not isinstance(path, str) or not path or not all(SAFE_PART.match(p) for p in path.split("/")):
        raise ShardgenError(f"{where}: refused shard path {path!r} (only relative paths of letters, "
                            "digits, '_', '.', '-' that stay inside the shard folder)")


def manifest_preprocessing(manifest: dict[str, Any]) -> Preprocessing:
    return Preprocessing.from_dict(manifest["preprocessing"])


def merge_manifests(paths: list[Path], out: Path) -> dict[str, Any]:
    """Join the manifests of a multi-node build into ``out`` (a manifest path).

    The parts must agree on settings and split rule. Splits are assigned again, over the
    valid cases of all parts (a node's own assignment knew only its own rejections), so
    the result equals a single-node build's; shard paths are rewritten relative to
    ``out``'s folder.
    """
    parts = [(Path(p), read_manifest(p)) for p in paths]
    if not parts:
        raise ShardgenError("nothing to merge: give the per-node manifests")
    check_parts_agree(parts)
    records = joined_records(parts, out)
    first = parts[0][1]
    # manifests written before split_rule existed: their (complete) assignment is the rule
    rule = first.get("split_rule") or {"assignment": first["split_assignment"]}
    splits = apply_split_rule(rule, [r["case"] for r in records], records)
    records = [{**r, "split": splits[r["case"]]} for r in records]
    settings = {k: first[k] for k in ("preprocessing", "selection", "zstd_level")}
    merged = assemble_manifest(records, joined_rejections(parts), splits, settings,
                               first["tool_version"], split_rule=rule)
    write_json_atomic(out, merged)
    return merged


def check_parts_agree(parts: list[tuple[Path, dict[str, Any]]]) -> None:
    first_path, first = parts[0]
    for path, part in parts[1:]:
        for key in ("preprocessing", "selection", "zstd_level", "split_rule"):
            if part.get(key) != first.get(key):
                raise ShardgenError(f"{path}: its {key} differs from {first_path}'s; "
                                    "these shards were not built together")


def joined_records(parts: list[tuple[Path, dict[str, Any]]], out: Path) -> list[dict[str, Any]]:
    """Every part's shards with their case entries, paths relative to ``out``'s folder."""
    records = [{**shard, **part["cases"][shard["case"]],
                "shard": os.path.relpath(path.parent / shard["path"], out.parent)}
               for path, part in parts for shard in part["shards"]]
    for record in records:  # readers refuse paths that leave the folder: refuse them here already
        check_shard_path(record["shard"], f"{out} (merging shards outside its folder)")
    duplicates = [case for case, n in Counter(r["case"] for r in records).items() if n > 1]
    if duplicates:
        raise ShardgenError(f"case(s) {sorted(duplicates)[:5]} appear in more than one manifest")
    return records


def joined_rejections(parts: list[tuple[Path, dict[str, Any]]]) -> list[Rejection]:
    """Every part's rejections, once each (discovery's are in every part)."""
    unique = {(r["case"], r["file"]): Rejection(**r) for _, part in parts for r in part["rejected"]}
    return list(unique.values())
