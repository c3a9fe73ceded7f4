"""Distributed training on a real local Ray with a real sqlite MLflow and real 300W shards."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from flare.datasets.readers import parse_pts
from flare.platform.config import load_job
from flare.platform.predictor import Predictor
from flare.platform.ray_train import train
from flare.platform.tracking import manifest_hash

ROOT = Path(__file__).resolve().parents[1]
FLARE = str(Path(sys.executable).parent / "flare")


def tiny_job(manifest: Path, uri: str, *extra: str):
    return load_job(ROOT / "jobs" / "tiny.yaml", [f"data.manifest={manifest / 'manifest.json'}",
                                                  f"mlflow.tracking_uri={uri}", *extra])


def metric_steps(uri: str, run_id: str, key: str = "val_nme") -> list[int]:
    return sorted(int(m.step) for m in MlflowClient(uri).get_metric_history(run_id, key))


def _temp_checkpoints() -> set[str]:
    tmp = Path(tempfile.gettempdir())
    return {p.name for pat in ("flare-best-*", "flare-ckpt-*", "checkpoint_tmp_*") for p in tmp.glob(pat)}


def test_train_survives_worker_failure_then_register_pull_predict(ray_cluster, small_300w: Path, mlflow_uri: str,
                                                                  tmp_path: Path, test_data: Path) -> None:
    """2 workers, 2 epochs; one worker raises once at epoch 1 (test-only fault hook), Ray restarts it
    from the epoch-0 checkpoint; then the registered model is pulled and used for prediction."""
    marker = tmp_path / "fault-marker"
    job = tiny_job(small_300w, mlflow_uri)
    temp_before = _temp_checkpoints()
    out = train(job, storage=tmp_path / "runs", log=lambda s: None,
                worker_env={"FLARE_TEST_FAULT_EPOCH": "1", "FLARE_TEST_FAULT_MARKER": str(marker)})
    assert marker.read_text().endswith("failed at epoch 1\n")  # the fault really happened
    assert [h["epoch"] for h in out.history] == [1]  # the restarted execution did not redo epoch 0
    assert _temp_checkpoints() == temp_before  # neither the restore nor the model logging left a temp copy
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("tests")
    assert len(client.search_runs([exp.experiment_id])) == 1  # one MLflow run despite the restart
    assert metric_steps(mlflow_uri, out.run_id) == [0, 1]  # no epoch logged twice
    total = {int(m.step): m.value for m in client.get_metric_history(out.run_id, "train_total")}
    assert sorted(total) == [0, 1] and total[1] < total[0]  # the loss decreases
    run = client.get_run(out.run_id)
    assert run.data.params["objective.name"] == "star"
    assert "job.json" in {a.path for a in client.list_artifacts(out.run_id)}
    figures = {a.path for a in client.list_artifacts(out.run_id, "figures")}
    assert {"figures/val_predictions.png", "figures/val_ellipses.png"} <= figures
    versions = client.search_model_versions("name = 'tiny-300w'")
    assert [str(v.version) for v in versions] == ["1"] and out.registered_version == "1"
    assert float(versions[0].tags["val_nme"]) == pytest.approx(out.best_metrics["val_nme"])
    # the run ended with its training (before its model was registered) and carries the data's digest
    assert run.info.status == "FINISHED" and run.info.end_time < versions[0].creation_timestamp
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [manifest_hash(small_300w)]

    # pull, then predict through the CLI: same landmarks as the run's own best checkpoint
    pulled = tmp_path / "pulled"
    env = {"MLFLOW_TRACKING_URI": mlflow_uri, "PATH": "/usr/bin:/bin"}
    r = subprocess.run([FLARE, "models", "pull", "tiny-300w/1", "--out", str(pulled)], check=False, capture_output=True,
                       text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (pulled / "MODEL_CARD.md").read_text().startswith("# models:/tiny-300w/1")
    from flare.datasets.ingest import BatchBuilder, iter_local_rows, load_manifest

    manifest = load_manifest(small_300w)
    prior = Predictor.from_dir(pulled, device="cpu").crop_prior  # rank 0's re-crop prior, through the registry
    assert prior is not None and prior.faces == manifest.count("train")
    images = sorted((test_data / "300W" / "lfpw" / "testset").glob("*.jpg"))[:3]
    direct = Predictor.from_dir(out.best_checkpoint, device="cpu")
    for img in images:
        pts = parse_pts(img.with_suffix(".pts"))
        x0, y0 = pts.min(0)
        x1, y1 = pts.max(0)
        box = f"{x0},{y0},{x1 - x0},{y1 - y0}"
        r = subprocess.run([FLARE, "predict", str(img), "--model", str(pulled), "--out", str(tmp_path / "pred"),
                            "--box", box], check=False, capture_output=True, text=True, env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        got = np.array(json.loads((tmp_path / "pred" / f"{img.stem}.json").read_text())["faces"][0])
        want = direct.predict(cv2.imread(str(img)), boxes=np.array([[x0, y0, x1 - x0, y1 - y0]]))[0]
        assert got.shape == (68, 2)
        np.testing.assert_allclose(got, want, atol=1e-4)
        assert (tmp_path / "pred" / f"{img.stem}_overlay.png").stat().st_size > 0

    # the registered model works without flare: crops in, landmarks (crop px) out, any batch size, the
    # validation-selected decoder inside; it carries the selected epoch's metrics
    rows = next(iter_local_rows(manifest, "test", 4))
    crops = BatchBuilder(manifest.layout, direct.input_size, augment=False)(rows)["image"]
    np.save(tmp_path / "crops.npy", crops.numpy())
    script = ("import sys; sys.modules['flare'] = None\n"  # flare cannot be imported
              "import mlflow, numpy as np\n"
              f"m = mlflow.pyfunc.load_model('models:/tiny-300w/1')\n"
              f"x = np.load({str(tmp_path / 'crops.npy')!r})\n"
              f"np.save({str(tmp_path / 'out4.npy')!r}, np.asarray(m.predict(x)))\n"
              f"np.save({str(tmp_path / 'out1.npy')!r}, np.asarray(m.predict(x[:1])))\n")
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    want = direct.predict_batch(crops)
    np.testing.assert_allclose(np.load(tmp_path / "out4.npy"), want, atol=0.01)
    np.testing.assert_allclose(np.load(tmp_path / "out1.npy"), want[:1], atol=0.01)
    version = client.get_model_version("tiny-300w", "1")
    assert "crop pixels" in version.description and "decoder softargmax" in version.description
    import mlflow

    logged = [m for m in mlflow.search_logged_models(filter_string=f"source_run_id = '{out.run_id}'",
                                                     output_format="list") if m.name == "model"]
    assert len(logged) == 1 and logged[0].metrics
    assert {m.step for m in logged[0].metrics} == {out.best_metrics["epoch"]}


@pytest.mark.parametrize(
    "override,needle",
    [
        ("objective.star.ww=1", "objective.star.ww: unknown key"),
        ("data.manifest=/nonexistent/manifest.json", "/nonexistent/manifest.json: no such manifest"),
        ("model.layout=wflw98", "model.layout: wflw98 does not match the data's layout 300w68"),
    ],
)
def test_bad_specs_fail_before_workers(small_300w: Path, tmp_path: Path, override: str, needle: str) -> None:
    r = subprocess.run([FLARE, "train", str(ROOT / "jobs" / "tiny.yaml"), "--set",
                        f"data.manifest={small_300w / 'manifest.json'}", "--set", override],
                       check=False, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlruns").exists()
