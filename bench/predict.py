"""Inference speed on CPU: torch eager vs onnxruntime on the same exported graph (network + decoder).

For each spec (random seeded weights; speed does not depend on them):

- ``small``: ``jobs/300w_small_rwsa.yaml`` (128 px, 2 stacks, 128 ch; decoder argmax_refine);
- ``paper``: ``jobs/300w_star.yaml`` (256 px, 4 stacks, 256 ch; decoder softargmax),

it measures per-face latency (batch 1) and throughput (batch ``--batch``, faces/s), both on ONE thread
(``torch.set_num_threads(1)``, onnxruntime ``intra_op_num_threads=1``). torch and onnxruntime runs are
interleaved repetition by repetition, so load from other processes hits both alike; the median is reported
and the ratio onnxruntime/torch is of the medians (< 1: onnxruntime is faster). The torch timing is
``Predictor.predict_batch`` (forward + decode + copy to numpy), the onnxruntime one ``OnnxLandmarks.predict_batch``.
OpenCV's Haar face detection (``flare.platform.predictor.detect_faces``) is timed separately, per image,
on a real 300W image when ``FLARE_TEST_DATA`` is set (else a synthetic 640x480 image).

Usage: ``python bench/predict.py [--only small|paper] [--reps N] [--batch B] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from flare.models.layouts import get_layout
from flare.platform.builders import build_model
from flare.platform.config import load_job
from flare.platform.export import export_onnx_bytes
from flare.platform.onnx_backend import OnnxLandmarks
from flare.platform.predictor import Predictor, detect_faces

JOBS = Path(__file__).resolve().parents[1] / "jobs"
SPECS = {"small": ("300w_small_rwsa.yaml", "argmax_refine"), "paper": ("300w_star.yaml", "softargmax")}


def _predictor(spec: str, decoder: str) -> Predictor:
    job = load_job(JOBS / spec)
    layout = get_layout(job.model.layout)
    torch.manual_seed(0)
    return Predictor.from_job(build_model(job, layout).eval(), job, layout, decoder)


def _interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds per call of each function, calls alternating between them (one warm-up each)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_spec(name: str, reps: int, batch: int) -> list[str]:
    spec, decoder = SPECS[name]
    predictor = _predictor(spec, decoder)
    t0 = time.perf_counter()
    runtime = OnnxLandmarks(export_onnx_bytes(predictor), threads=1)
    export_s = time.perf_counter() - t0
    size = predictor.input_size
    gen = torch.Generator().manual_seed(0)
    x1 = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
    xb = torch.rand(batch, 3, size, size, generator=gen) * 2 - 1
    diff = float(np.abs(runtime.predict_batch(xb) - predictor.predict_batch(xb)).max())
    lat = _interleaved({"torch": lambda: predictor.predict_batch(x1), "onnx": lambda: runtime.predict_batch(x1)},
                       reps)
    thr = _interleaved({"torch": lambda: predictor.predict_batch(xb), "onnx": lambda: runtime.predict_batch(xb)},
                       max(2, reps // 4))
    label = f"{name} ({spec}, {size} px, {predictor.job.model.stacks} stacks, {decoder})"
    head = f"{label}: export {export_s:.1f} s, max |onnx - torch| = {diff:.2e} crop px on batch {batch}"
    return [head,
            _row("per-face latency, batch 1 (ms)", 1e3 * lat["torch"], 1e3 * lat["onnx"], lat["onnx"] / lat["torch"]),
            _row(f"throughput, batch {batch} (faces/s)", batch / thr["torch"], batch / thr["onnx"],
                 thr["onnx"] / thr["torch"])]


def _row(what: str, torch_value: float, onnx_value: float, ratio: float) -> str:
    return f"  {what:<34} {torch_value:>10.1f} {onnx_value:>10.1f} {ratio:>10.2f}"


def bench_haar(reps: int) -> str:
    root = os.environ.get("FLARE_TEST_DATA")
    paths = sorted((Path(root) / "300W" / "afw").glob("*.jpg"))[:1] if root else []
    if paths:
        image, what = cv2.imread(str(paths[0])), f"300W {paths[0].name}"
    else:
        image, what = np.random.default_rng(0).integers(0, 255, (480, 640, 3), np.uint8), "synthetic"
    t = _interleaved({"haar": lambda: detect_faces(image)}, reps)["haar"]
    faces = len(detect_faces(image))
    return (f"OpenCV Haar detection (1 thread), {what} {image.shape[1]}x{image.shape[0]}: "
            f"{1e3 * t:.1f} ms per image, {faces} face(s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SPECS))
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    title = (f"flare inference on CPU, 1 thread: torch {torch.__version__} eager vs onnxruntime "
             f"{onnxruntime.__version__} ({cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start)")
    lines = [title, f"  {'':<34} {'torch':>10} {'onnxrt':>10} {'ort/torch':>10}",
             "  (ort/torch: per-face time ratio for latency; time-per-batch ratio for throughput; < 1 = onnxrt faster)"]
    print("\n".join(lines), flush=True)
    for name in [args.only] if args.only else list(SPECS):
        rows = bench_spec(name, args.reps, args.batch)
        print("\n".join(rows), flush=True)
        lines += rows
    lines.append(bench_haar(args.reps))
    print(lines[-1])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
