"""``flare specs ls|cp|validate``: the shipped job specs and search spaces; ``flare.platform.cli`` adds
:data:`specs_app` to the main app."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flare.platform.cli_errors import one_line_errors

specs_app = typer.Typer(help="Shipped job specs and search spaces: list, copy to edit, validate.",
                        no_args_is_help=True)


@specs_app.command("ls")
@one_line_errors
def specs_ls() -> None:
    """Every shipped job spec (layout, objective, model size) and search space (objective, parameters)."""
    from flare.platform.specs import list_lines

    for line in list_lines():
        typer.echo(line)


@specs_app.command("cp")
@one_line_errors
def specs_cp(
    name: Annotated[str, typer.Argument(help="a shipped spec (300w_star) or search space (search/star)")],
    dest: Annotated[Path, typer.Argument(help="the copy (a .yaml file, or a directory to put it in)")],
    force: Annotated[bool, typer.Option("--force", help="replace an existing file")] = False,
) -> None:
    """Copy a shipped spec to edit it."""
    from flare.platform.specs import copy_spec

    typer.echo(f"copied {name} to {copy_spec(name, dest, force)}")


@specs_app.command("validate")
@one_line_errors
def specs_validate(
    spec: Annotated[str, typer.Argument(help="a job spec YAML or a shipped spec's name")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a.b=value (repeatable)")] = None,
) -> None:
    """Parse a job spec, check its data, and build its model (meta device) and objective."""
    from flare.platform.specs import validate_spec

    typer.echo(validate_spec(spec, set_ or []))
