"""MLflow glue: tracking URI defaults, idempotent per-epoch logging, model logging and registry, and what
the run pages show: the metric names (:func:`chart_metrics`), the data's fingerprint (:func:`data_input`) and
run end times (:func:`end_run`).

Default store: ``sqlite:///<cwd>/mlruns/mlflow.db`` with artifacts under ``<cwd>/mlruns/artifacts``;
``MLFLOW_TRACKING_URI`` or the job spec's ``mlflow.tracking_uri`` override it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

EXPORT_ARTIFACT = "model"  # pytorch flavour (pt2: crops -> landmarks) + extra_files/{state.pt, job.json}


def default_tracking_uri(cwd: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a sqlite store under ``<cwd>/mlruns``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = Path(cwd or Path.cwd()) / "mlruns"
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def setup(tracking_uri: str | None, experiment: str) -> str:
    """Point MLflow at ``tracking_uri`` (or the default) and make ``experiment`` the active one
    (created with artifacts next to a sqlite store if new). Returns the experiment id."""
    import mlflow

    uri = tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
        exp_id = mlflow.create_experiment(experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


# ---------------------------------------------------------------------------------------------- run pages

END_KEY = "ended_at"  # an epoch's wall-clock end (unix s) in metrics.jsonl and reports: a timestamp, not a metric
PER_DECODER = re.compile(r"^val_(raw|ema)_(.+)_(nme|fr|auc)$")  # val_raw_argmax_refine_nme -> argmax_refine


def chart_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """What MLflow charts of one epoch: the finite numbers, with objective-independent names. ``val_raw_nme``
    etc. are the selected decoder's (the decoder is the ``flare.decoder`` tag and the ``decode`` param);
    per-decoder values (``val_raw_<decoder>_nme``) stay only when the run compared several decoders."""
    out = {k: float(v) for k, v in metrics.items() if k != END_KEY and isinstance(v, (int, float))
           and not isinstance(v, bool) and math.isfinite(float(v))}
    dec = metrics.get("val_decoder")
    for w in ("raw", "ema"):  # rows written before these names existed
        for s in ("nme", "fr", "auc"):
            if f"val_{w}_{dec}_{s}" in out:
                out.setdefault(f"val_{w}_{s}", out[f"val_{w}_{dec}_{s}"])
    per_decoder = {k: m.group(2) for k in out if (m := PER_DECODER.match(k))}
    if len(set(per_decoder.values())) <= 1:
        out = {k: v for k, v in out.items() if k not in per_decoder}
    return out


def manifest_hash(manifest_path: str | Path) -> str:
    """The data fingerprint: sha256 of ``manifest.json`` (which holds every shard's sha256), 16 hex digits
    (``sha256sum manifest.json | cut -c1-16``)."""
    path = Path(manifest_path)
    path = path / "manifest.json" if path.is_dir() else path
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def data_input(manifest_path: str | Path, splits: dict[str, str], rows: dict[str, int | None]) -> Any:
    """An MLflow dataset input for a prepared dataset: digest = :func:`manifest_hash`, profile = the split
    sizes of the manifest, input tags = which splits this run used and how many rows of each."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    path = Path(manifest_path)
    path = path / "manifest.json" if path.is_dir() else path
    data = json.loads(path.read_text())
    sizes = {split: int(c.get("all", 0)) for split, c in sorted(data.get("counts", {}).items())}
    profile = {"splits": sizes, "layout": data.get("layout"), "image_size": data.get("image_size"),
               "manifest_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    ds = Dataset(name=path.parent.name, digest=manifest_hash(path), source_type="local",
                 source=json.dumps({"uri": path.resolve().as_uri()}), profile=json.dumps(profile, sort_keys=True))
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, "training")]
    for role, split in splits.items():
        cap = rows.get(role)
        used = sizes.get(split, 0) if cap is None else min(int(cap), sizes.get(split, int(cap)))
        tags += [InputTag(f"flare.{role}_split", split), InputTag(f"flare.{role}_rows", str(used))]
    return DatasetInput(ds, tags)


def job_data_input(job: Any) -> Any:
    """:func:`data_input` of a job spec's train and val splits (with its sample caps)."""
    d = job.data
    return data_input(d.manifest, {"train": d.train_split, "val": d.val_split},
                      {"train": d.max_train_samples, "val": d.max_val_samples})


def run_data_tags(client: Any, run_id: str) -> dict[str, str]:
    """The data fingerprint of a run's dataset input as tags (for its model and model version)."""
    inputs = client.get_run(run_id).inputs
    for di in (inputs.dataset_inputs if inputs else []):
        ds = di.dataset
        splits = json.loads(ds.profile or "{}").get("splits", {})
        return {"flare.data.name": ds.name, "flare.data.digest": ds.digest,
                "flare.data.splits": json.dumps(splits, sort_keys=True),
                **{f"flare.data.{t.key.removeprefix('flare.')}": t.value for t in di.tags
                   if t.key.startswith("flare.")}}
    return {}


def end_run(client: Any, run_id: str, status: str, end_s: float | None = None) -> None:
    """Set a run's status and end time: ``end_s`` (unix s) if given, else the end it already has, else the
    time of its last logged metric, else now. Model logging or tagging afterwards never moves it."""
    end_ms = None if end_s is None else int(end_s * 1000)
    if end_ms is None:
        run = client.get_run(run_id)
        if run.info.status != "RUNNING" and run.info.end_time:
            end_ms = run.info.end_time
        else:
            stamps = [m.timestamp for k in run.data.metrics for m in client.get_metric_history(run_id, k)]
            end_ms = max(stamps, default=None)
    client.set_terminated(run_id, status=status, end_time=end_ms)


@contextlib.contextmanager
def ended_on_error(tracking_uri: str, run_id: str) -> Iterator[None]:
    """Around a training: if it raises, end the run then (FAILED; KILLED on Ctrl-C) and re-raise."""
    try:
        yield
    except BaseException as err:
        from mlflow.tracking import MlflowClient

        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        with contextlib.suppress(Exception):  # the training's own error is the one to report
            end_run(MlflowClient(tracking_uri), run_id, status, time.time())
        raise


@contextlib.contextmanager
def quick_requests(retries: int = 1, timeout_s: float = 10.0) -> Iterator[None]:
    """MLflow HTTP requests in this block give up after ``retries`` retries and ``timeout_s`` each (MLflow
    reads both per request; by default it retries 7 times with exponential backoff, about 4 minutes).
    MLflow reads them from the environment, so the setting is process-wide while the block runs: a request
    another thread makes meanwhile fails fast too (in flare only the epoch logger's own thread logs then)."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout_s))}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class EpochLogger:
    """Logs one dict of metrics per epoch into an existing run, at most once per epoch: epochs that
    the run already holds (a restarted worker redoing work) are skipped. When the tracking server cannot
    be reached, the epoch stays buffered and is sent with the next one (or by :meth:`flush`), so a server
    that blinks costs no metric and never stops training."""

    def __init__(self, tracking_uri: str, run_id: str, key: str = "val_nme") -> None:
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(tracking_uri), run_id
        self.logged = {int(m.step) for m in self.client.get_metric_history(run_id, key)}
        self.key = key
        self.pending: dict[int, list] = {}

    def log(self, metrics: dict[str, Any], epoch: int) -> bool:
        """Queue ``epoch``'s metrics and send everything queued; False if the epoch was already logged."""
        if epoch in self.logged or epoch in self.pending:
            return False
        from mlflow.entities import Metric

        ts = int(1000 * float(metrics.get(END_KEY) or time.time()))  # when the epoch ended, not when logged
        batch = [Metric(k, v, ts, epoch) for k, v in chart_metrics(metrics).items()]
        # the key metric last: its presence marks the epoch as complete
        batch.sort(key=lambda m: m.key == self.key)
        self.pending[epoch] = batch
        self.send()
        return True

    def send(self) -> bool:
        """Send the queued epochs in order; True when nothing is left (False: the server is unreachable).
        Each request fails within seconds (:func:`quick_requests`) instead of MLflow's minutes of retries,
        so an outage never holds training up: the epoch waits in the buffer instead."""
        for epoch in sorted(self.pending):
            batch = self.pending[epoch]
            try:
                with quick_requests():
                    for i in range(0, len(batch), 200):
                        self.client.log_batch(self.run_id, metrics=batch[i : i + 200])
            except Exception as err:  # noqa: BLE001 - MLflow raises many types when the server is down
                print(f"MLflow unreachable, epoch {epoch} buffered ({type(err).__name__}); retried with the next "
                      "epoch", flush=True)
                return False
            self.logged.add(epoch)
            del self.pending[epoch]
        return True

    def flush(self, timeout_s: float = 300.0) -> None:
        """Retry the queued epochs until they are sent or ``timeout_s`` passes (then RuntimeError)."""
        deadline, wait = time.monotonic() + timeout_s, 1.0
        while not self.send():
            if time.monotonic() > deadline:
                raise RuntimeError(f"MLflow: epochs {sorted(self.pending)} could not be logged in {timeout_s:g} s")
            time.sleep(wait)
            wait = min(wait * 2, 15.0)


def serving_requirements() -> list[str]:
    """What the logged pt2 graph needs to run, pinned to this environment. Given explicitly, MLflow
    skips inferring requirements by re-importing the model in a subprocess (about 10 s per model)."""
    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]


def log_flare_model(run_id: str, model: nn.Module, weights: dict[str, torch.Tensor], job: dict[str, Any],
                    info: dict[str, Any], registered_model: str | None, input_size: int) -> str | None:
    """Log the whole inference into ``run_id`` with MLflow's pytorch flavour: a pt2 graph of network +
    validation-selected decoder (crops in, landmarks in crop px out, any batch size; see
    :mod:`flare.platform.export` for the conventions), attached to the selected epoch's metrics, and, as
    ``extra_files``, what flare's own loader reads: weights-only ``state.pt`` and ``job.json``. Registers it
    under ``registered_model`` if given (the version's description states the conventions) and returns
    the new version."""
    import mlflow

    from flare.platform.export import CROP_RULE, INPUT_CONVENTION, OUTPUT_CONVENTION, LandmarkGraph

    temperature = float(job["job"]["objective"]["rwsa"]["epsilon"])
    graph = LandmarkGraph(model.eval().cpu(), input_size, info["decoder"], temperature).eval()
    example = np.zeros((2, 3, input_size, input_size), np.float32)  # batch 2: a batch of 1 would pin it to 1
    description = (f"flare landmarks ({job['layout']}, decoder {info['decoder']}, selected on validation at "
                   f"epoch {info['epoch']}, val NME {info['val_nme']:.5f}). Input: {INPUT_CONVENTION}. "
                   f"Crop rule: {CROP_RULE}. Output: {OUTPUT_CONVENTION}.")
    client = mlflow.MlflowClient()
    data = run_data_tags(client, run_id)  # the run's dataset input, carried by its model and model version
    # the selection as tags: metric names stay the same for every objective and decoder (chart_metrics)
    for key, value in {"decoder": info["decoder"], "weights": info["weights"], "selected_epoch": info["epoch"]}.items():
        client.set_tag(run_id, f"flare.{key}", str(value))
    with tempfile.TemporaryDirectory() as tmp:
        state, meta = Path(tmp) / "state.pt", Path(tmp) / "job.json"
        torch.save(weights, state)
        meta.write_text(json.dumps({**job, "info": info}, indent=2, sort_keys=True) + "\n")
        # run_id instead of start_run(run_id): the run's status and end time stay as its training left them
        model_info = mlflow.pytorch.log_model(
            graph, name=EXPORT_ARTIFACT, input_example=example, step=int(info["epoch"]),
            extra_files=[str(state), str(meta)], registered_model_name=registered_model,
            pip_requirements=serving_requirements(), run_id=run_id, tags=data or None,
        )
    version = model_info.registered_model_version
    if version is None:
        return None
    client.update_model_version(registered_model, str(version), description=description)
    for key, value in {**info, **data}.items():
        client.set_model_version_tag(registered_model, str(version), key, str(value))
    return str(version)
