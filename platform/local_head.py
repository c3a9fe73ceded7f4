"""A local Ray head for trying cluster jobs: ``flare cluster up|down|status``.

``up`` runs ``ray start --head`` (token authentication on) in a new process group and in its own Ray
temp dir, so that plain ``ray.init()`` elsewhere on the machine never finds it. By default every
listener is on 127.0.0.1 (node IP, dashboard, metrics); ``listen_all`` is for a head other machines join.
What it started, and what it created on disk, is recorded in a state file (``$FLARE_CLUSTER_STATE``,
default ``~/.flare/cluster.json``). ``down`` stops exactly that process group and its descendants (never
``ray stop``, which kills every Ray process of the machine), checks that none of them is left, and
removes only the files and folders ``up`` created.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flare.platform.ray_jobs import ClusterError, Token, default_token_path, find_token, probe

START_TIMEOUT_S = 180.0
STOP_GRACE_S = 5.0
LOOPBACK = "127.0.0.1"
# Ray swaps a loopback --node-ip-address for the routable IP unless this is 0 (then its servers, metrics
# exporter and agents bind to the loopback node IP); the variable name is Ray's
LOCAL_ONLY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@dataclass
class ClusterState:
    """What ``flare cluster up`` started, as saved in the state file."""

    pgid: int  # the process group of every process `ray start` spawned
    pids: list[int]  # its members right after start (checked again by `down`)
    temp_dir: str  # the Ray temp dir of this cluster only
    session_dir: str
    gcs_address: str
    dashboard_url: str
    num_cpus: int | None
    token_source: str
    started_at: float
    listen_all: bool = False  # True: node IP and dashboard on all interfaces (a head other machines join)
    created_temp_dir: str = ""  # the top-most folder `up` created for the temp dir ("" when it existed)
    created: dict[str, list[int]] = field(default_factory=dict)  # in a pre-existing temp dir: path -> [inode,
    # mtime_ns] of each entry that appeared during `up` (its session dir, pointers, ray-start.log)


def state_path() -> Path:
    """``$FLARE_CLUSTER_STATE`` or ``~/.flare/cluster.json``."""
    env = os.environ.get("FLARE_CLUSTER_STATE")
    return Path(env).expanduser() if env else Path.home() / ".flare" / "cluster.json"


def load_state(path: Path | None = None) -> ClusterState | None:
    """The recorded cluster, or None when there is no state file."""
    path = path or state_path()
    if not path.is_file():
        return None
    try:
        return ClusterState(**json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise ClusterError(f"{path}: unreadable cluster state ({err}); remove it if no cluster is running") \
            from None


def _save_state(state: ClusterState, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=1))
    tmp.replace(path)


# ------------------------------------------------------------------------------------------ processes


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, pgid, command line) of every live (non-zombie) process, from POSIX ``ps``."""
    out = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "ppid=", "-o", "pgid=", "-o", "stat=", "-o", "args="],
                         capture_output=True, text=True, check=True).stdout
    table = {}
    for line in out.splitlines():
        parts = line.split(None, 4)
        if len(parts) >= 4 and not parts[3].startswith("Z"):
            table[int(parts[0])] = (int(parts[1]), int(parts[2]), parts[4] if len(parts) > 4 else "")
    return table


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped counts as gone)."""
    return pid in process_table()


def cluster_processes(state: ClusterState) -> list[int]:
    """Live processes of the cluster: its process group plus all their descendants (job drivers start
    their own sessions). Empty when the group no longer belongs to this cluster (none of its members
    mentions the cluster's temp dir), so a reused id is never touched."""
    table = process_table()
    group = {pid for pid, (_, pgid, _) in table.items() if pgid == state.pgid}
    if not any(state.temp_dir in table[pid][2] for pid in group):
        return []
    found, frontier = set(group), set(group)
    while frontier:
        frontier = {pid for pid, (ppid, _, _) in table.items() if ppid in frontier and pid not in found}
        found |= frontier
    return sorted(found)


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = pids
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        table = process_table()
        left = [p for p in left if p in table]
    return left


# ------------------------------------------------------------------------------------------ auth


def ensure_token(log: Callable[[str], None]) -> Token:
    """The token the head will require: the one Ray finds, or a new one (256 bits, mode 0600) saved where
    Ray looks (``$RAY_AUTH_TOKEN_PATH`` if set, else ``~/.ray/auth_token``)."""
    path_env = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not os.environ.get("RAY_AUTH_TOKEN", "").strip() and path_env and not Path(path_env).expanduser().exists():
        path = Path(path_env).expanduser()
    else:
        token = find_token()
        if token is not None:
            return token
        path = default_token_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    log(f"generated a Ray auth token in {path}")
    return Token(path.read_text().strip(), str(path))


# ------------------------------------------------------------------------------------------ up/down


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port_free(host: str, port: int, flag: str) -> None:
    """Refuse ``port`` if a server could not bind it on ``host`` now. Bound the way Ray's servers bind
    (SO_REUSEADDR), so a connection of a stopped cluster lingering in TIME_WAIT does not count as in use;
    a listening socket on the port still does."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise ClusterError(f"port {port} is in use; choose another with {flag}") from None


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def ray_executable() -> Path:
    """The ``ray`` CLI of this environment (next to the running Python)."""
    return Path(sys.executable).parent / "ray"


def _running(state: ClusterState | None) -> bool:
    return state is not None and bool(cluster_processes(state))


def _make_temp_dir(temp_dir: Path | None) -> tuple[Path, str]:
    """The Ray temp dir, and the top-most folder created for it here ("" when it already existed)."""
    if temp_dir is None:  # Ray makes its temp dir world-writable: in a 0700 folder nobody else reaches it
        parent = Path(tempfile.mkdtemp(prefix="flare-ray-")).resolve()
        (parent / "ray").mkdir()
        return parent / "ray", str(parent)
    tmp = Path(temp_dir).expanduser().resolve()  # no symlink in it: session paths compare as Ray writes them
    if tmp.exists() and not tmp.is_dir():
        raise ClusterError(f"--temp-dir {tmp}: not a directory")
    missing = [d for d in (tmp, *tmp.parents) if not d.exists()]
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp, str(missing[-1]) if missing else ""


def _new_entries(tmp: Path, before: set[str], session_dir: str) -> dict[str, list[int]]:
    """path -> [inode, mtime_ns] of the entries of ``tmp`` that appeared since ``before``, without the
    session dirs of other Ray heads that share the temp dir."""
    out = {}
    for name in sorted(set(os.listdir(tmp)) - before):
        path = tmp / name
        st = path.lstat()
        if name.startswith("session_") and stat.S_ISDIR(st.st_mode) and str(path) != session_dir:
            continue
        out[str(path)] = [st.st_ino, st.st_mtime_ns]
    return out


def up(num_cpus: int | None = None, port: int = 6379, dashboard_port: int = 8265,
       temp_dir: Path | None = None, listen_all: bool = False,
       log: Callable[[str], None] = print) -> ClusterState:
    """Start a local Ray head with token authentication and record it (see the module docstring)."""
    path = state_path()
    old = load_state(path)
    if _running(old):
        raise ClusterError(f"a cluster started by flare is already up at {old.dashboard_url} (state {path}); "
                           "run `flare cluster down` first")
    host = "" if listen_all else LOOPBACK
    check_port_free(host, port, "--port")
    check_port_free(host, dashboard_port, "--dashboard-port")
    token = ensure_token(log)
    tmp, created_temp_dir = _make_temp_dir(temp_dir)
    before = set() if created_temp_dir else set(os.listdir(tmp))
    agent_port = _free_port(host)
    cmd = [str(ray_executable()), "start", "--head", "--port", str(port),
           "--dashboard-host", "0.0.0.0" if listen_all else LOOPBACK,
           "--dashboard-port", str(dashboard_port), "--include-dashboard", "true", "--temp-dir", str(tmp),
           "--dashboard-agent-listen-port", str(agent_port), "--ray-client-server-port", str(_free_port(host)),
           "--disable-usage-stats"]
    if not listen_all:
        cmd += ["--node-ip-address", LOOPBACK]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    # token mode always; the venv first on PATH so that jobs' `python` is this environment's
    env = {**os.environ, "RAY_AUTH_MODE": "token",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    if not listen_all:
        env.update(LOCAL_ONLY_ENV)
    start_log = tmp / "ray-start.log"
    with open(start_log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
    state = ClusterState(pgid=proc.pid, pids=[], temp_dir=str(tmp), session_dir="", gcs_address="",
                         dashboard_url=f"http://127.0.0.1:{dashboard_port}", num_cpus=num_cpus,
                         token_source=token.source, started_at=time.time(), listen_all=listen_all,
                         created_temp_dir=created_temp_dir)
    if rc != 0:
        _stop(state)
        lines = [ln for ln in start_log.read_text().splitlines() if ln.strip()]
        why = f"exit {rc}" if rc is not None else f"no answer in {START_TIMEOUT_S:g} s"
        raise ClusterError(f"ray start failed ({why}): {lines[-1] if lines else 'no output'} (log {start_log})")
    state.session_dir = str((tmp / "session_latest").resolve())
    state.gcs_address = (tmp / "ray_current_cluster").read_text().strip()
    state.pids = cluster_processes(state)
    if not created_temp_dir:
        state.created = _new_entries(tmp, before, state.session_dir)
    _save_state(state, path)
    try:
        _wait_ready(state, token, agent_port)
    except ClusterError:
        down(log=lambda s: None)
        raise
    return state


def _wait_ready(state: ClusterState, token: Token, agent_port: int) -> None:
    """Until the dashboard answers with this token and the head's job agent listens."""
    host = state.gcs_address.rsplit(":", 1)[0]
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            probe(state.dashboard_url, token, timeout=2.0)
            if _port_open(host, agent_port):
                return
        except ClusterError as err:
            if time.monotonic() > deadline:
                raise ClusterError(f"the Ray head did not become ready: {err}") from None
        if time.monotonic() > deadline:
            raise ClusterError(f"the Ray head's job agent never listened on {host}:{agent_port}")
        time.sleep(0.5)


def _stop(state: ClusterState) -> list[int]:
    """SIGTERM the cluster's processes, SIGKILL what is left after a grace period; returns the pids
    that were stopped and raises if any survives."""
    targets = cluster_processes(state)
    _signal_all(targets, signal.SIGTERM)
    left = _wait_gone(targets, STOP_GRACE_S)
    _signal_all(left, signal.SIGKILL)
    left = _wait_gone(left, STOP_GRACE_S)
    left += [p for p in cluster_processes(state) if p not in left]  # anything spawned meanwhile
    if left:
        raise ClusterError(f"processes of the cluster still alive after SIGKILL: {sorted(set(left))}")
    return targets


def down(keep_logs: bool = False, log: Callable[[str], None] = print) -> list[int]:
    """Stop the cluster recorded in the state file; returns the stopped pids ([] when none was up)."""
    path = state_path()
    state = load_state(path)
    if state is None:
        log(f"no cluster started by flare (no {path})")
        return []
    stopped = _stop(state)
    table = process_table()
    survivors = [p for p in state.pids if p in table and table[p][1] == state.pgid]
    if survivors:
        raise ClusterError(f"recorded processes still alive: {survivors}")
    path.unlink(missing_ok=True)
    if keep_logs:
        log(f"logs kept in {state.session_dir}/logs")
    else:
        remove_created(state)
    log(f"stopped {len(stopped)} processes of the cluster at {state.dashboard_url}")
    return stopped


def remove_created(state: ClusterState) -> None:
    """Remove what ``up`` created: the temp dir if it made it, else the entries it recorded inside, never
    anything outside: its session dir (same inode), links that still point into that session (Ray re-creates
    them), files still unchanged (same inode and mtime)."""
    if state.created_temp_dir:
        shutil.rmtree(state.created_temp_dir, ignore_errors=True)
        return
    root, session = Path(state.temp_dir), Path(state.session_dir)
    for name, (inode, mtime_ns) in state.created.items():
        entry = Path(name)
        try:
            st = entry.lstat()
        except FileNotFoundError:
            continue
        if entry.parent != root:
            continue
        if stat.S_ISLNK(st.st_mode):
            target = (root / os.readlink(entry)).resolve()
            if target == session or session in target.parents:
                entry.unlink(missing_ok=True)
        elif st.st_ino != inode:
            continue
        elif stat.S_ISDIR(st.st_mode):
            shutil.rmtree(entry, ignore_errors=True)
        elif st.st_mtime_ns == mtime_ns:
            entry.unlink(missing_ok=True)


def status() -> dict[str, Any]:
    """Whether the recorded cluster is up, with its address, processes and resources."""
    path = state_path()
    state = load_state(path)
    if state is None:
        return {"up": False, "state": str(path)}
    procs = cluster_processes(state)
    info: dict[str, Any] = {"up": bool(procs), "state": str(path), "dashboard": state.dashboard_url,
                            "gcs_address": state.gcs_address, "processes": len(procs),
                            "session_dir": state.session_dir, "auth_token": state.token_source}
    if procs:
        info["resources"] = resources(state.dashboard_url)
    return info


RESOURCE_UNITS = {"CPU": ("CPU", 1.0), "GPU": ("GPU", 1.0), "memory": ("memory_GiB", 2.0**30),
                  "objectStoreMemory": ("object_store_GiB", 2.0**30)}


def resources(url: str) -> dict[str, Any]:
    """Alive nodes and their total CPU, GPU and memory (GiB) from the dashboard's node summary, with the
    amount in use from the autoscaler report once it has one (a few seconds after start)."""
    import requests

    token = find_token()
    headers = {"Authorization": f"Bearer {token.value}"} if token else {}
    try:
        r = requests.get(f"{url}/nodes", params={"view": "summary"}, headers=headers, timeout=5.0)
        r.raise_for_status()
        nodes = [n["raylet"] for n in r.json()["data"]["summary"] if n.get("raylet", {}).get("state") == "ALIVE"]
    except (requests.exceptions.RequestException, ValueError, KeyError, TypeError) as err:
        return {"error": f"cannot read resources from {url}: {type(err).__name__}"}
    try:
        r = requests.get(f"{url}/api/cluster_status", headers=headers, timeout=5.0)
        usage = r.json()["data"]["clusterStatus"]["loadMetricsReport"]["usage"]
    except (requests.exceptions.RequestException, ValueError, KeyError, TypeError):
        usage = {}
    out: dict[str, Any] = {"nodes": len(nodes)}
    for key, (name, unit) in RESOURCE_UNITS.items():
        total = sum(float(n.get("resourcesTotal", {}).get(key, 0.0)) for n in nodes)
        if total:
            used = usage.get(key, [None])[0]
            out[name] = {"total": round(total / unit, 2), "used": None if used is None else round(used / unit, 2)}
    return out
