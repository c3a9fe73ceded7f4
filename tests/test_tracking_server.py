"""flare against an MLflow tracking server as users deploy it: ``mlflow server`` on 127.0.0.1 with a
database backend store and proxied artifacts (artifacts travel over HTTP). The server is stopped and
started again while metrics are logged: nothing is lost and training does not die."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from procs import free_port

ROOT = Path(__file__).resolve().parents[1]
FLARE = str(Path(sys.executable).parent / "flare")
MLFLOW = str(Path(sys.executable).parent / "mlflow")


class Server:
    """One ``mlflow server`` process group on 127.0.0.1; ``stop``/``start`` keep its store and port."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> None:
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)  # polling a condition with a deadline, not synchronising on a guess
        raise TimeoutError(f"mlflow server did not answer on {self.uri}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and the workers it started, by group
            self.proc.wait(timeout=60)
        self.proc = None


@pytest.fixture()
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    srv = Server(tmp_path)
    try:  # a start that fails stops what it started
        srv.start()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.uri)
        yield srv
    finally:
        srv.stop()


def test_epochs_buffered_while_the_server_is_down_are_sent_after(server: Server) -> None:
    from flare.platform.tracking import EpochLogger

    client = MlflowClient(server.uri)
    exp = client.create_experiment("blink")
    run = client.create_run(exp).info.run_id
    logger = EpochLogger(server.uri, run)
    assert logger.log({"val_nme": 0.5, "train_total": 3.0}, 0)
    server.stop()
    t0 = time.monotonic()
    assert logger.log({"val_nme": 0.4, "train_total": 2.0}, 1)  # buffered, training goes on
    assert time.monotonic() - t0 < 15  # seconds, not MLflow's minutes of retries
    assert sorted(logger.pending) == [1]
    assert os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") is None  # the rest of the process keeps its retries
    server.start()
    assert logger.log({"val_nme": 0.3, "train_total": 1.0}, 2)
    assert not logger.pending
    logger.flush(timeout_s=5)
    history = MlflowClient(server.uri).get_metric_history(run, "val_nme")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.5), (1, 0.4), (2, 0.3)]
    assert not logger.log({"val_nme": 9.9}, 1)  # an epoch is logged once, whatever happens


def test_train_through_a_server_that_blinks_then_pull_predict_eval(server: Server, small_300w: Path,
                                                                  test_data: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``flare train tiny`` from a folder holding ``data/300w`` (the spec's relative manifest, resolved on the
    driver; Ray's workers run elsewhere) logs over HTTP (driver and rank 0); the server is down for 20 s
    during epoch 2; the run still ends FINISHED with every epoch logged once and its model registered; then
    the registry, ``models pull``, ``predict models:/`` and ``eval`` work against the same server."""
    # MLflow's own retries (outside the epoch logger) back off 1, 2, 4, 8, 16 s instead of 2, 4, ... 32 s, so a
    # request that failed at the outage's start resumes within ~10 s of the server's return, not ~40 s
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri, "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    env.pop("RAY_ADDRESS", None)
    epochs = 2  # the outage falls in the last epoch: its metrics wait in the buffer or MLflow's retries
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "300w").symlink_to(small_300w)  # the quickstart: tiny.yaml's relative data/300w
    proc = subprocess.Popen(
        [FLARE, "train", "tiny", "--storage", str(tmp_path / "runs"), "--set", f"optimizer.epochs={epochs}",
         "--set", "mlflow.registered_model=served", "--set", "mlflow.experiment=served",
         "--set", "data.max_train_samples=32", "--set", "data.max_val_samples=8"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = MlflowClient(server.uri)
    deadline = time.monotonic() + 600
    run_id = None
    while time.monotonic() < deadline and proc.poll() is None:  # wait for epoch 1 to be logged
        exp = client.get_experiment_by_name("served")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and client.get_metric_history(runs[0].info.run_id, "val_nme"):
            run_id = runs[0].info.run_id
            break
        time.sleep(1.0)
    assert run_id is not None, proc.communicate()[0][-3000:]
    server.stop()
    down_at = time.monotonic()
    time.sleep(20)  # the outage itself: the server is away for 20 s, whatever training does meanwhile
    server.start()
    up_at = time.monotonic()
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    print(f"tracking server down for {up_at - down_at:.0f} s during epoch 2; training went on and ended "
          f"{time.monotonic() - up_at:.0f} s after the server was back")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "val_nme")]
    assert sorted(steps) == list(range(epochs)), steps  # every epoch exactly once
    assert [str(v.version) for v in client.search_model_versions("name = 'served'")] == ["1"]

    # the same CLI in this process (torch and MLflow are imported already): pull, predict, eval
    from typer.testing import CliRunner

    from flare.platform.cli import app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["models", "pull", "served/1", "--out", str(tmp_path / "pulled")])
    assert r.exit_code == 0, r.output
    img = min((test_data / "300W" / "lfpw" / "testset").glob("*.jpg"))
    r = CliRunner().invoke(app, ["predict", str(img), "--model", "models:/served/1", "--out", str(tmp_path / "pred"),
                                 "--no-detect"])
    assert r.exit_code == 0, r.output
    assert len(json.loads((tmp_path / "pred" / f"{img.stem}.json").read_text())["faces"][0]) == 68
    r = CliRunner().invoke(app, ["eval", "models:/served/1", "--data", str(small_300w), "--split", "test"])
    assert r.exit_code == 0, r.output
    assert 0 < json.loads(r.stdout)["nme"] < 10
