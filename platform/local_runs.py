"""Log a single-process run (``flare train --no-ray``) into MLflow afterwards.

Hosts without Ray or MLflow (the GPU machine) train with :func:`flare.platform.train_loop.train_local`,
which leaves ``metrics.jsonl`` (one line per epoch) and ``checkpoints/epoch_NNNN/`` in a run directory.
:func:`import_local_run` turns such a directory into the same MLflow record a Ray run gets: params and
``job.json``, the per-epoch metrics, the model of the epoch with the lowest **validation** NME (logged,
registered, figures), and optionally the ``champion`` decision. Importing the same directory twice is an
error that names the existing run, never a duplicate.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from flare.platform.config import ConfigError, parse_job
from flare.platform.tracking import END_KEY
from flare.platform.train_loop import VAL_METRIC

IMPORT_TAG = "flare.local_run"  # sha256 of metrics.jsonl: the identity of an imported run directory


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch metrics of a run directory; a bad line is an error naming file and line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no metrics.jsonl (not a `flare train --no-ray` run directory)")
    rows: dict[int, dict[str, Any]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            epoch = int(row["epoch"])
            float(row[VAL_METRIC])
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{path}:{n}: not an epoch record ({type(err).__name__}: {err})") from None
        rows[epoch] = row  # a resumed run may repeat an epoch: the later line wins
    if not rows:
        raise ConfigError(f"{path}: no epochs recorded")
    return [rows[e] for e in sorted(rows)]


def selected_epoch(metrics: list[dict[str, Any]], run_dir: Path) -> tuple[dict[str, Any], Path]:
    """The epoch with the lowest validation NME that still has its checkpoint (never the test set)."""
    ranked = sorted((m for m in metrics if math.isfinite(float(m[VAL_METRIC]))), key=lambda m: float(m[VAL_METRIC]))
    for m in ranked:
        ckpt = Path(run_dir) / "checkpoints" / f"epoch_{int(m['epoch']):04d}"
        if (ckpt / "state.pt").is_file():
            return m, ckpt
    raise ConfigError(f"{run_dir}: no checkpoint under checkpoints/ for any recorded epoch")


def run_times(metrics: list[dict[str, Any]], run_dir: Path) -> tuple[float, float]:
    """When the training ran (unix s): the first epoch's start and the last epoch's end, as the loop wrote
    them; for run directories written before that, host.json's and metrics.jsonl's modification times."""
    first, last = metrics[0], metrics[-1]
    if END_KEY in first and END_KEY in last:
        return float(first[END_KEY]) - float(first.get("epoch_time_s", 0.0)), float(last[END_KEY])
    jsonl, host = Path(run_dir) / "metrics.jsonl", Path(run_dir) / "host.json"
    return (host if host.is_file() else jsonl).stat().st_mtime, jsonl.stat().st_mtime


def import_local_run(run_dir: Path, tracking_uri: str | None = None, registered_model: str | None = None,
                     champion: bool = False, log=print) -> dict[str, Any]:
    """Log ``run_dir`` as one MLflow run (metrics per epoch, val-selected model, registration) and,
    with ``champion``, move the alias only if the model beats the current champion on the same val
    split (:func:`flare.platform.registry.champion_if_better`). Returns what was recorded."""
    from mlflow.tracking import MlflowClient

    from flare.platform import tracking
    from flare.platform.checkpoints import load_checkpoint
    from flare.platform.ray_train import finish_run, open_run
    from flare.platform.registry import champion_if_better

    run_dir = Path(run_dir).resolve()
    metrics = read_metrics(run_dir)
    best, ckpt = selected_epoch(metrics, run_dir)
    _, meta = load_checkpoint(ckpt)
    raw = meta["job"]
    if registered_model:
        raw = {**raw, "mlflow": {**raw["mlflow"], "registered_model": registered_model}}
    job = parse_job(raw, str(ckpt / "job.json"))
    if champion and not job.mlflow.registered_model:
        raise ConfigError("--champion needs a registered model (mlflow.registered_model or --registered-model)")
    uri = tracking_uri or job.mlflow.tracking_uri or tracking.default_tracking_uri()
    exp_id = tracking.setup(uri, job.mlflow.experiment)
    fingerprint = hashlib.sha256((run_dir / "metrics.jsonl").read_bytes()).hexdigest()[:16]
    client = MlflowClient(uri)
    seen = client.search_runs([exp_id], f"tags.`{IMPORT_TAG}` = '{fingerprint}'")
    if seen:
        raise ConfigError(f"{run_dir}: already imported as MLflow run {seen[0].info.run_id} "
                          f"(experiment {job.mlflow.experiment})")
    started, ended = run_times(metrics, run_dir)  # the training's times, not the import's
    run_id, _ = open_run(job, uri, tags={IMPORT_TAG: fingerprint, "flare.local_run_dir": str(run_dir),
                                         "flare.kind": "local"}, start_s=started)
    try:
        logger = tracking.EpochLogger(uri, run_id)
        for m in metrics:
            logger.log(m, int(m["epoch"]))
        host = run_dir / "host.json"
        if host.is_file():
            client.log_artifact(run_id, str(host))
        client.set_tag(run_id, "flare.selected_epoch", str(best["epoch"]))
        outcome = finish_run(job, ckpt, run_id, uri, log)
        tracking.end_run(client, run_id, "FINISHED", ended)
    except BaseException:
        client.delete_run(run_id)  # nothing half-imported: a re-run starts clean
        raise
    record: dict[str, Any] = {"run_id": run_id, "epochs": len(metrics), "selected_epoch": int(best["epoch"]),
                              "val_nme": float(best[VAL_METRIC]), "registered_model": job.mlflow.registered_model,
                              "registered_version": outcome.registered_version}
    if champion and outcome.registered_version is not None:
        promoted, decision = champion_if_better(job, outcome.registered_version, float(outcome.best_metrics["val_nme"]),
                                                uri)
        log(decision)
        record.update(promoted=promoted, decision=decision)
    return record
