"""What every click CLI of the project shares (``liverseg-shards``, ``liverseg-eval``,
``liverseg-train``, the demo): help options and width, the verbosity flag, our errors
printed in one line, and a cheap import of the model stack."""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

from .errors import ShardgenError, os_error_line

CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
Command = TypeVar("Command", bound=Callable[..., Any])


def friendly_errors(command: Command) -> Command:
    """Errors a user can cause (``ShardgenError``, liverseg's included, and file-system
    errors) become one line (``Error: ...``, exit 1), never a traceback; bugs still raise."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ShardgenError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:  # an --out that is a file, a full disk: the path and the reason
            raise click.ClickException(os_error_line(exc)) from None

    return wrapper  # type: ignore[return-value]


def verbose_option(command: Command) -> Command:
    """``-v/--verbose``: log diagnostics to stderr (warnings only without it); the flag is
    handled here and not passed on to the command."""

    def configure(ctx: click.Context, param: click.Parameter, verbose: bool) -> None:
        logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")

    return click.option("-v", "--verbose", is_flag=True, expose_value=False, is_eager=True,
                        callback=configure, help="Log diagnostics to stderr.")(command)


@contextlib.contextmanager
def heavy_imports() -> Iterator[None]:
    """Import the model stack (torch, timm, smp: about 450,000 objects, none of them
    garbage) inside this block: the garbage collector is paused while they load, then
    freezes them, so that none of its full passes, during the import, the run or the
    interpreter's exit, walks them again. Measured on a fresh ``launch/train.py`` run:
    4 s of CPU less per process (docs/PERFORMANCE.md, "Start-up and exit"). Nothing
    relies on those passes: the objects are module state, alive until the process ends.
    A process that had the modules already (a test calling a command) is left as it was."""
    enabled, loaded = gc.isenabled(), len(sys.modules)
    gc.disable()
    try:
        yield
    finally:
        if len(sys.modules) > loaded:
            gc.freeze()
        if enabled:
            gc.enable()
