"""One GPU window in one command (run through ``bench/gpu_run.sh``; must finish in under 10 minutes).

(a) Throughput of the paper configs (``jobs/300w_star.yaml``, ``jobs/300w_rwsa.yaml``) on the real data
path: batches from the prepared shards built by :class:`~flare.platform.local_loader.LocalLoader`
workers, then the step of ``train_worker`` (forward, objective, backward, clip, Adam, EMA), fp32 eager vs
bf16 autocast + channels_last; images/s, share of the time the step waited for data, peak memory, batch
(halved on out-of-memory). (b) A ``flare train SPEC --no-ray`` run stopped at a wall-clock budget (flare
has no budget option: the process group is killed at the budget) and its per-epoch metrics.
(c) Everything under ``--out`` (``$OUT``): throughput.json, throughput.md, train_metrics.jsonl,
train_log.txt, train_summary.json, env.json (and gpu_run.log written by the shell wrapper).

``--dry-run``: the same steps with ``jobs/tiny.yaml`` on CPU, small and fast (< 3 minutes).
Needs only PyTorch, NumPy, OpenCV, pyarrow, PyYAML, Typer and pydantic (never Ray or MLflow).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flare.datasets.ingest import BatchBuilder, Manifest, load_manifest
from flare.platform.builders import build_model, objective_from_config
from flare.platform.config import JobConfig, load_job
from flare.platform.local_loader import LocalLoader, WaitClock

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
PRECISIONS = ("fp32", "bf16+channels_last")


def endless(loader: LocalLoader) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of epoch 0, 1, 2, ... without end."""
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Loaders:
    """One persistent loader per data setting, shared by the cases that read the same batches."""

    def __init__(self, manifest: Manifest, workers: int, pin: bool) -> None:
        self.manifest, self.workers, self.pin = manifest, workers, pin
        self.open: dict[tuple, LocalLoader] = {}

    def get(self, job: JobConfig, batch: int) -> LocalLoader:
        key = (job.data.input_size, job.data.augment, job.seed, batch, job.data.max_train_samples)
        if key not in self.open:
            builder = BatchBuilder(self.manifest.layout, job.data.input_size, augment=job.data.augment, seed=job.seed)
            self.open[key] = LocalLoader(self.manifest, job.data.train_split, batch, builder, workers=self.workers,
                                         limit=job.data.max_train_samples, shuffle_base=job.seed * 100003,
                                         pin_memory=self.pin)
        return self.open[key]

    def close(self) -> None:
        for loader in self.open.values():
            loader.close()


def throughput(job: JobConfig, precision: str, batch: int, loaders: Loaders, device: torch.device,
               warmup: int, steps: int) -> dict[str, Any]:
    """Time ``steps`` training steps of ``job`` on real batches (after ``warmup``)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    layout = loaders.manifest.layout
    torch.manual_seed(job.seed)
    cl = precision == "bf16+channels_last"
    model = build_model(job, layout).to(device)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(job.ema.decay), use_buffers=True)
    objective = objective_from_config(job.objective).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=job.optimizer.lr, betas=tuple(job.optimizer.betas))
    gen = torch.Generator(device=device).manual_seed(job.seed)
    batches = WaitClock(endless(loaders.get(job, batch)))

    def step() -> None:
        b = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        if cl:
            b["image"] = b["image"].contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cl):
            outputs = model(b["image"])
        total, _ = objective(outputs, b, gen)
        opt.zero_grad(set_to_none=True)
        total.backward()
        if job.optimizer.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), job.optimizer.grad_clip)
        opt.step()
        ema.update_parameters(model)

    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches.seconds, t0 = 0.0, time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {"images_per_s": steps * batch / elapsed, "data_wait": min(batches.seconds / elapsed, 1.0),
            "step_s": elapsed / steps, "peak_mem_mb": peak}


def run_case(spec: str, precision: str, args: argparse.Namespace, loaders: Loaders,
             device: torch.device) -> dict[str, Any]:
    """One table row; on out-of-memory the batch is halved and the case retried."""
    job = load_job(JOBS / f"{spec}.yaml", [f"data.manifest={loaders.manifest.path}"])
    batch = args.batch or job.optimizer.batch_size
    row: dict[str, Any] = {"spec": spec, "precision": precision, "spec_batch": job.optimizer.batch_size,
                           "workers": loaders.workers, "device": str(device)}
    while batch >= 1:
        try:
            row.update(throughput(job, precision, batch, loaders, device, args.warmup, args.steps), batch=batch)
            return row
        except torch.OutOfMemoryError:
            row.setdefault("oom_batches", []).append(batch)
            torch.cuda.empty_cache()
            batch //= 2
    return {**row, "error": "out of memory at batch 1"}


def write_table(rows: list[dict[str, Any]], out: Path) -> str:
    """throughput.json and a Markdown table (throughput.md); returns the table."""
    (out / "throughput.json").write_text(json.dumps(rows, indent=1) + "\n")
    head = "| spec | precision | batch | workers | images/s | data wait | s/step | peak MiB |\n|---|---|---|---|---|---|---|---|\n"
    lines = [f"| {r['spec']} | {r['precision']} | {r.get('batch', '-')} | {r['workers']} | "
             f"{r.get('images_per_s', float('nan')):.1f} | {r.get('data_wait', float('nan')):.1%} | "
             f"{r.get('step_s', float('nan')):.3f} | {r.get('peak_mem_mb', float('nan')):.0f} |\n" for r in rows]
    table = head + "".join(lines)
    (out / "throughput.md").write_text(table)
    return table


def timed_training(spec: str, manifest: Manifest, args: argparse.Namespace, device: torch.device,
                   out: Path) -> dict[str, Any]:
    """``flare train SPEC --no-ray`` in its own process group, killed at ``args.budget`` seconds."""
    run_dir = Path(tempfile.mkdtemp(prefix="flare-gpu-run-")) / "run"
    cmd = [sys.executable, "-m", "flare.platform.cli", "train", str(JOBS / f"{spec}.yaml"), "--no-ray",
           "--run-dir", str(run_dir), "--device", device.type, "--set", f"data.manifest={manifest.path}",
           "--set", f"data.loader_workers={args.workers}", *[x for s in args.train_set for x in ("--set", s)]]
    t0 = time.perf_counter()
    with (out / "train_log.txt").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=args.budget)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code = None
    wall = time.perf_counter() - t0
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    shutil.copyfile(metrics, out / "train_metrics.jsonl") if metrics.exists() else \
        (out / "train_metrics.jsonl").write_text("")
    shutil.rmtree(run_dir.parent, ignore_errors=True)
    summary = {"spec": spec, "command": " ".join(cmd), "budget_s": args.budget, "wall_s": wall,
               "stopped_at_budget": code is None, "exit_code": code, "epochs_done": len(rows),
               "last": rows[-1] if rows else None,
               "note": "flare train has no wall-clock budget option; the run is killed at the budget"}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def environment(device: torch.device, manifest: Manifest) -> dict[str, Any]:
    """Host, library versions and data facts for env.json."""
    import pydantic

    shm = shutil.disk_usage("/dev/shm") if Path("/dev/shm").exists() else None
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpus": os.cpu_count(), "pydantic": pydantic.VERSION, "dev_shm_mb": shm.total / 2**20 if shm else None,
            "manifest": str(manifest.path), "train_count": manifest.count("train"),
            "ray_imported": "ray" in sys.modules, "mlflow_imported": "mlflow" in sys.modules}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out/gpu_run")))
    p.add_argument("--data", type=Path, default=REPO / "data" / "300w", help="a prepared 300W dataset")
    p.add_argument("--dry-run", action="store_true", help="jobs/tiny.yaml on CPU, a few steps")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: CPUs - 2; dry run 1)")
    p.add_argument("--batch", type=int, default=None, help="default: the spec's batch size")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--budget", type=float, default=None, help="training run wall-clock seconds (240; dry 40)")
    p.add_argument("--train-set", action="append", default=[], help="extra --set for the training run")
    args = p.parse_args(argv)
    dry = args.dry_run
    device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    specs = ["tiny"] if dry else ["300w_star", "300w_rwsa"]
    args.workers = args.workers if args.workers is not None else (1 if dry else max(1, (os.cpu_count() or 4) - 2))
    args.warmup = args.warmup if args.warmup is not None else (1 if dry else 3)
    args.steps = args.steps if args.steps is not None else (2 if dry else 15)
    args.budget = args.budget if args.budget is not None else (40.0 if dry else 240.0)
    if dry and not args.train_set:
        args.train_set = ["optimizer.epochs=1", "data.max_train_samples=16", "data.max_val_samples=8"]
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(args.data)
    (args.out / "env.json").write_text(json.dumps(environment(device, manifest), indent=1) + "\n")
    print(f"device {device}, {args.workers} loader workers, data {manifest.path}", flush=True)
    rows, loaders = [], Loaders(manifest, args.workers, pin=device.type == "cuda")
    try:
        for spec in specs:
            for precision in PRECISIONS:
                t0 = time.perf_counter()
                rows.append(run_case(spec, precision, args, loaders, device))
                print(f"  {spec} {precision}: {rows[-1].get('images_per_s', 0):.1f} img/s "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        loaders.close()
    print(write_table(rows, args.out), flush=True)
    summary = timed_training(specs[0], manifest, args, device, args.out)
    print(f"training {summary['spec']}: {summary['epochs_done']} epochs in {summary['wall_s']:.0f} s "
          f"(budget {args.budget:.0f} s, stopped at budget: {summary['stopped_at_budget']})", flush=True)


if __name__ == "__main__":
    main()
