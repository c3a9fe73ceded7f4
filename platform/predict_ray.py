"""``flare predict --ray`` (what ``flare submit predict`` runs on a cluster): the per-image work of
``flare predict`` as Ray Data batch inference.

The driver lists the images (folders walked, output names mirrored as in
:func:`flare.platform.predict_files.collect_images`); ``map_batches`` actors, each of which loads the model
once, predict them and write each image's JSON and overlay under ``out``; the driver then writes
``predictions.jsonl`` in input order. Images, ``out`` and a model directory must be paths that every node
sees (they are made absolute here); a registry model is read from the driver's tracking URI.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flare.errors import FlareError
from flare.platform.config import ConfigError
from flare.platform.predict_files import (
    IMAGE_SUFFIXES,
    PredictError,
    check_predict_options,
    collect_images,
    predict_one,
    write_results,
)

ACTOR_CPUS = 1.0
ACTOR_START_S = 600  # how long the actors may take to start and load the model
_LOADS = 0  # models loaded by PredictActor in this process (each row reports it: a reload would show)


@dataclass(frozen=True)
class PredictJob:
    """What every actor needs: the model and the options of ``flare predict``."""

    model: str
    backend: str = "torch"
    tracking_uri: str | None = None  # a registry model is read from here (None: MLflow's default)
    boxes: list | None = None
    detect: bool = True
    ellipses: bool = False
    detector: str = "haar"
    passes: int = 1


class PredictActor:
    """One Ray Data actor: the model is loaded once, then every batch of ``(index, path, stem)`` rows is
    predicted; a failed image gives its one-line reason instead of a record."""

    def __init__(self, job: dict[str, Any], out: str) -> None:
        from flare.platform.onnx_backend import load_landmarks

        global _LOADS
        self.job, self.out = PredictJob(**job), Path(out)
        self.predictor = load_landmarks(self.job.model, self.job.backend, tracking_uri=self.job.tracking_uri)
        _LOADS += 1

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records, errors = [], []
        j = self.job
        for path, stem in zip(batch["path"], batch["stem"], strict=True):
            try:
                record = predict_one(self.predictor, Path(path), Path(stem), self.out, j.boxes, j.detect,
                                     ellipses=j.ellipses, detector=j.detector, passes=j.passes)
                records.append(json.dumps(record))
                errors.append("")
            except PredictError as err:
                records.append("")
                errors.append(str(err))
        n = len(records)
        return {"index": batch["index"], "record": np.array(records, dtype=object),
                "error": np.array(errors, dtype=object), "actor": np.full(n, os.getpid()), "loads": np.full(n, _LOADS)}


def check_model(job: PredictJob) -> None:
    """Load the model once on the driver, so that a bad reference is one line before any actor starts
    (an actor that fails to load it would end the dataset with a long Ray traceback)."""
    from flare.platform.onnx_backend import load_landmarks

    load_landmarks(job.model, job.backend, tracking_uri=job.tracking_uri)


def predict_on_ray(job: PredictJob, images: Sequence[Path], out: Path, actors: int = 2, batch_size: int = 16,
                   address: str | None = None, log: Callable[[str], None] = print) -> list[tuple[str, str]]:
    """Predict every image on ``actors`` Ray Data actors (``ACTOR_CPUS`` each) in batches of ``batch_size``
    images; returns ``(path, reason)`` of the images that failed, like :func:`predict_files`."""
    import ray

    from flare.platform.ray_connect import ensure_ray

    if actors < 1 or batch_size < 1:
        raise ConfigError(f"--actors {actors} / --batch-size {batch_size}: both must be >= 1")
    check_predict_options(job.backend == "torch", job.ellipses, job.detector, job.passes,
                          job.detect and not job.boxes)
    pairs = collect_images(images)
    if not pairs:
        raise ConfigError(f"{', '.join(map(str, images))}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    check_model(job)
    ensure_ray(address)
    cpus = float(ray.cluster_resources().get("CPU", 0.0))
    if actors * ACTOR_CPUS > cpus:
        raise ConfigError(f"--actors {actors}: {actors} x {ACTOR_CPUS:g} CPU do not fit this {cpus:g}-CPU cluster")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    items = [{"index": i, "path": str(p.resolve()), "stem": str(s)} for i, (p, s) in enumerate(pairs)]
    # a fixed pool of `actors`, each given one batch at a time, and no batch before every actor has loaded the
    # model: otherwise the first actor up takes every batch while the others are still loading (a pool that
    # cannot start fails after ACTOR_START_S instead of waiting forever)
    pool = ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1)
    context = ray.data.DataContext.get_current()  # a dataset copies it when it is created
    saved, context.wait_for_min_actors_s = context.wait_for_min_actors_s, ACTOR_START_S
    try:
        ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / batch_size)))
        rows = ds.map_batches(PredictActor, fn_constructor_kwargs={"job": asdict(job), "out": str(out)},
                              batch_size=batch_size, compute=pool, num_cpus=ACTOR_CPUS,
                              batch_format="numpy").take_all()
    except ray.exceptions.GetTimeoutError as err:
        raise FlareError(f"--actors {actors}: the actors did not all start within {ACTOR_START_S} s "
                         "(other work holding the cluster's CPUs?)") from err
    finally:
        context.wait_for_min_actors_s = saved
    rows.sort(key=lambda r: int(r["index"]))
    records = [json.loads(r["record"]) for r in rows if r["record"]]
    failures = [(items[int(r["index"])]["path"], str(r["error"])) for r in rows if not r["record"]]
    for record in records:
        log(f"{record['image']}: {len(record['faces'])} face(s) -> {out / record['output']}.json")
    write_results(out, records)
    loads: dict[int, int] = {}  # per actor process, the most models it had loaded
    for r in rows:
        loads[int(r["actor"])] = max(loads.get(int(r["actor"]), 0), int(r["loads"]))
    log(f"{len(rows)} image(s) on {len(loads)} actor(s), {sum(loads.values())} model load(s); "
        f"{len(failures)} failed; results in {out}")
    return failures

