"""``flare runs import``: a ``flare train --no-ray`` run logged into a real sqlite MLflow afterwards
(the GPU-host path), on real 300W shards."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from flare.datasets.crop_prior import manifest_crop_prior
from flare.datasets.ingest import load_manifest
from flare.platform.config import load_job
from flare.platform.local_runs import import_local_run
from flare.platform.predictor import ModelLoadError, Predictor
from flare.platform.train_loop import train_local

ROOT = Path(__file__).resolve().parents[1]
FLARE = str(Path(sys.executable).parent / "flare")


@pytest.fixture(scope="module")
def local_run(small_300w: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch single-process run of the tiny spec."""
    job = load_job(ROOT / "jobs" / "tiny.yaml", [f"data.manifest={small_300w / 'manifest.json'}",
                                                 "mlflow.registered_model=tiny-local"])
    run_dir = tmp_path_factory.mktemp("local") / "run"
    train_local(job, run_dir, device="cpu")
    return run_dir


def _val_nmes(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["epoch"]: r["val_nme"] for r in rows}


def test_import_logs_each_epoch_once_registers_and_crowns(local_run: Path, mlflow_uri: str) -> None:
    record = import_local_run(local_run, champion=True, log=lambda s: None)
    written = _val_nmes(local_run)
    assert record["epochs"] == 2
    assert record["selected_epoch"] == min(written, key=written.get)  # chosen on validation
    client = MlflowClient(mlflow_uri)
    history = sorted((int(m.step), m.value) for m in client.get_metric_history(record["run_id"], "val_nme"))
    assert history == sorted(written.items())
    champion = client.get_model_version_by_alias("tiny-local", "champion")
    assert str(champion.version) == record["registered_version"] == "1" and champion.run_id == record["run_id"]
    assert float(champion.tags["val_nme"]) == pytest.approx(min(written.values()))
    host = json.loads(Path(client.download_artifacts(record["run_id"], "host.json")).read_text())
    assert host["device"] == "cpu" and host["threads"] >= 1

    # the same directory again: refused with the existing run named, nothing duplicated
    proc = subprocess.run([FLARE, "runs", "import", str(local_run)], capture_output=True, text=True, check=False,
                          timeout=300)
    assert proc.returncode != 0 and record["run_id"] in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    exp = client.get_experiment_by_name("tests")
    assert len(client.search_runs([exp.experiment_id])) == 1
    assert len(client.search_model_versions("name='tiny-local'")) == 1


def test_bad_metrics_line_is_one_line_error_naming_file_and_line(tmp_path: Path, mlflow_uri: str) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"epoch": 0, "val_nme": 0.2}\n{"epoch": 1, "val_nme": \n')
    proc = subprocess.run([FLARE, "runs", "import", str(run)], capture_output=True, text=True, check=False,
                          timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "metrics.jsonl:2" in proc.stderr
    assert not (tmp_path / "mlruns" / "artifacts").exists()


def test_failed_import_leaves_no_run_and_can_be_retried(local_run: Path, tmp_path: Path, mlflow_uri: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(local_run, run)
    manifest = {}
    for job_file in run.glob("checkpoints/*/job.json"):  # point the run at shards that are gone
        meta = json.loads(job_file.read_text())
        manifest = meta["job"]["data"]["manifest"]
        meta["job"]["data"]["manifest"] = str(tmp_path / "gone" / "manifest.json")
        job_file.write_text(json.dumps(meta))
    with pytest.raises(Exception, match="gone"):
        import_local_run(run, log=lambda s: None)
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("tests")
    assert client.search_runs([exp.experiment_id]) == []  # the half-made run was removed
    (tmp_path / "gone").symlink_to(Path(manifest).parent)
    record = import_local_run(run, log=lambda s: None)
    assert record["registered_version"] == "1"
    assert len(client.search_runs([exp.experiment_id])) == 1


def test_rerun_into_a_finished_run_dir_is_refused_without_resume(local_run: Path, small_300w: Path) -> None:
    before = (local_run / "metrics.jsonl").read_bytes()
    proc = subprocess.run([FLARE, "train", str(ROOT / "jobs" / "tiny.yaml"), "--no-ray", "--run-dir", str(local_run),
                           "--set", f"data.manifest={small_300w / 'manifest.json'}"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(local_run) in lines[0] and "--resume" in lines[0]
    assert (local_run / "metrics.jsonl").read_bytes() == before


def test_no_ray_resume_takes_only_last(local_run: Path, small_300w: Path) -> None:
    proc = subprocess.run([FLARE, "train", str(ROOT / "jobs" / "tiny.yaml"), "--no-ray", "--run-dir", str(local_run),
                           "--resume", "0123abcd", "--set", f"data.manifest={small_300w / 'manifest.json'}"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: --resume 0123abcd: with --no-ray, use --resume last (the run dir's last checkpoint)")


def test_checkpoints_carry_the_train_split_crop_prior(local_run: Path, small_300w: Path, tmp_path: Path) -> None:
    """Every checkpoint's job.json holds the crop prior of the run's train split (never val or test), which
    Predictor reads back for its re-crops; a malformed one is refused in one line naming the file."""
    manifest = load_manifest(small_300w)
    checkpoints = sorted(local_run.rglob("job.json"))
    assert checkpoints
    for path in checkpoints:
        assert json.loads(path.read_text())["crop_prior"]["faces"] == manifest.count("train")
    predictor = Predictor.from_dir(checkpoints[-1].parent, device="cpu")
    expected = manifest_crop_prior(manifest, "train")
    shape = expected.mean.reshape(1, 68, 2) * 50 + 100  # the mean training shape, 50 px radius
    for got, want in zip(predictor.crop_prior.crops(shape), expected.crops(shape), strict=True):
        assert np.allclose(got, want, rtol=1e-12, atol=1e-9)
    broken = tmp_path / "model"
    shutil.copytree(checkpoints[-1].parent, broken)
    meta = json.loads((broken / "job.json").read_text())
    meta["crop_prior"]["weights"] = meta["crop_prior"]["weights"][:2]
    (broken / "job.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match=r"^\S+/model/job\.json: crop_prior does not fit 68 finite points$"):
        Predictor.from_dir(broken, device="cpu")


def test_background_checkpoints_hold_their_own_epoch_and_time_the_loop(local_run: Path) -> None:
    """``--no-ray`` writes each checkpoint while the next epoch trains: every epoch is reported once, in
    order, with the checkpoint of that epoch, and each row says how long
    validation and the checkpoint held the loop."""
    from flare.platform.checkpoints import load_checkpoint

    rows = [json.loads(line) for line in (local_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(len(rows))) and len(rows) >= 2
    for r in rows:
        assert 0 < r["val_s"] < r["epoch_time_s"] and 0 <= r["checkpoint_s"] < r["epoch_time_s"]
    dirs = sorted((local_run / "checkpoints").glob("epoch_*"))
    states = {d.name: load_checkpoint(d)[0] for d in dirs}
    assert f"epoch_{len(rows) - 1:04d}" in states  # the last epoch's checkpoint is written before return
    for name, state in states.items():
        assert name == f"epoch_{int(state['epoch']):04d}"
        assert float(state["val_nme"]) == rows[int(state["epoch"])]["val_nme"]


def test_a_run_that_fails_keeps_the_epoch_written_in_the_background(small_300w: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``--no-ray`` run that raises at the start of epoch 1 (the test fault hook) raises that error, and
    epoch 0, whose checkpoint was being written while epoch 1 began, is on disk and reported: resumable."""
    from flare.platform.checkpoints import latest_checkpoint

    monkeypatch.setenv("FLARE_TEST_FAULT_EPOCH", "1")
    monkeypatch.setenv("FLARE_TEST_FAULT_MARKER", str(tmp_path / "fault"))
    job = load_job(ROOT / "jobs" / "tiny.yaml", [f"data.manifest={small_300w / 'manifest.json'}"])
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="test fault hook: worker 0 fails once at epoch 1"):
        train_local(job, run_dir, device="cpu")
    assert [json.loads(x)["epoch"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0]
    assert latest_checkpoint(run_dir / "checkpoints").name == "epoch_0000"
    session = train_local(job, run_dir, device="cpu", resume=True)  # the fault fires once: it continues
    assert [r["epoch"] for r in session.reports] == [1]


def test_a_gpu_windows_model_comes_back_in_parts_and_evaluates_the_same(local_run: Path, small_300w: Path,
                                                                         tmp_path: Path) -> None:
    """``bench/gpu_model.py``: the selected weights split into files under a size limit (fp16), joined here into
    a model directory that Predictor loads and that scores the checkpoint's test NME; missing, repeated or
    foreign parts and a non-empty target are refused in one line naming the file."""
    from flare.bench.gpu_model import join, split
    from flare.platform.checkpoints import load_checkpoint, load_weights, selected_weights
    from flare.platform.evaluate import evaluate_model

    checkpoint = max((local_run / "checkpoints").glob("epoch_*"))
    (tmp_path / "parts").mkdir()
    parts = split(checkpoint, tmp_path / "parts", max_bytes=150_000)
    assert len(parts) >= 3 and all(p.stat().st_size < 150_000 + 40_000 for p in parts)
    model = join(list(reversed(parts)), tmp_path / "model")  # in any order
    weights, want = load_weights(model / "state.pt"), selected_weights(load_checkpoint(checkpoint)[0])
    assert weights.keys() == want.keys()
    for k, v in want.items():
        assert weights[k].dtype == v.dtype and torch.allclose(weights[k], v, rtol=1e-3, atol=1e-6), k
    joined = Predictor.from_dir(model, device="cpu")
    original = Predictor.from_dir(checkpoint, device="cpu")
    assert joined.decoder == original.decoder and joined.crop_prior is not None
    scores = [evaluate_model(p, small_300w, "test", tmp_path / name)["nme"]
              for p, name in ((joined, "eval_joined"), (original, "eval_original"))]
    assert abs(scores[0] - scores[1]) < 1e-4, scores  # NME as a fraction: fp16 weights change it by < 0.01%
    with pytest.raises(ValueError, match=r"model_part0\.pt: part 0 given twice"):
        join([parts[0], parts[0]], tmp_path / "m2")
    with pytest.raises(ValueError, match=r"model_part0\.pt: parts \[1\] of \d+ are missing"):
        join([p for p in parts if p.name != "model_part1.pt"], tmp_path / "m3")
    with pytest.raises(ValueError, match=r"/model: exists and is not empty"):
        join(parts, model)
    foreign = tmp_path / "foreign"
    shutil.copytree(checkpoint, foreign)
    meta = json.loads((foreign / "job.json").read_text())
    (foreign / "job.json").write_text(json.dumps({**meta, "note": "another run"}))
    (tmp_path / "other").mkdir()
    other = split(foreign, tmp_path / "other", max_bytes=150_000)
    with pytest.raises(ValueError, match=r"other/model_part1\.pt: belongs to another model"):
        join([parts[0], other[1], *parts[2:]], tmp_path / "m4")
    assert not any((tmp_path / name).exists() for name in ("m2", "m3", "m4"))  # nothing half-written
