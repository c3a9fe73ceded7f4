"""How ``bench/gpu_run.py`` times and profiles a training step: warm-up until the step time settles,
per-step times without host syncs between steps (CUDA events), and a torch.profiler breakdown."""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any

import torch

WARMUP_MAX_S, WARMUP_CHUNK, WARMUP_TOLERANCE = 90.0, 4, 0.05  # warm_up()
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")  # the host blocks on the GPU


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def chunk_s(step: Any, device: torch.device, n: int) -> float:
    """Mean wall seconds per step over ``n`` steps (one host sync at the end)."""
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - t0) / n


def warm_up(step: Any, device: torch.device, minimum: int, max_s: float) -> int:
    """Run ``minimum`` steps, then chunks of ``WARMUP_CHUNK`` until two chunks in a row agree within
    ``WARMUP_TOLERANCE`` (cudnn autotuning and lazy module loading are over) or ``max_s`` seconds have
    passed; returns the steps run. It does not catch a steady slow phase: every window so far measured its
    first rows, right after the machine started, 2x slower than the same step minutes later in the training
    run, whose sustained rate (``train.sustained``) is the figure to quote."""
    t0, done, last = time.perf_counter(), minimum, math.inf
    if minimum:
        chunk_s(step, device, minimum)
    while time.perf_counter() - t0 < max_s:
        now = chunk_s(step, device, WARMUP_CHUNK)
        done += WARMUP_CHUNK
        if abs(now - last) <= WARMUP_TOLERANCE * last:
            break
        last = now
    return done


def step_times(step: Any, device: torch.device, n: int) -> list[float]:
    """Seconds of each of ``n`` steps: CUDA events on the stream (no host sync between steps), else the
    host clock (CPU steps are synchronous)."""
    if device.type != "cuda":
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            out.append(time.perf_counter() - t0)
        return out
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    marks[0].record()
    for i in range(n):
        step()
        marks[i + 1].record()
    sync(device)
    return [a.elapsed_time(b) / 1000 for a, b in itertools.pairwise(marks)]


def profile_steps(step: Any, device: torch.device, path: Path, title: str, steps: int = 3) -> dict[str, float]:
    """``steps`` steps under torch.profiler: where the step's time goes (kernels by device time, ops by
    host time, ops by input shapes, kernel launches per step), appended to ``path`` (profile.txt); returns
    the totals."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        sync(device)
    wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    kernels = [e for e in events if getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA")]
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    # the host waiting for the device inside the steps (the final sync(device) above is ours, not the step's)
    waits = sum(e.count for e in events if e.key in SYNC_CALLS) - (device.type == "cuda")
    gpu_busy = sum(getattr(e, "self_device_time_total", 0.0) for e in kernels) / 1e6 / steps
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with path.open("a") as f:
        f.write(f"== {title}: {wall * 1000:.1f} ms/step wall, GPU kernels busy {gpu_busy * 1000:.1f} ms/step, "
                f"{launches / steps:.0f} kernel launches/step, {waits / steps:.1f} host waits/step ==\n")
        f.write(events.table(sort_by=sort, row_limit=30, max_name_column_width=60) + "\n")
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60) + "\n")
        shaped = prof.key_averages(group_by_input_shape=True)  # which tensors the copies and adds move
        f.write(shaped.table(sort_by=sort, row_limit=25, max_name_column_width=40, max_shapes_column_width=70) + "\n")
    return {"wall_ms": wall * 1000, "gpu_busy_ms": gpu_busy * 1000, "launches_per_step": launches / steps,
            "host_waits_per_step": waits / steps}
