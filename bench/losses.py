"""Forward+backward timing of the STAR loss (method.md §4) at B=32, N=98, 64×64.

Compares (a) a naive official-style STAR formulation written here (full (B·N, 2, H·W) covariance products,
``torch.linalg.eigh`` on the CPU in every call, row-indexed eigenvectors), (b) ``flare.losses.star.STARLoss``
(closed-form eigendecomposition on the device) and (c) ``flare.losses.rwsa.RWSALoss`` when importable.
Usage: ``python bench/losses.py [--reps N] [--warmup N] [--threads N]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from flare.losses.star import STARLoss, weighted_moments

B, N, H, W = 32, 98, 64, 64


def naive_star(heatmap: Tensor, gt: Tensor, w: float = 1.0, s: float = 0.01) -> Tensor:
    """Official-style STAR v2 with smooth-L1 (same formula as flare's default, eig clamp [1e-6, 1e2])."""
    bs, npts, h, wd = heatmap.shape
    heatmap = heatmap / torch.clamp(heatmap.sum([2, 3]), min=1e-6).view(bs, npts, 1, 1)
    yy, xx = torch.meshgrid(
        torch.arange(h, device=heatmap.device).float() / (h - 1) * 2 - 1,
        torch.arange(wd, device=heatmap.device).float() / (wd - 1) * 2 - 1,
        indexing="ij",
    )
    means = torch.stack([(xx * heatmap).sum([2, 3]), (yy * heatmap).sum([2, 3])], dim=-1)
    xv = (xx - means[..., 0].view(bs, npts, 1, 1)).reshape(bs * npts, 1, h * wd)
    yv = (yy - means[..., 1].view(bs, npts, 1, 1)).reshape(bs * npts, 1, h * wd)
    vec = torch.cat((xv, yv), 1)  # (B·N, 2, H·W)
    htp = heatmap.reshape(bs * npts, 1, h * wd).expand(-1, 2, -1)
    cov = torch.bmm(htp * vec, vec.transpose(1, 2)).view(bs, npts, 2, 2)
    v1 = heatmap.sum([2, 3]) + 1e-5
    v2 = heatmap.pow(2).sum([2, 3]) + 1e-5
    cov = cov / (v1 - v2 / v1).view(bs, npts, 1, 1)
    evalues, evectors = _eigh_on_cpu(cov)
    err = gt - means
    normal, tangent = evectors[:, :, 0], evectors[:, :, 1]  # ROWS, as in the official code
    e = torch.stack(((normal * err).sum(-1), (tangent * err).sum(-1)), dim=-1)
    d2 = e.pow(2)
    dist = torch.where(d2 < s * s, 0.5 / s * d2, d2.clamp(min=1e-6).sqrt() - 0.5 * s)
    trans = (dist / torch.sqrt(evalues.clamp(1e-6, 1e2) + 1e-5)).sum(-1)
    return (trans + w * evalues.abs().sum(-1)).mean()


def _eigh_on_cpu(cov: Tensor) -> tuple[Tensor, Tensor]:
    bs, npts = cov.shape[:2]
    evalues, evectors = torch.linalg.eigh(cov.reshape(bs * npts, 2, 2).cpu())
    return evalues.view(bs, npts, 2).to(cov), evectors.view(bs, npts, 2, 2).to(cov)


def make_inputs(device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random anisotropic Gaussian heatmaps (B, N, H, W) and normalised targets near their centres."""
    gen = torch.Generator().manual_seed(seed)
    centre = (torch.rand(B, N, 2, generator=gen) - 0.5) * 1.4
    sig = (1.0 + 2.5 * torch.rand(B, N, 2, generator=gen)) * (2.0 / (W - 1))
    ang = math.pi * torch.rand(B, N, generator=gen)
    c, s = torch.cos(ang), torch.sin(ang)
    g = torch.linspace(-1, 1, W)
    yy, xx = torch.meshgrid(g, g, indexing="ij")
    dx = xx - centre[..., 0, None, None]
    dy = yy - centre[..., 1, None, None]
    p = (c[..., None, None] * dx + s[..., None, None] * dy) / sig[..., 0, None, None]
    q = (-s[..., None, None] * dx + c[..., None, None] * dy) / sig[..., 1, None, None]
    heat = torch.exp(-0.5 * (p * p + q * q)) + 1e-3 * torch.rand(B, N, H, W, generator=gen)
    targets = (centre + 0.03 * torch.randn(B, N, 2, generator=gen)).clamp(-1, 1)
    return heat.to(device), targets.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int) -> float:
    """Median wall time in ms of ``fn`` over ``reps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fwd_bwd(loss_fn: Callable[[Tensor, Tensor], Tensor], heat: Tensor, tgt: Tensor) -> Callable[[], Tensor]:
    x = heat.detach().clone().requires_grad_(True)

    def step() -> Tensor:
        (grad,) = torch.autograd.grad(loss_fn(x, tgt), x)
        return grad

    return step


def eigh_stage(heat: Tensor) -> Callable[[], Tensor]:
    """The naive formulation's eigendecomposition step alone (host round trip, eigh, backward)."""
    with torch.no_grad():
        _, cov = weighted_moments(heat)
    cov = cov.requires_grad_(True)
    wts = torch.arange(1.0, 7.0, device=heat.device)

    def step() -> Tensor:
        lam, vec = _eigh_on_cpu(cov)
        out = (lam * wts[:2]).sum() + (vec.flatten(-2) * wts[2:]).sum()
        (grad,) = torch.autograd.grad(out, cov)
        return grad

    return step


def rwsa_loss() -> Callable[[Tensor, Tensor], Tensor] | None:
    try:
        from flare.losses.rwsa import RWSALoss
    except ImportError:
        return None
    return RWSALoss()


def bench_device(device: torch.device, reps: int, warmup: int) -> None:
    heat, tgt = make_inputs(device)
    star = STARLoss()
    with torch.no_grad():
        v_naive = naive_star(heat, tgt).item()
        v_ours = star(heat, tgt).item()
    rel = abs(v_naive - v_ours) / abs(v_naive)
    print(f"[{device.type}] B={B} N={N} {H}x{W}: value naive={v_naive:.9g} ours={v_ours:.9g} rel.diff={rel:.2e}")
    assert rel <= 1e-4, f"naive and STARLoss disagree: rel. diff {rel:.2e} > 1e-4"

    t_naive = time_ms(fwd_bwd(naive_star, heat, tgt), device, reps, warmup)
    t_ours = time_ms(fwd_bwd(star, heat, tgt), device, reps, warmup)
    t_eigh = time_ms(eigh_stage(heat), device, reps, warmup)
    print(f"[{device.type}] fwd+bwd median of {reps}: naive STAR {t_naive:.2f} ms | STARLoss {t_ours:.2f} ms")
    print(f"[{device.type}] naive/ours = {t_naive / t_ours:.2f}x; eigh stage {t_eigh:.2f} ms "
          f"= {t_eigh / t_naive:.1%} of naive")

    rwsa = rwsa_loss()
    if rwsa is None:
        print(f"[{device.type}] RWSALoss n/a (flare.losses.rwsa not importable)")
        return
    t_rwsa = time_ms(fwd_bwd(rwsa, heat, tgt), device, reps, warmup)
    print(f"[{device.type}] RWSALoss {t_rwsa:.2f} ms; rwsa/star = {t_rwsa / t_ours:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="timed calls per loss (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up calls per loss")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    for dev in devices:
        bench_device(dev, args.reps, args.warmup)


if __name__ == "__main__":
    main()
