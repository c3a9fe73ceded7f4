"""Ray Train storage as a path or a URI (platform/storage.py): an S3 bucket served by a real S3 server on
127.0.0.1 (moto's, a dev dependency) holds the checkpoints of ``flare train --storage s3://…``; an
interrupted run resumes from the newest checkpoint in the bucket and registers its model from there."""

from __future__ import annotations

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

from flare.platform.config import ConfigError
from flare.platform.storage import checkpoint_dirs, join, local_storage, newest_checkpoint, resolve_storage

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_REGION": "us-east-1"}


def test_paths_become_absolute_and_uris_stay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_storage(None) == str(tmp_path / "runs")
    assert resolve_storage("a/b") == str(tmp_path / "a" / "b")
    assert resolve_storage("file:///x/runs/") == "file:///x/runs"  # kept as written (no trailing slash)
    assert join("s3://bucket/runs", "name", "checkpoint_1") == "s3://bucket/runs/name/checkpoint_1"
    with pytest.raises(ConfigError, match=r"^--storage nosuch://x/y: unknown scheme 'nosuch'; pyarrow opens file, s3"):
        resolve_storage("nosuch://x/y")
    with pytest.raises(ConfigError, match="name a bucket"):
        resolve_storage("s3://")
    with pytest.raises(ConfigError, match="no query string; set the endpoint"):
        resolve_storage("s3://bucket/runs?endpoint_override=localhost:9000")
    with pytest.raises(ConfigError, match="a search keeps its state on a filesystem path"):
        local_storage("s3://bucket/runs")


def test_newest_complete_checkpoint(tmp_path: Path) -> None:
    """By Ray's time-ordered names; a checkpoint folder without its state file (an upload cut short) is
    skipped; a missing run folder has none."""
    run = tmp_path / "run"
    for name in ("checkpoint_2026-11-26_10-00-00.000001", "checkpoint_2026-11-26_10-00-05.000001",
                 "checkpoint_2026-11-26_10-00-09.000001"):
        (run / name).mkdir(parents=True)
    (run / "checkpoint_2026-11-26_10-00-00.000001" / "state.pt").write_bytes(b"x")
    (run / "checkpoint_2026-11-26_10-00-05.000001" / "state.pt").write_bytes(b"x")
    (run / "checkpoint_tmp_abc").mkdir()
    assert [Path(d).name for d in checkpoint_dirs(str(run))] == [
        "checkpoint_2026-11-26_10-00-00.000001", "checkpoint_2026-11-26_10-00-05.000001",
        "checkpoint_2026-11-26_10-00-09.000001", "checkpoint_tmp_abc"]
    assert newest_checkpoint(str(run)) == str(run / "checkpoint_2026-11-26_10-00-05.000001")
    assert newest_checkpoint(str(tmp_path / "none")) is None


class S3Server:
    """moto's S3 server, one process group on 127.0.0.1, with one bucket."""

    def __init__(self, root: Path, bucket: str = "flare") -> None:
        self.port, self.bucket = free_port(), bucket
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = root / "s3.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=log, stderr=log, start_new_session=True)
        try:  # a server that never answers, or a bucket that cannot be made, is stopped here
            deadline = time.monotonic() + 60
            while True:
                assert self.proc.poll() is None, self.log.read_text()[-2000:]
                try:
                    urllib.request.urlopen(self.endpoint, timeout=2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no S3 server on {self.endpoint}") from None
                    time.sleep(0.3)  # polling a condition with a deadline
            self.fs.create_dir(bucket)
        except BaseException:
            self.stop()
            raise

    @property
    def env(self) -> dict[str, str]:
        return {**S3_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    @property
    def fs(self):
        import pyarrow.fs

        return pyarrow.fs.S3FileSystem(endpoint_override=self.endpoint, scheme="http", access_key="testing",
                                       secret_key="testing", region="us-east-1", allow_bucket_creation=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


@pytest.fixture()
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """The server, with its endpoint and test credentials in this process's environment too."""
    if not (BIN / "moto_server").exists():
        pytest.skip("moto's S3 server is not installed (it is in the dev extra: pip install -e '.[dev]')")
    server = S3Server(tmp_path)
    for k, v in server.env.items():
        monkeypatch.setenv(k, v)
    try:
        yield server
    finally:
        server.stop()


def test_train_into_s3_then_resume_from_it(s3: S3Server, small_300w: Path, tmp_path: Path) -> None:
    """One worker, its batches streamed from a Ray Data actor (``data.loader_workers=1``), fails at epoch 1
    (test-only fault hook, no retries): the run is FAILED, epoch 0's checkpoint is in the bucket and nothing
    was written to the working directory's ./runs. ``--resume RUN`` finds the newest checkpoint in the
    bucket, streams from epoch 1 on without redoing epoch 0, and registers the model read back from S3."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, **s3.env, "MLFLOW_TRACKING_URI": uri}
    env.pop("RAY_ADDRESS", None)
    sets = []
    for s in (f"data.manifest={small_300w / 'manifest.json'}", "checkpoint.max_failures=0", "scaling.workers=1",
              "scaling.cpus_per_worker=1", "data.loader_workers=1", "data.max_train_samples=16", "data.max_val_samples=8",
              "optimizer.batch_size=8", "mlflow.experiment=s3", "mlflow.registered_model=s3-tiny"):
        sets += ["--set", s]
    storage = f"s3://{s3.bucket}/runs"
    cmd = [str(BIN / "flare"), "train", str(ROOT / "jobs" / "tiny.yaml"), "--storage", storage, *sets]
    first = subprocess.run(cmd, env={**env, "FLARE_TEST_FAULT_EPOCH": "1",
                                     "FLARE_TEST_FAULT_MARKER": str(tmp_path / "marker")},
                           cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert first.returncode != 0 and (tmp_path / "marker").exists(), first.stderr[-2000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("s3").experiment_id])
    assert run.info.status == "FAILED"
    assert sorted(int(m.step) for m in client.get_metric_history(run.info.run_id, "val_nme")) == [0]
    name = run.data.tags["flare.ray_run_name"]
    ckpts = checkpoint_dirs(join(storage, name))
    assert len(ckpts) == 1 and ckpts[0].startswith(f"{storage}/{name}/checkpoint_")
    assert newest_checkpoint(join(storage, name)) == ckpts[0]  # the state file was uploaded
    assert not (tmp_path / "runs").exists()  # nothing written beside the user's files
    second = subprocess.run([*cmd, "--resume", run.info.run_id], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=600, check=False)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "registered s3-tiny v1" in second.stdout
    assert sorted(int(m.step) for m in client.get_metric_history(run.info.run_id, "val_nme")) == [0, 1]
    assert len(checkpoint_dirs(join(storage, name))) == 1  # checkpoint.keep_best: 1 in the bucket too
    resumed = client.get_run(run.info.run_id).info
    assert resumed.status == "FINISHED" and resumed.end_time > run.info.end_time  # ended again, later
    assert "epoch 2/2" in second.stdout and "epoch 1/2" not in second.stdout  # epoch 0 was not redone
    assert not (tmp_path / "runs").exists()
