"""What the benchmarks share: the machine line, median timing, and the phantom cases and
shards they run on (built once, cached in a work folder)."""

from __future__ import annotations

import functools
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np
from isal import igzip

from shardgen.build import BuildConfig, build_shards
from shardgen.phantom import write_phantoms
from shardgen.preprocess import Preprocessing


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def timed(fn: Callable[[], object], repeat: int = 20) -> tuple[float, object]:
    """Median milliseconds of ``fn()`` and its last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)), result


def work_folder(work: Path | None) -> Path:
    """Where phantoms and shards are cached: ``work``, else one folder in the temp dir."""
    return work or Path(tempfile.gettempdir()) / "liverseg-bench"


def phantom_options(fn: Callable) -> Callable:
    """--cases, --slices, --size and --work: the phantom cases a benchmark runs on."""
    options = (
        click.option("--cases", default=2, show_default=True, help="Phantom cases."),
        click.option("--slices", default=300, show_default=True, help="Slices per case."),
        click.option("--size", default=512, show_default=True, help="Phantom slices are SIZE x SIZE."),
        click.option("--work", type=click.Path(path_type=Path), default=None,
                     help="Where phantoms and shards are cached [default: a temp folder]."),
    )
    return functools.reduce(lambda f, option: option(f), reversed(options), fn)


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


def benchmark_shards(work: Path, context: int, cases: int = 2, slices: int = 300, size: int = 512,
                     fractions: tuple[float, float, float] = (1.0, 0.0, 0.0)) -> Path:
    """Shards of the phantom cases at their own size, split by ``fractions`` (train, val,
    test; all training by default), built once and cached in ``work``."""
    gz, _ = phantom_inputs(work, cases, slices, size)
    split = "" if fractions == (1.0, 0.0, 0.0) else "-" + "-".join(f"{f:g}" for f in fractions)
    out = work / f"shards-{cases}-{slices}-{size}-context-{context}{split}"
    if not (out / "manifest.json").exists():
        build_shards(BuildConfig(inputs=(gz,), out=out, preprocessing=Preprocessing(size=size, context=context),
                                 fractions=fractions))
    return out
