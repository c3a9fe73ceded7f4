"""One-line errors for the ``flare`` commands: expected failures end in ``error: <one line>`` on stderr
and exit code 2, never a traceback."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

import typer


def _expected_errors() -> tuple[type[BaseException], ...]:
    from flare.datasets.ingest import ManifestError
    from flare.datasets.prepare import PrepareError
    from flare.datasets.records import DataError
    from flare.platform.config import ConfigError

    return (ConfigError, DataError, ManifestError, PrepareError, FileExistsError, FileNotFoundError, KeyError,
            ValueError)


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
            msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            typer.echo(f"error: {msg}", err=True)
            raise typer.Exit(2) from None

    return wrapper
