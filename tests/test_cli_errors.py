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


def test_yaml_error_inside_set_is_one_line() -> None:
    from flare.platform.cli import app

    res = CliRunner().invoke(app, ["train", "tiny", "--no-ray", "--set", "objective.star.w=[1, 2"])
    assert res.exit_code == 2
    assert res.output.strip().startswith("error: ") and "objective.star.w='[1, 2' is not valid YAML" in res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["a\x00b", "tab\tname", "x" * 101, "a/b", ""])
def test_names_that_end_up_in_paths_are_checked(name: str) -> None:
    """A NUL in ``name`` used to pass validation and reach run folders and MLflow run names."""
    from flare.platform.config import ConfigError, load_job, parse_job
    from flare.platform.specs import resolve_spec

    raw = load_job(resolve_spec("tiny"), []).model_dump(mode="json")
    assert parse_job({**raw, "name": "ok-name_1.2"}).name == "ok-name_1.2"
    with pytest.raises(ConfigError, match="name must be 1-100 printable characters"):
        parse_job({**raw, "name": name})


def test_refused_weights_are_one_line_and_never_run(tmp_path) -> None:
    """A state.pt that is a pickle with code in it: refused by the weights-only load, the code never runs."""
    import json
    import os

    import torch

    from flare.platform.cli import app

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    model = tmp_path / "model"
    model.mkdir()
    torch.save({"weights": Payload()}, model / "state.pt")
    (model / "job.json").write_text(json.dumps({"job": {"data": {"manifest": "/m.json"}}, "layout": "300w68"}))
    img = tmp_path / "x.png"
    img.write_bytes(b"")
    res = CliRunner().invoke(app, ["predict", str(img), "--model", str(model), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "refused, not plain weights" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not marker.exists()
