"""What the MLflow UI shows, read back from a real sqlite MLflow: runs start and end when their training did
(also when imported later), epochs carry their own timestamps, every run and model version carries the data's
fingerprint, STAR and RwSA runs chart under the same metric names, and prediction grids have a colour key and
no empty tiles. (The Tune side, trial times and names, is in tests/test_tune.py on the search it runs.)"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from flare.platform.config import load_job
from flare.platform.local_runs import import_local_run
from flare.platform.plots import GT_COLOR, KEY_HEIGHT, PRED_COLOR, grid_shape, overlay_grid
from flare.platform.tracking import PER_DECODER, chart_metrics, manifest_hash
from flare.platform.train_loop import train_local

ROOT = Path(__file__).resolve().parents[1]
MODEL = "pages"
TINY = ["data.max_train_samples=16", "data.max_val_samples=8", "optimizer.batch_size=8",
        f"mlflow.registered_model={MODEL}"]


@pytest.fixture(scope="module")
def run_dirs(small_300w: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two finished ``--no-ray`` runs of the tiny spec: STAR (2 epochs) and RwSA (1 epoch, two decoders)."""
    root = tmp_path_factory.mktemp("pages")
    data = f"data.manifest={small_300w / 'manifest.json'}"
    specs = {"star": [], "rwsa": ["objective.name=rwsa", "model.heatmap_activation=none", "optimizer.epochs=1"]}
    out = {}
    for name, extra in specs.items():
        job = load_job(ROOT / "jobs" / "tiny.yaml", [data, *TINY, *extra])
        train_local(job, root / name, device="cpu")
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def imported(run_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Both run directories imported into one fresh sqlite store, after training (import time recorded)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('pages-mlruns') / 'mlflow.db'}"
    t0 = time.time()
    records = {name: import_local_run(d, tracking_uri=uri, log=lambda s: None) for name, d in run_dirs.items()}
    return {"uri": uri, "t0": t0, "records": records}


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_imported_runs_carry_the_training_times_and_per_epoch_timestamps(run_dirs: dict[str, Path],
                                                                         imported: dict) -> None:
    client = MlflowClient(imported["uri"])
    star = rows(run_dirs["star"])
    run = client.get_run(imported["records"]["star"]["run_id"])
    started = star[0]["ended_at"] - star[0]["epoch_time_s"]
    assert run.info.status == "FINISHED"
    assert run.info.start_time == int(started * 1000) and run.info.end_time == int(star[-1]["ended_at"] * 1000)
    assert run.info.end_time < imported["t0"] * 1000  # the training's end, not the import's
    history = sorted(client.get_metric_history(run.info.run_id, "val_nme"), key=lambda m: m.step)
    stamps = [m.timestamp for m in history]
    assert [m.step for m in history] == [0, 1]
    assert stamps == [int(r["ended_at"] * 1000) for r in star] and stamps[0] < stamps[1]
    assert run.info.start_time <= stamps[0] <= stamps[-1] == run.info.end_time
    epoch_s = [m.value for m in client.get_metric_history(run.info.run_id, "epoch_time_s")]
    assert (run.info.end_time - run.info.start_time) / 1000 >= sum(epoch_s) - 1e-3 > 0


def test_every_run_and_model_version_carries_the_data_fingerprint(small_300w: Path, imported: dict) -> None:
    client = MlflowClient(imported["uri"])
    manifest = small_300w / "manifest.json"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    sizes = {s: c["all"] for s, c in json.loads(manifest.read_text())["counts"].items()}
    assert manifest_hash(manifest) == digest
    versions = client.search_model_versions(f"name = '{MODEL}'")
    mlflow.set_tracking_uri(imported["uri"])
    assert sorted(int(v.version) for v in versions) == [1, 2]  # one per imported run
    for v in versions:
        (di,) = client.get_run(v.run_id).inputs.dataset_inputs
        assert di.dataset.digest == digest and di.dataset.source_type == "local"
        assert json.loads(di.dataset.profile)["splits"] == sizes
        tags = {t.key: t.value for t in di.tags}
        assert tags["mlflow.data.context"] == "training"
        assert (tags["flare.train_split"], tags["flare.train_rows"]) == ("train", "16")
        assert (tags["flare.val_split"], tags["flare.val_rows"]) == ("val", "8")
        assert v.tags["flare.data.digest"] == digest and json.loads(v.tags["flare.data.splits"]) == sizes
        assert (v.tags["flare.data.train_rows"], v.tags["flare.data.val_rows"]) == ("16", "8")
        (model,) = [m for m in mlflow.search_logged_models(filter_string=f"source_run_id = '{v.run_id}'",
                                                           output_format="list") if m.name == "model"]
        assert model.tags["flare.data.digest"] == digest


def test_star_and_rwsa_chart_under_the_same_metric_names(imported: dict) -> None:
    client = MlflowClient(imported["uri"])
    runs = {name: client.get_run(r["run_id"]) for name, r in imported["records"].items()}
    star, rwsa = (set(runs[n].data.metrics) for n in ("star", "rwsa"))
    shared = {"val_nme", "val_fr", "val_auc", "val_raw_nme", "val_raw_fr", "val_raw_auc", "val_ema_nme",
              "train_total", "train_landmark", "lr", "epoch_time_s"}
    assert shared <= star & rwsa
    assert star <= rwsa  # nothing of STAR's is named after its decoder ...
    extra = rwsa - star  # ... and RwSA adds only its two decoders' own values, which it compares
    assert extra and {PER_DECODER.match(k).group(2) for k in extra} == {"argmax", "argmax_refine"}
    assert "ended_at" not in star | rwsa  # a timestamp, not a metric
    for name, run in runs.items():
        decoders = {"softargmax"} if name == "star" else {"argmax", "argmax_refine"}
        assert run.data.tags["flare.decoder"] in decoders
        assert run.data.params["decode"] == "auto" and run.data.tags["flare.weights"] in {"raw", "ema"}
        w = run.data.tags["flare.weights"]
        assert run.data.metrics["val_nme"] == run.data.metrics[f"val_{w}_nme"]  # the selected pair


def test_chart_metrics_names_do_not_depend_on_the_decoder() -> None:
    star = {"epoch": 0, "val_raw_softargmax_nme": 0.2, "val_raw_softargmax_fr": 0.5,
            "val_raw_softargmax_auc": 0.1, "val_nme": 0.2, "val_decoder": "softargmax", "val_weights": "raw",
            "ended_at": 1.7e9, "bad": float("nan")}
    rwsa = {"epoch": 0, "val_raw_argmax_nme": 0.3, "val_raw_argmax_refine_nme": 0.25,
            "val_raw_argmax_refine_fr": 0.6, "val_raw_argmax_refine_auc": 0.05, "val_nme": 0.25,
            "val_decoder": "argmax_refine"}
    assert chart_metrics(star) == {"epoch": 0.0, "val_nme": 0.2, "val_raw_nme": 0.2, "val_raw_fr": 0.5,
                                   "val_raw_auc": 0.1}
    got = chart_metrics(rwsa)
    assert got["val_raw_nme"] == 0.25 and got["val_raw_argmax_nme"] == 0.3  # two decoders: both kept


def grid_cells(png: np.ndarray, n: int, tile: int = 256) -> tuple[list[np.ndarray], np.ndarray]:
    """The tiles of a gapless grid of ``n`` images and its key strip; the image must be exactly that size."""
    rows, cols = grid_shape(n)
    assert png.shape == (rows * tile + KEY_HEIGHT, cols * tile, 3)
    cells = [png[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(rows) for c in range(cols)]
    return cells, png[rows * tile:]


def has_colour(img: np.ndarray, bgr: tuple[int, int, int]) -> bool:
    return bool((img == np.array(bgr, np.uint8)).all(-1).any())


@pytest.mark.parametrize("n,shape", [(8, (2, 4)), (7, (1, 7)), (9, (3, 3)), (11, (2, 5)), (3, (1, 3))])
def test_prediction_grid_has_a_key_and_no_empty_tile(tmp_path: Path, n: int, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(n)
    images = [rng.integers(30, 220, (64, 64, 3), dtype=np.uint8) for _ in range(n)]
    pts = [rng.uniform(8, 56, (68, 2)) for _ in range(n)]
    png = cv2.imread(str(overlay_grid(images, pts, pts, tmp_path / "grid.png")))
    assert grid_shape(n) == shape
    cells, key = grid_cells(png, n)
    assert all(c.std() > 10 for c in cells)  # every cell holds a face, none is black
    assert has_colour(key, GT_COLOR) and has_colour(key, PRED_COLOR)  # the key's filled dots
    assert (key[..., 0] > 200).sum() > 100  # and its white labels


def test_logged_figures_have_a_key_and_no_empty_tile(imported: dict) -> None:
    client = MlflowClient(imported["uri"])
    run_id = imported["records"]["star"]["run_id"]
    for name in ("val_predictions.png", "val_ellipses.png"):
        png = cv2.imread(client.download_artifacts(run_id, f"figures/{name}"))
        cells, key = grid_cells(png, 8)  # run_figures shows 8 validation faces: 2 x 4
        assert all(c.std() > 10 for c in cells), name
        assert key.mean() < 80 and (key.max(-1) > 150).sum() > 100, name  # a dark strip with a drawn key
    cells, key = grid_cells(cv2.imread(client.download_artifacts(run_id, "figures/val_predictions.png")), 8)
    assert has_colour(key, GT_COLOR) and has_colour(key, PRED_COLOR)
