"""The shard format (docs/FORMAT.md): one sample per preprocessed axial slice.

A shard is a plain tar in WebDataset's layout (``<key>.<field>`` members, a sample's
members adjacent). Fields: ``image.zst`` and ``mask.zst`` (raw uint8 size×size,
zstd-compressed) and ``meta.json``. Slices of a case are written in increasing z, so a
reader builds the 2.5D stacks from neighbours it has just read instead of every sample
carrying copies of them. No pickled data anywhere.

webdataset is not imported here: importing it imports torch, and shardgen runs on
machines without torch. Tars are written with the standard library in the layout
WebDataset reads; the tests read them back through webdataset itself.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import zstandard

from .preprocess import context_indices

FORMAT_NAME = "liverseg-shards"
FORMAT_VERSION = 1
FIELDS = ("image.zst", "mask.zst", "meta.json")


@dataclass(frozen=True)
class SliceSample:
    """One decoded sample: uint8 image and mask (H, W), and its metadata."""

    case: str
    z: int
    depth: int
    target: bool
    liver: bool
    tumour: bool
    image: np.ndarray
    mask: np.ndarray


def sample_key(case: str, z: int) -> str:
    # WebDataset splits a member name at the first dot of its basename: keys hold none.
    return f"{case.replace('.', '_')}-z{z:04d}"


def class_counts(mask: np.ndarray) -> tuple[int, int, int]:
    """Pixels of background, liver (without tumour) and tumour in a mask."""
    foreground = int(np.count_nonzero(mask))
    tumour = int(np.count_nonzero(mask == 2))
    return mask.size - foreground, foreground - tumour, tumour


def encode_sample(case: str, z: int, depth: int, target: bool, image: np.ndarray,
                  mask: np.ndarray, compressor: zstandard.ZstdCompressor,
                  counts: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """A sample as WebDataset fields of bytes (``counts``: :func:`class_counts` of mask)."""
    _, liver, tumour = counts or class_counts(mask)
    meta = {
        "case": case, "z": int(z), "depth": int(depth), "target": bool(target),
        "liver": liver + tumour > 0, "tumour": tumour > 0, "shape": list(image.shape),
    }
    return {
        "__key__": sample_key(case, z),
        "image.zst": compressor.compress(np.ascontiguousarray(image, np.uint8).tobytes()),
        "mask.zst": compressor.compress(np.ascontiguousarray(mask, np.uint8).tobytes()),
        "meta.json": json.dumps(meta, separators=(",", ":")).encode(),
    }


_DECOMPRESSOR = zstandard.ZstdDecompressor()


def decode_sample(sample: dict[str, Any]) -> SliceSample:
    """Fields of bytes (as a tar reader yields them) → a :class:`SliceSample`."""
    meta = json.loads(sample["meta.json"])
    shape = tuple(meta["shape"])
    image = np.frombuffer(_DECOMPRESSOR.decompress(sample["image.zst"]), np.uint8).reshape(shape)
    mask = np.frombuffer(_DECOMPRESSOR.decompress(sample["mask.zst"]), np.uint8).reshape(shape)
    return SliceSample(meta["case"], meta["z"], meta["depth"], meta["target"], meta["liver"],
                       meta["tumour"], image, mask)


def member_header(name: str, size: int) -> bytes:
    """The tar (ustar) header of a shard member, equal to ``tarfile.TarInfo.tobuf``'s.

    The standard library builds it field by field in Python (a fifth of the time spent
    per slice); here its template is patched with the name, size and checksum instead.
    A test checks the result against the standard library byte for byte.
    """
    encoded = name.encode()
    if len(encoded) > 100 or size >= 8**11:
        return _tarinfo(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
    header = bytearray(_TEMPLATE)
    header[0:len(encoded)] = encoded
    header[124:136] = b"%011o\0" % size
    header[148:155] = b"%06o\0" % sum(header)  # computed with the checksum field blank
    return bytes(header)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uname = info.gname = "liverseg"
    return info


def _blank_template() -> bytes:
    header = bytearray(_tarinfo("", 0).tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
    header[148:156] = b" " * 8
    return bytes(header)


_TEMPLATE = _blank_template()


class ShardWriter:
    """Writes samples to one tar, deterministically (fixed mtime, owner and mode).

    Members are written straight to the file (tarfile's stream mode re-copies its buffer
    for every 10 kB, which cost more than compressing the slice). Use as a context
    manager; ``sha256`` and ``bytes`` are set on exit.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.samples = 0
        self.sha256 = ""
        self.bytes = 0

    def __enter__(self) -> "ShardWriter":
        self._file = open(self.path, "wb")
        self._hash = hashlib.sha256()
        return self

    def _put(self, data: bytes) -> None:
        self._hash.update(data)
        self._file.write(data)
        self.bytes += len(data)

    def write(self, sample: dict[str, Any]) -> None:
        key = sample["__key__"]
        for field in FIELDS:
            data = sample[field]
            self._put(member_header(f"{key}.{field}", len(data)))
            self._put(data)
            self._put(tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE))
        self.samples += 1

    def __exit__(self, *exc: object) -> None:
        # end-of-archive: two zero blocks, then padding to a whole record, as tarfile does
        self._put(tarfile.NUL * 2 * tarfile.BLOCKSIZE)
        self._put(tarfile.NUL * (-self.bytes % tarfile.RECORDSIZE))
        self._file.close()
        self.sha256 = self._hash.hexdigest()


def read_shard(path: str | Path) -> Iterator[dict[str, Any]]:
    """Samples of one shard as dicts of bytes (``__key__`` plus fields), in tar order."""
    with open(path, "rb") as f:
        yield from read_samples(f)


def read_samples(stream: BinaryIO) -> Iterator[dict[str, Any]]:
    """Group a tar stream's members into samples (adjacent members sharing a key)."""
    sample: dict[str, Any] = {}
    for name, data in read_members(stream):
        key, field = name.rsplit("/", 1)[-1].split(".", 1)
        if sample and sample["__key__"] != key:
            yield sample
            sample = {}
        sample["__key__"] = key
        sample[field] = data
    if sample:
        yield sample


def read_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files in a ustar stream (a file, a pipe, a socket).

    The standard library's tarfile spends ~0.2 ms of Python per member, which made it the
    slowest stage of the training loader; shards are plain ustar (written above), so the
    headers are read directly. Other member types are skipped, damaged headers refused.
    """
    while True:
        header = _read_exactly(stream, tarfile.BLOCKSIZE)
        if not header or header == tarfile.NUL * tarfile.BLOCKSIZE:
            return
        name, size, kind = _parse_header(header)
        data = _read_exactly(stream, size)
        _read_exactly(stream, -size % tarfile.BLOCKSIZE)
        if len(data) < size:
            raise ValueError(f"tar stream ends inside member {name}")
        if kind in (b"0", b"\0"):
            yield name, data


def _parse_header(header: bytes) -> tuple[str, int, bytes]:
    if len(header) < tarfile.BLOCKSIZE:
        raise ValueError("tar stream ends inside a header")
    stored = int(header[148:156].strip(b"\0 ") or b"0", 8)
    if stored != sum(header[:148]) + 256 + sum(header[156:]):  # checksum field counts as spaces
        raise ValueError("damaged tar header (checksum mismatch)")
    name = header[:100].split(b"\0", 1)[0].decode()
    prefix = header[345:500].split(b"\0", 1)[0].decode()
    size = int(header[124:136].strip(b"\0 ") or b"0", 8)
    return (f"{prefix}/{name}" if prefix else name), size, header[156:157]


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    while len(data) < size:  # pipes and sockets may return less than asked
        more = stream.read(size - len(data))
        if not more:
            break
        data += more
    return data


def stack_stream(samples: Iterable[SliceSample], context: int) -> Iterator[tuple[SliceSample, np.ndarray]]:
    """Build the (2k+1, H, W) uint8 stacks of the target samples of a z-ordered stream.

    Neighbours are ``preprocess.context_indices`` (edges replicated): the writer
    guarantees they are in the stream, so the result equals ``preprocess.stack_context``
    on the whole volume.
    """
    for sample, slices in context_stream(samples, context):
        yield sample, np.stack(slices)


def context_stream(samples: Iterable[SliceSample], context: int
                   ) -> Iterator[tuple[SliceSample, list[np.ndarray]]]:
    """Like :func:`stack_stream` but yields the list of channel slices, uncopied, so a
    batch can be filled with one copy per slice instead of two.

    Holds only the last few slices of the current case (a ring buffer in effect): a target
    is emitted once the slice k above it has been read, or its case ended.
    """
    window: dict[int, SliceSample] = {}
    pending: list[SliceSample] = []
    for sample in samples:
        if window and _starts_new_run(sample, window):
            yield from _flush(pending, window, context)
            window, pending = {}, []
        window[sample.z] = sample
        if sample.target:
            pending.append(sample)
        ready = [p for p in pending if _last_needed(p, context) <= sample.z]
        for p in ready:
            yield p, _channels(p, window, context)
        pending = [p for p in pending if _last_needed(p, context) > sample.z]
        lowest = min([p.z for p in pending] + [sample.z + 1]) - context
        for z in [z for z in window if z < lowest]:
            del window[z]
    yield from _flush(pending, window, context)


def _starts_new_run(sample: SliceSample, window: dict[int, SliceSample]) -> bool:
    # a new case, or the same shard read again (resampling can repeat a shard)
    return next(iter(window.values())).case != sample.case or sample.z <= max(window)


def _last_needed(sample: SliceSample, context: int) -> int:
    return min(sample.z + context, sample.depth - 1)


def _flush(pending: list[SliceSample], window: dict[int, SliceSample], context: int
           ) -> Iterator[tuple[SliceSample, list[np.ndarray]]]:
    for p in pending:
        yield p, _channels(p, window, context)


def _channels(sample: SliceSample, window: dict[int, SliceSample], context: int) -> list[np.ndarray]:
    try:
        return [window[z].image for z in context_indices(sample.z, sample.depth, context)]
    except KeyError as missing:
        raise ValueError(f"shard stream lacks slice {missing} of case {sample.case} "
                         f"needed as context for slice {sample.z}") from None
