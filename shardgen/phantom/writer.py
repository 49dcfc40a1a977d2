"""Writing phantoms as LiTS files (volume-N.nii.gz, segmentation-N.nii.gz), in parallel."""

from __future__ import annotations

import functools
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

from ..io import write_nifti
from .synthesis import make_phantom


def write_phantom_case(out: Path, i: int, seed: int, size: int, slices: tuple[int, int]) -> list[Path]:
    """Write case ``i`` (volume then segmentation); the unit of work of :func:`write_phantoms`."""
    case = make_phantom(i, seed=seed, size=size, slices=slices)
    return [write_nifti(out / f"volume-{i}.nii.gz", case.volume, case.affine),
            write_nifti(out / f"segmentation-{i}.nii.gz", case.label, case.affine)]


def write_phantoms(out_dir: Path, cases: int, seed: int = 0, size: int = 512,
                   slices: tuple[int, int] = (80, 200),
                   on_case: Callable[[int], None] | None = None, workers: int = 1) -> list[Path]:
    """Write ``volume-{i}.nii.gz`` (int16) and ``segmentation-{i}.nii.gz`` (uint8) for
    i in 0..cases-1 into ``out_dir`` (created if needed), LiTS layout, in ``workers``
    processes (each case depends only on (seed, i), so the files do not depend on it).
    Returns the paths written, volume then segmentation for each case, in case order;
    calls ``on_case(i)`` after each case."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    job = functools.partial(write_phantom_case, out, seed=seed, size=size, slices=slices)
    done: dict[int, list[Path]] = {}
    if workers <= 1:
        for i in range(cases):
            done[i] = job(i)
            if on_case is not None:
                on_case(i)
    else:
        with ProcessPoolExecutor(workers) as pool:
            futures = {pool.submit(job, i): i for i in range(cases)}
            for future in as_completed(futures):
                done[futures[future]] = future.result()
                if on_case is not None:
                    on_case(futures[future])
    return [path for i in range(cases) for path in done[i]]
