"""``flare demo``: the whole platform on one machine with no data, no cluster and no server.

Synthetic faces (labelled synthetic everywhere) -> Parquet shards (Ray Data) -> STAR training on a
local Ray with 2 workers -> MLflow (sqlite) run + registered model promoted to ``champion`` -> an ASHA
search over STAR and RwSA knobs (``jobs/search/demo.yaml``) whose best trial is registered and takes
``champion`` only if its val NME is lower -> evaluation of the champion on the held-out synthetic test
split -> predictions (overlays) on held-out images and on any user photos.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flare
from flare.datasets.prepare import PrepareOptions, prepare
from flare.files import atomic_write_bytes
from flare.platform.config import load_job, load_yaml
from flare.platform.plots import write_png

JOBS = Path(flare.__file__).resolve().parent / "jobs"


def run_demo(out: Path, quick: bool = False, images: list[Path] | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo into ``out`` (replacing an earlier demo there) and return its summary."""
    from flare.datasets.synthetic import generate_synthetic
    from flare.platform.evaluate import evaluate_model
    from flare.platform.predict_files import predict_files
    from flare.platform.predictor import Predictor
    from flare.platform.ray_connect import ensure_ray
    from flare.platform.ray_train import train
    from flare.platform.registry import champion_if_better
    from flare.platform.tracking import default_tracking_uri
    from flare.platform.tune import plan_search, run_search

    t0 = time.perf_counter()
    out = Path(out).resolve()
    count, epochs = (120, 2) if quick else (600, 6)
    log(f"[1/6] synthetic faces: {count} train + {count // 5} test, prepared into shards with Ray Data")
    ensure_ray(None)
    data = out / "data"
    prepare("synthetic", Path("."), data, PrepareOptions(val_fraction=0.1, seed=0), engine="ray", overwrite=True,
            synthetic_count=count, log=log)
    log(f"[2/6] training STAR on local Ray, 2 workers, {epochs} epochs")
    job = load_job(JOBS / "demo.yaml", [f"data.manifest={data / 'manifest.json'}", f"optimizer.epochs={epochs}"])
    outcome = train(job, storage=out / "runs", log=log)
    uri = default_tracking_uri()
    name = job.mlflow.registered_model
    # champion only if better: a re-run in the same ./mlruns never demotes an earlier, better demo model
    _, trained_decision = champion_if_better(job, outcome.registered_version, float(outcome.best_metrics["val_nme"]),
                                             uri)
    log(f"[3/6] {trained_decision}")
    search_file = demo_search(out, quick)
    log(f"[4/6] ASHA search over STAR and RwSA knobs ({search_file})")
    state = plan_search(JOBS / "demo.yaml", search_file, [f"data.manifest={data / 'manifest.json'}"],
                        name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}", storage=out / "runs")
    search = run_search(state, log=log, verbose=False)
    max_epochs = state.spec.scheduler.max_epochs
    predictor = Predictor.load(f"models:/{name}@champion")
    log("[5/6] evaluating the champion on the held-out synthetic test split")
    metrics = evaluate_model(predictor, data, "test", out / "eval")
    log("[6/6] predicting on held-out synthetic images" + (" and your photos" if images else ""))
    heldout = out / "heldout"
    heldout.mkdir(parents=True, exist_ok=True)
    boxes = []
    for rec in generate_synthetic(6, seed=1234, split="test"):
        path = heldout / f"{rec.sample_id.replace(':', '_').replace('#', '_').replace('/', '_')}.png"
        write_png(path, rec.load_image())
        x0, y0 = rec.landmarks.min(0)
        x1, y1 = rec.landmarks.max(0)
        boxes.append((path, [[x0, y0, x1 - x0, y1 - y0]]))
    pred_dir = out / "predictions"
    for path, box in boxes:  # the synthetic faces' own landmark boxes (oracle boxes, labelled so)
        predict_files(predictor, [path], pred_dir, box, log=lambda s: None)
    failures = predict_files(predictor, images or [], pred_dir / "photos", None, log=log) if images else []
    summary = {
        "data": "SYNTHETIC faces (not a benchmark)",
        "run_id": outcome.run_id,
        "val_nme_per_epoch": [round(h["val_nme"], 4) for h in sorted(outcome.history, key=lambda h: h["epoch"])],
        "best": outcome.best_metrics,
        "champion_decision": trained_decision,
        "search": {
            "trials": [{"trial": t.trial_id, "objective": t.values.get("objective"), "epochs": t.epochs,
                        "best_val_nme": round(t.best_val_nme, 4), "stopped_early": t.stopped_early(max_epochs)}
                       for t in search.trials],
            "best_trial": search.best.trial_id if search.best else None,
            "champion_decision": search.decision,
            "plot": str(search.plot),
        },
        "test_nme": round(metrics["nme"], 4),
        "model": f"models:/{name}@champion",
        "overlays": str(pred_dir),
        "photo_failures": [f"{p}: {r}" for p, r in failures],
        "mlflow_ui": f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1",
        "seconds": round(time.perf_counter() - t0, 1),
        "summary_file": str(out / "summary.json"),
    }
    atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def summary_table(summary: dict[str, Any]) -> str:
    """The demo's end, read in ten seconds: steps, val NME per epoch and per trial, champion, where to look."""
    pct = lambda v: f"{100 * v:.2f}%"
    search = summary["search"]
    lines = [f"flare demo: done in {summary['seconds']:.0f} s on {summary['data']}",
             "  STAR on Ray, val NME (inter-ocular) per epoch: "
             + " -> ".join(pct(v) for v in summary["val_nme_per_epoch"]),
             f"  {summary['champion_decision']}",
             "  ASHA search:"]
    for t in search["trials"]:
        stop = "stopped early" if t["stopped_early"] else "ran to the end"
        best = " (best)" if t["trial"] == search["best_trial"] else ""
        lines.append(f"    {t['trial']:<12} {t['objective']!s:<8} {t['epochs']} epochs, val NME "
                     f"{pct(t['best_val_nme'])}, {stop}{best}")
    lines += [f"  {search['champion_decision']}",
              f"  champion {summary['model']}: test NME (inter-ocular) {pct(summary['test_nme'])} (synthetic faces)",
              f"  overlays:  {summary['overlays']}",
              f"  MLflow UI: {summary['mlflow_ui']}",
              f"  details:   {summary['summary_file']}"]
    lines += [f"  photo failed: {f}" for f in summary["photo_failures"]]
    return "\n".join(lines)


def demo_search(out: Path, quick: bool) -> Path:
    """``jobs/search/demo.yaml``, shrunk for ``--quick`` (4 trials, at most 2 epochs, grace 1), copied
    into ``out`` so the search records the file it ran."""
    import yaml

    spec = load_yaml(JOBS / "search" / "demo.yaml")
    if quick:
        spec.update(samples=4, scheduler={"grace_period": 1, "reduction_factor": 2, "max_epochs": 2})
    path = out / "search.yaml"
    atomic_write_bytes(path, yaml.safe_dump(spec, sort_keys=False).encode())
    return path
