"""Errors a user can cause; the CLI prints them in one line, without a traceback."""

from __future__ import annotations

from pathlib import Path


class ShardgenError(Exception):
    """Bad input or settings, explained in one line."""


class InvalidCase(ShardgenError):
    """One case cannot be used: names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
