"""MLflow glue: tracking URI defaults, idempotent per-epoch logging, model logging and registry.

Default store: ``sqlite:///<cwd>/mlruns/mlflow.db`` with artifacts under ``<cwd>/mlruns/artifacts``;
``MLFLOW_TRACKING_URI`` or the job spec's ``mlflow.tracking_uri`` override it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
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
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, epoch) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        # the key metric last: its presence marks the epoch as complete
        batch.sort(key=lambda m: m.key == self.key)
        self.pending[epoch] = batch
        self.send()
        return True

    def send(self) -> bool:
        """Send the queued epochs in order; True when nothing is left (False: the server is unreachable)."""
        for epoch in sorted(self.pending):
            batch = self.pending[epoch]
            try:
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
        import time

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
    with tempfile.TemporaryDirectory() as tmp:
        state, meta = Path(tmp) / "state.pt", Path(tmp) / "job.json"
        torch.save(weights, state)
        meta.write_text(json.dumps({**job, "info": info}, indent=2, sort_keys=True) + "\n")
        with mlflow.start_run(run_id=run_id):
            model_info = mlflow.pytorch.log_model(
                graph, name=EXPORT_ARTIFACT, input_example=example, step=int(info["epoch"]),
                extra_files=[str(state), str(meta)], registered_model_name=registered_model,
                pip_requirements=serving_requirements(),
            )
    version = model_info.registered_model_version
    if version is None:
        return None
    client = mlflow.MlflowClient()
    client.update_model_version(registered_model, str(version), description=description)
    for key, value in info.items():
        client.set_model_version_tag(registered_model, str(version), key, str(value))
    return str(version)
