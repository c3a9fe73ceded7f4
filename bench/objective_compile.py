"""The training objective eager vs under ``torch.compile`` (``compile_objective: true``), side by side.

The whole objective of a paper spec (``jobs/300w_star.yaml``: STAR + 10 AWing(point) + 10 AWing(edge) over 4
stacks; ``jobs/300w_rwsa.yaml``: RwSA with label smoothing + the AWing terms), forward + backward, on one
fixed synthetic batch (N = 68, E = 9, 64 x 64 maps: heatmaps, point and edge maps, labels, smoothing
covariances). Prints the compile time, the eager and compiled medians, their ratio and how far the compiled
total and gradients are from the eager ones (same generator seed, so RwSA draws the same smoothing samples).
On CUDA the times are absolute; on CPU read the ratio only.

Usage: ``python bench/objective_compile.py [--specs 300w_star 300w_rwsa] [--batch B] [--reps N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flare.bench.step_timing import sync
from flare.datasets.targets import point_heatmaps_torch
from flare.models.decode import label_to_crop
from flare.models.hourglass import StackOutput
from flare.platform.builders import objective_from_config
from flare.platform.config import load_job
from flare.platform.train_loop import compiled_objective

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def synthetic(batch: int, stacks: int, raw: bool, device: torch.device, points: int = 68, edges: int = 9,
              size: int = 256, seed: int = 0) -> tuple[list[StackOutput], dict[str, Tensor]]:
    """Model outputs (leaf tensors that take gradients) and a batch of the shapes the objective reads.
    ``raw``: RwSA's raw scores (any sign) instead of STAR's non-negative activated maps."""
    g = torch.Generator().manual_seed(seed)
    h = size // 4
    landmarks = torch.rand(batch, points, 2, generator=g) * 1.6 - 0.8
    scale = torch.rand(batch, points, 2, generator=g) + 0.5
    cov = torch.diag_embed(scale)  # heatmap px^2, SPD
    out = {"landmarks": landmarks, "cov": cov, "edge_targets": torch.rand(batch, edges, h, h, generator=g),
           "point_targets": point_heatmaps_torch(label_to_crop(landmarks, size), size=size, out=h)}
    outputs = []
    for _ in range(stacks):
        heat = torch.randn(batch, points, h, h, generator=g) if raw else torch.rand(batch, points, h, h, generator=g)
        maps = [heat, torch.rand(batch, points, h, h, generator=g), torch.rand(batch, edges, h, h, generator=g)]
        heat, pts, edg = (m.to(device).requires_grad_() for m in maps)
        outputs.append(StackOutput(heatmaps=heat, fused=heat, points=pts, edges=edg))
    return outputs, {k: v.to(device) for k, v in out.items()}


def leaves(outputs: Sequence[StackOutput]) -> list[Tensor]:
    return [t for o in outputs for t in (o.heatmaps, o.points, o.edges) if t is not None]


def run(objective: nn.Module, outputs: list[StackOutput], batch: dict[str, Tensor], seed: int = 7
        ) -> tuple[Tensor, list[Tensor]]:
    """Total and the gradients of every output map, from a fresh generator seeded ``seed``."""
    device = outputs[0].heatmaps.device
    for t in leaves(outputs):
        t.grad = None
    total, _ = objective(outputs, batch, torch.Generator(device=device).manual_seed(seed))
    total.backward()
    return total.detach(), [t.grad.clone() for t in leaves(outputs)]


def median_s(objective: nn.Module, outputs: list[StackOutput], batch: dict[str, Tensor], reps: int) -> float:
    device = outputs[0].heatmaps.device
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        run(objective, outputs, batch)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compare(spec: str, batch_size: int, reps: int, device: torch.device) -> dict[str, Any]:
    """One row: eager vs compiled forward + backward of ``spec``'s objective."""
    job = load_job(JOBS / f"{spec}.yaml", [])
    eager = objective_from_config(job.objective).to(device)
    compiled = compiled_objective(eager, True)
    outputs, batch = synthetic(batch_size, job.model.stacks, job.objective.name == "rwsa", device)
    t0 = time.perf_counter()
    total_c, grads_c = run(compiled, outputs, batch)  # compiles
    sync(device)
    compile_s = time.perf_counter() - t0
    total_e, grads_e = run(eager, outputs, batch)
    grad_diff = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(grads_c, grads_e,
                                                                                                  strict=True))
    run(eager, outputs, batch)  # warm
    e, c = median_s(eager, outputs, batch, reps), median_s(compiled, outputs, batch, reps)
    return {"spec": spec, "batch": batch_size, "device": str(device), "compile_s": compile_s, "eager_s": e,
            "compiled_s": c, "speedup": e / c, "total_rel_diff": float((total_c - total_e).abs() / total_e.abs()),
            "grad_max_rel_diff": grad_diff}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", nargs="+", default=["300w_star", "300w_rwsa"])
    ap.add_argument("--batch", type=int, default=None, help="default: 128 on CUDA, 16 on CPU")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default=None, help="default: cuda when available")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch = args.batch or (128 if device.type == "cuda" else 16)
    print(f"objective forward+backward, eager vs torch.compile (static shapes), {device}, batch {batch}, "
          f"median of {args.reps}")
    print("| spec | compile s | eager s | compiled s | speedup | total rel. diff | max grad rel. diff |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.specs:
        r = compare(spec, batch, args.reps, device)
        print(f"| {r['spec']} | {r['compile_s']:.1f} | {r['eager_s']:.4f} | {r['compiled_s']:.4f} | "
              f"{r['speedup']:.2f}x | {r['total_rel_diff']:.1e} | {r['grad_max_rel_diff']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
