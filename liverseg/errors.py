"""Errors a user can cause in liverseg; the CLIs print them in one line, without a traceback."""

from __future__ import annotations

from shardgen.errors import ShardgenError


class LiversegError(ShardgenError):
    """Bad input or settings, explained in one line."""


class ConfigError(LiversegError):
    """A wrong name or flag: unknown architecture, encoder, attention or weights."""


class CheckpointError(LiversegError):
    """A checkpoint folder that is missing, corrupt or does not fit its config; names the file."""
