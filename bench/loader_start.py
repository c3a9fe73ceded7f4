"""Time to a run's first step: the loader's workers started before vs after the model is built.

A training run's first epoch waits for its first batch while the loader's worker processes start (process
start, imports, the shards read, the first batch built); the H200 windows measured 26-44 s first epochs
(bench/results/gpu). ``train_loop.train_worker`` asks for the first batches before it builds the model, so
that start-up overlaps the model build (paper configuration: build, EMA copy, Adam; on a GPU host also the
CUDA context and the copy to the device). Both orders run here side by side, in ABBA rounds, with the real
pieces (``build_model``, ``Ema``, ``make_optimizer``, ``LocalLoader`` over the shards), each from fresh
worker processes, and the script prints the wall time from the start to "model built and first batch in
hand" for each, and their ratio.

Usage: ``python bench/loader_start.py --data data/300w [--spec jobs/300w_star.yaml] [--workers 2]
[--batch 32] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from flare.datasets.ingest import BatchBuilder, load_manifest
from flare.platform.builders import build_model
from flare.platform.config import load_job
from flare.platform.ema import Ema
from flare.platform.local_loader import LocalLoader
from flare.platform.train_loop import make_optimizer

ROOT = Path(__file__).resolve().parents[1]


def time_to_first_step(spec: Path, manifest_path: Path, workers: int, batch: int, early: bool) -> float:
    """Seconds from nothing to a built model (EMA, Adam) and the first batch in hand, loader started
    before (``early``) or after the build."""
    job = load_job(spec, [f"data.manifest={manifest_path}"])
    manifest = load_manifest(job.data.manifest)
    builder = BatchBuilder(manifest.layout, job.data.input_size, augment=True, seed=job.seed, compact=True)
    t0 = time.perf_counter()
    with LocalLoader(manifest, job.data.train_split, batch, builder, workers=workers, shuffle_base=0) as loader:
        batches = loader.epoch(0) if early else None
        torch.manual_seed(job.seed)
        model = build_model(job, manifest.layout)
        Ema(model, job.ema.decay)
        make_optimizer(model, job.optimizer, torch.device("cpu"))
        batches = batches if batches is not None else loader.epoch(0)
        next(batches)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "300w", help="a prepared dataset directory")
    ap.add_argument("--spec", type=Path, default=ROOT / "jobs" / "300w_star.yaml")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    manifest = args.data / "manifest.json"
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds):
        for early in ((False, True) if r % 2 == 0 else (True, False)):
            times[early].append(time_to_first_step(args.spec, manifest, args.workers, args.batch, early))
    print(f"{args.spec.name}, {args.workers} loader workers, batch {args.batch}, {args.rounds} rounds (ABBA); "
          f"torch threads {torch.get_num_threads()}")
    for early, name in ((False, "loader after model build "), (True, "loader before model build")):
        ts = times[early]
        print(f"  {name}: median {statistics.median(ts):.2f} s  ({', '.join(f'{t:.2f}' for t in ts)})")
    ratio = statistics.median(times[False]) / statistics.median(times[True])
    print(f"  time to first step, after / before: {ratio:.2f}x")


if __name__ == "__main__":
    main()
