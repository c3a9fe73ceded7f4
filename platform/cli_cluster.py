"""``flare cluster``, ``flare submit`` and ``flare jobs``: thin Typer shells over
:mod:`flare.platform.local_head` and :mod:`flare.platform.ray_jobs`; ``flare.platform.cli`` adds ``cluster_app``, ``jobs_app`` and
:func:`submit` to the main app.

The cluster address is ``--address`` (the head's dashboard, ``http://HEAD:8265``), else
``$RAY_API_SERVER_ADDRESS``, else the head started by ``flare cluster up``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer

from flare.platform.cli_errors import one_line_errors

AddressOpt = Annotated[str | None, typer.Option("--address", help="the head's dashboard, http://HEAD:8265 "
                                                   "(default: $RAY_API_SERVER_ADDRESS, else `flare cluster up`'s)")]


def _cluster_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Hand :class:`~flare.platform.ray_jobs.ClusterError` to ``one_line_errors`` (one line, exit 2)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from flare.platform.ray_jobs import ClusterError

        try:
            return fn(*args, **kwargs)
        except ClusterError as err:
            raise ValueError(str(err)) from None

    return wrapper


def _connect(address: str | None):
    """A checked connection to ``address`` or the default cluster (see the module docstring)."""
    from flare.platform.local_head import load_state
    from flare.platform.ray_jobs import ClusterError, connect

    if not address:
        address = os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address:
        state = load_state()
        if state is None:
            raise ClusterError("no cluster address: pass --address http://HEAD:8265, set RAY_API_SERVER_ADDRESS, "
                               "or start a local head with `flare cluster up`")
        address = state.dashboard_url
    return connect(address)


def _write(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()


def _follow_and_exit(conn, job_id: str) -> None:
    """Stream the job's logs until it ends, then exit 0 if it SUCCEEDED, else 1."""
    from flare.platform.ray_jobs import follow

    status = follow(conn, job_id, _write)
    typer.echo(f"job {job_id} {status}")
    raise typer.Exit(0 if status == "SUCCEEDED" else 1)


cluster_app = typer.Typer(no_args_is_help=True, help="A local Ray head for trying cluster jobs.")
jobs_app = typer.Typer(no_args_is_help=True, help="Jobs on a Ray cluster: list, status, logs, stop.")


@cluster_app.command("up")
@one_line_errors
@_cluster_errors
def cluster_up(
    num_cpus: Annotated[int | None, typer.Option("--num-cpus", help="CPUs the head offers (default: all)")]
    = None,
    port: Annotated[int, typer.Option("--port", help="GCS port")] = 6379,
    dashboard_port: Annotated[int, typer.Option("--dashboard-port", help="dashboard / Jobs API port")] = 8265,
    temp_dir: Annotated[Path | None, typer.Option("--temp-dir", help="Ray temp dir (default: a new "
                                                     "/tmp/flare-ray-*/ray, in a folder only you can enter); "
                                                     "`down` removes only what `up` created")] = None,
    listen_all: Annotated[bool, typer.Option("--listen-all", help="listen on all interfaces, for a head "
                                             "that other machines join (default: 127.0.0.1 only)")] = False,
) -> None:
    """Start a local Ray head (every listener on 127.0.0.1, token authentication on)."""
    from flare.platform.local_head import state_path, up

    state = up(num_cpus=num_cpus, port=port, dashboard_port=dashboard_port, temp_dir=temp_dir,
               listen_all=listen_all, log=typer.echo)
    typer.echo(f"Ray head up: GCS {state.gcs_address}, {len(state.pids)} processes (state {state_path()})")
    if listen_all:
        typer.echo("listening on all interfaces: other machines can join with the auth token")
    typer.echo(f"auth token: {state.token_source}")
    typer.echo(f"dashboard: {state.dashboard_url}")
    typer.echo(f"submit with: flare submit train jobs/tiny.yaml --address {state.dashboard_url} --wait")


@cluster_app.command("down")
@one_line_errors
@_cluster_errors
def cluster_down(
    keep_logs: Annotated[bool, typer.Option("--keep-logs", help="keep the Ray session with its logs")] = False,
) -> None:
    """Stop exactly the processes `flare cluster up` started; remove only the files it created."""
    from flare.platform.local_head import down

    down(keep_logs=keep_logs, log=typer.echo)


@cluster_app.command("status")
@one_line_errors
@_cluster_errors
def cluster_status() -> None:
    """Whether the local head is up, and its resources (JSON). Exit code 1 when it is not up."""
    from flare.platform.local_head import status

    info = status()
    typer.echo(json.dumps(info, indent=2, sort_keys=True))
    if not info["up"]:
        raise typer.Exit(1)


@one_line_errors
@_cluster_errors
def submit(
    ctx: typer.Context,
    command: Annotated[str, typer.Argument(help="prepare | train | tune | eval | predict (Ray Data batch "
                                                "inference, as flare predict --ray)")],
    args: Annotated[list[str] | None, typer.Argument(help="the command's own arguments and options; "
                                                        "relative paths resolve in the shipped project")]
    = None,
    address: AddressOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="follow the logs; exit 0 if the job SUCCEEDED, "
                                       "else 1")] = False,
) -> None:
    """Run `flare prepare|train|tune|eval|predict ARGS...` as a Ray job, shipping this project's code. Put
    `--` before ARGS that are named like this command's own options (--address, --wait)."""
    from flare.platform.ray_jobs import check_cluster_paths, entrypoint
    from flare.platform.ray_jobs import submit as submit_job

    entrypoint(command, list(args or []))  # a bad command or a relative data path fails before connecting
    check_cluster_paths(command, list(args or []), ctx.find_root().command)
    conn = _connect(address)
    job_id = submit_job(conn, command, list(args or []))
    typer.echo(f"submitted {job_id}")
    typer.echo(f"dashboard: {conn.job_url(job_id)}")
    if wait:
        _follow_and_exit(conn, job_id)


@jobs_app.command("list")
@one_line_errors
@_cluster_errors
def jobs_list(address: AddressOpt = None) -> None:
    """Every job of the cluster: id, status, entrypoint."""
    from flare.platform.ray_jobs import list_jobs

    for row in list_jobs(_connect(address)):
        typer.echo(f"{row['id']}\t{row['status']}\t{row['entrypoint']}")


@jobs_app.command("status")
@one_line_errors
@_cluster_errors
def jobs_status(job_id: Annotated[str, typer.Argument()], address: AddressOpt = None) -> None:
    """One job's status, message, entrypoint and dashboard page (JSON)."""
    from flare.platform.ray_jobs import job_status

    typer.echo(json.dumps(job_status(_connect(address), job_id), indent=2, sort_keys=True))


@jobs_app.command("logs")
@one_line_errors
@_cluster_errors
def jobs_logs(
    job_id: Annotated[str, typer.Argument()],
    address: AddressOpt = None,
    follow: Annotated[bool, typer.Option("--follow", help="stream until the job ends; exit 0 if it "
                                         "SUCCEEDED, else 1")] = False,
) -> None:
    """A job's logs so far (or followed to the end)."""
    from flare.platform.ray_jobs import job_logs

    conn = _connect(address)
    if follow:
        _follow_and_exit(conn, job_id)
    _write(job_logs(conn, job_id))


@jobs_app.command("stop")
@one_line_errors
@_cluster_errors
def jobs_stop(job_id: Annotated[str, typer.Argument()], address: AddressOpt = None) -> None:
    """Ask a running job to stop."""
    from flare.platform.ray_jobs import job_status, stop_job

    conn = _connect(address)
    if stop_job(conn, job_id):
        typer.echo(f"stop requested for {job_id}")
    else:
        typer.echo(f"{job_id} had already finished ({job_status(conn, job_id)['status']})")
