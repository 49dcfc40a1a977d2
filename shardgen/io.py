"""Writing files so that a reader never sees half of one: every file shardgen and liverseg
write goes through ``atomic_path`` (JSON, CSV, HTML, shards, NIfTI, safetensors).

A file is written under a temporary name in its own folder, flushed to the disk and
renamed over the final name; on any error the temporary file is removed and the old file
(if any) stays as it was.
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import nibabel as nib
import numpy as np
from isal import igzip


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; when the block ends without an error
    the file is fsynced and renamed to ``path``, otherwise it is removed. The folder is
    created if needed.

    The name is ``.NAME.PID.tmp``: hidden, in the same folder (a rename across file
    systems is not atomic), apart from concurrent writers, and made with the process's
    usual mode (tempfile.mkstemp's 0600 would survive the rename and hide the file from
    the other users of a shared cluster).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as file:  # the rename is only crash-safe once the data is on disk
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_leftovers(path: str | Path) -> None:
    """Remove the temporary files of ``path`` that a killed writer left (``.NAME.PID.tmp``,
    any PID). Only for a path that one writer owns at a time, such as a case's shard."""
    path = Path(path)
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        leftover.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def json_ready(value: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays as Python ones, paths as text, keys as
    text, and NaN or inf (an undefined metric, docs/METRICS.md) as null, since strict
    readers refuse NaN."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_ready(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """``data`` (through ``json_ready``) as indented JSON, atomically."""
    return write_text_atomic(path, json.dumps(json_ready(data), indent=1, allow_nan=False) + "\n")


class SpatialHeader(Protocol):
    def apply(self, header: nib.Nifti1Header) -> None: ...


def write_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray,
                spatial: SpatialHeader | None = None, compresslevel: int = 1) -> Path:
    """Write ``data`` (in file voxel order, stored in its own dtype) as NIfTI-1, atomically.

    The header takes ``spatial``'s qform, sform (matrices and codes) and units when given
    (``shardgen.nifti.Spatial``: a prediction keeps its input's header), else both forms
    are ``affine`` with code 1 (scanner) and units mm. A ``.gz`` name is deflated with
    ISA-L at ``compresslevel`` (0 is its fastest) with mtime 0 and no file name in the
    gzip header, so the same data always gives the same bytes.
    """
    path = Path(path)
    data = np.ascontiguousarray(data)
    affine = np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(data, affine)
    image.header.set_data_dtype(data.dtype)
    if spatial is not None:
        spatial.apply(image.header)
    else:
        image.header.set_xyzt_units("mm")
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
    payload = image.to_bytes()
    if path.name.endswith(".gz"):
        payload = igzip.compress(payload, compresslevel=compresslevel, mtime=0)
    return write_bytes_atomic(path, payload)
