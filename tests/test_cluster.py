"""Cluster jobs with real processes: ``flare cluster up`` (every listener on 127.0.0.1), ``flare submit
--wait`` of a tiny prepare + train job into a sqlite MLflow, ``flare jobs``, connectivity and auth errors,
and ``flare cluster down`` leaving none of the cluster's processes alive and removing only what ``up``
created in the temp dir.

The cluster gets its own HOME, state file and token file (``RAY_AUTH_TOKEN_PATH``) under tmp, so the
user's ``~/.ray`` and ``~/.flare`` are never touched, and a pre-existing temp dir (short path under /tmp:
Ray's socket paths must fit 107 bytes) holding a user file and another session. It is always stopped
(fixture finaliser).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from procs import free_port, proc_table

from flare.platform.local_head import ClusterState, check_port_free, remove_created
from flare.platform.ray_jobs import ClusterError, entrypoint, find_token, stage_package

FLARE = [str(Path(sys.executable).parent / "flare")]
ROOT = Path(__file__).resolve().parents[1]
HOST_ENV_DROP = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS",
                 "MLFLOW_TRACKING_URI", "FLARE_CLUSTER_STATE")


def flare(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(FLARE + args, check=False, capture_output=True, text=True, env=env, timeout=timeout)


def living(pids: set[int]) -> set[int]:
    """The pids that still run (a zombie is dead: only its exit status is left to reap)."""
    table = proc_table()
    return {p for p in pids if p in table and table[p][2] not in ("Z", "X")}


def group_and_descendants(pgid: int) -> set[int]:
    table = proc_table()
    found = {p for p, (_, g, _) in table.items() if g == pgid}
    frontier = set(found)
    while frontier:
        frontier = {p for p, (pp, _, _) in table.items() if pp in frontier and p not in found}
        found |= frontier
    return found


def listeners(pids: set[int]) -> set[tuple[str, int]]:
    """(ip, port) of every listening TCP socket of ``pids`` and their descendants (IPv4-mapped IPv6
    addresses as IPv4)."""
    import ray  # noqa: F401, I001  (puts Ray's bundled psutil on sys.path)
    import psutil

    procs: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            procs.update({p.pid: p for p in [proc, *proc.children(recursive=True)]})
        except psutil.NoSuchProcess:
            continue
    found = set()
    for proc in procs.values():
        try:
            conns = proc.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        found |= {(c.laddr.ip.removeprefix("::ffff:"), c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return found


# listeners of `flare cluster up` on other than 127.0.0.1: none. With the loopback node IP, Ray binds its
# gRPC servers, agents and Prometheus metrics exporter (on all interfaces otherwise) to 127.0.0.1 as well.
PUBLIC_LISTENERS: set[tuple[str, int]] = set()


def assert_loopback_only(pids: set[int]) -> set[tuple[str, int]]:
    found = listeners(pids)
    public = {(ip, port) for ip, port in found if not ipaddress.ip_address(ip).is_loopback}
    assert public == PUBLIC_LISTENERS, f"listening beyond 127.0.0.1: {sorted(public)}"
    assert {ip for ip, _ in found} == {"127.0.0.1"}, sorted(found)
    return found


def one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    if not Path("/proc/self/stat").exists():
        pytest.skip("the process checks read /proc (Linux)")
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if k not in HOST_ENV_DROP}
    env.update(HOME=str(home), FLARE_CLUSTER_STATE=str(home / "flare" / "cluster.json"),
               RAY_AUTH_TOKEN_PATH=str(home / "token"))
    real_token = Path.home() / ".ray" / "auth_token"
    real_before = real_token.stat().st_mtime_ns if real_token.exists() else None
    temp_dir = Path(tempfile.mkdtemp(prefix="fl-", dir="/tmp"))  # pre-existing, with things of others
    (temp_dir / "user-file.txt").write_text("not flare's\n")
    (temp_dir / "session_2020-01-01_00-00-00_000000_1").mkdir()
    (temp_dir / "session_2020-01-01_00-00-00_000000_1" / "log.txt").write_text("another Ray session\n")
    dashboard, gcs = free_port(), free_port()
    r = flare(["cluster", "up", "--num-cpus", "2", "--port", str(gcs), "--dashboard-port", str(dashboard),
               "--temp-dir", str(temp_dir)], env)
    state_file = home / "flare" / "cluster.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else None
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"dashboard: http://127.0.0.1:{dashboard}" in r.stdout
        yield {"env": env, "url": f"http://127.0.0.1:{dashboard}", "state": state, "home": home,
               "real_token": (real_token, real_before), "ports": (gcs, dashboard), "temp_dir": temp_dir}
    finally:
        if state_file.exists():
            flare(["cluster", "down"], env, timeout=60)
        if state is not None and living(group_and_descendants(state["pgid"])):
            os.killpg(state["pgid"], signal.SIGKILL)  # last resort: this group is the one this test started
        shutil.rmtree(temp_dir, ignore_errors=True)  # made by this test


def test_up_uses_isolated_token(cluster) -> None:
    token = cluster["home"] / "token"
    assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text().strip()) == 64  # 256-bit hex
    real, before = cluster["real_token"]
    assert (real.stat().st_mtime_ns if real.exists() else None) == before
    assert not (cluster["home"] / ".ray").exists()
    state = cluster["state"]
    assert state["dashboard_url"] == cluster["url"] and len(state["pids"]) >= 3  # gcs, raylet, dashboard, ...
    assert living(set(state["pids"])) == set(state["pids"])
    r = flare(["cluster", "status"], cluster["env"])
    info = json.loads(r.stdout)
    assert r.returncode == 0 and info["up"] and info["resources"]["CPU"]["total"] == 2.0


def test_every_listener_is_on_loopback(cluster) -> None:
    state = cluster["state"]
    assert state["gcs_address"] == f"127.0.0.1:{cluster['ports'][0]}" and not state["listen_all"]
    found = assert_loopback_only(set(state["pids"]))
    assert {("127.0.0.1", port) for port in cluster["ports"]} <= found and len(found) >= 5  # + agents, client


def test_submit_prepare_and_train(cluster, tmp_path: Path) -> None:
    env, url = cluster["env"], cluster["url"]
    r = flare(["submit", "prepare", "--format", "synthetic", "--count", "40", "--out", str(tmp_path / "data"),
               "--no-ray", "--address", url, "--wait"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    prepare_id = r.stdout.split("submitted ", 1)[1].split()[0]
    assert f"dashboard: {url}/#/jobs/{prepare_id}" in r.stdout and f"job {prepare_id} SUCCEEDED" in r.stdout
    assert (tmp_path / "data" / "manifest.json").is_file()  # written by the job, on this (shared) disk

    # MLFLOW_TRACKING_URI only in the submitting shell: the job must receive it (the cluster does not have it)
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    r = flare(["submit", "train", "jobs/tiny.yaml", "--set", f"data.manifest={tmp_path / 'data' / 'manifest.json'}",
               "--storage", str(tmp_path / "runs"),
               "--set", "optimizer.epochs=1", "--address", url, "--wait"], {**env, "MLFLOW_TRACKING_URI": uri})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    train_id = r.stdout.split("submitted ", 1)[1].split()[0]
    assert f"job {train_id} SUCCEEDED" in r.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["optimizer.epochs"] == "1"
    (version,) = client.search_model_versions("name = 'tiny-300w'")
    assert str(version.version) == "1" and version.run_id == run.info.run_id

    # the jobs commands see both (the default address is the head of `flare cluster up`)
    r = flare(["jobs", "list"], env)
    rows = {line.split("\t")[0]: line.split("\t")[1] for line in r.stdout.strip().splitlines()}
    assert r.returncode == 0 and rows[prepare_id] == rows[train_id] == "SUCCEEDED"
    r = flare(["jobs", "status", train_id], env)
    info = json.loads(r.stdout)
    assert info["status"] == "SUCCEEDED" and info["entrypoint"].startswith("python -m flare.platform.cli train ")
    r = flare(["jobs", "logs", train_id, "--address", url], env)
    assert r.returncode == 0 and f"model logged to run {run.info.run_id}, registered tiny-300w v1" in r.stdout

    # batch inference on the cluster with the registered model: 2 Ray Data actors, each loading it once
    rng = np.random.default_rng(0)
    (tmp_path / "photos").mkdir()
    for i in range(5):
        cv2.imwrite(str(tmp_path / "photos" / f"p{i}.png"), rng.integers(0, 255, (72, 64, 3), dtype=np.uint8))
    r = flare(["submit", "predict", str(tmp_path / "photos"), "--model", "models:/tiny-300w/1", "--out",
               str(tmp_path / "pred"), "--no-detect", "--actors", "2", "--batch-size", "2", "--address", url,
               "--wait"], {**env, "MLFLOW_TRACKING_URI": uri})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    assert "5 image(s) on " in r.stdout and "0 failed" in r.stdout
    rows = [json.loads(ln) for ln in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert [x["output"] for x in rows] == [f"p{i}" for i in range(5)]
    assert all(np.asarray(x["faces"]).shape == (1, 68, 2) for x in rows)


def test_submit_tune_runs_the_search_on_the_cluster(cluster, tmp_path: Path) -> None:
    """`flare submit tune` runs the ASHA search as a job on the head (the driver
    attaches to that cluster through RAY_ADDRESS); its parent/child runs and the champion land in the
    MLflow of the submitting shell."""
    env, url = cluster["env"], cluster["url"]
    r = flare(["data", "prepare", "--format", "synthetic", "--count", "40", "--out", str(tmp_path / "data"),
               "--no-ray"], env)
    assert r.returncode == 0, r.stderr
    search = tmp_path / "search.yaml"
    # one sample: the search's plumbing on a cluster (job, parent/child runs, registry); ASHA itself is test_tune's
    search.write_text("samples: 1\nseed: 0\nscheduler: {grace_period: 1, reduction_factor: 2, max_epochs: 1}\n"
                      "params:\n  optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    r = flare(["submit", "tune", "jobs/tiny.yaml", "--search", str(search), "--name", "cluster-search",
               "--storage", str(tmp_path / "runs"),
               "--set", f"data.manifest={tmp_path / 'data' / 'manifest.json'}",
               "--address", url, "--wait"], {**env, "MLFLOW_TRACKING_URI": uri}, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    job_id = r.stdout.split("submitted ", 1)[1].split()[0]
    assert f"job {job_id} SUCCEEDED" in r.stdout and "search cluster-search: 1 sample(s)" in r.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    parents = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    children = [x for x in runs if "mlflow.parentRunId" in x.data.tags]
    assert len(parents) == 1 and len(children) == 1
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    (version,) = client.search_model_versions("name = 'tiny-300w'")
    best = min(children, key=lambda c: c.data.metrics["val_nme"])
    assert version.run_id == best.info.run_id
    assert str(client.get_model_version_by_alias("tiny-300w", "champion").version) == str(version.version)


def test_failed_and_stopped_jobs_exit_1(cluster, tmp_path: Path) -> None:
    env, url = cluster["env"], cluster["url"]
    r = flare(["submit", "train", "jobs/no-such-spec.yaml", "--storage", str(tmp_path / "runs"), "--address", url,
               "--wait"], env)
    job_id = r.stdout.split("submitted ", 1)[1].split()[0]
    assert r.returncode == 1 and f"job {job_id} FAILED" in r.stdout
    r = flare(["submit", "prepare", "--format", "synthetic", "--count", "100000", "--out", str(tmp_path / "big"),
               "--no-ray", "--address", url], env)
    job_id = r.stdout.split("submitted ", 1)[1].split()[0]
    r = flare(["jobs", "stop", job_id, "--address", url], env)
    assert r.returncode == 0 and f"stop requested for {job_id}" in r.stdout
    r = flare(["jobs", "logs", job_id, "--follow", "--address", url], env)
    assert r.returncode == 1 and f"job {job_id} STOPPED" in r.stdout
    assert json.loads(flare(["jobs", "status", job_id], env).stdout)["status"] == "STOPPED"
    # and its process is gone: a stop that raced the job's start once left it running, orphaned
    deadline, left = time.monotonic() + 30, running_with(str(tmp_path / "big"))
    while left and time.monotonic() < deadline:
        time.sleep(0.5)  # polling the process table with a deadline
        left = running_with(str(tmp_path / "big"))
    for pid in left:  # this test's own job (its unique output path is in the command line)
        os.kill(pid, signal.SIGKILL)
    assert not left, f"the stopped job's processes {left} were still running"


def running_with(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker``."""
    table = proc_table()
    pids = []
    for pid, (_, _, state) in table.items():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd and state != "Z":
            pids.append(pid)
    return pids


def test_wrong_address_is_one_line_and_quick(cluster) -> None:
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    for args in (["jobs", "list", "--address", f"http://127.0.0.1:{port}"],
                 ["submit", "train", "jobs/tiny.yaml", "--set", "data.manifest=/shared/300w/manifest.json",
                  "--storage", "/shared/runs", "--address", f"127.0.0.1:{port}", "--wait"]):
        r = flare(args, cluster["env"])
        assert r.returncode == 2
        assert one_error_line(r).startswith(f"error: cannot reach Ray at http://127.0.0.1:{port}: ")
    assert time.monotonic() - t0 < 60


def test_missing_and_wrong_token(cluster, tmp_path: Path) -> None:
    env = {k: v for k, v in cluster["env"].items() if k != "RAY_AUTH_TOKEN_PATH"}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    before = flare(["jobs", "list"], cluster["env"]).stdout
    for args in (["jobs", "list", "--address", cluster["url"]],
                 ["submit", "prepare", "--format", "synthetic", "--address", cluster["url"]]):
        r = flare(args, env)
        assert r.returncode == 2
        line = one_error_line(r)
        assert f"the Ray cluster at {cluster['url']} requires an auth token and none was found" in line
        assert "RAY_AUTH_TOKEN" in line and "RAY_AUTH_TOKEN_PATH" in line and "~/.ray/auth_token" in line
    r = flare(["jobs", "list", "--address", cluster["url"]], {**env, "RAY_AUTH_TOKEN": "0" * 64})
    assert r.returncode == 2 and "rejected the auth token from RAY_AUTH_TOKEN" in one_error_line(r)
    assert flare(["jobs", "list"], cluster["env"]).stdout == before  # nothing was submitted


def test_down_leaves_no_process(cluster) -> None:
    state, env, temp_dir = cluster["state"], cluster["env"], cluster["temp_dir"]
    running = group_and_descendants(state["pgid"])
    assert set(state["pids"]) <= running and living(running)
    assert_loopback_only(running)  # also the job drivers and workers the other tests started
    assert state["created_temp_dir"] == "" and Path(state["session_dir"]).parent == temp_dir
    assert {Path(p).name for p in state["created"]} >= {Path(state["session_dir"]).name, "ray-start.log"}
    r = flare(["cluster", "down"], env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert living(running | set(state["pids"]) | group_and_descendants(state["pgid"])) == set()
    assert not Path(env["FLARE_CLUSTER_STATE"]).exists()
    # the pre-existing temp dir keeps what was there before `up`; what `up` created is gone
    assert sorted(p.name for p in temp_dir.iterdir()) == ["session_2020-01-01_00-00-00_000000_1", "user-file.txt"]
    assert (temp_dir / "user-file.txt").read_text() == "not flare's\n"
    r = flare(["cluster", "status"], env)
    assert r.returncode == 1 and json.loads(r.stdout)["up"] is False

    # up again at once on the same ports (the old sockets may linger in TIME_WAIT), in a temp dir flare makes
    gcs, dashboard = cluster["ports"]
    r = flare(["cluster", "up", "--num-cpus", "1", "--port", str(gcs), "--dashboard-port", str(dashboard)], env)
    again = json.loads(Path(env["FLARE_CLUSTER_STATE"]).read_text()) if r.returncode == 0 else None
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        made = Path(again["created_temp_dir"])
        assert made == Path(again["temp_dir"]).parent and Path(again["temp_dir"]).is_dir()
        assert made.stat().st_mode & 0o777 == 0o700  # Ray's world-writable temp dir is out of others' reach
        r = flare(["cluster", "down"], env, timeout=60)
        assert r.returncode == 0, r.stderr
        assert not made.exists()  # flare made it: removed
    finally:
        if again is not None and living(group_and_descendants(again["pgid"])):
            os.killpg(again["pgid"], signal.SIGKILL)  # last resort: this group is the one this test started


# ------------------------------------------------------------------------------ no cluster needed


def _time_wait_ports() -> set[int]:
    """Local ports of the IPv4 TCP sockets in TIME_WAIT (state 06 of /proc/net/tcp)."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return {int(r.split()[1].rsplit(":", 1)[1], 16) for r in rows if r.split()[3] == "06"}


def test_port_check_ignores_time_wait() -> None:
    if not Path("/proc/net/tcp").exists():
        pytest.skip("reads /proc/net/tcp (Linux)")
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            conn, _ = server.accept()
            conn.close()  # the server side closes first: its end of the connection goes to TIME_WAIT
            assert client.recv(1) == b""
    deadline = time.monotonic() + 10
    while port not in _time_wait_ports():
        assert time.monotonic() < deadline, f"no TIME_WAIT socket on port {port}"
        time.sleep(0.05)
    with socket.socket() as s, pytest.raises(OSError):
        s.bind(("127.0.0.1", port))  # a plain bind (the old check) calls the port busy
    check_port_free("127.0.0.1", port, "--port")  # free for a server (SO_REUSEADDR), as Ray's bind it
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        with pytest.raises(ClusterError, match=f"^port {port} is in use; choose another with --port$"):
            check_port_free("127.0.0.1", port, "--port")


def test_token_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    (tmp_path / "file").write_text("  from-file \n")
    assert find_token({}).value == "from-home"
    assert find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "file")}).value == "from-file"
    assert find_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "file")}).value == \
        "from-env"
    with pytest.raises(ClusterError, match="cannot read the token file"):
        find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
    (tmp_path / ".ray" / "auth_token").unlink()
    assert find_token({}) is None


def test_entrypoint_and_shipped_package(tmp_path: Path) -> None:
    assert entrypoint("prepare", ["--format", "synthetic", "--out", "/tmp/a b"]) == \
        "python -m flare.platform.cli data prepare --format synthetic --out '/tmp/a b'"
    assert entrypoint("train", ["jobs/tiny.yaml"]) == "python -m flare.platform.cli train jobs/tiny.yaml"
    assert entrypoint("predict", ["/in", "--model", "models:/m@champion", "--out", "/out"]) == \
        "python -m flare.platform.cli predict --ray /in --model models:/m@champion --out /out"
    with pytest.raises(ClusterError, match="cannot submit 'demo'"):
        entrypoint("demo", [])
    pkg = stage_package(ROOT, tmp_path / "flare")
    assert (pkg / "platform" / "cli.py").read_bytes() == (ROOT / "platform" / "cli.py").read_bytes()
    assert (pkg / "jobs" / "tiny.yaml").is_file() and (pkg / ".flare_py_module").is_file()
    for name in (".venv", "mlruns", ".git", "runs", "out", "data"):
        assert not (pkg / name).exists()
    assert not list(pkg.rglob("__pycache__"))


def test_submit_refuses_relative_data_paths(tmp_path: Path) -> None:
    """The cluster gets the code, not the data: a relative data path is refused before anything is sent."""
    import typer.main

    from flare.platform.cli import app
    from flare.platform.ray_jobs import check_cluster_paths

    cli = typer.main.get_command(app)

    def refused(command: str, args: list[str]) -> str:
        with pytest.raises(ClusterError) as info:
            check_cluster_paths(command, args, cli, ROOT)
        msg = str(info.value)
        assert "\n" not in msg and "use an absolute path or a URI that the cluster sees" in msg
        return msg

    assert "data.manifest=data/300w/manifest.json (from jobs/tiny.yaml)" in refused("train", ["jobs/tiny.yaml"])
    assert "(from tiny)" in refused("train", ["tiny"])  # a shipped name reads the shipped spec
    assert "data.manifest=rel/m.json (from --set)" in refused("train", ["jobs/tiny.yaml", "--set",
                                                                        "data.manifest=rel/m.json"])
    assert "data.manifest=data/300w-k5/manifest.json (from jobs/search/rwsa.yaml)" in refused(
        "tune", ["jobs/300w_rwsa.yaml", "--set", "data.manifest=/shared/m.json", "--search", "jobs/search/rwsa.yaml"])
    assert "--out data/300w is relative" in refused("prepare", ["--format", "300w", "--root", "/d", "--out",
                                                                "data/300w"])
    assert "--root 300W is relative" in refused("prepare", ["--format", "300w", "--root", "300W", "--out", "/d"])
    assert "--data data/300w is relative" in refused("eval", ["models:/m@champion", "--data", "data/300w"])
    assert "--storage runs is relative" in refused("train", ["tiny", "--set", "data.manifest=/d/m.json",
                                                             "--storage", "runs"])
    assert "IMAGES photos is relative" in refused("predict", ["/in", "photos", "--model", "models:/m/1",
                                                              "--out", "/out"])
    assert "--out out is relative" in refused("predict", ["/in", "--model", "models:/m/1", "--out", "out"])
    assert "--model model/ is relative" in refused("predict", ["/in", "--model", "model/", "--out", "/o"])
    # no --storage (or --run-dir with --no-ray): checkpoints would land in the job's temporary copy
    assert "give --storage; the default ./runs would land in the job's temporary copy" in refused(
        "train", ["tiny", "--set", "data.manifest=/d/m.json"])
    assert "give --storage" in refused("tune", ["--resume", "some-search"])
    assert "give --run-dir" in refused("train", ["tiny", "--set", "data.manifest=/d/m.json", "--no-ray"])
    assert "--run-dir out is relative" in refused("train", ["tiny", "--set", "data.manifest=/d/m.json", "--no-ray",
                                                           "--run-dir", "out"])
    shared = ["--storage", "/shared/runs"]
    for command, args in [("train", ["jobs/tiny.yaml", "--set", f"data.manifest={tmp_path / 'm.json'}", *shared]),
                          ("train", ["tiny", "--set", "data.manifest=s3://bucket/300w/manifest.json", *shared]),
                          ("train", ["tiny", "--set", "data.manifest=/d/m.json", "--no-ray", "--run-dir", "/r"]),
                          ("tune", ["300w_star", "--search", "star", "--set", "data.manifest=/shared/m.json", *shared]),
                          ("tune", ["--resume", "some-search", *shared]),
                          ("prepare", ["--format", "synthetic", "--out", str(tmp_path / "d"), "--no-ray"]),
                          ("eval", ["models:/m@champion", "--data", "/shared/300w", "--out", str(tmp_path)]),
                          ("train", ["tiny", "--set", "data.manifest=/d/m.json", "--storage", "s3://b/runs"]),
                          ("predict", ["/in", "--model", "0123abcd", "--out", "/o"]),  # a run id
                          ("predict", ["/in", "/more", "--model", "/models/m", "--out", "/o", "--actors", "3"]),
                          ("train", ["jobs/no-such-spec.yaml", *shared])]:  # not here to read: the job reports it
        check_cluster_paths(command, args, cli, ROOT)


def test_down_removes_only_what_up_recorded(tmp_path: Path) -> None:
    """The rules of `down` in a pre-existing temp dir, on real files: the recorded session dir goes, links go
    while they point into it, files go while unchanged; anything replaced or re-pointed since, or never
    recorded, stays."""
    root = tmp_path / "ray"
    (root / "session_old").mkdir(parents=True)
    (root / "user-file.txt").write_text("mine\n")
    ours = root / "session_new"
    (ours / "logs").mkdir(parents=True)
    for name, target in (("session_latest", ours), ("prom.json", ours / "prom.json"), ("moved", ours)):
        (root / name).symlink_to(target)
    (root / "ray-start.log").write_text("started\n")
    (root / "ray_current_cluster").write_text("127.0.0.1:1\n")
    state = ClusterState(pgid=0, pids=[], temp_dir=str(root), session_dir=str(ours), gcs_address="",
                         dashboard_url="", num_cpus=None, token_source="", started_at=0.0)
    for name in ("session_new", "session_latest", "prom.json", "moved", "ray-start.log", "ray_current_cluster"):
        st = (root / name).lstat()
        state.created[str(root / name)] = [st.st_ino, st.st_mtime_ns]
    state.created[str(tmp_path / "user-file.txt")] = [0, 0]  # outside the temp dir: never touched
    (tmp_path / "user-file.txt").write_text("outside\n")
    (root / "moved").unlink()
    (root / "moved").symlink_to(root / "session_old")  # another head re-pointed it
    os.utime(root / "ray_current_cluster", ns=(1, 1))  # rewritten since
    remove_created(state)
    assert sorted(p.name for p in root.iterdir()) == ["moved", "ray_current_cluster", "session_old", "user-file.txt"]
    assert (tmp_path / "user-file.txt").exists()

