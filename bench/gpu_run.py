"""One GPU window in one command (run through ``bench/gpu_run.sh``; must finish in under 10 minutes).

(a) Throughput of the paper configs (``jobs/300w_star.yaml``, ``jobs/300w_rwsa.yaml``) on the real data
path: batches from the prepared shards built by :class:`~flare.platform.local_loader.LocalLoader`
workers, then the step of ``train_worker`` (forward, objective, backward, clip, Adam, EMA), fp32 eager vs
bf16 autocast + channels_last (RwSA: bf16 only), with ``--compile [blocks|model|objective]`` also + torch.compile of
the residual blocks, the whole forward or the objective (STAR, in a child process under a timeout); images/s, share of the
time the step waited for data, the first and last third's step times, MFU, peak memory, batch (halved on
out-of-memory); ``--train-only`` skips them. (b) ``flare train 300w_star --no-ray`` (or ``--train-spec``)
with ``optimizer.time_budget_s`` (epochs and LR milestones fitted to the budget; compiled when that row was
faster), its sustained images/s and epoch split, then the validation-selected checkpoint evaluated on the
test split (300W common subset).
(c) At most 8 files under ``--out`` (``$OUT``): summary.json (environment, throughput rows, training and
test figures), throughput.md, profile.txt, train_metrics.jsonl, train_log.txt, val_curve.png, ced.png, and
gpu_run.log written by the shell wrapper.

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

from flare.bench.gpu_model import keep
from flare.bench.step_timing import WARMUP_MAX_S, profile_steps, step_times, warm_up
from flare.datasets.ingest import Manifest, load_manifest
from flare.platform.builders import build_model, objective_from_config
from flare.platform.config import JobConfig, load_job
from flare.platform.ema import Ema
from flare.platform.local_loader import LocalLoader, WaitClock
from flare.platform.train_loop import (
    TrainStep,
    compiled_forward,
    compiled_objective,
    make_optimizer,
    train_builder,
    train_loader,
)

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
PRECISIONS = ("fp32", "bf16+channels_last")
COMPILED = "bf16+channels_last+compile_"  # + "blocks" / "model" (JobConfig.compile) or "objective" (compile_objective)
PROFILED = "bf16+channels_last"  # rows whose precision starts so are also profiled into profile.txt
GRACE_S = 60.0  # the training process is killed only this long after its budget


def endless(loader: LocalLoader) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of epoch 0, 1, 2, ... without end."""
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


class Loaders:
    """One persistent loader per data setting, shared by the cases that read the same batches."""

    def __init__(self, manifest: Manifest, workers: int, pin: bool) -> None:
        self.manifest, self.workers, self.pin = manifest, workers, pin
        self.open: dict[tuple, LocalLoader] = {}

    def get(self, job: JobConfig, batch: int) -> LocalLoader:
        key = (job.data.input_size, job.data.augment, job.seed, batch, job.data.max_train_samples, job.data.drop_last)
        if key not in self.open:
            self.open[key] = train_loader(self.manifest, job, batch, train_builder(job, self.manifest.layout),
                                          self.workers, self.pin)
        return self.open[key]

    def close(self) -> None:
        for loader in self.open.values():
            loader.close()
        self.open.clear()


def throughput(job: JobConfig, precision: str, batch: int, loaders: Loaders, device: torch.device,
               warmup: int, steps: int, profile_to: Path | None = None) -> dict[str, Any]:
    """Time ``steps`` training steps of ``job`` on real batches (after ``warmup``); with ``profile_to``, then
    profile a few more (:func:`profile_steps`)."""
    layout = loaders.manifest.layout
    torch.manual_seed(job.seed)
    cl = precision.startswith("bf16+channels_last")
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as train_worker
    model = build_model(job, layout).to(device)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    ema = Ema(model, job.ema.decay)
    objective = objective_from_config(job.objective).to(device)
    opt = make_optimizer(model, job.optimizer, device)
    gen = torch.Generator(device=device).manual_seed(job.seed)
    batches = WaitClock(endless(loaders.get(job, batch)))
    mode = precision.removeprefix(COMPILED) if precision.startswith(COMPILED) else "off"
    forward = compiled_forward(model, "off" if mode == "objective" else mode)
    objective = compiled_objective(objective, mode == "objective")  # JobConfig.compile_objective
    train_step = TrainStep(model, forward, objective, opt, ema, gen, job.data.input_size, job.optimizer.grad_clip,
                           bf16=cl, channels_last=cl)  # the step of train_worker

    images = [0]  # counted, not steps x batch: every epoch ends with a smaller batch (1,815 = 14 x 128 + 23)

    def step() -> None:
        host = next(batches)
        images[0] += len(host["image"])
        train_step(host)

    t_warm = time.perf_counter()
    warmup_steps = warm_up(step, device, warmup, max_s=WARMUP_MAX_S if device.type == "cuda" else 1.0)
    warmup_s = time.perf_counter() - t_warm
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches.seconds, images[0], t0 = 0.0, 0, time.perf_counter()
    per_step = step_times(step, device, steps)
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    third = max(1, steps // 3)
    row = {"images_per_s": images[0] / elapsed, "images": images[0], "data_wait": min(batches.seconds / elapsed, 1.0),
           "step_s": elapsed / steps, "peak_mem_mb": peak, "warmup_s": warmup_s, "warmup_steps": warmup_steps,
           "step_s_first_third": sum(per_step[:third]) / third, "step_s_last_third": sum(per_step[-third:]) / third}
    if profile_to is not None:
        row["profile"] = profile_steps(step, device, profile_to, f"{job.name} {precision} batch {batch}")
    return row


def run_case(spec: str, precision: str, args: argparse.Namespace, loaders: Loaders,
             device: torch.device) -> dict[str, Any]:
    """One table row; on out-of-memory the batch is halved and the case retried."""
    job = load_job(JOBS / f"{spec}.yaml", [f"data.manifest={loaders.manifest.path}"])
    batch = args.batch or job.optimizer.batch_size
    row: dict[str, Any] = {"spec": spec, "precision": precision, "spec_batch": job.optimizer.batch_size,
                           "workers": loaders.workers, "device": str(device)}
    while batch >= 1:
        try:
            profile_to = args.out / "profile.txt" if precision.startswith(PROFILED) else None
            row.update(throughput(job, precision, batch, loaders, device, args.warmup, args.steps, profile_to),
                       batch=batch)
            return row
        except torch.OutOfMemoryError:
            row.setdefault("oom_batches", []).append(batch)
            torch.cuda.empty_cache()
            batch //= 2
    return {**row, "error": "out of memory at batch 1"}


def train_flops_per_image(job: JobConfig, layout: Any, device: torch.device) -> float:
    """Forward FLOPs of one image (torch's FLOP counter) x 3: forward plus backward, as MFU counts it."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(job, layout).to(device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, job.data.input_size, job.data.input_size, device=device))
    return 3.0 * counter.get_total_flops()


def write_table(rows: list[dict[str, Any]], out: Path, peak_tflops: float | None) -> str:
    """throughput.md (a Markdown table); returns it. MFU is against ``peak_tflops`` (dense bf16)."""
    head = ("| spec | precision | batch | workers | images/s | data wait | s/step | first/last third | MFU | peak MiB "
            "| warm-up s (steps) |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    nan = float("nan")
    lines = []
    for r in rows:
        mfu = r.get("images_per_s", nan) * r.get("train_flops_per_image", nan) / (peak_tflops * 1e12) \
            if peak_tflops else nan
        r["mfu_bf16_dense"] = mfu
        lines.append(f"| {r['spec']} | {r['precision']} | {r.get('batch', '-')} | {r['workers']} | "
                     f"{r.get('images_per_s', nan):.1f} | {r.get('data_wait', nan):.1%} | {r.get('step_s', nan):.3f} | "
                     f"{r.get('step_s_first_third', nan):.3f}/{r.get('step_s_last_third', nan):.3f} | "
                     f"{mfu:.1%} | {r.get('peak_mem_mb', nan):.0f} | {r.get('warmup_s', nan):.1f} "
                     f"({r.get('warmup_steps', '-')}) |"
                     + (f" {r['error']}" if "error" in r else "") + "\n")
    table = head + "".join(lines) + (f"\nMFU: training FLOPs (3 x forward, torch's counter) x images/s over "
                                     f"{peak_tflops:g} TFLOP/s dense bf16.\n" if peak_tflops else "")
    table += ("fp32: PyTorch's default fp32, cudnn convolutions in TF32 "
              f"(torch.backends.cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}); the variants table's "
              "fp32_strict turns TF32 off.\n")
    (out / "throughput.md").write_text(table)
    return table


def timed_training(spec: str, manifest: Manifest, args: argparse.Namespace, device: torch.device,
                   out: Path) -> dict[str, Any]:
    """``flare train SPEC --no-ray`` with ``optimizer.time_budget_s``: epochs and milestones fitted to the budget
    (platform/budget.py). Killed only if it overruns the budget by ``GRACE_S``. Then the validation-selected
    checkpoint is evaluated on the test split (summary.json's ``train.eval``), ced.png, val_curve.png."""
    run_dir = Path(tempfile.mkdtemp(prefix="flare-gpu-run-")) / "run"
    cmd = [sys.executable, "-m", "flare.platform.cli", "train", str(JOBS / f"{spec}.yaml"), "--no-ray",
           "--run-dir", str(run_dir), "--device", device.type, "--set", f"data.manifest={manifest.path}",
           "--set", f"data.loader_workers={args.workers}", "--set", f"optimizer.time_budget_s={args.budget}",
           *[x for s in args.train_set for x in ("--set", s)]]
    t0 = time.perf_counter()
    with (out / "train_log.txt").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=args.budget + GRACE_S)
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
    summary: dict[str, Any] = {
        "spec": spec, "command": " ".join(cmd), "budget_s": args.budget, "wall_s": wall,
        "killed_after_grace": code is None, "exit_code": code, "epochs_done": len(rows),
        "planned_epochs": rows[-1].get("planned_epochs") if rows else None,
        "best": min(rows, key=lambda r: r["val_nme"]) if rows else None, "last": rows[-1] if rows else None}
    later = rows[1:] or rows  # the first epoch also starts the loader and tunes cudnn
    if later:
        rates = sorted(r["images_per_s"] for r in later)
        summary["sustained"] = {"images_per_s_median": rates[len(rates) // 2], "images_per_s_min": rates[0],
                                "data_wait_max": max(r["data_wait"] for r in later), "epochs": len(later)}
    if rows and "first_batch_s" in rows[0]:  # where the first epoch's extra time goes
        first = rows[0]
        summary["first_epoch_s"] = {k: first.get(k) for k in ("epoch_time_s", "first_batch_s", "val_s", "checkpoint_s")}
    if later and all("val_s" in r for r in later):
        summary["epoch_mean_s"] = {k: sum(r[k] for r in later) / len(later)
                                   for k in ("epoch_time_s", "val_s", "checkpoint_s")}
    if rows:
        from flare.platform.compare import val_plot

        val_plot({spec: [(r["epoch"], r["val_nme"]) for r in rows]}, out / "val_curve.png",
                 f"{spec} on {device}: validation NME, {len(rows)} epochs in {wall:.0f} s")
        summary["eval"] = evaluate_best(run_dir / "checkpoints", manifest, device, out)
        if args.keep_model and "checkpoint" in summary["eval"]:
            summary["model_parts"] = keep(run_dir / "checkpoints" / summary["eval"]["checkpoint"], out)
    shutil.rmtree(run_dir.parent, ignore_errors=True)
    return summary


def evaluate_best(checkpoints: Path, manifest: Manifest, device: torch.device, out: Path) -> dict[str, Any]:
    """The validation-selected checkpoint on the test split (300W: the common subset), as ``flare eval`` does."""
    from flare.platform.checkpoints import best_checkpoint_dir
    from flare.platform.evaluate import evaluate_model
    from flare.platform.predictor import Predictor

    best = best_checkpoint_dir(checkpoints)
    if best is None:
        return {"error": f"no checkpoint under {checkpoints}"}
    with tempfile.TemporaryDirectory() as tmp:
        result = evaluate_model(Predictor.from_dir(best, device.type), manifest.path.parent, "test", Path(tmp))
        if (Path(tmp) / "ced.png").exists():
            shutil.copyfile(Path(tmp) / "ced.png", out / "ced.png")
    return {"checkpoint": best.name, **result}


GPU_QUERY = "utilization.gpu,clocks.sm,clocks.max.sm,power.draw,temperature.gpu,memory.used"


def gpu_state() -> dict[str, str] | None:
    """``nvidia-smi``'s view of the GPU now (utilisation, SM clock vs its maximum, power, temperature, memory
    used by every process): a row measured while something else used the GPU, or at low clocks, shows here."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={GPU_QUERY}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    return dict(zip(GPU_QUERY.split(","), (v.strip() for v in out[0].split(",")), strict=False)) if out else None


def environment(device: torch.device, manifest: Manifest) -> dict[str, Any]:
    """Host, library versions and data facts (summary.json's ``env``)."""
    import pydantic

    shm = shutil.disk_usage("/dev/shm") if Path("/dev/shm").exists() else None
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpus": os.cpu_count(), "pydantic": pydantic.VERSION, "dev_shm_mb": shm.total / 2**20 if shm else None,
            "manifest": str(manifest.path), "train_count": manifest.count("train"),
            "ray_imported": "ray" in sys.modules, "mlflow_imported": "mlflow" in sys.modules,
            "gpu_state_at_start": gpu_state() if device.type == "cuda" else None,
            # fp32 rows: PyTorch's defaults run cudnn convolutions in TF32 (tensor cores), matmuls in IEEE fp32
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}


def compiled_case(spec: str, mode: str, args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    """The torch.compile row (``compile: blocks`` or ``model``), in a child process stopped after ``timeout`` s
    (compiling the whole 4-stack model took over 150 s in the first window, and the other rows must come
    back); its profile is appended to profile.txt."""
    out = Path(tempfile.mkdtemp(prefix="flare-compile-"))
    precision = COMPILED + mode
    cmd = [sys.executable, __file__, "--case", f"{spec}:{precision}", "--out", str(out), "--data", str(args.data),
           "--workers", str(args.workers), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    try:
        proc = subprocess.run(cmd, check=False, timeout=timeout, capture_output=True, text=True,
                              start_new_session=True)
        if proc.returncode != 0:
            return {"spec": spec, "precision": precision, "workers": args.workers,
                    "error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
        if (out / "profile.txt").exists():
            with (args.out / "profile.txt").open("a") as f:
                f.write((out / "profile.txt").read_text())
        return json.loads((out / "case.json").read_text())
    except subprocess.TimeoutExpired:
        return {"spec": spec, "precision": precision, "workers": args.workers,
                "error": f"not done within {timeout:.0f} s (compile included)"}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def train_compile_mode(rows: list[dict[str, Any]], spec: str) -> str:
    """The compile mode of this window's fastest row of ``spec`` when a compiled row beat its bf16 eager row,
    else ``"off"``: the timed run trains with what measured fastest here."""
    speed = {r["precision"]: r.get("images_per_s", 0.0) for r in rows if r["spec"] == spec}
    eager = speed.get("bf16+channels_last", 0.0)
    best = max(((v, k) for k, v in speed.items() if k.startswith(COMPILED)), default=(0.0, ""))
    return best[1].removeprefix(COMPILED) if best[0] > eager > 0 else "off"


def variant_rows(spec: str, manifest: Manifest, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """bench/model_variants.py for ``spec`` (dry run: two rounds of one step), appended to throughput.md."""
    from flare.bench.model_variants import measure

    job = load_job(JOBS / f"{spec}.yaml", [f"data.manifest={manifest.path}"])
    try:
        rows, text = measure(job, device, batch=args.batch or (2 if args.dry_run else None),
                             rounds=2 if args.dry_run else 4)
    except Exception as err:  # noqa: BLE001 - the window's other results must come back
        rows, text = [{"error": f"{type(err).__name__}: {err}"}], f"model variants failed: {type(err).__name__}: {err}\n"
    with (args.out / "throughput.md").open("a") as f:
        f.write("\n" + text)
    print(text, flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM data sheets


def main(argv: list[str] | None = None) -> None:
    t_start = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out/gpu_run")))
    p.add_argument("--data", type=Path, default=REPO / "data" / "300w", help="a prepared 300W dataset")
    p.add_argument("--dry-run", action="store_true", help="jobs/tiny.yaml on CPU, a few steps")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: min(8, CPUs - 4), the "
                   "rest for the launch-bound main thread; dry run 1)")
    p.add_argument("--batch", type=int, default=None, help="default: the spec's batch size")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--budget", type=float, default=None, help="training run wall-clock seconds (330: with the "
                   "throughput rows and the evaluation, ~8 of the 10 minutes a command gets; dry 20)")
    p.add_argument("--train-set", action="append", default=[], help="extra --set for the training run")
    p.add_argument("--compile", nargs="?", const="blocks", default=None, choices=("blocks", "model", "objective"),
                   help="add a torch.compile row of the first spec: blocks (each residual block; -3%% kernel time on "
                   "an H200, bench/results/gpu/2026-11-26_h200_blocks), model (the whole forward) or objective "
                   "(compile_objective: the loss; 3.8-4.7x on CPU, bench/objective_compile.py); the last two unmeasured")
    p.add_argument("--variants", action="store_true", help="after the rows: the model's forward+backward with each "
                   "implementation detail swapped back (bench/model_variants.py), interleaved, into throughput.md")
    p.add_argument("--compile-timeout", type=float, default=150.0, help="seconds for the compiled row, compile "
                   "included")
    p.add_argument("--case", default=None, help="SPEC:PRECISION: only this throughput row, into OUT/case.json")
    p.add_argument("--specs", nargs="+", default=None, help="throughput rows of these specs only")
    p.add_argument("--precisions", nargs="+", default=None, choices=PRECISIONS, help="these precisions only")
    p.add_argument("--throughput-only", action="store_true", help="no training run (a short window)")
    p.add_argument("--train-only", action="store_true", help="no throughput rows: the whole command for the timed "
                   "run (--budget 480 measures the issue's 100-epochs-in-8-minutes target)")
    p.add_argument("--keep-model", action="store_true", help="bring the selected weights back as model_partK.pt "
                   "(fp16, <= 15 MiB each; join them with bench/gpu_model.py): fits the 8 files with --train-only")
    p.add_argument("--train-spec", default=None, help="the timed run's spec (default: 300w_star; dry: tiny)")
    args = p.parse_args(argv)
    if args.train_only and (args.throughput_only or args.case):
        p.error("--train-only runs no throughput rows: drop --throughput-only / --case")
    if args.keep_model and not args.train_only:
        p.error("--keep-model needs --train-only: the throughput rows' files fill the 8 a window returns")
    dry = args.dry_run
    device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    specs = ["tiny"] if dry else ["300w_star", "300w_rwsa"]
    args.workers = args.workers if args.workers is not None else (1 if dry else max(1, min(8, (os.cpu_count() or 4) - 4)))
    args.warmup = args.warmup if args.warmup is not None else (1 if dry else 8)
    args.steps = args.steps if args.steps is not None else (2 if dry else 30)
    args.budget = args.budget if args.budget is not None else (20.0 if dry else 330.0)
    if dry and not args.train_set:
        args.train_set = ["optimizer.epochs=2", "data.max_train_samples=16", "data.max_val_samples=8"]
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(args.data)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    summary: dict[str, Any] = {"env": environment(device, manifest)}
    print(f"device {device} {gpu}, {args.workers} loader workers, data {manifest.path}", flush=True)
    rows, loaders = [], Loaders(manifest, args.workers, pin=device.type == "cuda")

    def case(spec: str, precision: str) -> None:
        t0 = time.perf_counter()
        try:
            row = run_case(spec, precision, args, loaders, device)
            job = load_job(JOBS / f"{spec}.yaml", [f"data.manifest={manifest.path}"])
            row["train_flops_per_image"] = train_flops_per_image(job, manifest.layout, device)
        except Exception as err:  # noqa: BLE001 - one failing case must not lose the window's other results
            row = {"spec": spec, "precision": precision, "workers": args.workers, "error": f"{type(err).__name__}: {err}"}
        if device.type == "cuda":
            row["gpu_state_after"] = {**(gpu_state() or {}),  # memory.used beyond ours: another process
                                      "torch_reserved_mib": torch.cuda.memory_reserved(device) / 2**20}
        rows.append(row)
        print(f"  {spec} {precision}: {row.get('images_per_s', 0):.1f} img/s ({time.perf_counter() - t0:.0f} s)"
              + (f" {row['error']}" if "error" in row else ""), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if args.case:  # one row in this process (the compile case runs so, under a timeout)
        spec, precision = args.case.split(":", 1)
        try:
            case(spec, precision)
        finally:
            loaders.close()
        (args.out / "case.json").write_text(json.dumps(rows[0], default=str) + "\n")
        return
    try:
        for spec in [] if args.train_only else args.specs or specs:
            for precision in args.precisions or (PRECISIONS if spec == specs[0] else PRECISIONS[-1:]):
                case(spec, precision)
                write_table(rows, args.out, peak)  # after every row: a window cut short keeps what it measured
            if spec == specs[0] and device.type == "cuda" and args.compile:
                loaders.close()  # the child process needs the CPUs
                rows.append(compiled_case(spec, args.compile, args, args.compile_timeout))
                print(f"  {spec} {rows[-1]['precision']}: " + (f"{rows[-1]['images_per_s']:.1f} img/s" if "images_per_s" in
                      rows[-1] else rows[-1]["error"]), flush=True)
                write_table(rows, args.out, peak)
        if rows:
            print(write_table(rows, args.out, peak), flush=True)
        summary["throughput"] = rows
        if args.variants and not args.train_only:
            summary["variants"] = variant_rows(specs[0], manifest, args, device)
        if args.throughput_only:
            return
        loaders.close()
        train_spec = args.train_spec or specs[0]
        summary["train_compile"] = train_compile_mode(rows, train_spec)
        if summary["train_compile"] == "objective":
            args.train_set = [*args.train_set, "compile_objective=true"]
        elif summary["train_compile"] != "off":
            args.train_set = [*args.train_set, f"compile={summary['train_compile']}"]
        summary["train"] = timed_training(train_spec, manifest, args, device, args.out)
        t = summary["train"]
        print(f"training {t['spec']} (compile {summary['train_compile']}): {t['epochs_done']} of {t['planned_epochs']} "
              f"planned epochs in {t['wall_s']:.0f} s (budget {args.budget:.0f} s); test NME "
              f"{t.get('eval', {}).get('nme', float('nan')):.2%} ({t.get('eval', {}).get('count', 0)} faces)", flush=True)
        if "sustained" in t:
            u = t["sustained"]
            print(f"  sustained over epochs 2-{u['epochs'] + 1}: {u['images_per_s_median']:.0f} images/s (median; "
                  f"min {u['images_per_s_min']:.0f}), data wait at most {u['data_wait_max']:.1%}", flush=True)
        if "first_epoch_s" in t:
            f = t["first_epoch_s"]
            print(f"  the first epoch: {f['epoch_time_s']:.1f} s, of which waiting for its first batch (loader start) "
                  f"{f['first_batch_s']:.1f} s and validation {f['val_s']:.1f} s", flush=True)
        if "epoch_mean_s" in t:
            e = t["epoch_mean_s"]
            print(f"  an epoch after the first: {e['epoch_time_s']:.2f} s, of which validation {e['val_s']:.2f} s and "
                  f"the checkpoint held the loop {e['checkpoint_s']:.3f} s", flush=True)
    finally:
        loaders.close()
        summary["wall_s"] = time.perf_counter() - t_start
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
