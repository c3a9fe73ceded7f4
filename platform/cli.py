"""The ``flare`` command line (Typer). Each sub-command is a thin shell over a library function."""

from __future__ import annotations

import typer

import flare

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train and tune facial-landmark detectors.")


@app.command()
def version() -> None:
    """Print the flare version."""
    typer.echo(flare.__version__)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
