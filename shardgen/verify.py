"""``liverseg-shards verify``: every shard of a manifest present, unchanged and readable to the end.

One pass per shard: the bytes are hashed as the reader consumes them, and every sample is
decoded, so a shard is read once however it is damaged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from .errors import ShardError
from .format import decode_sample, read_samples
from .manifest import read_manifest


class _HashingReader:
    """A read-only stream that hashes and counts what is read through it."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.sha256.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        # the reader stops at the end-of-archive blocks; the record padding is hashed too
        while self.read(1 << 20):
            pass


def check_listed_file(path: Path, entry: dict[str, Any]) -> None:
    """Raise :class:`ShardError` if a manifest's shard is missing or not of its recorded size
    (cheap: one ``stat``)."""
    size = _file_size(path)
    if size != entry["bytes"]:
        raise ShardError(path, f"{size} bytes, the manifest records {entry['bytes']}")


def _file_size(path: Path) -> int:
    try:
        if not path.is_file():
            raise ShardError(path, "listed in the manifest, but missing" if not path.exists()
                             else "listed in the manifest, but not a file")
        return path.stat().st_size
    except OSError as exc:
        raise ShardError(path, f"cannot be read ({exc.strerror})") from None


def verify_shard(path: Path, entry: dict[str, Any]) -> None:
    """Raise :class:`ShardError` unless the shard reads to the end with the manifest's counts,
    size and sha256."""
    _file_size(path)
    try:
        with open(path, "rb") as f:
            stream = _HashingReader(f)
            samples, targets = _count_samples(stream, str(path))
            stream.drain()
    except OSError as exc:
        raise ShardError(path, f"cannot be read ({exc.strerror})") from None
    # compared after reading, so a damaged shard gets the reader's precise reason
    if (samples, targets) != (entry["samples"], entry["targets"]):
        raise ShardError(path, f"{samples} samples / {targets} targets, the manifest records "
                               f"{entry['samples']} / {entry['targets']}")
    if stream.bytes != entry["bytes"]:
        raise ShardError(path, f"{stream.bytes} bytes, the manifest records {entry['bytes']}")
    if stream.sha256.hexdigest() != entry["sha256"]:
        raise ShardError(path, "sha256 differs from the manifest's (changed since the build)")


def _count_samples(stream: BinaryIO, name: str) -> tuple[int, int]:
    samples = targets = 0
    for sample in read_samples(stream, name):
        samples += 1
        targets += decode_sample(sample, name).target
    return samples, targets


def verify_shards(shards: str | Path, on_plan: Callable[[int], None] | None = None,
                  on_shard: Callable[[dict[str, Any], ShardError | None], None] | None = None
                  ) -> list[ShardError]:
    """The problems of every shard listed in a manifest (or a folder holding manifest.json),
    one per bad shard; empty if all are good. ``on_plan`` gets the number of shards,
    ``on_shard`` each manifest entry once checked, with its problem or None."""
    shards = Path(shards)
    manifest = read_manifest(shards)
    folder = shards if shards.is_dir() else shards.parent
    if on_plan:
        on_plan(len(manifest["shards"]))
    problems = []
    for entry in manifest["shards"]:
        problem = None
        try:
            verify_shard(folder / entry["path"], entry)
        except ShardError as exc:
            problem = exc
            problems.append(exc)
        if on_shard:
            on_shard(entry, problem)
    return problems
