"""``liverseg-shards inspect``: counts per split, class balance, and a picture of samples."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .format import decode_sample, read_shard
from .io import atomic_path
from .labels import CLASS_NAMES, overlay
from .manifest import read_manifest
from .verify import check_listed_file


def summary_lines(manifest: dict[str, Any]) -> list[str]:
    pre = manifest["preprocessing"]
    lines = [f"preprocessing: window {pre['window']} HU, {pre['size']}x{pre['size']}, "
             f"context {pre['context']} ({2 * pre['context'] + 1} channels)",
             f"{'split':<6} {'cases':>6} {'samples':>8} {'targets':>8} {'liver':>7} "
             f"{'tumour':>7} {'MB':>9}  pixels " + " / ".join(CLASS_NAMES)]
    for split, t in manifest["totals"].items():
        fr = manifest["class_fractions"][split]
        lines.append(f"{split:<6} {t['cases']:>6} {t['samples']:>8} {t['targets']:>8} "
                     f"{t['liver_slices']:>7} {t['tumour_slices']:>7} {t['bytes'] / 1e6:>9.1f}  "
                     + " / ".join(f"{100 * fr[c]:.2f}%" for c in CLASS_NAMES))
    if manifest["rejected"]:
        lines.append(f"rejected inputs: {len(manifest['rejected'])}")
        lines += [f"  {r['file']}: {r['reason']}" for r in manifest["rejected"]]
    return lines


def pick_samples(folder: Path, manifest: dict[str, Any], count: int, seed: int):
    """``count`` random target slices: random shards (weighted by targets), one slice each."""
    shards = [s for s in manifest["shards"] if s["targets"] > 0]
    if not shards:
        return []
    rng = np.random.default_rng(seed)
    weights = np.array([s["targets"] for s in shards], float)
    chosen = rng.choice(len(shards), size=count, p=weights / weights.sum())
    picked = []
    for index in sorted(set(chosen.tolist())):
        path = folder / shards[index]["path"]
        targets = [d for d in (decode_sample(s, str(path)) for s in read_shard(path)) if d.target]
        take = rng.choice(len(targets), size=min(int((chosen == index).sum()), len(targets)), replace=False)
        picked += [targets[i] for i in sorted(take)]
    return picked


def save_grid(samples, path: Path, columns: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(samples) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, s in zip(axes.ravel(), samples):
        ax.imshow(overlay(s.image, s.mask), interpolation="nearest")
        ax.set_title(f"{s.case} z={s.z}", fontsize=8)
    fig.suptitle("green: liver, red: tumour", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def inspect_shards(shards: str | Path, out_png: Path | None, count: int = 16, seed: int = 0,
                   on_summary: Callable[[list[str]], None] | None = None
                   ) -> tuple[list[str], Path | None]:
    """Summary lines, and a PNG grid of ``count`` random target slices with masks overlaid.

    ``on_summary`` gets the lines before any shard is read, so they are shown even when a
    shard turns out missing or damaged (:class:`ShardError`). Only the picked shards are
    read; ``liverseg-shards verify`` reads them all.
    """
    shards = Path(shards)
    manifest = read_manifest(shards)
    folder = shards if shards.is_dir() else shards.parent
    lines = summary_lines(manifest)
    if on_summary:
        on_summary(lines)
    for entry in manifest["shards"]:  # one stat each: a missing or cut shard is named up front
        check_listed_file(folder / entry["path"], entry)
    if out_png is None or count == 0:
        return lines, None
    samples = pick_samples(folder, manifest, count, seed)
    save_grid(samples, out_png)
    return lines, out_png
