"""``flare train``: a job spec on Ray Train (V2 API) with MLflow tracking and registry.

The driver validates everything before any worker starts (spec, manifest, layout), opens one MLflow
run, runs :func:`flare.platform.train_loop.train_worker` on a ``TorchTrainer`` (gloo on CPU, nccl on
GPU; restarts from the latest checkpoint on worker failure) and finally logs and registers the
validation-selected model.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flare.datasets.ingest import BatchBuilder, Manifest, iter_local_rows, load_manifest
from flare.platform.builders import build_model
from flare.platform.checkpoints import (
    check_resume,
    checkpoint_info,
    load_checkpoint,
    selected_weights,
)
from flare.platform.config import ConfigError, JobConfig
from flare.platform.local_loader import split_rows
from flare.platform.progress import EpochPrinter
from flare.platform.ray_batches import ACTOR_CPUS, RankBatches
from flare.platform.storage import check_storage, join, local_dir, newest_checkpoint, resolve_storage
from flare.platform.train_loop import VAL_METRIC, train_worker


class RaySession:
    """A worker inside Ray Train: dataset shards, DDP, ``ray.train.report``, MLflow on rank 0."""

    background_checkpoints = False  # every rank reports each epoch together, from the worker's own thread

    def __init__(self, job: JobConfig, tracking_uri: str | None, run_id: str | None,
                 resume_from: str | None) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.job, self.resume_from = job, resume_from
        self.manifest = load_manifest(job.data.manifest)  # driver-resolved absolute paths
        self.batches: RankBatches | None = None
        self.reports: list[dict[str, Any]] = []  # this execution's reports (rank 0 returns them)
        self.logger = None
        if self.rank == 0 and tracking_uri and run_id:
            from flare.platform.tracking import EpochLogger

            self.logger = EpochLogger(tracking_uri, run_id, key=VAL_METRIC)

    def train_batches(self, epoch: int, batch_size: int, builder: BatchBuilder) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's batches of ``epoch``: those of ``flare train --no-ray`` for one worker, every
        ``world_size``-th for several (:mod:`flare.platform.ray_batches`)."""
        if self.batches is None:
            self.batches = RankBatches(
                self.manifest, self.job.data.train_split, batch_size, builder, self.rank, self.world_size,
                limit=self.job.data.max_train_samples, shuffle_base=self.job.seed * 100003,
                actors=self.job.data.loader_workers, last_epoch=self.job.optimizer.epochs - 1,
                drop_last=self.job.data.drop_last)
        return self.batches.epoch(epoch)

    def val_rows(self, batch_size: int) -> Iterator[list[dict]]:
        """The validation split, read from the shards by this worker (rank 0 validates)."""
        return iter_local_rows(self.manifest, self.job.data.val_split, batch_size, self.job.data.max_val_samples)

    def close(self) -> None:
        if self.batches is not None:
            self.batches.close()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False) if self.world_size > 1 else model

    @contextmanager
    def restored(self) -> Iterator[Path | None]:
        """Ray's checkpoint after a restart (a local path as is, a remote one through a temp copy that
        Ray removes), else the ``--resume`` checkpoint."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            if self.resume_from is None:
                yield None
            else:
                with local_dir(self.resume_from) as d:  # a URI in --storage: downloaded, then removed
                    yield d
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        self.reports.append(metrics)
        if self.logger is not None:
            self.logger.log(metrics, int(metrics["epoch"]))
        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)


class EpochRelay:
    """A Train ``UserCallback`` (on the controller): puts rank 0's report of every epoch on ``queue``."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        with contextlib.suppress(Exception):  # a progress line is never worth failing the run for
            self.queue.put(("report", dict(metrics[0])), timeout=10)


def relay_callback(queue: Any) -> Any:
    """:class:`EpochRelay` as a ``ray.train.UserCallback`` (imported here: the module loads without Ray)."""
    from ray.train import UserCallback

    cls = type("EpochRelayCallback", (EpochRelay, UserCallback), {})
    return cls(queue)


@contextmanager
def epoch_lines(on_epoch: Callable[[dict[str, Any]], None]) -> Iterator[Any]:
    """Yield a Train callback whose epoch reports reach ``on_epoch`` on the driver while the run goes on
    (Ray's worker logs stay in the Ray log dir)."""
    import ray
    from ray.util.queue import Empty, Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # on the driver's node (the controller's too): Ray may put a zero-CPU actor on any node, and one that
    # dies with its node took the controller's after_report, hence the run, with it (measured)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue, done = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here}), threading.Event()

    def drain() -> None:
        while True:
            try:
                kind, metrics = queue.get(block=True, timeout=0.5)
            except Empty:
                if done.is_set():
                    return
                continue
            except Exception:  # noqa: BLE001 - the queue actor is gone: nothing more to print
                return
            if kind == "report":
                on_epoch(metrics)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    try:
        yield relay_callback(queue)
    finally:
        done.set()
        thread.join(timeout=10)
        with contextlib.suppress(Exception):
            queue.shutdown()


def _ray_entry(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The function each Ray Train worker runs; returns the metrics this execution reported (the
    driver reads rank 0's as ``Result.return_value``: after a restart or a resume, only new epochs)."""
    from flare.platform.config import parse_job

    job = parse_job(config["job"])
    session = RaySession(job, config.get("tracking_uri"), config.get("run_id"), config.get("resume_from"))
    try:
        train_worker(config["job"], session)
    finally:
        session.close()
    if session.logger is not None:
        session.logger.flush()  # epochs buffered while the tracking server was unreachable
    return session.reports


@dataclass
class TrainOutcome:
    """What a finished training run produced."""

    run_id: str | None
    best_checkpoint: str  # a path, or a URI in a remote --storage
    best_metrics: dict[str, Any]
    registered_version: str | None
    storage: str  # the run's folder in the storage
    history: list[dict[str, Any]]


def check_job(job: JobConfig) -> Manifest:
    """Everything that can be checked before a worker starts: manifest, splits, layout vs model."""
    manifest = load_manifest(job.data.manifest)
    for split in (job.data.train_split, job.data.val_split):
        manifest.shard_paths(split)
    layout = manifest.layout
    if job.model.layout is not None and job.model.layout != layout.name:
        raise ConfigError(f"model.layout: {job.model.layout} does not match the data's layout {layout.name} "
                          f"({manifest.path})")
    if job.model.aam and layout.num_edges == 0:
        raise ConfigError(f"{manifest.path}: layout {layout.name} has no boundary groups; set model.aam=false")
    if job.objective.name == "rwsa" and job.heatmap_activation != "none":
        raise ConfigError("model.heatmap_activation: rwsa needs raw scores ('none'), got "
                          f"{job.heatmap_activation!r}")
    if job.objective.name != "rwsa" and job.heatmap_activation == "none":
        raise ConfigError(f"model.heatmap_activation: {job.objective.name} needs non-negative maps ('in_relu')")
    if job.data.drop_last:
        rows = split_rows(manifest, job.data.train_split, job.data.max_train_samples)
        if rows < job.optimizer.batch_size:
            raise ConfigError(f"data.drop_last: the {job.data.train_split!r} split of {manifest.path} has {rows} "
                              f"faces, fewer than one batch of {job.optimizer.batch_size}: no step would run")
    k = manifest.data.get("options", {}).get("smoothing_k")
    if k is not None and job.objective.name == "rwsa" and k != job.objective.smoothing.k:
        raise ConfigError(f"objective.smoothing.k={job.objective.smoothing.k} but {manifest.path} was prepared "
                          f"with k={k}")
    return manifest


def check_resources(job: JobConfig) -> None:
    """Fail fast instead of hanging: the workers and their batch-building actors (``data.loader_workers``
    per worker, ACTOR_CPUS each) must fit the cluster's CPUs, and STRICT_SPREAD needs a node per worker."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 0.0))
    workers = job.scaling.workers * job.scaling.cpus_per_worker
    actors = job.scaling.workers * job.data.loader_workers * ACTOR_CPUS
    if workers + actors > total:
        raise ConfigError(
            f"scaling: {job.scaling.workers} workers x {job.scaling.cpus_per_worker} CPU"
            + (f" + {job.scaling.workers} x {job.data.loader_workers} batch builders x {ACTOR_CPUS:g} CPU"
               if actors else "")
            + f" do not fit this {total:g}-CPU cluster; lower scaling.cpus_per_worker, scaling.workers or "
            "data.loader_workers")
    if job.scaling.placement_strategy == "STRICT_SPREAD":  # one worker per node: never placeable otherwise
        per_worker = {"CPU": job.scaling.cpus_per_worker, "GPU": 1.0 if job.scaling.use_gpu else 0.0}
        nodes = [n for n in ray.nodes() if n.get("Alive") and
                 all(n.get("Resources", {}).get(k, 0.0) >= v for k, v in per_worker.items())]
        if len(nodes) < job.scaling.workers:
            raise ConfigError(f"scaling.placement_strategy: STRICT_SPREAD puts each of the {job.scaling.workers} "
                              f"workers on its own node, but {len(nodes)} node(s) can hold one; lower "
                              "scaling.workers or use SPREAD")


def open_run(job: JobConfig, tracking_uri: str, parent_run_id: str | None = None,
             tags: dict[str, str] | None = None, run_name: str | None = None,
             start_s: float | None = None) -> tuple[str, str]:
    """Open the MLflow run of one training run (started at ``start_s``, default now), left RUNNING until
    :func:`flare.platform.tracking.end_run` ends it: params, job.json, the data's dataset input and the Ray
    run name as a tag. Nested under ``parent_run_id`` when given (a Tune trial). Returns (run_id, ray name)."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from flare.platform import tracking

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(job.mlflow.experiment)
    exp_id = exp.experiment_id if exp else tracking.setup(tracking_uri, job.mlflow.experiment)
    data = tracking.job_data_input(job)  # reads the manifest: a missing one fails before the run exists
    all_tags = {**(tags or {}), **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    run = client.create_run(exp_id, start_time=None if start_s is None else int(start_s * 1000), tags=all_tags,
                            run_name=(run_name or job.name)[:250])
    run_id = run.info.run_id
    name = f"{job.name}-{run_id[:8]}"
    client.set_tag(run_id, "flare.ray_run_name", name)
    params = [Param(k, str(v)[:500]) for k, v in job.flat().items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])
    client.log_dict(run_id, job.model_dump(mode="json"), "job.json")
    client.log_inputs(run_id, datasets=[data])
    return run_id, name


def make_trainer(job: JobConfig, manifest: Manifest, name: str, storage: str, tracking_uri: str | None,
                 run_id: str | None, resume_from: str | None = None, worker_env: dict[str, str] | None = None,
                 callbacks: list | None = None):
    """The ``TorchTrainer`` of one run: workers from ``job.scaling`` (each reads its batches from the
    shards, :mod:`flare.platform.ray_batches`), best-k-by-val-NME checkpoints and worker-failure restarts."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        _ray_entry,
        train_loop_config={"job": job.model_dump(mode="json"), "tracking_uri": tracking_uri, "run_id": run_id,
                           "resume_from": resume_from},
        scaling_config=ScalingConfig(num_workers=job.scaling.workers, use_gpu=job.scaling.use_gpu,
                                     resources_per_worker={"CPU": job.scaling.cpus_per_worker},
                                     placement_strategy=job.scaling.placement_strategy),
        run_config=RunConfig(
            name=name, storage_path=storage, callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=job.checkpoint.keep_best,
                                               checkpoint_score_attribute=VAL_METRIC,
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=job.checkpoint.max_failures),
            worker_runtime_env={"env_vars": dict(worker_env)} if worker_env else None,
        ),
    )


def local_copy(checkpoint: Any) -> Path:
    """Copy a Ray Train checkpoint into a new local temp directory (the caller removes it)."""
    with checkpoint.as_directory() as d:
        local = Path(tempfile.mkdtemp(prefix="flare-best-"))
        shutil.copytree(d, local, dirs_exist_ok=True)
    return local


def train(job: JobConfig, address: str | None = None, storage: str | Path | None = None, resume: str | None = None,
          log=print, worker_env: dict[str, str] | None = None, allow_changes: Sequence[str] = ()) -> TrainOutcome:
    """Run ``job`` on Ray Train and register the selected model. ``resume`` is an MLflow run id of an
    interrupted run: it continues from that run's latest checkpoint without redoing finished epochs, with
    the same spec except the keys named in ``allow_changes``. Every check (spec, data, resources, resume)
    passes before the MLflow run or the run folder is created."""
    import time

    import mlflow

    from flare.platform import tracking
    from flare.platform.ray_connect import ensure_ray

    manifest = check_job(job)
    tracking_uri = job.mlflow.tracking_uri or tracking.default_tracking_uri()
    storage = resolve_storage(storage)  # a path made absolute here (workers run elsewhere), or a URI
    check_storage(storage)
    ensure_ray(address)
    check_resources(job)
    tracking.setup(tracking_uri, job.mlflow.experiment)
    resume_from = None
    if resume:
        name = mlflow.get_run(resume).data.tags.get("flare.ray_run_name")
        if not name:
            raise ConfigError(f"--resume {resume}: not a flare training run")
        resume_from, run_id = newest_checkpoint(join(storage, name)), resume
        if resume_from is not None:
            with local_dir(resume_from) as d:
                check_resume(d, job, allow_changes)
        mlflow.MlflowClient(tracking_uri).update_run(run_id, status="RUNNING")  # ended again when training ends
    else:
        run_id, name = open_run(job, tracking_uri)
    norm = manifest.layout.default_normaliser.replace("_", "-")
    printer = EpochPrinter(job.optimizer.epochs, norm, log)
    with tracking.ended_on_error(tracking_uri, run_id), epoch_lines(printer) as relay:
        result = make_trainer(job, manifest, name, storage, tracking_uri, run_id, resume_from, worker_env,
                              callbacks=[relay]).fit()
    ended, client = time.time(), mlflow.MlflowClient(tracking_uri)  # the run ends when its training does
    if result.error is not None:
        tracking.end_run(client, run_id, "FAILED", ended)
        raise result.error
    best = best_checkpoint(result)
    local = local_copy(best)
    status = "FAILED"
    try:
        outcome = finish_run(job, local, run_id, tracking_uri, log)
        status = "FINISHED"
    finally:
        shutil.rmtree(local, ignore_errors=True)
        tracking.end_run(client, run_id, status, ended)
    outcome.storage, outcome.history = join(storage, name), list(result.return_value or [])
    outcome.best_checkpoint = join(outcome.storage, Path(best.path).name)  # in Ray's storage
    return outcome


def best_checkpoint(result: Any):
    """The reported checkpoint with the smallest val NME (never the test set, method.md 9.6)."""
    cands = [(m.get(VAL_METRIC, float("inf")), c) for c, m in (result.best_checkpoints or [])]
    if not cands:
        if result.checkpoint is None:
            raise RuntimeError("training reported no checkpoint")
        return result.checkpoint
    return min(cands, key=lambda t: t[0])[1]


def finish_run(job: JobConfig, checkpoint: Path, run_id: str | None, tracking_uri: str | None,
               log=print) -> TrainOutcome:
    """Log the selected model of ``checkpoint`` to MLflow (and register it)."""
    from flare.platform import tracking

    state, meta = load_checkpoint(checkpoint)
    info = checkpoint_info(state)
    version = None
    if run_id is not None:
        layout = load_manifest(job.data.manifest).layout
        model = build_model(job, layout)
        weights = selected_weights(state)
        model.load_state_dict(weights)
        version = tracking.log_flare_model(run_id, model, weights, meta, info, job.mlflow.registered_model,
                                           job.data.input_size)
        from flare.platform.predictor import Predictor
        from flare.platform.run_figures import log_run_figures

        log_run_figures(run_id, Predictor.from_job(model.eval(), job, layout, info["decoder"], info), job)
        log(f"model logged to run {run_id}" + (f", registered {job.mlflow.registered_model} v{version}"
                                               if version else ""))
    return TrainOutcome(run_id, checkpoint, info, version, checkpoint, [])
