"""Writing phantoms as LiTS files (volume-N.nii.gz, segmentation-N.nii.gz), in parallel."""

from __future__ import annotations

import functools
import gzip
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from .synthesis import make_phantom


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write a .nii.gz via a temporary file in the same folder and os.replace: readers
    never see a half-written file. The gzip header holds no name (it would be the
    temporary one, with the writer's pid) and mtime 0, so reruns write identical bytes."""
    image = nib.Nifti1Image(array, affine)
    image.set_data_dtype(array.dtype)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=1,
                                                        mtime=0) as gz:
            gz.write(image.to_bytes())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_phantom_case(out: Path, i: int, seed: int, size: int, slices: tuple[int, int]) -> list[Path]:
    """Write case ``i`` (volume then segmentation); the unit of work of :func:`write_phantoms`."""
    case = make_phantom(i, seed=seed, size=size, slices=slices)
    return [_write_nifti(out / f"volume-{i}.nii.gz", case.volume, case.affine),
            _write_nifti(out / f"segmentation-{i}.nii.gz", case.label, case.affine)]


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
