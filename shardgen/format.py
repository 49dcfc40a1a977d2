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

from .errors import ShardError
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
_META_KEYS = frozenset(("case", "z", "depth", "target", "liver", "tumour", "shape"))


def decode_sample(sample: dict[str, Any], name: str = "<shard>") -> SliceSample:
    """Fields of bytes (as a tar reader yields them) → a :class:`SliceSample`.

    A damaged sample raises :class:`ShardError` naming ``name`` (the shard) and the member.
    """
    key = sample.get("__key__", "?")
    meta = _meta(sample, name, key)
    image = _pixels(sample, "image.zst", meta["shape"], name, key)
    mask = _pixels(sample, "mask.zst", meta["shape"], name, key)
    return SliceSample(meta["case"], meta["z"], meta["depth"], meta["target"], meta["liver"],
                       meta["tumour"], image, mask)


def _meta(sample: dict[str, Any], name: str, key: str) -> dict[str, Any]:
    try:
        meta = json.loads(sample["meta.json"])
    except KeyError:
        raise ShardError(name, "sample has no meta.json", key) from None
    except ValueError as exc:  # UnicodeDecodeError is one too
        raise ShardError(name, f"meta.json is not valid JSON ({exc})", f"{key}.meta.json") from None
    if type(meta) is not dict or not _META_KEYS <= meta.keys():
        raise ShardError(name, f"meta.json lacks some of {', '.join(sorted(_META_KEYS))}", f"{key}.meta.json")
    shape, z, depth = meta["shape"], meta["z"], meta["depth"]
    if not _is_shape(shape):
        raise ShardError(name, f"meta.json's shape {shape!r} is not [height, width]", f"{key}.meta.json")
    # the 2.5D stacking compares and indexes by z: a wrong type would fail far from here
    if not (type(z) is int and type(depth) is int and 0 <= z < depth):
        raise ShardError(name, f"meta.json's z {z!r} is not a slice of depth {depth!r}", f"{key}.meta.json")
    return meta


def _is_shape(shape: Any) -> bool:
    # spelled out rather than all(...): this runs for every sample the loader reads
    return (type(shape) is list and len(shape) == 2 and type(shape[0]) is int and type(shape[1]) is int
            and shape[0] > 0 and shape[1] > 0)


def _pixels(sample: dict[str, Any], field: str, shape: list[int], name: str, key: str) -> np.ndarray:
    try:
        data = sample[field]
    except KeyError:
        raise ShardError(name, f"sample has no {field}", key) from None
    expected = shape[0] * shape[1]
    try:
        # checked before decompressing: a damaged frame header must not allocate gigabytes
        stored = zstandard.frame_content_size(data)
        if stored != expected:
            raise ShardError(name, _size_mismatch(stored, shape), f"{key}.{field}")
        raw = _DECOMPRESSOR.decompress(data)
    except zstandard.ZstdError as exc:
        raise ShardError(name, f"corrupt zstd data ({exc})", f"{key}.{field}") from None
    return np.frombuffer(raw, np.uint8).reshape(shape)


def _size_mismatch(stored: int, shape: list[int]) -> str:
    if stored < 0:
        return "zstd frame does not record its decoded size"
    return f"decodes to {stored} bytes, but meta.json's shape {shape} needs {shape[0] * shape[1]}"


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
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise ShardError(path, f"cannot open ({exc.strerror})") from None
    with f:
        yield from read_samples(f, str(path))


def read_samples(stream: BinaryIO, name: str = "<stream>") -> Iterator[dict[str, Any]]:
    """Group a tar stream's members into samples (adjacent members sharing a key).

    Every sample has exactly the fields of :data:`FIELDS`; anything else raises
    :class:`ShardError` naming ``name`` (the shard) and the member.
    """
    sample: dict[str, Any] = {}
    seen: set[str] = set()
    for member, data in read_members(stream, name):
        key, field = _key_and_field(member, name)
        if sample and sample["__key__"] != key:
            yield _complete(sample, name, seen)
            sample = {}
        if field in sample:
            raise ShardError(name, f"field {field} appears twice in sample {key}", member)
        sample["__key__"] = key
        sample[field] = data
    if sample:
        yield _complete(sample, name, seen)


def _key_and_field(member: str, name: str) -> tuple[str, str]:
    key, _, field = member.rpartition("/")[2].partition(".")
    if not key or field not in _FIELD_SET:
        raise ShardError(name, f"member name is not <key>.<field> with a field of {', '.join(FIELDS)}",
                         member)
    return key, field


def _complete(sample: dict[str, Any], name: str, seen: set[str]) -> dict[str, Any]:
    key = sample["__key__"]
    if len(sample) != len(FIELDS) + 1:  # fields are known and unique, so only some can lack
        missing = [f for f in FIELDS if f not in sample]
        raise ShardError(name, f"sample lacks {', '.join(missing)}", key)
    if key in seen:  # members of one sample must be adjacent, and a sample stored once
        raise ShardError(name, "sample key appears twice in the shard", key)
    seen.add(key)
    return sample


def read_members(stream: BinaryIO, name: str = "<stream>") -> Iterator[tuple[str, bytes]]:
    """(name, data) of the members of a ustar stream (a file, a pipe, a socket).

    The standard library's tarfile spends ~0.2 ms of Python per member, which made it the
    slowest stage of the training loader; shards are plain ustar (written above), so the
    headers are read directly. Nothing is ever extracted, but a member that is not a
    regular file, or whose name leaves the shard, means the tar is not ours: refused, as
    are damaged headers and a stream cut short, with :class:`ShardError` naming ``name``.
    """
    while True:
        header = _read_exactly(stream, tarfile.BLOCKSIZE)
        if header == _ZERO_BLOCK:
            _end_of_archive(stream, name)
            return
        member, size = _parse_header(header, name)
        data = _read_exactly(stream, size)
        padding = -size % tarfile.BLOCKSIZE
        if len(data) < size or len(_read_exactly(stream, padding)) < padding:
            raise ShardError(name, "stream ends inside this member (truncated)", member)
        yield member, data


def _end_of_archive(stream: BinaryIO, name: str) -> None:
    # the writer always ends with two zero blocks; one alone is a zeroed header or a cut
    if _read_exactly(stream, tarfile.BLOCKSIZE) != _ZERO_BLOCK:
        raise ShardError(name, "a zero block not followed by a second one: a zeroed header, "
                               "or the end-of-archive cut short")


def _parse_header(header: bytes, name: str) -> tuple[str, int]:
    if len(header) < tarfile.BLOCKSIZE:
        # the writer ends every shard with zero blocks, so even a cut between samples shows
        where = "inside a tar header" if header else "without the end-of-archive blocks"
        raise ShardError(name, f"stream ends {where} (truncated)")
    try:
        stored = int(header[148:156].strip(b"\0 ") or b"0", 8)
    except ValueError:
        stored = -1
    if stored != sum(header[:148]) + 256 + sum(header[156:]):  # the field itself counts as spaces
        raise ShardError(name, "damaged tar header (checksum mismatch)")
    try:
        member = header[:100].split(b"\0", 1)[0].decode()
        prefix = header[345:500].split(b"\0", 1)[0].decode()
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
    except ValueError:  # a size that is not octal, or a name that is not UTF-8
        raise ShardError(name, "damaged tar header (unreadable name or size)") from None
    member = f"{prefix}/{member}" if prefix else member
    _check_member(header[156:157], member, size, name)
    return member, size


def _check_member(kind: bytes, member: str, size: int, name: str) -> None:
    if kind not in _REGULAR:
        what = _KINDS.get(kind, f"type {kind!r}")
        raise ShardError(name, f"a {what} member: shards hold only regular files", member)
    if size < 0:  # int(..., 8) accepts a sign; read(-1) would read the whole stream
        raise ShardError(name, f"damaged tar header (size {size})", member)
    if member.startswith("/") or (".." in member and ".." in member.split("/")):
        raise ShardError(name, "member name leaves the shard (absolute or with ..)", member)


_ZERO_BLOCK = tarfile.NUL * tarfile.BLOCKSIZE
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE)
_KINDS = {tarfile.LNKTYPE: "hard link", tarfile.SYMTYPE: "symbolic link",
          tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
          tarfile.DIRTYPE: "directory", tarfile.FIFOTYPE: "FIFO", tarfile.CONTTYPE: "contiguous file",
          tarfile.XHDTYPE: "pax header", tarfile.XGLTYPE: "pax global header",
          tarfile.GNUTYPE_LONGNAME: "GNU long name", tarfile.GNUTYPE_LONGLINK: "GNU long link",
          tarfile.GNUTYPE_SPARSE: "sparse file"}
_FIELD_SET = frozenset(FIELDS)
_CHUNK = 1 << 24


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    if size > _CHUNK:  # a damaged size must not allocate more than the stream holds
        return _read_chunked(stream, size)
    data = stream.read(size)
    while len(data) < size:  # pipes and sockets may return less than asked
        more = stream.read(size - len(data))
        if not more:
            break
        data += more
    return data


def _read_chunked(stream: BinaryIO, size: int) -> bytes:
    parts, left = [], size
    while left > 0:
        part = _read_exactly(stream, min(left, _CHUNK))
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


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
