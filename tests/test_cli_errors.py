"""Errors a user can cause end in one line and exit code 2; anything else keeps its traceback."""

from __future__ import annotations

import errno

import pytest
import typer
from typer.testing import CliRunner

from flare.errors import FlareError
from flare.platform.cli_errors import one_line_errors


def _app(exc: BaseException) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @one_line_errors
    def boom() -> None:
        raise exc

    return app


@pytest.mark.parametrize("exc, line", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/out/shard-0.parquet"),
     "error: /data/out/shard-0.parquet: No space left on device"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/manifest.json"), "error: /ro/manifest.json: Read-only file system"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), "error: /root/x: Permission denied"),
    (FlareError("search s: no trial reported a validation epoch (t1: RuntimeError: boom)\nmore"),
     "error: search s: no trial reported a validation epoch (t1: RuntimeError: boom)"),
    (ValueError("--box nan,1,2,3: not finite"), "error: --box nan,1,2,3: not finite"),
])
def test_user_errors_are_one_line(exc: BaseException, line: str) -> None:
    res = CliRunner().invoke(_app(exc), [])
    assert res.exit_code == 2
    assert res.output.strip() == line


def test_other_errors_keep_their_traceback() -> None:
    res = CliRunner().invoke(_app(OSError(errno.EIO, "Input/output error")), [])
    assert res.exit_code == 1 and isinstance(res.exception, OSError)
    res = CliRunner().invoke(_app(RuntimeError("a bug")), [])
    assert res.exit_code == 1 and isinstance(res.exception, RuntimeError)
