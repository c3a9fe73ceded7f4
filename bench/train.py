"""Training throughput and peak memory of one full train step.

A step is what ``flare.platform.train_loop.train_worker`` does per batch: forward, the job's objective (STAR,
method.md 4.8), backward, Adam step and the EMA update (``flare.platform.ema.Ema``,
4.11), on synthetic tensors of the right shapes. Cases:

- ``full``: the WFLW STAR recipe model (``jobs/wflw_star.yaml``: 98 points, 4 stacks, 256 ch, 256 px, AAM),
  plus the same step under ``torch.autograd.set_detect_anomaly(True)`` (the official code's setting);
- ``tiny``: ``jobs/tiny.yaml`` (1 stack, 64 ch, 64 px, depth 3; 300W 68 points).

On CUDA each model also runs with bf16 autocast + channels_last, with the model FLOPs utilisation
(34.7 GFLOPs per 256^2 forward, method.md 3.7; x3 for forward + backward) against ``--peak``.
Each case runs in a fresh process so that its peak memory (``ru_maxrss`` on CPU) is its own.

Usage: ``python bench/train.py [--device cpu|cuda] [--only full|tiny] [--steps N] [--warmup N]
[--batch-full B] [--batch-tiny B] [--peak FLOPS]``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

JOBS = Path(__file__).resolve().parents[1] / "jobs"
FULL_FWD_FLOPS = 34.7e9  # per 256^2 image, 2 FLOPs per MAC (method.md 3.7)
TRAIN_FLOPS_FACTOR = 3  # backward ~ 2x forward
H100_BF16_DENSE = 989e12  # H100/H200 SXM bf16 dense peak
OFFICIAL_IMG_S = 0.90  # official STAR code, full WFLW model, 256 px, batch 4, this CPU
OFFICIAL_IMG_S_ANOMALY = 0.76  # same, with its global anomaly detection on


@dataclass(frozen=True)
class Case:
    """One benchmark configuration."""

    name: str
    spec: str  # jobs/<spec>.yaml
    layout: str
    batch: int
    device: str
    steps: int
    warmup: int
    bf16_channels_last: bool = False
    anomaly: bool = False


@dataclass(frozen=True)
class Result:
    """Measured figures of one case."""

    case: Case
    images_per_s: float  # from the median step time (robust to a noisy host)
    best_images_per_s: float  # from the fastest step
    step_s: float  # median
    peak_mb: float
    base_mb: float
    cpu_share: float  # process CPU time / wall time over the timed steps (1.0 = one core busy)
    threads: int
    fwd_flops_per_image: float


def synthetic_batch(batch: int, num_points: int, groups: list[tuple[int, ...]], input_size: int,
                    device: torch.device, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random image, landmarks (B, N, 2) in [-1, 1] (0.9 margin), Gaussian point targets (B, N, h, w) of
    sigma 1.5/4 heatmap px (method.md 7.2) and edge targets (B, E, h, w) = max of each group's point maps."""
    h = input_size // 4
    image = torch.rand(batch, 3, input_size, input_size, generator=gen) * 2 - 1
    u = (torch.rand(batch, num_points, 2, generator=gen) * 2 - 1) * 0.9
    px = (u + 1) * (h - 1) / 2
    grid = torch.arange(h, dtype=torch.float32)
    gx = torch.exp(-((grid - px[..., 0, None]) ** 2) / (2 * 0.375**2))  # (B, N, w)
    gy = torch.exp(-((grid - px[..., 1, None]) ** 2) / (2 * 0.375**2))  # (B, N, h)
    points = gy[..., :, None] * gx[..., None, :]
    edges = torch.stack([points[:, list(g)].amax(dim=1) for g in groups], dim=1)
    out = {"image": image, "landmarks": u, "point_targets": points, "edge_targets": edges}
    return {k: v.to(device) for k, v in out.items()}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Counted forward FLOPs (convolutions and matmuls) of one image."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x[:1])
    return float(counter.get_total_flops())


def run_case(case: Case) -> Result:
    """Build model, objective, Adam and EMA as the training loop does; time ``case.steps`` steps."""
    from flare.models.layouts import get_layout
    from flare.platform.builders import build_model, objective_from_config
    from flare.platform.config import load_job
    from flare.platform.ema import Ema

    base_mb = _rss_mb()
    device = torch.device(case.device)
    job = load_job(JOBS / f"{case.spec}.yaml")
    layout = get_layout(case.layout)
    torch.manual_seed(0)
    model = build_model(job, layout).to(device)
    objective = objective_from_config(job.objective).to(device)
    gen = torch.Generator().manual_seed(0)
    batch = synthetic_batch(case.batch, layout.num_points, [g.indices for g in layout.groups],
                            job.data.input_size, device, gen)
    if case.bf16_channels_last:
        model = model.to(memory_format=torch.channels_last)
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    flops = forward_flops(model, batch["image"])
    ema = Ema(model, job.ema.decay)
    opt = torch.optim.Adam(model.parameters(), lr=job.optimizer.lr, betas=tuple(job.optimizer.betas))
    model.train()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.bf16_channels_last):
            outputs = model(batch["image"])
        total, _ = objective(outputs, batch)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        ema.update_parameters(model)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.autograd.set_detect_anomaly(case.anomaly):
        for _ in range(case.warmup):
            step()
        _sync(device)
        times, c0 = [], _cpu_s()
        for _ in range(case.steps):
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        cpu = _cpu_s() - c0
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _rss_mb()
    median = statistics.median(times)
    return Result(case, case.batch / median, case.batch / min(times), median, peak, base_mb, cpu / sum(times),
                  torch.get_num_threads(), flops)


def build_cases(args: argparse.Namespace) -> list[Case]:
    """The cases for ``--device`` / ``--only``; CPU keeps the full model to a handful of steps."""
    cuda = args.device == "cuda"
    steps = args.steps
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    full = {"spec": "wflw_star", "layout": "wflw98", "device": args.device, "warmup": warmup,
            "batch": args.batch_full or (32 if cuda else 4), "steps": steps or (20 if cuda else 3)}
    tiny = {"spec": "tiny", "layout": "300w68", "device": args.device, "warmup": warmup,
            "batch": args.batch_tiny or (128 if cuda else 16), "steps": steps or (50 if cuda else 10)}
    cases: list[Case] = []
    if args.only in (None, "full"):
        cases.append(Case("full fp32", **full))
        cases.append(Case("full fp32 + detect_anomaly", anomaly=True, **full))
        if cuda:
            cases.append(Case("full bf16 + channels_last", bf16_channels_last=True, **full))
    if args.only in (None, "tiny"):
        cases.append(Case("tiny fp32", **tiny))
        if cuda:
            cases.append(Case("tiny bf16 + channels_last", bf16_channels_last=True, **tiny))
    return cases


def default_peak(device: str) -> float | None:
    """bf16 dense peak FLOP/s of a known GPU (H100/H200), else None (pass ``--peak``)."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return H100_BF16_DENSE if any(k in name for k in ("H100", "H200")) else None


def report(results: list[Result], peak: float | None) -> None:
    """Print one line per case, then the comparison with the official code's CPU figures."""
    mem = "peak alloc MB" if results and results[0].case.device == "cuda" else "peak RSS MB"
    print(f"{'case':<30}{'batch':>6}{'steps':>6}{'img/s':>10}{'best':>9}{'s/step':>9}{mem:>15}"
          f"{'fwd GFLOP/img':>15}{'MFU':>8}{'CPU cores':>10}")
    for r in results:
        c = r.case
        flop = FULL_FWD_FLOPS if c.spec == "wflw_star" else r.fwd_flops_per_image
        mfu = f"{r.images_per_s * flop * TRAIN_FLOPS_FACTOR / peak:.1%}" if peak else "-"
        print(f"{c.name:<30}{c.batch:>6}{c.steps:>6}{r.images_per_s:>10.3f}{r.best_images_per_s:>9.3f}"
              f"{r.step_s:>9.3f}{r.peak_mb:>15.0f}{r.fwd_flops_per_image / 1e9:>15.2f}{mfu:>8}"
              f"{r.cpu_share:>10.2f}")
    if results:
        r0 = results[0]
        print(f"img/s from the median step, best from the fastest; device {r0.case.device}, "
              f"torch {torch.__version__}, {r0.threads} threads; process RSS before the model: "
              f"{r0.base_mb:.0f} MB; MFU uses {FULL_FWD_FLOPS / 1e9:.1f} GFLOP (method.md 3.7) for the full "
              f"model, counted FLOPs otherwise, x{TRAIN_FLOPS_FACTOR} for training, "
              f"peak {peak or 0:.3g} FLOP/s")
    by = {r.case.name: r.images_per_s for r in results}
    fp32, anom = by.get("full fp32"), by.get("full fp32 + detect_anomaly")
    if fp32 and results[0].case.device == "cpu":
        print(f"full model vs official STAR code on this CPU (batch 4): ours {fp32:.3f} img/s / "
              f"{OFFICIAL_IMG_S} = {fp32 / OFFICIAL_IMG_S:.2f}x; vs official with anomaly detection "
              f"{OFFICIAL_IMG_S_ANOMALY}: {fp32 / OFFICIAL_IMG_S_ANOMALY:.2f}x")
        if anom:
            print(f"with detect_anomaly both: ours {anom:.3f} / {OFFICIAL_IMG_S_ANOMALY} = "
                  f"{anom / OFFICIAL_IMG_S_ANOMALY:.2f}x; anomaly detection costs us {1 - anom / fp32:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", choices=("full", "tiny"), default=None)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps (default: 3 full / 10 tiny on CPU, 20 / 50 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default 1 CPU, 3 CUDA)")
    parser.add_argument("--batch-full", type=int, default=None, help="default 4 on CPU, 32 on CUDA")
    parser.add_argument("--batch-tiny", type=int, default=None, help="default 16 on CPU, 128 on CUDA")
    parser.add_argument("--peak", type=float, default=None, help="device peak FLOP/s for the MFU")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    peak = args.peak or default_peak(args.device)
    results = []
    ctx = multiprocessing.get_context("spawn")
    for case in build_cases(args):
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            results.append(pool.submit(run_case, case).result())
        r = results[-1]
        print(f"  {case.name}: {r.images_per_s:.3f} img/s", flush=True)
    report(results, peak)


if __name__ == "__main__":
    main()
