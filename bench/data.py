"""Data-pipeline throughput per CPU core at 256 px (issue 3 benchmark; method.md 7.1, 7.2, 8.2-8.3).

Stages of flare's training path, each timed alone on one thread: shard read (pyarrow -> rows),
JPEG decode (``decode_row``), augmentation (one warp + texture), targets (point heatmaps drawn at 64,
precomputed edge maps warped once, A Sigma A^T), and the whole ``BatchBuilder`` train path, full and compact (what training hands between processes: uint8
image and edges, the point maps drawn on the device by ``expand_batch``).

For comparison, an "official STAR loader style" baseline written here does the work the official code
does per sample: the same decode and augmentation, then one 256x256 canvas per landmark with the Gaussian
pasted and downscaled to 64 (``_generate_pointmap``), and the edge maps rendered from the landmarks at
256 px every sample (``edge_heatmaps(size=256, out=64)``, the literal 7.1 procedure); nothing precomputed.

The parallel loader case (``platform/local_loader.py``) times whole epochs of ready batches in wall-clock
seconds with 1 and then 2 worker processes (persistent workers, started before the clock), rounds
interleaved in ABBA order, and prints the 2-vs-1 ratio (target >= 1.6x on 2 cores).

Validation crops: un-augmented, full (with targets; what each epoch built once per validated model before
``train_loop.ValCrops``) vs compact (what ``ValCrops`` builds once per run).

Usage: ``python bench/data.py [--data DIR] [--count 200] [--min-time 2.0] [--baseline-samples 100]
[--only stages|loader] [--rounds 2]``.
Without ``--data`` it prepares ``--count`` synthetic faces into a temporary directory first.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import torch

from flare.datasets.augment import AugmentConfig, augment_sample, heatmap_matrix, to_tensor_image
from flare.datasets.ingest import (
    TRAIN_KEYS,
    BatchBuilder,
    Manifest,
    decode_row,
    iter_local_rows,
    load_manifest,
)
from flare.datasets.prepare import PrepareOptions, prepare
from flare.datasets.shards import LOOSE_FACTOR
from flare.datasets.targets import edge_heatmaps, point_heatmaps
from flare.models.layouts import Layout

SIZE = 256  # network input (px)
OUT = SIZE // 4  # heatmap side
TARGET = 200.0  # samples/s/core the issue asks for
LOADER_TARGET = 1.6  # 2 workers vs 1 on 2 cores


# ------------------------------------------------------------------------------------------ timing


def per_second(step: Callable[[int], int], n_items: int, min_time: float) -> float:
    """Items per CPU second of ``step(i)`` (which processes some items and returns how many), cycling
    ``i`` over ``range(n_items)`` until at least ``min_time`` CPU seconds and one full pass have elapsed.
    Process CPU time (all threads) makes the figure a per-core cost, robust to other load on the host."""
    step(0)  # warm-up (imports, first allocations)
    done, i, start = 0, 0, time.process_time()
    while True:
        done += step(i % n_items)
        i += 1
        elapsed = time.process_time() - start
        if elapsed >= min_time and i >= n_items:
            return done / elapsed


# ------------------------------------------------------------------------------------------ stages


def loose_crop_geometry(size: int) -> tuple[np.ndarray, float]:
    """Centre and scale of the canonical crop inside a loose crop of ``size`` px (shards.py)."""
    return np.full(2, (size - 1) / 2.0), size / LOOSE_FACTOR / 200.0


def warp_edges(edges: np.ndarray, matrix: np.ndarray, src_px: int) -> np.ndarray:
    """Precomputed uint8 edge maps of the loose crop warped once into the 64^2 target frame."""
    h = heatmap_matrix(SIZE, OUT) @ matrix @ np.linalg.inv(heatmap_matrix(src_px, edges.shape[-1]))
    maps = np.ascontiguousarray(edges.transpose(1, 2, 0), dtype=np.float32) / 255.0
    warped = cv2.warpAffine(maps, h[:2], (OUT, OUT), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return warped.reshape(OUT, OUT, -1).transpose(2, 0, 1)


def official_point_maps(points: np.ndarray, size: int = SIZE, out: int = OUT, sigma: float = 1.5) -> np.ndarray:
    """[SC] ``_generate_pointmap``: per landmark a zero ``size``^2 float32 canvas, the 255-scaled Gaussian
    patch pasted at the clamped point (``_circle``), then /255 and a bilinear resize to ``out``."""
    tmp = 3.0 * sigma
    grid = np.arange(0, 2 * tmp + 1, 1, np.float32)
    x0 = (2 * tmp + 1) // 2
    g = np.exp(-((grid[None, :] - x0) ** 2 + (grid[:, None] - x0) ** 2) / (2 * sigma**2))
    maps = []
    for px, py in points:
        canvas = np.zeros((size, size), np.float32)
        px, py = min(max(float(px), 0.0), size - 1.0), min(max(float(py), 0.0), size - 1.0)
        ul = int(px - tmp), int(py - tmp)
        br = int(px + tmp + 1), int(py + tmp + 1)
        if not (ul[0] > size - 1 or ul[1] > size - 1 or br[0] - 1 < 0 or br[1] - 1 < 0):
            gx = max(0, -ul[0]), min(br[0], size) - ul[0]
            gy = max(0, -ul[1]), min(br[1], size) - ul[1]
            ix = max(0, ul[0]), min(br[0], size)
            iy = max(0, ul[1]), min(br[1], size)
            canvas[iy[0] : iy[1], ix[0] : ix[1]] = 255 * g[gy[0] : gy[1], gx[0] : gx[1]]
        maps.append(canvas)
    stack = np.stack(maps) / 255.0
    return np.stack([cv2.resize(m, (out, out), interpolation=cv2.INTER_LINEAR) for m in stack])


def official_sample(row: dict, layout: Layout, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """One training sample the official way: decode, one warp + texture, targets drawn from scratch."""
    arr = decode_row(row, layout)
    center, scale = loose_crop_geometry(arr["size"])
    s = augment_sample(arr["image"], arr["landmarks"], None, None, center, scale, layout, rng,
                       AugmentConfig(), size=SIZE)
    pts = s["landmarks"]
    return {
        "image": to_tensor_image(s["image"]),
        "points": torch.from_numpy(official_point_maps(pts)),
        "edges": torch.from_numpy(edge_heatmaps(pts, layout, size=SIZE, out=OUT)),
        "landmarks": torch.from_numpy((2 * pts + 1) / SIZE - 1),
    }


# ------------------------------------------------------------------------------------------ driver


def measure(manifest: Manifest, split: str, min_time: float, batch: int, baseline_samples: int) -> dict[str, float]:
    """samples/s on one core for every stage, ours and the baseline."""
    layout = manifest.layout
    paths = manifest.shard_paths(split)
    rows = pq.read_table(paths).to_pylist()
    n = len(rows)
    arrays = [decode_row(r, layout) for r in rows]
    center, scale = loose_crop_geometry(arrays[0]["size"])
    cfg = AugmentConfig()

    def augment(i: int) -> dict:
        a = arrays[i]
        return augment_sample(a["image"], a["landmarks"], None, None, center, scale, layout,
                              np.random.default_rng(i), cfg, size=SIZE)

    augmented = [augment(i) for i in range(n)]
    builder = BatchBuilder(layout, SIZE, augment=True, seed=0)
    compact = BatchBuilder(layout, SIZE, augment=True, seed=0, compact=True)
    val_full = BatchBuilder(layout, SIZE, augment=False, seed=0)
    val_compact = BatchBuilder(layout, SIZE, augment=False, seed=0, compact=True)
    batches = [rows[i : i + batch] for i in range(0, n, batch)]
    base_rows = rows[: max(1, min(baseline_samples, n))]
    base_batches = [base_rows[i : i + batch] for i in range(0, len(base_rows), batch)]

    def read(_: int) -> int:
        return len(pq.read_table(paths).to_pylist())

    def decode(i: int) -> int:
        decode_row(rows[i], layout)
        return 1

    def augment_one(i: int) -> int:
        augment(i)
        return 1

    def targets(i: int) -> int:
        pts, m, a = augmented[i]["landmarks"], augmented[i]["matrix"], arrays[i]
        point_heatmaps(pts, size=SIZE, out=OUT)
        warp_edges(a["edges"], m, a["size"])
        lin = m[:2, :2]
        _ = lin @ a["cov"] @ lin.T
        return 1

    def train(i: int) -> int:
        builder(batches[i], epoch=i)
        return len(batches[i])

    def train_compact(i: int) -> int:
        compact(batches[i], epoch=i)
        return len(batches[i])

    def validation(i: int) -> int:  # before: full crops with their targets, built for each model each epoch
        val_full(batches[i])
        return len(batches[i])

    def validation_compact(i: int) -> int:  # now (train_loop.ValCrops): compact, built once per run
        val_compact(batches[i])
        return len(batches[i])

    def end_to_end(_: int) -> int:
        table = pq.read_table(paths)
        for k in range(0, table.num_rows, batch):
            builder(table.slice(k, batch).to_pylist(), epoch=k)
        return table.num_rows

    def official_targets(i: int) -> int:
        pts = augmented[i]["landmarks"]
        official_point_maps(pts)
        edge_heatmaps(pts, layout, size=SIZE, out=OUT)
        return 1

    def official(i: int) -> int:  # per-sample tensors collated like a DataLoader's default_collate
        samples = [official_sample(r, layout, np.random.default_rng(i * batch + k))
                   for k, r in enumerate(base_batches[i])]
        _ = {key: torch.stack([smp[key] for smp in samples]) for key in samples[0]}
        return len(samples)

    return {
        "shard read (pyarrow -> rows)": per_second(read, 1, min_time),
        "JPEG decode (decode_row)": per_second(decode, n, min_time),
        "augmentation (warp + texture)": per_second(augment_one, n, min_time),
        "targets (points@64 + edge warp + cov)": per_second(targets, n, min_time),
        "ours: BatchBuilder train path": per_second(train, len(batches), min_time),
        "ours: compact BatchBuilder (training's)": per_second(train_compact, len(batches), min_time),
        "ours: read + BatchBuilder": per_second(end_to_end, 1, min_time),
        "validation crops, full (before)": per_second(validation, len(batches), min_time),
        "validation crops, compact (ValCrops)": per_second(validation_compact, len(batches), min_time),
        "official-style targets only": per_second(official_targets, len(base_rows), min_time),
        "official-style loader (collated)": per_second(official, len(base_batches), min_time),
    }


def loader_scaling(manifest: Manifest, split: str, batch: int, rounds: int,
                   workers: Sequence[int] = (1, 2)) -> dict[int, float]:
    """Wall-clock samples/s of :class:`LocalLoader` epochs per worker count; one untimed epoch starts the
    workers, then ``rounds`` rounds time one epoch of each count in turn (side by side, same host load)."""
    from flare.platform.local_loader import LocalLoader

    builder = BatchBuilder(manifest.layout, SIZE, augment=True, seed=0, compact=True, keys=TRAIN_KEYS)  # as training
    loaders = {w: LocalLoader(manifest, split, batch, builder, workers=w, shuffle_base=0) for w in workers}
    seconds = dict.fromkeys(workers, 0.0)
    samples = dict.fromkeys(workers, 0)
    try:
        for w, loader in loaders.items():
            for _ in loader.epoch(0):  # warm-up: worker start, table read
                pass
        for r in range(rounds):  # ABBA order: a load drift on the shared host hits both counts alike
            for w in (workers if r % 2 == 0 else workers[::-1]):
                loader = loaders[w]
                t0 = time.perf_counter()
                samples[w] += sum(len(b["image"]) for b in loader.epoch(r + 1))
                seconds[w] += time.perf_counter() - t0
    finally:
        for loader in loaders.values():
            loader.close()
    return {w: samples[w] / seconds[w] for w in workers}


def prepare_synthetic(out: Path, count: int) -> None:
    """``count`` synthetic train faces (no validation split) written to ``out``."""
    prepare("synthetic", Path("."), out, PrepareOptions(val_fraction=0.0), engine="local", synthetic_count=count)


def prepare_elsewhere(out: Path, count: int) -> None:
    """Prepare in a spawned process: the prepare's large temporaries leave the allocator of the
    measuring process in a state where every big allocation page-faults (the baseline then reads 2x
    slower), so the timings run in a process that did nothing else."""
    proc = multiprocessing.get_context("spawn").Process(target=prepare_synthetic, args=(out, count))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"preparing {count} synthetic faces failed (exit code {proc.exitcode})")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a prepared dataset (default: synthetic faces in a temp dir)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--count", type=int, default=200, help="synthetic faces when --data is omitted")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--min-time", type=float, default=2.0, help="CPU seconds per stage (at least one pass)")
    parser.add_argument("--baseline-samples", type=int, default=100)
    parser.add_argument("--only", choices=("stages", "loader"), default=None)
    parser.add_argument("--rounds", type=int, default=2, help="timed loader epochs per worker count")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "synthetic"
            prepare_elsewhere(data, args.count)
        manifest = load_manifest(data)
        figures = (measure(manifest, args.split, args.min_time, args.batch, args.baseline_samples)
                   if args.only != "loader" else {})
        scaling = loader_scaling(manifest, args.split, args.batch, args.rounds) if args.only != "stages" else {}
    label = "synthetic" if manifest.data["source"].get("synthetic") else manifest.data["source"].get("format")
    print(f"data: {data if args.data else 'synthetic (temporary)'} [{label}], layout {manifest.data['layout']}, "
          f"split {args.split}, input {SIZE} px, 1 thread (torch + OpenCV)")
    if scaling:
        one, two = scaling[1], scaling[2]
        print(f"parallel loader (wall clock, {os.cpu_count()} CPUs, batch {args.batch}, {args.rounds} epochs each): "
              f"1 worker {one:.1f} samples/s, 2 workers {two:.1f} samples/s: ratio {two / one:.2f}x "
              f"({'meets' if two / one >= LOADER_TARGET else 'misses'} the {LOADER_TARGET}x target)")
    if not figures:
        return
    rows = next(iter_local_rows(manifest, args.split, args.batch))
    nbytes = [sum(v.numel() * v.element_size() for v in BatchBuilder(manifest.layout, SIZE, augment=True,
                                                                     compact=c)(rows).values()) for c in (False, True)]
    print(f"bytes per batch of {len(rows)} handed from a loader process: full {nbytes[0] / 2**20:.1f} MiB, compact "
          f"{nbytes[1] / 2**20:.1f} MiB ({nbytes[0] / nbytes[1]:.1f}x less; point maps drawn on the device)")
    print(f"{'stage':40s} {'samples/s/core':>15s} {'ms/sample':>10s}")
    for name, value in figures.items():
        print(f"{name:40s} {value:15.1f} {1000.0 / value:10.2f}")
    ours, base = figures["ours: BatchBuilder train path"], figures["official-style loader (collated)"]
    verdict = "meets" if ours >= TARGET else "misses"
    print(f"ours {ours:.1f} vs official-style {base:.1f} samples/s/core: ratio {ours / base:.1f}x "
          f"({verdict} the {TARGET:.0f} samples/s/core target)")
    full, compact = figures["validation crops, full (before)"], figures["validation crops, compact (ValCrops)"]
    print(f"validation crops for raw + EMA: before {2 / full * 1000:.2f} ms/face every epoch; now "
          f"{1 / compact * 1000:.2f} ms/face in the first epoch ({2 * compact / full:.1f}x less), none after")


if __name__ == "__main__":
    main()
