"""The per-worker training loop, one readable recipe for every objective.

:func:`train_worker` is what Ray Train runs on each worker; :func:`train_local` runs the very same
function in one process without Ray (GPU hosts without Ray, unit tests). A :class:`Session` hides
the difference: where rows come from, how checkpoints are reported and restored.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from flare.datasets.crop_prior import manifest_crop_prior
from flare.datasets.ingest import (
    TRAIN_KEYS,
    BatchBuilder,
    Manifest,
    expand_batch,
    image_from_uint8,
    iter_local_rows,
    load_manifest,
)
from flare.files import atomic_write_bytes, move_dir
from flare.models.decode import apply_affine, decoders_for
from flare.models.layouts import Layout
from flare.models.metrics import evaluate
from flare.platform.budget import BudgetPlan
from flare.platform.builders import build_model, objective_from_config
from flare.platform.checkpoints import (
    CheckpointWriter,
    host_copy,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from flare.platform.config import JobConfig, OptimizerConfig, parse_job
from flare.platform.ema import Ema
from flare.platform.local_loader import LocalLoader, WaitClock
from flare.platform.predictor import Predictor

VAL_METRIC = "val_nme"


class Session(Protocol):
    """Where a worker's data comes from and where its reports go."""

    rank: int
    world_size: int
    device: torch.device
    background_checkpoints: bool  # rank 0 writes each checkpoint while the next epoch trains

    def train_batches(self, epoch: int, batch_size: int, builder: BatchBuilder) -> Iterable[dict[str, torch.Tensor]]: ...
    def val_rows(self, batch_size: int) -> Iterable[list[dict]]: ...
    def prepare_model(self, model: nn.Module) -> nn.Module: ...
    def restored(self) -> AbstractContextManager[Path | None]: ...
    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None: ...


# ----------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------


@dataclass
class EpochStats:
    """Running sums of one training epoch (kept on the device: no per-step host sync)."""

    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0
    images: int = 0

    def add(self, terms: dict[str, torch.Tensor], n: int) -> None:
        for k, v in terms.items():
            self.terms[k] = self.terms.get(k, 0.0) + v.detach().float()
        self.steps += 1
        self.images += n

    def means(self) -> dict[str, float]:
        return {f"train_{k}": float(v) / max(self.steps, 1) for k, v in self.terms.items()}


@dataclass
class TrainStep:
    """One optimisation step on a compact host batch: point maps drawn on the device
    (:func:`expand_batch`), forward under bf16 autocast (``bf16``) in channels_last (``channels_last``),
    the objective (the STAR total of method.md 4.8 or the RwSA total of 5.8, each with its AWing heatmap
    terms), backward, gradient clipping, Adam, EMA (recipes 4.11 / 5.10). Returns the objective's terms
    (on the device, no host sync)."""

    model: nn.Module
    forward: Callable[[torch.Tensor], Any]  # the model, or its DDP / compiled wrapper
    objective: nn.Module
    opt: torch.optim.Optimizer
    ema: Ema
    gen: torch.Generator
    input_size: int
    grad_clip: float | None = None
    bf16: bool = False
    channels_last: bool = False

    def __call__(self, host: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = self.gen.device
        batch = expand_batch({k: v.to(device, non_blocking=True) for k, v in host.items()}, self.input_size)
        image = batch["image"].contiguous(memory_format=torch.channels_last) if self.channels_last else batch["image"]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            outputs = self.forward(image)
        total, terms = self.objective(outputs, batch, self.gen)
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.ema.update_parameters(self.model)
        return terms


class ValCrops:
    """The validation split as compact batches (uint8 crops, ``to_original``, ``landmarks_original``), built
    on first use and kept for the run: un-augmented crops are the same every epoch, and building them (one
    core) cost more than the paper model's validation forward on a GPU (bench/results/gpu)."""

    KEYS = ("image", "to_original", "landmarks_original")

    def __init__(self, session: Session, job: JobConfig, layout: Layout, batch_size: int) -> None:
        self.session, self.batch_size = session, batch_size
        self.builder = BatchBuilder(layout, job.data.input_size, augment=False, seed=job.seed, compact=True)
        self.batches: list[dict[str, torch.Tensor]] | None = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.batches is None:
            self.batches = [{k: v for k, v in self.builder(rows).items() if k in self.KEYS}
                            for rows in self.session.val_rows(self.batch_size)]
        return iter(self.batches)


def validate(models: dict[str, nn.Module], crops: Iterable[dict[str, torch.Tensor]], job: JobConfig,
             layout: Layout, device: torch.device, bf16: bool = False) -> dict[str, float]:
    """NME/FR/AUC on the validation split for every model (``{"val_raw": model, "val_ema": ...}``) and every
    decoder compared (method.md 9.6; rank 0 only); each batch of ``crops`` goes to the device once. ``bf16``
    (the CUDA fast path): the forward runs as training does, bf16 autocast on channels_last input (as timm
    validates AMP runs), so it reuses the training's cudnn choices; the maps are decoded in fp32, and the test
    split (``flare eval``) stays fp32."""
    decoders = decoders_for(job.objective.name, job.decode)
    predictors = {prefix: Predictor.from_job(m, job, layout, decoders[0], device=device) for prefix, m in models.items()}
    preds: dict[tuple[str, str], list[np.ndarray]] = {(p, d): [] for p in models for d in decoders}
    gts: list[np.ndarray] = []
    for m in models.values():
        m.eval()
    for batch in crops:
        gts.append(batch["landmarks_original"].double().numpy())
        to_original = batch["to_original"].double().numpy()
        image = image_from_uint8(batch["image"].to(device, non_blocking=True))
        image = image.contiguous(memory_format=torch.channels_last) if bf16 else image
        for prefix, predictor in predictors.items():
            # compiled blocks (compile: blocks) stay eager here
            with torch.compiler.set_stance("force_eager"), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                heat = predictor.heatmaps(image)
            for d in decoders:
                preds[prefix, d].append(apply_affine(predictor.decode(heat, d), to_original))
    for m in models.values():
        m.train()
    gt = np.concatenate(gts)
    out: dict[str, float] = {}
    for (prefix, d), ps in preds.items():
        res = evaluate(np.concatenate(ps), gt, layout)
        for k in ("nme", "fr", "auc"):
            out[f"{prefix}_{d}_{k}"] = float(res[k])
    return out


def fault_hook(epoch: int, rank: int) -> None:
    """Test-only: raise once in epoch ``FLARE_TEST_FAULT_EPOCH``, remembered by a marker file. Called after the
    epoch's first step: with several workers, DDP's all-reduce in that step waits for every rank, so every rank
    has reported the previous epoch (rank 0 with its checkpoint) before the fault; raised at the epoch's start,
    the fault could reach Ray's controller before rank 0's report and checkpoint, and the run restarted from
    scratch (seen once in CI)."""
    at, marker = os.environ.get("FLARE_TEST_FAULT_EPOCH"), os.environ.get("FLARE_TEST_FAULT_MARKER")
    if at is None or marker is None or int(at) != epoch or Path(marker).exists():
        return
    Path(marker).write_text(f"rank {rank} failed at epoch {epoch}\n")
    raise RuntimeError(f"test fault hook: worker {rank} fails once at epoch {epoch}")


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------


def compiled_forward(model: nn.Module, mode: str) -> Callable[..., Any]:
    """The training forward under ``torch.compile`` (``JobConfig.compile``): ``"model"`` compiles the whole
    forward (minutes for the 4-stack paper model); ``"blocks"`` compiles each residual block in place, whose
    code Dynamo shares between blocks of one shape (seconds), fusing the batch-norm, ReLU and residual-add
    chains that dominate the GPU step (bench/results/gpu); ``"off"``: ``model`` itself."""
    if mode == "model":
        return torch.compile(model)
    if mode == "blocks":
        from flare.models.hourglass import Residual

        # one compiled graph per block variant (skip conv or not, channels, train/eval) on each rank
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
        setattr(config, name, max(getattr(config, name), 64))
        for block in model.modules():
            if isinstance(block, Residual):
                block.compile()
    return model


def compiled_objective(objective: nn.Module, on: bool) -> nn.Module:
    """``objective`` under ``torch.compile`` (``JobConfig.compile_objective``), static shapes: one graph for the
    full batch and one for the epoch's last, smaller batch, instead of a dynamic-shape graph that compiled
    2.4x slower and ran 2x slower (STAR, CPU); ``on`` False: ``objective`` itself."""
    return torch.compile(objective, dynamic=False) if on else objective


def train_builder(job: JobConfig, layout: Layout) -> BatchBuilder:
    """How training batches are built: compact (uint8 image and edges; the point maps are drawn on the device)
    and only what a step reads (``TRAIN_KEYS``), so little crosses processes and reaches the device."""
    return BatchBuilder(layout, job.data.input_size, augment=job.data.augment, seed=job.seed, compact=True,
                        keys=TRAIN_KEYS)


def train_loader(manifest: Manifest, job: JobConfig, batch_size: int, builder: BatchBuilder, workers: int,
                 pin_memory: bool) -> LocalLoader:
    """``job``'s training batches without Ray, built by ``workers`` processes (0: in this one); the same order
    as the Ray path's (shuffle base ``seed * 100003``), ``data.drop_last`` applied."""
    return LocalLoader(manifest, job.data.train_split, batch_size, builder, workers=workers,
                       limit=job.data.max_train_samples, shuffle_base=job.seed * 100003, pin_memory=pin_memory,
                       drop_last=job.data.drop_last)


def make_optimizer(model: nn.Module, config: OptimizerConfig, device: torch.device) -> torch.optim.Adam:
    """Adam (method.md 4.11, 5.10) over ``model``'s parameters; on CUDA the fused kernel (one launch for the
    whole update instead of a few per parameter group), elsewhere PyTorch's default implementation."""
    return torch.optim.Adam(model.parameters(), lr=config.lr, betas=tuple(config.betas),
                            weight_decay=config.weight_decay, fused=True if device.type == "cuda" else None)


def train_worker(job_dict: dict[str, Any], session: Session) -> None:
    """Train ``job_dict`` (a validated JobConfig dump) on this worker; rank 0 validates and reports."""
    job = parse_job(job_dict)
    manifest = load_manifest(job.data.manifest)
    layout = manifest.layout
    meta = {"job": job.model_dump(mode="json"), "layout": layout.name}
    if session.rank == 0:  # the re-crop map every checkpoint carries (platform/refine.py)
        prior = manifest_crop_prior(manifest, job.data.train_split)
        meta.update({"crop_prior": prior.to_json()} if prior is not None else {})
    torch.manual_seed(job.seed)
    device = session.device
    use_bf16 = job.precision == "bf16" or (job.precision == "auto" and device.type == "cuda")
    fast = use_bf16 and device.type == "cuda"  # bf16 autocast + channels_last: the GPU fast path
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input shapes: pick the fastest kernels once
    with session.restored() as restore:
        state = load_checkpoint(restore, map_location=device)[0] if restore is not None else None
    start_epoch = int(state["epoch"]) + 1 if state is not None else 0
    per_worker = job.optimizer.batch_size // session.world_size
    builder = train_builder(job, layout)
    # asked for now, so that loader workers (--no-ray) start and build the first batches while the model is built
    first_batches = session.train_batches(start_epoch, per_worker, builder) if start_epoch < job.optimizer.epochs else None
    model = build_model(job, layout).to(device, memory_format=torch.channels_last if fast else torch.preserve_format)
    ema = Ema(model, job.ema.decay)
    objective = compiled_objective(objective_from_config(job.objective).to(device), job.compile_objective)
    opt = make_optimizer(model, job.optimizer, device)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, job.optimizer.milestones, gamma=job.optimizer.gamma)
    best = math.inf
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])  # restores last_epoch: never stepped twice
        best = float(state.get("best", math.inf))
    plan = BudgetPlan(job.optimizer.epochs, job.optimizer.milestones, job.optimizer.time_budget_s,
                      current=sorted(sched.milestones.elements()))
    ddp_model = session.prepare_model(model)
    forward = compiled_forward(ddp_model, job.compile)
    gen = torch.Generator(device=device).manual_seed(job.seed * 1000 + session.rank)
    step = TrainStep(model, forward, objective, opt, ema, gen, job.data.input_size, job.optimizer.grad_clip,
                     bf16=use_bf16, channels_last=fast)
    val_crops = ValCrops(session, job, layout, per_worker)
    writer = CheckpointWriter(background=session.background_checkpoints)  # used by rank 0 only
    epoch, going = start_epoch, start_epoch < plan.epochs
    try:
        while going:
            stats, t0, wall0 = EpochStats(), time.perf_counter(), time.time()
            if first_batches is None:
                first_batches = session.train_batches(epoch, per_worker, builder)
            batches, first_batches = WaitClock(iter(first_batches)), None
            for i, host in enumerate(batches):
                stats.add(step(host), len(host["image"]))
                if i == 0:
                    fault_hook(epoch, session.rank)
            lr = opt.param_groups[0]["lr"]
            sched.step()
            elapsed = time.perf_counter() - t0
            metrics: dict[str, Any] = {"epoch": epoch, "lr": lr, **stats.means(),
                                       "train_images": stats.images * session.world_size,
                                       "images_per_s": stats.images * session.world_size / max(elapsed, 1e-9),
                                       "data_wait": min(batches.seconds / max(elapsed, 1e-9), 1.0),
                                       "first_batch_s": batches.first or 0.0}
            if session.rank == 0:
                models = {"val_raw": model, **({"val_ema": ema.module} if job.ema.enabled else {})}
                metrics.update(validate(models, val_crops, job, layout, device, bf16=fast))
                metrics.update(select_best(metrics, job))
                metrics["val_s"] = time.perf_counter() - t0 - elapsed
                best = min(best, metrics[VAL_METRIC])
            going = plan.epoch_done(epoch, time.perf_counter() - t0)  # train + validation time
            going = plan.share(going, device)
            plan.apply(sched)
            metrics["planned_epochs"] = plan.epochs
            if session.rank != 0:
                session.report(stamped(metrics, wall0), None)
                epoch += 1
                continue
            t_hold = time.perf_counter()
            writer.wait()  # the previous epoch's checkpoint, when written in the background
            state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "epoch": epoch, "best": best,
                     "val_nme": metrics[VAL_METRIC], "weights": metrics["val_weights"],
                     "decoder": metrics["val_decoder"], "planned_epochs": plan.epochs}
            if writer.background:  # the next epoch changes the originals while this copy is written
                state = host_copy(state)
            writer.submit(partial(publish, session, state, meta, metrics, t_hold, wall0, writer.background))
            epoch += 1
    except BaseException:
        with suppress(Exception):  # the last reported epoch still lands; the loop's own error is the one raised
            writer.close()
        raise
    writer.close()


def stamped(metrics: dict[str, Any], wall0: float) -> dict[str, Any]:
    """``metrics`` with the epoch's wall-clock end (MLflow's per-epoch timestamps, also for runs imported
    later by ``flare runs import``) and its duration."""
    metrics["ended_at"] = time.time()
    metrics["epoch_time_s"] = metrics["ended_at"] - wall0
    return metrics


def publish(session: Session, state: dict[str, Any], meta: dict[str, Any], metrics: dict[str, Any],
            t_hold: float, wall0: float, background: bool) -> None:
    """Write one epoch's checkpoint and report it with its metrics. ``checkpoint_s`` is how long the training
    loop was held by it: the write itself inline; the host copy (and any wait for the previous write) when
    the write runs in the background, where the epoch ends before it."""
    if background:
        metrics["checkpoint_s"] = time.perf_counter() - t_hold
        stamped(metrics, wall0)
    ckpt_dir = Path(tempfile.mkdtemp(prefix="flare-ckpt-"))
    save_checkpoint(ckpt_dir, state, meta)
    if not background:
        metrics["checkpoint_s"] = time.perf_counter() - t_hold
        stamped(metrics, wall0)
    session.report(metrics, ckpt_dir)


def select_best(metrics: dict[str, Any], job: JobConfig) -> dict[str, Any]:
    """The validation-selected weights (raw or EMA) and decoder (method.md 9.6): smallest val NME."""
    cands = [(metrics[f"{w}_{d}_nme"], w, d) for w in ("val_raw", "val_ema")
             for d in decoders_for(job.objective.name, job.decode)
             if f"{w}_{d}_nme" in metrics]
    nme, weights, dec = min(cands)
    # the same names for every objective: raw and EMA weights with the selected decoder (a tag in MLflow)
    same = {f"{w}_{k}": metrics[f"{w}_{dec}_{k}"] for w in ("val_raw", "val_ema") for k in ("nme", "fr", "auc")
            if f"{w}_{dec}_{k}" in metrics}
    return {VAL_METRIC: nme, "val_fr": metrics[f"{weights}_{dec}_fr"], "val_auc": metrics[f"{weights}_{dec}_auc"],
            **same, "val_weights": weights.removeprefix("val_"), "val_decoder": dec}


# ----------------------------------------------------------------------------------------------
# single process, no Ray
# ----------------------------------------------------------------------------------------------


class LocalSession:
    """One process, no Ray: rows from the shards, checkpoints under ``run_dir/checkpoints``,
    metrics appended to ``run_dir/metrics.jsonl`` (GPU hosts log them into MLflow afterwards)."""

    rank, world_size = 0, 1
    background_checkpoints = True  # report() is plain file work: it runs in the writer's thread

    def __init__(self, job: JobConfig, run_dir: Path, device: str | None = None, resume: bool = False) -> None:
        self.job, self.run_dir = job, Path(run_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.manifest: Manifest = load_manifest(job.data.manifest)
        (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        self.resume = resume
        host = {"device": str(self.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "cpus": os.cpu_count(), "hostname": socket.gethostname(),
                "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None}
        atomic_write_bytes(self.run_dir / "host.json", (json.dumps(host, indent=1) + "\n").encode())
        self.reports: list[dict[str, Any]] = []
        self.val_nme: dict[str, float] = {}  # epoch_NNNN -> val NME, of the checkpoints this run dir holds
        if resume and (self.run_dir / "metrics.jsonl").exists():
            for line in (self.run_dir / "metrics.jsonl").read_text().splitlines():
                row = json.loads(line)
                if VAL_METRIC in row:
                    self.val_nme[f"epoch_{int(row['epoch']):04d}"] = float(row[VAL_METRIC])
        self.on_report: Callable[[dict[str, Any]], None] | None = None  # e.g. the CLI's per-epoch line
        self.loader: LocalLoader | None = None

    def train_batches(self, epoch: int, batch_size: int, builder: BatchBuilder) -> Iterator[dict[str, torch.Tensor]]:
        """Ready batches: built by ``data.loader_workers`` persistent processes, or here when 0; with a
        progress bar within the epoch on a terminal (never in logs)."""
        if self.loader is None:
            self.loader = train_loader(self.manifest, self.job, batch_size, builder, self.job.data.loader_workers,
                                       pin_memory=self.device.type == "cuda")
        batches = self.loader.epoch(epoch)
        if not sys.stderr.isatty():
            return batches
        from tqdm import tqdm

        return iter(tqdm(batches, total=len(self.loader), desc=f"epoch {epoch + 1}", unit="batch", leave=False,
                         dynamic_ncols=True))

    def prune(self, latest: str) -> None:
        """Keep the latest checkpoint and the ``checkpoint.keep_best`` best by val NME, as Ray Train does;
        only ``epoch_NNNN`` folders this run wrote are removed (a paper-size run writes ~200 MB per epoch)."""
        ranked = sorted(self.val_nme, key=lambda name: (self.val_nme[name], name))
        keep = {latest, *ranked[: self.job.checkpoint.keep_best]}
        for name in [n for n in self.val_nme if n not in keep]:
            shutil.rmtree(self.run_dir / "checkpoints" / name, ignore_errors=True)
            del self.val_nme[name]

    def close(self) -> None:
        """Stop the loader's worker processes."""
        if self.loader is not None:
            self.loader.close()

    def val_rows(self, batch_size: int) -> Iterator[list[dict]]:
        return iter_local_rows(self.manifest, self.job.data.val_split, batch_size, self.job.data.max_val_samples)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    @contextmanager
    def restored(self) -> Iterator[Path | None]:
        """With ``resume``: the run dir's latest ``epoch_*`` checkpoint."""
        yield latest_checkpoint(self.run_dir / "checkpoints") if self.resume else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.reports.append(metrics)
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(metrics, sort_keys=True) + "\n")
        if checkpoint_dir is not None:
            dest = self.run_dir / "checkpoints" / f"epoch_{metrics['epoch']:04d}"
            if dest.exists():
                shutil.rmtree(dest)
            move_dir(checkpoint_dir, dest)  # the scratch dir may be on another file system (tmpfs /tmp)
            self.val_nme[dest.name] = float(metrics[VAL_METRIC])
            self.prune(dest.name)
        if self.on_report is not None:
            self.on_report(metrics)


def train_local(job: JobConfig, run_dir: Path, device: str | None = None, resume: bool = False,
                on_report: Callable[[dict[str, Any]], None] | None = None) -> LocalSession:
    """Run :func:`train_worker` in this process (``flare train --no-ray``). A ``run_dir`` that already holds
    epochs is continued only with ``resume``; otherwise it is refused, so a re-run never mixes two runs."""
    metrics = Path(run_dir) / "metrics.jsonl"
    if not resume and metrics.exists() and metrics.stat().st_size > 0:
        raise FileExistsError(f"{run_dir}: already holds a run ({metrics.name}); pass --resume last to continue "
                              "it or choose another --run-dir")
    session = LocalSession(job, run_dir, device, resume)
    session.on_report = on_report
    try:
        train_worker(job.model_dump(mode="json"), session)
    finally:
        session.close()
    return session
