"""Ray Jobs glue behind ``flare submit`` and ``flare jobs``.

Talks to the head's dashboard (``http://HEAD:8265``) through ``JobSubmissionClient``. Token
authentication is never disabled: the token is looked up the way Ray does (``RAY_AUTH_TOKEN``, then the
file named by ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``) and sent as ``Authorization: Bearer``.
Every failure a user can cause (wrong address, no or wrong token, unknown job id) becomes a
:class:`ClusterError` with a one-line message.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROBE_TIMEOUT_S = 5.0  # an unreachable head fails within this
AGENT_WAIT_S = 60.0  # a freshly started head may take this long to accept its first job
AUTH_HELP = ("set RAY_AUTH_TOKEN, point RAY_AUTH_TOKEN_PATH at a file holding the token, or save it as "
             "~/.ray/auth_token (`ray get-auth-token` prints it on the head node)")
# flare subcommand -> the CLI words it runs on the cluster
SUBMIT_COMMANDS: dict[str, tuple[str, ...]] = {"prepare": ("data", "prepare"), "train": ("train",),
                                               "tune": ("tune",), "eval": ("eval",),
                                               "predict": ("predict", "--ray")}  # Ray Data batch inference
# the job runs the cluster's `python` (a head from `flare cluster up` puts its venv first on PATH); `flare`
# itself is the shipped copy (py_modules), whatever is installed there
ENTRYPOINT = ("python", "-m", "flare.platform.cli")
# never shipped: environments, results and data (anchored at the project root)
EXCLUDES = ["/.venv", "/mlruns", "/runs", "/out", "/data", "/.git", "__pycache__", "*.egg-info", ".pytest_cache",
            ".ruff_cache"]
PASS_THROUGH_ENV = ("MLFLOW_TRACKING_URI",)
_ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # JobSubmissionClient lets these override --address


class ClusterError(Exception):
    """An expected failure talking to a Ray cluster; the message is one line for the user."""


@dataclass(frozen=True)
class Token:
    """A Ray auth token and where it was found (never the token itself in messages)."""

    value: str
    source: str


def default_token_path() -> Path:
    """Ray's default token file, ``~/.ray/auth_token`` (``$HOME`` decides ``~``)."""
    return Path.home() / ".ray" / "auth_token"


def find_token(env: Mapping[str, str] | None = None) -> Token | None:
    """The token Ray would use, in Ray's precedence; None when there is none. A ``RAY_AUTH_TOKEN_PATH``
    that cannot be read is an error (Ray treats it as fatal too)."""
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return Token(env["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    if env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as err:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token file ({err.strerror}); "
                               f"{AUTH_HELP}") from None
        if not value:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path}: the token file is empty; {AUTH_HELP}")
        return Token(value, str(path))
    path = default_token_path()
    value = path.read_text().strip() if path.is_file() else ""
    return Token(value, str(path)) if value else None


def dashboard_url(address: str) -> str:
    """``http://HOST:PORT`` of a head's dashboard (a bare ``HOST:PORT`` gets ``http://``)."""
    url = address.strip().rstrip("/")
    if url.startswith("ray://"):
        raise ClusterError(f"--address {address}: give the dashboard address http://HEAD:8265, not a Ray Client "
                           "address")
    if "://" not in url:
        url = "http://" + url
    if not url.startswith(("http://", "https://")):
        raise ClusterError(f"--address {address}: expected http://HEAD:8265")
    return url


def _reason(err: Exception) -> str:
    """The useful tail of a ``requests`` connection error, e.g. ``[Errno 111] Connection refused``."""
    import requests

    if isinstance(err, requests.exceptions.Timeout):
        return f"no answer within {PROBE_TIMEOUT_S:g} s"
    found = re.findall(r"\[Errno -?\d+\][^'\")]*", str(err))
    return found[-1].strip() if found else type(err).__name__


def probe(url: str, token: Token | None, timeout: float = PROBE_TIMEOUT_S) -> str:
    """Check that ``url`` is a Ray dashboard that accepts ``token``; return the cluster's Ray version."""
    import requests

    headers = {"Authorization": f"Bearer {token.value}"} if token else {}
    try:
        r = requests.get(f"{url}/api/version", headers=headers, timeout=timeout)
    except requests.exceptions.RequestException as err:
        raise ClusterError(f"cannot reach Ray at {url}: {_reason(err)}") from None
    if r.status_code == 401:
        raise ClusterError(f"the Ray cluster at {url} requires an auth token and none was found: {AUTH_HELP}")
    if r.status_code == 403:
        raise ClusterError(f"the Ray cluster at {url} rejected the auth token from {token.source if token else '?'}"
                           f": {AUTH_HELP}")
    try:
        r.raise_for_status()
        return str(r.json()["ray_version"])
    except (ValueError, KeyError, requests.exceptions.HTTPError):
        raise ClusterError(f"cannot reach Ray at {url}: GET /api/version answered HTTP {r.status_code}, "
                           "not a Ray dashboard") from None


@contextmanager
def _only_explicit_address() -> Iterator[None]:
    """``JobSubmissionClient`` lets ``RAY_ADDRESS``/``RAY_API_SERVER_ADDRESS`` override its argument;
    hide them while it is built so the address flare resolved is the one used."""
    saved = {k: os.environ.pop(k) for k in _ADDRESS_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextmanager
def _calls(url: str, job_id: str | None = None) -> Iterator[None]:
    """Turn the client's errors into one-line :class:`ClusterError` s."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except requests.exceptions.RequestException as err:
        raise ClusterError(f"cannot reach Ray at {url}: {_reason(err)}") from None
    except AuthenticationError:
        raise ClusterError(f"the Ray cluster at {url} refused the request: {AUTH_HELP}") from None
    except RuntimeError as err:
        text = str(err)
        if job_id is not None and ("404" in text or "does not exist" in text):
            raise ClusterError(f"no job {job_id} on {url}") from None
        raise ClusterError(f"Ray at {url}: {text.strip().splitlines()[0] if text.strip() else 'request failed'}") \
            from None


@dataclass
class Connection:
    """A checked connection to one head's Jobs API."""

    url: str
    client: Any  # ray.job_submission.JobSubmissionClient

    def job_url(self, job_id: str) -> str:
        """The dashboard page of a job."""
        return f"{self.url}/#/jobs/{job_id}"


def _quiet_ray_client() -> None:
    """The Jobs SDK and runtime-env packaging log every upload and websocket close at INFO."""
    import logging

    logging.getLogger("ray._private.runtime_env").setLevel(logging.ERROR)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("ray.dashboard.modules", "ray._private.runtime_env")):
            logging.getLogger(name).setLevel(logging.ERROR)


def connect(address: str, env: Mapping[str, str] | None = None) -> Connection:
    """Probe the head quickly (reachability, auth), then build the client with the token as a header."""
    from ray.job_submission import JobSubmissionClient

    _quiet_ray_client()
    url = dashboard_url(address)
    token = find_token(env)
    probe(url, token)
    headers = {"Authorization": f"Bearer {token.value}"} if token else None
    with _only_explicit_address(), _calls(url):
        client = JobSubmissionClient(url, headers=headers)
    return Connection(url, client)


def project_root() -> Path:
    """The directory holding ``pyproject.toml``: the ``flare`` package itself (repo root = package)."""
    import flare

    return Path(flare.__file__).resolve().parent


def entrypoint(command: str, args: list[str]) -> str:
    """The shell command a job runs: ``python -m flare.platform.cli <words> ARGS...``."""
    if command not in SUBMIT_COMMANDS:
        raise ClusterError(f"cannot submit {command!r}: expected one of {', '.join(SUBMIT_COMMANDS)}")
    return shlex.join([*ENTRYPOINT, *SUBMIT_COMMANDS[command], *args])


# parameters that name data or storage on the cluster
DATA_OPTIONS = {"prepare": ("root", "out"), "eval": ("data", "out"), "train": ("storage", "run_dir"), "tune": ("storage",),
                "predict": ("images", "out", "model")}
ABSOLUTE_HELP = "the cluster gets this project's code, not its data: use an absolute path or a URI that the cluster sees"


def command_params(command: str, args: list[str], cli: Any) -> dict[str, Any]:
    """``args`` parsed by the very CLI command the job will run (``cli``: the root ``click`` command of
    ``flare``; nothing is executed)."""
    import click

    cmd: Any = cli
    ctx = None
    words = [w for w in SUBMIT_COMMANDS[command] if not w.startswith("-")]  # sub-commands, then fixed options
    fixed = list(SUBMIT_COMMANDS[command][len(words):])
    try:
        for word in words:
            ctx = click.Context(cmd, info_name=word, parent=ctx)
            cmd = cmd.get_command(ctx, word)
        return cmd.make_context(" ".join(words), [*fixed, *args], parent=ctx, resilient_parsing=True).params
    except click.ClickException as err:
        raise ClusterError(f"flare {' '.join(SUBMIT_COMMANDS[command])}: {err.format_message()}") from None


def _relative(value: Any) -> bool:
    from flare.platform.config import is_uri

    text = str(value)
    return bool(text) and not is_uri(text) and not Path(text).expanduser().is_absolute()


def _shipped_file(arg: Any, root: Path, folder: str) -> Path | None:
    """Where the job will find the spec ``arg`` (a path, relative to the shipped project, or a shipped
    name); None when it is not here to check (the job then reports it)."""
    path = Path(str(arg)).expanduser()
    for candidate in (path if path.is_absolute() else root / path, root / folder / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    return None


def check_cluster_paths(command: str, args: list[str], cli: Any, root: Path | None = None) -> None:
    """Refuse relative data paths before submitting: ``--root/--out/--data`` of prepare and eval, and the
    path fields (``data.manifest``, ``mlflow.tracking_uri``) of a train/tune job spec with its ``--set``
    overrides and of a tune search file. The job runs in a copy of the code, where they would not exist."""
    from flare.platform.config import PATH_FIELDS, apply_overrides, load_yaml
    from flare.platform.search_space import map_path_values

    root = root or project_root()
    words = " ".join(SUBMIT_COMMANDS.get(command, (command,)))
    params = command_params(command, args, cli)
    for name in DATA_OPTIONS.get(command, ()):
        values = params.get(name)
        for value in values if isinstance(values, list | tuple) else [values]:
            # a model may also be a registry URI or a run id (no slash): only a path-like one must be absolute
            if value is not None and _relative(value) and (name != "model" or "/" in str(value)
                                                           or Path(value).exists()):
                shown = name.upper() if name == "images" else f"--{name.replace('_', '-')}"
                raise ClusterError(f"flare submit {words}: {shown} {value} is relative; {ABSOLUTE_HELP}")
    if command not in ("train", "tune"):
        return

    def refuse(source: str) -> Any:
        def check(key: str, value: str) -> str:
            if _relative(value):
                raise ClusterError(f"flare submit {words}: {key}={value} (from {source}) is relative; {ABSOLUTE_HELP}")
            return value
        return check

    sets = list(params.get("set_") or [])
    spec = _shipped_file(params["job_file"], root, "jobs") if params.get("job_file") else None
    for source, raw in (("--set", apply_overrides({}, sets, "--set")),
                        (str(params.get("job_file")), apply_overrides(load_yaml(spec), sets, "--set") if spec else {})):
        for key in PATH_FIELDS:
            section, field = key.split(".")
            node = raw.get(section)
            if isinstance(node, dict) and isinstance(node.get(field), str):
                refuse(source)(key, node[field])
    search = _shipped_file(params["search"], root, "jobs/search") if params.get("search") else None
    if search is not None:
        map_path_values(load_yaml(search), refuse(str(params["search"])))
    need = "run_dir" if params.get("no_ray") else "storage"
    if not params.get(need):
        raise ClusterError(f"flare submit {words}: give --{need.replace('_', '-')}; the default ./runs would land in "
                           f"the job's temporary copy of this project, and {ABSOLUTE_HELP}")


def stage_package(root: Path, dest: Path) -> Path:
    """Copy the project's code to ``dest`` (a directory named ``flare``) for ``py_modules``, without
    :data:`EXCLUDES`. Ray names packages by content hash, so the copy carries a marker file to differ from
    the ``working_dir`` package (same content would reuse that zip, which has no ``flare/`` top folder)."""
    top = {e.strip("/") for e in EXCLUDES if e.startswith("/")}
    anywhere = [e for e in EXCLUDES if not e.startswith("/")]

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = set(shutil.ignore_patterns(*anywhere, "*.pyc")(folder, names))
        skip |= {n for n in names if not (Path(folder, n).is_dir() or Path(folder, n).is_file())}  # sockets...
        return skip | (top & set(names)) if Path(folder) == root else skip

    shutil.copytree(root, dest, ignore=ignore, symlinks=True)
    (dest / ".flare_py_module").write_text("the flare package, shipped by `flare submit`\n")
    return dest


def runtime_env(root: Path, package: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """The project as ``working_dir`` (the job's cwd, so relative paths like ``jobs/*.yaml`` resolve there)
    and as the ``flare`` py_module (``package`` from :func:`stage_package`), so that the driver and every
    worker import exactly this code, not a ``flare`` installed on the cluster. ``MLFLOW_TRACKING_URI``
    is passed through when set."""
    env_vars = {k: env[k] for k in PASS_THROUGH_ENV if env.get(k)}
    out: dict[str, Any] = {"working_dir": str(root), "py_modules": [str(package)], "excludes": list(EXCLUDES)}
    if env_vars:
        out["env_vars"] = env_vars
    return out


def submit(conn: Connection, command: str, args: list[str], env: Mapping[str, str] | None = None,
           root: Path | None = None) -> str:
    """Submit ``flare <command> ARGS...`` as a Ray job; returns its submission id."""
    env = os.environ if env is None else env
    root = root or project_root()
    line = entrypoint(command, args)
    with tempfile.TemporaryDirectory(prefix="flare-submit-") as tmp:
        renv = runtime_env(root, stage_package(root, Path(tmp) / "flare"), env)
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                with _calls(conn.url):
                    return conn.client.submit_job(entrypoint=line, runtime_env=renv,
                                                  metadata={"flare_command": command})
            except ClusterError as err:
                if "No available agent" not in str(err) or time.monotonic() > deadline:
                    raise
            time.sleep(1.0)


def follow(conn: Connection, job_id: str, write: Callable[[str], None]) -> str:
    """Stream a job's logs to ``write`` until it ends; returns its final status name."""

    async def tail() -> None:
        async for chunk in conn.client.tail_job_logs(job_id):
            write(chunk)

    with _calls(conn.url, job_id):
        conn.client.get_job_status(job_id)  # unknown ids fail here, before the websocket
        asyncio.run(tail())
        status = conn.client.get_job_status(job_id)
        deadline = time.monotonic() + 30.0
        while not status.is_terminal() and time.monotonic() < deadline:  # logs can close before the status
            time.sleep(0.5)
            status = conn.client.get_job_status(job_id)
    return str(status.value)


def list_jobs(conn: Connection) -> list[dict[str, Any]]:
    """All jobs of the cluster, oldest first, as plain dicts."""
    with _calls(conn.url):
        jobs = conn.client.list_jobs()
    rows = [_row(j) for j in jobs]
    return sorted(rows, key=lambda r: r["start_time"] or 0)


def _row(info: Any) -> dict[str, Any]:
    """A ``JobDetails``/``JobInfo`` as a plain dict (a driver without submission id shows its job id)."""
    return {"id": info.submission_id or info.job_id, "status": str(getattr(info.status, "value", info.status)),
            "entrypoint": info.entrypoint, "message": info.message, "start_time": info.start_time,
            "end_time": info.end_time}


def job_status(conn: Connection, job_id: str) -> dict[str, Any]:
    """One job's status, message, entrypoint, times (ms since the epoch) and dashboard page."""
    with _calls(conn.url, job_id):
        info = conn.client.get_job_info(job_id)
    return {**_row(info), "dashboard": conn.job_url(job_id)}


def job_logs(conn: Connection, job_id: str) -> str:
    """Everything a job has logged so far."""
    with _calls(conn.url, job_id):
        return conn.client.get_job_logs(job_id)


def stop_job(conn: Connection, job_id: str, start_timeout_s: float = 60.0) -> bool:
    """Ask a job to stop; False when it had already finished. A job still PENDING is first given up to
    ``start_timeout_s`` to start: Ray can mark a job stopped while its supervisor is still launching the
    entrypoint, which then runs on, orphaned (seen here with Ray 2.60)."""
    import time

    from ray.job_submission import JobStatus

    with _calls(conn.url, job_id):
        deadline = time.monotonic() + start_timeout_s
        while conn.client.get_job_status(job_id) == JobStatus.PENDING and time.monotonic() < deadline:
            time.sleep(0.5)  # polling the job's state with a deadline
        return bool(conn.client.stop_job(job_id))
