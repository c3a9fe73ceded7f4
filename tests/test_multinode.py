"""A real two-node Ray cluster on this machine: a head (2 CPUs) and a worker node (1 CPU), each a
``ray start`` process group with its own temp dir and node IP (127.0.0.2 and 127.0.0.3, loopback aliases
standing in for two machines), token authentication on, one ``mlflow server`` for the module and a
storage folder both nodes write to. Everything runs through the ``flare`` CLI in subprocesses (this
process never joins the cluster); placement and restarts are read from Ray's state API (the head's
dashboard) and MLflow, not from flare's output.

Multi-node Ray binds its gRPC servers on all interfaces (``flare cluster up`` can keep a single node on
127.0.0.1, a node other nodes join cannot); token auth guards them. The cluster gets its own HOME and token
file, so the user's ``~/.ray`` is never touched, and its processes are stopped by process group, never
with ``ray stop``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from procs import free_port, proc_table

from flare.platform.predictor import detect_faces

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FLARE, RAY, MLFLOW = (str(BIN / name) for name in ("flare", "ray", "mlflow"))
TINY = str(ROOT / "jobs" / "tiny.yaml")
HEAD_IP = "127.0.0.2"
GUARD_S = 900  # one flare command; a hang fails the test instead of the CI run
HOST_ENV_DROP = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS",
                 "MLFLOW_TRACKING_URI", "FLARE_CLUSTER_STATE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")


def wait_for(what: str, check: Any, timeout_s: float = 180.0, every_s: float = 0.5) -> Any:
    """Poll ``check()`` until it returns something truthy; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g} s waiting for {what}"
        time.sleep(every_s)


class RayNode:
    """One ``ray start`` node: its own process group (``start_new_session``) and temp dir."""

    def __init__(self, args: list[str], env: dict[str, str], temp_dir: Path) -> None:
        self.temp_dir, self.seen = temp_dir, set()
        temp_dir.mkdir(mode=0o700)
        log = temp_dir.with_suffix(".log")
        with open(log, "wb") as out:
            proc = subprocess.Popen([RAY, "start", *args, "--temp-dir", str(temp_dir), "--disable-usage-stats",
                                     "--object-store-memory", str(200 * 2**20)],
                                    env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.pgid = proc.pid
        rc = proc.wait(timeout=300)
        assert rc == 0, log.read_text()[-3000:]
        self.processes()  # remember its members

    def processes(self) -> set[int]:
        """Live processes of the node: its group and their descendants. A group id reused by someone else
        (no member names this node's temp dir, none was seen before) yields nothing."""
        table = proc_table()
        live = {p: v for p, v in table.items() if v[2] not in ("Z", "X")}
        found = frontier = {p for p, (_, g, _) in live.items() if g == self.pgid}
        while frontier:
            frontier = {p for p, (pp, _, _) in live.items() if pp in frontier and p not in found}
            found = found | frontier
        if not (found & self.seen or any(str(self.temp_dir) in _cmdline(p) for p in found)):
            return set()
        self.seen |= found
        return found

    def kill(self, sig: int = signal.SIGKILL, timeout_s: float = 60.0) -> set[int]:
        """Send ``sig`` to every process of the node until none is alive (SIGKILL after half the time)."""
        killed: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while left := self.processes():
            assert time.monotonic() < deadline, f"node processes still alive: {sorted(left)}"
            if time.monotonic() > deadline - timeout_s / 2:
                sig = signal.SIGKILL
            for pid in left:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            killed |= left
            time.sleep(0.2)
        return killed


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class TwoNodes:
    """A head and one worker node at a time (``add_worker`` replaces a dead one); ``start`` starts both."""

    def __init__(self, root: Path) -> None:
        self.root, self.gcs_port, self.dash_port = root, free_port(), free_port()
        self.gcs, self.dashboard = f"{HEAD_IP}:{self.gcs_port}", f"http://127.0.0.1:{self.dash_port}"
        token = root / "token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.token = token.read_text()
        (root / "home").mkdir(mode=0o700)
        env = {k: v for k, v in os.environ.items() if k not in HOST_ENV_DROP}
        self.env = {**env, "HOME": str(root / "home"), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                    "PATH": os.pathsep.join([str(BIN), env.get("PATH", "")]),  # jobs' `python` is this venv's
                    "RAY_worker_maximum_startup_concurrency": "8"}
        self.nodes: list[RayNode] = []

    def start(self) -> None:
        self._start("head", ["--head", "--port", str(self.gcs_port), "--node-ip-address", HEAD_IP, "--num-cpus", "2",
                             "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port",
                             str(self.dash_port)], HEAD_IP)
        self.add_worker()

    def _start(self, name: str, args: list[str], ip: str) -> RayNode:
        node = RayNode([*args, "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port",
                        str(free_port())], self.env, self.root / name)
        self.nodes.append(node)
        wait_for(f"node {ip} alive", lambda: self.node_id(ip))
        return node

    def add_worker(self) -> None:
        """Start a worker node (1 CPU) on the next loopback IP: a fresh "machine" joining the head."""
        n = len(self.nodes)
        self.worker_ip = f"127.0.0.{n + 2}"
        self.worker = self._start(f"worker{n}", ["--address", self.gcs, "--node-ip-address", self.worker_ip,
                                                 "--num-cpus", "1"], self.worker_ip)

    def ensure_worker(self) -> TwoNodes:
        if self.node_id(self.worker_ip) is None:
            self.add_worker()
        assert len(self.alive_nodes()) == 2
        return self

    def api(self, path: str) -> Any:
        """GET the head's dashboard (state API) with the cluster's token."""
        req = urllib.request.Request(f"{self.dashboard}{path}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def alive_nodes(self) -> dict[str, str]:
        """node id -> IP of the alive nodes."""
        try:
            rows = self.api("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        except OSError:
            return {}
        return {n["node_id"]: n["node_ip"] for n in rows if n["state"] == "ALIVE"}

    def node_id(self, ip: str) -> str | None:
        return next((nid for nid, nip in self.alive_nodes().items() if nip == ip), None)

    def train_workers(self) -> dict[str, dict]:
        """actor id -> state API row of every Ray Train worker the cluster ever started."""
        rows = self.api("/api/v0/actors?detail=1&limit=10000&filter_keys=class_name&filter_predicates=%3D"
                        "&filter_values=RayTrainWorker")["data"]["result"]["result"]
        return {a["actor_id"]: a for a in rows}

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.kill(signal.SIGTERM, timeout_s=10)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a sqlite backend and proxied artifacts, as its own process group."""

    def __init__(self, root: Path) -> None:
        root.mkdir(mode=0o700)
        port = free_port()
        self.uri, self.log = f"http://127.0.0.1:{port}", root / "server.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
                 str(root / "artifacts")], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for("the MLflow server", self._healthy, timeout_s=180)

    def _healthy(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()[-2000:]
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def cluster() -> Iterator[TwoNodes]:
    root = Path(tempfile.mkdtemp(prefix="fmn-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    t0, nodes = time.monotonic(), TwoNodes(root)
    try:
        nodes.start()
        print(f"\n[multinode] two nodes up in {time.monotonic() - t0:.0f} s")
        yield nodes
    finally:
        nodes.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mn") / "mlflow")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def two_nodes(cluster: TwoNodes) -> TwoNodes:
    """The module's cluster with a live worker node (a replacement after a test killed one)."""
    return cluster.ensure_worker()


def flare(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([FLARE, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=GUARD_S,
                          check=False)


def job_sets(manifest: Path, model: str, *extra: str) -> list[str]:
    """``--set`` arguments of the tiny spec: few samples, this test's experiment and registered model."""
    out = []
    for s in (f"data.manifest={manifest / 'manifest.json'}", "data.max_train_samples=16", "data.max_val_samples=8",
              "optimizer.batch_size=8", f"mlflow.experiment={model}", f"mlflow.registered_model={model}", *extra):
        out += ["--set", s]
    return out


def only_run(client: MlflowClient, experiment: str) -> Any:
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def steps(client: MlflowClient, run_id: str, key: str = "val_nme") -> list[int]:
    return sorted(int(m.step) for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def spread_job(cluster: TwoNodes, mlflow_server: MlflowServer, small_300w: Path,
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One epoch of the tiny spec with STRICT_SPREAD, submitted with ``flare submit train --wait`` to the
    head's Jobs API (token from RAY_AUTH_TOKEN_PATH, as Ray reads it), checkpoints in a storage folder of
    both nodes, MLflow on the server; the Ray Train workers it started, read from Ray's state API."""
    cluster.ensure_worker()
    t0, before, tmp = time.monotonic(), set(cluster.train_workers()), tmp_path_factory.mktemp("spread")
    env = {**cluster.env, "MLFLOW_TRACKING_URI": mlflow_server.uri}
    r = flare(["submit", "train", "jobs/tiny.yaml", "--storage", str(tmp / "shared"), "--address", cluster.dashboard,
               "--wait", *job_sets(small_300w, "mn-spread", "optimizer.epochs=1",
                                   "scaling.placement_strategy=STRICT_SPREAD")], env, tmp)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    workers = [a for aid, a in cluster.train_workers().items() if aid not in before]
    print(f"\n[multinode] submitted STRICT_SPREAD job wall {time.monotonic() - t0:.0f} s")
    return {"out": r.stdout, "env": env, "storage": tmp / "shared", "workers": workers, "nodes": cluster.alive_nodes(),
            "cwd": tmp}


def test_strict_spread_puts_the_two_workers_on_both_nodes(spread_job: dict, mlflow_server: MlflowServer) -> None:
    """Both ranks ran, on different nodes; checkpoints in the shared folder; the model registered."""
    workers, nodes = spread_job["workers"], spread_job["nodes"]
    assert len(workers) == 2 and {a["node_id"] for a in workers} == set(nodes), (workers, nodes)
    client = MlflowClient(mlflow_server.uri)
    run = only_run(client, "mn-spread")
    assert run.info.status == "FINISHED" and run.data.params["scaling.placement_strategy"] == "STRICT_SPREAD"
    (version,) = client.search_model_versions("name = 'mn-spread'")
    assert version.run_id == run.info.run_id and steps(client, run.info.run_id) == [0]
    run_dir = spread_job["storage"] / run.data.tags["flare.ray_run_name"]  # written by rank 0, wherever it ran
    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    ckpts = [c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]]
    assert ckpts and all((run_dir / c / "state.pt").is_file() for c in ckpts)
    print(f"\n[multinode] STRICT_SPREAD: ranks on {sorted(nodes[a['node_id']] for a in workers)}; checkpoints {ckpts}")


def test_submit_train_then_jobs_logs(spread_job: dict, two_nodes: TwoNodes, mlflow_server: MlflowServer) -> None:
    """The submitted job succeeded and ``flare jobs logs`` shows it, down to the registration line."""
    job_id = spread_job["out"].split("submitted ", 1)[1].split()[0]
    assert f"job {job_id} SUCCEEDED" in spread_job["out"]
    client = MlflowClient(mlflow_server.uri)
    run_id = only_run(client, "mn-spread").info.run_id
    logs = flare(["jobs", "logs", job_id, "--address", two_nodes.dashboard], spread_job["env"], spread_job["cwd"])
    assert logs.returncode == 0, logs.stderr
    assert "epoch 1/1" in logs.stdout and f"model logged to run {run_id}, registered mn-spread v1" in logs.stdout


def predict_actors(cluster: TwoNodes) -> dict[str, dict]:
    """actor id -> state API row of every ``flare predict --ray`` actor the cluster ever started."""
    name = urllib.parse.quote("MapWorker(MapBatches(PredictActor))")
    rows = cluster.api("/api/v0/actors?detail=1&limit=10000&filter_keys=class_name&filter_predicates=%3D"
                       f"&filter_values={name}")["data"]["result"]["result"]
    return {a["actor_id"]: a for a in rows}


def test_submit_predict_spans_both_nodes(spread_job: dict, two_nodes: TwoNodes, test_data: Path,
                                         tmp_path: Path) -> None:
    """``flare submit predict`` with the model the submitted training registered (``models:/mn-spread/1``):
    3 Ray Data actors of 1 CPU on a 3-CPU two-node cluster, so the actors run on both nodes; each loads the
    model once; real 300W photos, the faces Haar finds here found there, JSONL in input order."""
    photos = [p for p in sorted((test_data / "300W" / "afw").glob("*.jpg"))[:12]
              if len(detect_faces(cv2.imread(str(p))))][:6]  # photos with a face Haar finds (else: exit 1)
    (tmp_path / "photos").mkdir()
    for p in photos:
        shutil.copy(p, tmp_path / "photos" / p.name)
    t0, before = time.monotonic(), set(predict_actors(two_nodes))
    r = flare(["submit", "predict", str(tmp_path / "photos"), "--model", "models:/mn-spread/1", "--out",
               str(tmp_path / "pred"), "--actors", "3", "--batch-size", "2", "--address", two_nodes.dashboard,
               "--wait"], spread_job["env"], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = next(ln for ln in r.stdout.splitlines() if ln.startswith("6 image(s) on "))
    assert "on 3 actor(s), 3 model load(s); 0 failed" in summary, summary  # all 3 ready before the 3 batches
    actors = [a for aid, a in predict_actors(two_nodes).items() if aid not in before]
    nodes = two_nodes.alive_nodes()
    assert len(actors) == 3 and {a["node_id"] for a in actors} == set(nodes), (actors, nodes)
    rows = [json.loads(ln) for ln in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert [x["output"] for x in rows] == [p.stem for p in photos]
    found = [len(detect_faces(cv2.imread(str(p)))) for p in photos]  # Haar here, in this process
    assert [len(x["faces"]) for x in rows] == found, (rows, found)
    assert all(np.asarray(f).shape == (68, 2) for x in rows for f in x["faces"])
    print(f"\n[multinode] submit predict: 6 photos on 3 actors over {sorted(nodes.values())}, "
          f"wall {time.monotonic() - t0:.0f} s")


def test_strict_spread_with_more_workers_than_nodes_is_refused(two_nodes: TwoNodes, mlflow_server: MlflowServer,
                                                              small_300w: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    env = {**two_nodes.env, "MLFLOW_TRACKING_URI": mlflow_server.uri}
    r = flare(["train", TINY, "--address", two_nodes.gcs, "--storage", str(tmp_path / "runs"),
               *job_sets(small_300w, "mn-refused", "scaling.workers=3", "optimizer.batch_size=12",
                         "scaling.placement_strategy=STRICT_SPREAD")], env, tmp_path)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
    assert "STRICT_SPREAD puts each of the 3 workers on its own node, but 2 node(s) can hold one" in errors[0]
    assert MlflowClient(mlflow_server.uri).get_experiment_by_name("mn-refused") is None  # refused before MLflow
    assert not (tmp_path / "runs").exists()
    print(f"\n[multinode] refusal wall {time.monotonic() - t0:.0f} s")


def trials(path: Path) -> dict[str, dict]:
    """Per trial id: Tune's status and its epochs, from Tune's experiment files."""
    from ray.tune import ExperimentAnalysis

    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)  # no results yet: normal
    ea = ExperimentAnalysis(str(path))
    frames = {tid: df for tid, df in ea.trial_dataframes.items() if not df.empty and "epochs_done" in df}
    return {t.trial_id: {"status": t.status, "epochs": [int(e) for e in frames[t.trial_id]["epochs_done"]]
                         if t.trial_id in frames else []} for t in ea.trials}


def test_tune_driver_sigkilled_then_resumed(spread_job: dict, two_nodes: TwoNodes, mlflow_server: MlflowServer,
                                            small_300w: Path, tmp_path: Path) -> None:
    """``flare tune --address HEAD`` is SIGKILLed once its first trial is TERMINATED in Tune's experiment
    state; ``--resume`` finishes the search without re-running that trial and moves ``champion`` only if
    the new best is better than the champion (the STRICT_SPREAD job's model)."""
    from flare.platform.registry import promote, version_info

    t0 = time.monotonic()
    env, model, name = {**two_nodes.env, "MLFLOW_TRACKING_URI": mlflow_server.uri}, "mn-spread", "mn-search"
    client = MlflowClient(mlflow_server.uri)
    if version_info(model, "champion", mlflow_server.uri) is None:
        promote(model, "1", tracking_uri=mlflow_server.uri)  # `flare train` registers; a search promotes
    champion = version_info(model, "champion", mlflow_server.uri)
    assert champion is not None
    storage = tmp_path / "shared"
    storage.mkdir(mode=0o755)
    search = tmp_path / "search.yaml"
    search.write_text("samples: 1\nseed: 0\nscheduler: {grace_period: 1, reduction_factor: 2, max_epochs: 1}\n"
                      "params:\n  optimizer.lr: {grid: [1.0e-7, 2.0e-7]}\n")
    args = ["--address", two_nodes.gcs, "--storage", str(storage)]
    log = tmp_path / "tune.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([FLARE, "tune", TINY, "--search", str(search), "--name", name, "--max-concurrent", "1",
                                 *args, *job_sets(small_300w, model, "mlflow.experiment=mn-tune", "scaling.workers=1")],
                                env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        def one_terminated() -> dict | None:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                ts = trials(storage / name)
            except Exception:  # noqa: BLE001 - no experiment state written yet
                return None
            return ts if [t["status"] for t in ts.values()].count("TERMINATED") == 1 else None

        before = wait_for("the first trial to finish", one_terminated, timeout_s=GUARD_S, every_s=1.0)
        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    path = storage / name
    (done,) = [tid for tid, t in before.items() if t["status"] == "TERMINATED"]
    result = next(path.glob(f"*{done}*")) / "result.json"
    finished_rows = result.read_bytes()
    r = flare(["tune", "--resume", name, *args], env, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    after = trials(path)
    assert all(t["status"] == "TERMINATED" and t["epochs"][-1:] == [1] for t in after.values()), after
    assert after[done] == before[done]
    assert result.read_bytes() == finished_rows  # the finished trial was not re-run
    exp = client.get_experiment_by_name("mn-tune")
    runs = client.search_runs([exp.experiment_id], f"tags.`flare.tune.search` = '{name}'")
    parent = [x for x in runs if x.data.tags.get("flare.kind") == "tune"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED" and len(runs) == 3
    versions = client.search_model_versions(f"name = '{model}'")
    newest = max(versions, key=lambda v: int(v.version))
    assert len(versions) == 2 and newest.run_id in {x.info.run_id for x in runs}  # the search registered its best
    now = version_info(model, "champion", mlflow_server.uri)
    better = float(newest.tags["val_nme"]) < float(champion["tags"]["val_nme"])
    assert str(now["version"]) == (str(newest.version) if better else str(champion["version"]))
    assert ("champion = v" if better else f"champion stays v{champion['version']}") in r.stdout
    print(f"\n[multinode] tune: driver SIGKILLed {killed_at - t0:.0f} s in with trial {done} finished; resume took "
          f"{time.monotonic() - killed_at:.0f} s; champion {'moved' if better else 'stayed'}; "
          f"wall {time.monotonic() - t0:.0f} s")


def test_a_node_dies_mid_epoch_and_training_finishes(two_nodes: TwoNodes, mlflow_server: MlflowServer,
                                                     small_300w: Path, tmp_path: Path) -> None:
    """SPREAD puts a rank on each node; once epoch 1's checkpoint is registered, every process of the worker
    node is SIGKILLed (the machine is gone). Ray marks the node dead, Train restarts the worker group from
    that checkpoint on the head, and the run still ends with each of the 4 epochs logged once."""
    t0, before = time.monotonic(), set(two_nodes.train_workers())
    env, storage, epochs = {**two_nodes.env, "MLFLOW_TRACKING_URI": mlflow_server.uri}, tmp_path / "shared", 4
    client, dead_ip, log = MlflowClient(mlflow_server.uri), two_nodes.worker_ip, tmp_path / "train.log"
    dead_id = two_nodes.node_id(dead_ip)
    with open(log, "w") as out:
        proc = subprocess.Popen([FLARE, "train", TINY, "--address", two_nodes.gcs, "--storage", str(storage),
                                 *job_sets(small_300w, "mn-fault", f"optimizer.epochs={epochs}",
                                           "scaling.placement_strategy=SPREAD", "checkpoint.max_failures=2")],
                                env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        def first_checkpoint() -> Any:
            assert proc.poll() is None, log.read_text()[-3000:]
            exp = client.get_experiment_by_name("mn-fault")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if not runs or "flare.ray_run_name" not in runs[0].data.tags:
                return None
            snap = storage / runs[0].data.tags["flare.ray_run_name"] / "checkpoint_manager_snapshot.json"
            try:
                done = [c["metrics"]["epoch"] for c in json.loads(snap.read_text())["checkpoint_results"]]
            except (OSError, ValueError):
                return None
            return runs[0].info.run_id if 0 in done else None

        run_id = wait_for("epoch 1's checkpoint", first_checkpoint, timeout_s=GUARD_S)
        group1 = {aid: a for aid, a in two_nodes.train_workers().items() if aid not in before and a["state"] == "ALIVE"}
        assert dead_id in {a["node_id"] for a in group1.values()}, ("SPREAD left the worker node without a rank",
                                                                   group1)
        steps_before = steps(client, run_id)
        fault_at, t_fault = time.time(), time.monotonic()
        killed = two_nodes.worker.kill()
        t_dead = t_restart = t_next = None
        while proc.poll() is None:  # until training ends: when the node is declared dead, the restart, the next epoch
            assert time.monotonic() - t_fault < GUARD_S, "training did not end after the node fault"
            now = time.monotonic()
            if t_dead is None and two_nodes.node_id(dead_ip) is None:
                t_dead = now
            if t_restart is None and any(aid not in before and aid not in group1 and a["state"] == "ALIVE"
                                         for aid, a in two_nodes.train_workers().items()):
                t_restart = now
            if t_next is None and len(steps(client, run_id)) > len(steps_before):
                t_next = now
            time.sleep(1.0)
        assert proc.wait() == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run = client.get_run(run_id)
    history = client.get_metric_history(run_id, "val_nme")
    after = [int(m.step) for m in history if m.timestamp >= fault_at * 1000]
    group2 = [a for aid, a in two_nodes.train_workers().items() if aid not in before and aid not in group1]
    counts = {key: len(client.get_metric_history(run_id, key)) for key in run.data.metrics}
    print(f"\n[multinode] node fault {t_fault - t0:.0f} s into the run, after epochs {steps_before} "
          f"({len(killed)} processes killed); node declared dead after "
          f"{(t_dead or t_fault) - t_fault:.0f} s, new worker group alive after {(t_restart or t_fault) - t_fault:.0f} s,"
          f" next epoch logged after {(t_next or t_fault) - t_fault:.0f} s; epochs logged after the fault {after}; "
          f"val_nme entries {len(history)}, metric entries {sum(counts.values())} over {len(counts)} keys "
          f"({sorted(set(counts.values()))} each); wall {time.monotonic() - t0:.0f} s")
    assert 1 <= len(steps_before) < epochs, steps_before  # the fault hit mid-run, after a checkpoint
    assert len(client.search_runs([run.info.experiment_id])) == 1  # one MLflow run despite the restart
    assert steps(client, run_id) == list(range(epochs)) and run.data.params["optimizer.epochs"] == str(epochs)
    assert set(counts.values()) == {epochs}  # every metric of every epoch exactly once
    assert group2 and {a["node_id"] for a in group2} == {two_nodes.node_id(HEAD_IP)}  # restarted on the head
    assert run.info.status == "FINISHED"
    (version,) = client.search_model_versions("name = 'mn-fault'")
    assert version.run_id == run_id and f"registered mn-fault v{version.version}" in log.read_text()
    assert float(version.tags["val_nme"]) == pytest.approx(min(m.value for m in history))
