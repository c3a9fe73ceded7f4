"""Inference speed on CPU: torch eager vs onnxruntime (fp32 and int8) on the same exported graph (network + decoder).

For each spec (random seeded weights; speed does not depend on them):

- ``small``: ``jobs/300w_small_rwsa.yaml`` (128 px, 2 stacks, 128 ch; decoder argmax_refine);
- ``paper``: ``jobs/300w_star.yaml`` (256 px, 4 stacks, 256 ch; decoder softargmax),

it measures per-face latency (batch 1) and throughput (batch ``--batch``, faces/s), both on ONE thread
(``torch.set_num_threads(1)``, onnxruntime ``intra_op_num_threads=1``), for torch eager, onnxruntime on the fp32
graph and onnxruntime on the int8 graph (``flare export onnx --int8``; calibrated here on random crops, which
sets its speed, not its accuracy: ``flare eval --backend onnx`` measures that). The runs are interleaved
repetition by repetition, so load from other processes hits all alike; the median is reported and the ratios
x/torch are of the medians (< 1: x is faster). The torch timing is ``Predictor.predict_batch`` (forward +
decode + copy to numpy), the others ``OnnxLandmarks.predict_batch``.
Where the time goes: the forward pass's FLOPs, the GFLOP/s torch and onnxruntime fp32 reach at batch 1, and
onnxruntime's fp32 kernel time by op type (its profiler). Parity: the largest landmark difference between
onnxruntime fp32 and torch fp32, and of each from the same weights run in float64 by torch: the exported graph
is as exact as torch when both gaps are alike. OpenCV's Haar face detection
(``flare.platform.predictor.detect_faces``) is timed separately, per image, on a real 300W image when
``FLARE_TEST_DATA`` is set (else a synthetic 640x480 image).

Usage: ``python bench/predict.py [--only small|paper] [--reps N] [--batch B] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import copy
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
from flare.platform.quantize import quantize_int8

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
    export_bytes = export_onnx_bytes(predictor)
    runtime = OnnxLandmarks(export_bytes, threads=1)
    export_s = time.perf_counter() - t0
    size = predictor.input_size
    gen = torch.Generator().manual_seed(0)
    x1 = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
    xb = torch.rand(batch, 3, size, size, generator=gen) * 2 - 1
    calibration = (torch.rand(8, 3, size, size, generator=gen) * 2 - 1).numpy()  # speed only: random crops
    int8 = OnnxLandmarks(quantize_int8(export_bytes, calibration), threads=1)
    parity = _parity(predictor, runtime, xb)
    runs = {"torch": predictor, "onnx": runtime, "int8": int8}
    lat = _interleaved({k: lambda r=r: r.predict_batch(x1) for k, r in runs.items()}, reps)
    thr = _interleaved({k: lambda r=r: r.predict_batch(xb) for k, r in runs.items()}, max(2, reps // 4))
    label = f"{name} ({spec}, {size} px, {predictor.job.model.stacks} stacks, {decoder})"
    head = f"{label}: export {export_s:.1f} s; {parity}"
    flops = _forward_flops(predictor)
    return [head,
            _row("per-face latency, batch 1 (ms)", {k: 1e3 * v for k, v in lat.items()},
                 {k: v / lat["torch"] for k, v in lat.items()}),
            _row(f"throughput, batch {batch} (faces/s)", {k: batch / v for k, v in thr.items()},
                 {k: v / thr["torch"] for k, v in thr.items()}),
            (f"  where the time goes, batch 1: {flops / 1e9:.1f} GFLOP per face (forward); torch "
             f"{flops / lat['torch'] / 1e9:.0f} GFLOP/s, onnxruntime {flops / lat['onnx'] / 1e9:.0f} GFLOP/s; "
             f"onnxruntime's kernel time by op: {_ort_op_shares(export_bytes, x1)}")]


def _forward_flops(predictor: Predictor) -> float:
    """FLOPs (2 per multiply-add, torch's counter) of one face's forward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    size = predictor.input_size
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        predictor.model(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def _ort_op_shares(model: bytes, images: torch.Tensor, runs: int = 3, top: int = 3) -> str:
    """The ``top`` op types by share of onnxruntime's kernel time (its profiler, ``runs`` runs, 1 thread)."""
    import json
    import tempfile
    from collections import Counter

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.enable_profiling = 1, 1, True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            session.run(None, {session.get_inputs()[0].name: images.numpy()})
        events = json.loads(Path(session.end_profiling()).read_text())
    time_by_op: Counter[str] = Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            time_by_op[e["args"]["op_name"]] += e["dur"]
    total = sum(time_by_op.values()) or 1
    return ", ".join(f"{op} {100 * t / total:.0f}%" for op, t in time_by_op.most_common(top))


def _parity(predictor: Predictor, runtime: OnnxLandmarks, images: torch.Tensor) -> str:
    """Largest landmark difference (crop px) of onnxruntime from torch fp32, and of both from the same
    weights run in float64 by torch (the exact answer up to float64 rounding): how far the exported graph
    is from torch, and how far torch's own fp32 kernels are from exact."""
    onnx, torch32 = runtime.predict_batch(images), predictor.predict_batch(images)
    model = copy.deepcopy(predictor.model).double()
    with torch.no_grad():
        exact = np.asarray(predictor.decode(model(images.double())[-1].fused))

    def gap(a: np.ndarray, b: np.ndarray) -> str:
        return f"{float(np.abs(a - b).max()):.2e}"

    return (f"max |onnx - torch| = {gap(onnx, torch32)} crop px on batch {len(images)} "
            f"(from float64: onnx {gap(onnx, exact)}, torch fp32 {gap(torch32, exact)})")


def _row(what: str, values: dict[str, float], ratios: dict[str, float]) -> str:
    return (f"  {what:<34} {values['torch']:>10.1f} {values['onnx']:>10.1f} {values['int8']:>10.1f} "
            f"{ratios['onnx']:>10.2f} {ratios['int8']:>10.2f}")


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
    lines = [title, f"  {'':<34} {'torch':>10} {'onnxrt':>10} {'ort int8':>10} {'ort/torch':>10} {'int8/torch':>10}",
             "  (x/torch: per-face time ratio for latency; time-per-batch ratio for throughput; < 1 = x faster)"]
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
