"""One-line errors for the ``flare`` commands: expected failures end in ``error: <one line>`` on stderr
and exit code 2, never a traceback."""

from __future__ import annotations

import errno
from collections.abc import Callable
from functools import wraps
from typing import Any

import typer

from flare.errors import FlareError


def _expected_errors() -> tuple[type[BaseException], ...]:
    from flare.datasets.ingest import ManifestError
    from flare.datasets.prepare import PrepareError
    from flare.datasets.records import DataError
    from flare.platform.config import ConfigError

    return (ConfigError, DataError, ManifestError, PrepareError, FileExistsError, FileNotFoundError, KeyError,
            ValueError, PermissionError, FlareError)


# OS errors a user causes and can fix: no permission, a read-only file system, a full disk or quota
USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror}"
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected errors into ``error: <one line>`` and exit code 2 (no traceback)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except _expected_errors() as err:
            typer.echo(f"error: {_one_line(err)}", err=True)
            raise typer.Exit(2) from None
        except OSError as err:
            if err.errno not in USER_ERRNOS:
                raise
            typer.echo(f"error: {_one_line(err)}", err=True)
            raise typer.Exit(2) from None

    return wrapper
