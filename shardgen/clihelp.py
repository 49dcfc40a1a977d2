"""What every click CLI of the project shares (``liverseg-shards``, ``liverseg-eval``,
``liverseg-train``, the demo): help options and width, the verbosity flag, and our errors
printed in one line."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
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
