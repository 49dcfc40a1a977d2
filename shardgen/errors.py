"""Errors a user can cause; the CLIs print them in one line, without a traceback.

``ShardgenError`` is the root of every such error, liverseg's included
(``liverseg.errors.LiversegError`` derives from it), so one ``except`` catches them all
and nothing is re-wrapped on its way up."""

from __future__ import annotations

from pathlib import Path


class ShardgenError(Exception):
    """Bad input or settings, explained in one line; the root of shardgen's and liverseg's errors."""


class InvalidCase(ShardgenError):
    """One case cannot be used: names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def os_error_line(exc: OSError) -> str:
    """One line for a file-system error (an output path that is a file, a full disk,
    no permission): the path and the reason, as the CLIs print it."""
    if isinstance(exc, FileExistsError) and exc.filename is not None and Path(exc.filename).is_file():
        return f"{exc.filename}: is a file, not a folder"
    if exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


class ShardError(ShardgenError):
    """A damaged or hostile shard (truncated, bad tar header, corrupt zstd, a member name
    that leaves the shard, a missing file): names the shard and, where known, the member."""

    def __init__(self, shard: str | Path, reason: str, member: str | None = None):
        self.shard = str(shard)
        self.member = member
        self.reason = reason
        where = f"{self.shard} (member {member})" if member else self.shard
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # picklable across worker processes despite the extra arguments
        return type(self), (self.shard, self.reason, self.member)
