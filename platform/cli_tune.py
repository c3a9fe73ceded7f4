"""``flare tune``: hyperparameter search with Ray Tune ASHA, a thin shell over the search driver;
``flare.platform.cli`` adds :func:`tune` to the main app."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flare.platform.cli_errors import one_line_errors


@one_line_errors
def tune(
    job_file: Annotated[Path | None, typer.Argument(help="job spec YAML or a shipped spec's name (not needed "
                                                           "with --resume)")] = None,
    search: Annotated[Path | None, typer.Option("--search", help="search file, or a shipped one's name (star)")] = None,
    samples: Annotated[int | None, typer.Option("--samples", help="trials (x grid size); default: the file's")]
    = None,
    max_concurrent: Annotated[str, typer.Option("--max-concurrent", help="auto (what the free CPUs/GPUs fit) "
                                                "or K")] = "auto",
    address: Annotated[str | None, typer.Option("--address", help="auto | ray://HOST:10001")] = None,
    resume: Annotated[str | None, typer.Option("--resume", help="NAME of an interrupted search")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a.b=value in the job (repeatable)")]
    = None,
    name: Annotated[str | None, typer.Option("--name", help="search name (default: JOB-SEARCH-timestamp)")]
    = None,
    storage: Annotated[str | None, typer.Option("--storage", help="Tune/Train storage: a path shared by the "
                                                "nodes (default ./runs)")] = None,
) -> None:
    """Search hyperparameters with ASHA; register the best model and promote it only if better."""
    from flare.platform.tune import plan_search, run_search

    if resume is None:
        if job_file is None or search is None:
            raise ValueError("give JOB.yaml and --search FILE (or --resume NAME)")
        from flare.platform.specs import resolve_spec

        state = plan_search(resolve_spec(job_file), resolve_spec(search, search=True), set_ or [], samples=samples,
                            name=name, storage=storage)
        outcome = run_search(state, max_concurrent=max_concurrent, address=address, log=typer.echo)
    else:
        if job_file is not None or search is not None or set_:
            typer.echo(f"--resume {resume}: continuing with the saved job and search; JOB/--search/--set ignored")
        outcome = run_search(resume=resume, storage=storage, address=address, log=typer.echo)
    typer.echo(f"search {outcome.name}: plot {outcome.plot}; parent run {outcome.parent_run_id}")
    if outcome.failed:
        typer.echo(f"error: {len(outcome.failed)} of {len(outcome.trials)} trial(s) failed "
                   f"({', '.join(outcome.failed)}); the others finished and were compared", err=True)
        raise typer.Exit(1)
