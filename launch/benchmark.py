"""Benchmarks behind docs/PERFORMANCE.md. Each prints its figures and the settings used.

    python launch/benchmark.py shards              # shard writing, slices/s per core
    python launch/benchmark.py shards --cases 3 --slices 400
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import click
import numpy as np
from isal import igzip

from shardgen.build import BuildConfig, Selection, build_shards
from shardgen.nifti import read_volume
from shardgen.phantom import write_phantoms
from shardgen.preprocess import Preprocessing


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


@click.group()
def main() -> None:
    """liverseg benchmarks (see docs/PERFORMANCE.md)."""


def phantom_inputs(work: Path, cases: int, slices: int, size: int) -> tuple[Path, Path]:
    """The same phantom cases as .nii.gz (as generated) and as plain .nii."""
    gz, raw = work / f"gz-{cases}-{slices}-{size}", work / f"nii-{cases}-{slices}-{size}"
    if not gz.exists():
        write_phantoms(gz.with_suffix(".tmp"), cases, seed=11, size=size, slices=(slices, slices))
        gz.with_suffix(".tmp").rename(gz)
    if not raw.exists():
        tmp = raw.with_suffix(".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for path in gz.glob("*.nii.gz"):
            (tmp / path.name.removesuffix(".gz")).write_bytes(igzip.decompress(path.read_bytes()))
        tmp.rename(raw)
    return gz, raw


def time_build(inp: Path, out: Path, size: int, select_all: bool) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    selection = Selection(background_fraction=1.0) if select_all else Selection()
    config = BuildConfig(inputs=(inp,), out=out, preprocessing=Preprocessing(size=size),
                         selection=selection, fractions=(1.0, 0.0, 0.0))
    start = time.perf_counter()
    manifest = build_shards(config).manifest
    seconds = time.perf_counter() - start
    depth = sum(c["depth"] for c in manifest["cases"].values())
    samples = sum(s["samples"] for s in manifest["shards"])
    nbytes = sum(s["bytes"] for s in manifest["shards"])
    return {"seconds": seconds, "input_slices": depth, "samples": samples,
            "in_per_s": depth / seconds, "out_per_s": samples / seconds,
            "kb_per_slice": nbytes / samples / 1e3}


def time_read(folder: Path) -> float:
    """Seconds per input slice to read and validate-load the volumes alone."""
    start, depth = time.perf_counter(), 0
    for path in sorted(folder.glob("volume-*")):
        depth += read_volume(path).data.shape[-1]
    return (time.perf_counter() - start) / depth


@main.command()
@click.option("--cases", default=2, show_default=True, help="Phantom cases at 512x512.")
@click.option("--slices", default=300, show_default=True, help="Slices per case.")
@click.option("--size", default=512, show_default=True)
@click.option("--work", type=click.Path(path_type=Path), default=None,
              help="Where phantoms are cached [default: a temp folder].")
def shards(cases: int, slices: int, size: int, work: Path | None) -> None:
    """Shard writing on one core (one worker; at 512 from 512 nothing is resized, so no BLAS)."""
    work = work or Path(tempfile.gettempdir()) / "liverseg-bench"
    gz, raw = phantom_inputs(work, cases, slices, size)
    print(f"# shards benchmark, {date.today()}, {machine()}")
    print(f"# {cases} phantom cases x {slices} slices, {size}x{size}, one worker, context 1")
    print(f"{'input':<8} {'selection':<10} {'in slices/s':>12} {'written/s':>10} {'KB/slice':>9} {'read ms/slice':>14}")
    for name, folder in (("nii.gz", gz), ("nii", raw)):
        read_ms = 1e3 * time_read(folder)
        for select_all in (True, False):
            r = time_build(folder, work / "out", size, select_all)
            label = "all" if select_all else "default"
            print(f"{name:<8} {label:<10} {r['in_per_s']:>12.0f} {r['out_per_s']:>10.0f} "
                  f"{r['kb_per_slice']:>9.1f} {read_ms:>14.2f}")
    shutil.rmtree(work / "out", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
