"""Shared fixtures. Real data is found through FLARE_TEST_DATA (set by .ci/run to ../shared/datasets)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Ray Train's controller polls its workers every 2 s by default, so each training run (and each Tune trial) ends,
# and a dead worker is noticed, up to 2 s after the fact. Tests poll every 0.5 s: the same behaviour, less idle
# wall time over the suite's many Ray runs. Set before any Ray starts; subprocesses (flare train, cluster up)
# inherit it. Full suite on the 2-core dev machine, one run each: 1520 s -> 1379 s (with the blinking-server
# test's shorter MLflow backoff).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def test_data() -> Path:
    """Root of the shared real datasets; tests that need it skip with a visible reason elsewhere."""
    root = os.environ.get("FLARE_TEST_DATA")
    if not root:
        pytest.skip("FLARE_TEST_DATA is not set: real-data tests need ../shared/datasets (.ci/run sets it)")
    path = Path(root)
    if not (path / "300W").is_dir():
        pytest.skip(f"FLARE_TEST_DATA={root} has no 300W/ folder")
    return path


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray (2 CPUs, dashboard off), shut down at the end of the session."""
    import ray

    from flare.platform.ray_connect import ensure_ray

    ensure_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_300w(test_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real 300W shards from a subset of the shared data: afw (train, val carved from it) and
    lfpw/testset (test). Prepared once per session in this process, without Ray."""
    from flare.datasets.prepare import PrepareOptions, prepare

    root = tmp_path_factory.mktemp("300w_subset")
    (root / "lfpw").mkdir()
    (root / "afw").symlink_to(test_data / "300W" / "afw")
    (root / "lfpw" / "testset").symlink_to(test_data / "300W" / "lfpw" / "testset")
    out = tmp_path_factory.mktemp("shards") / "300w"
    prepare("300w", root, out, PrepareOptions(val_fraction=0.1, seed=0), engine="local")
    return out


@pytest.fixture()
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh sqlite MLflow store in a temp dir, for this test only."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri
