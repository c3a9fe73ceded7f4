"""RwSA landmark loss: loss-augmented log-sum-exp over heatmap pixels (method.md section 5).

Per landmark (5.2, 5.6):  l_n = eps * LSE_p[(H_n[p] + alpha * Delta(y_n, p)) / eps] - sum_p q_n[p] * H_n[p],
with q_n the (smoothed) target distribution over pixels. Computed in the stable form of 5.7 in fp32.

Frames (method.md 1.1, 1.3): landmark targets are normalised labels u in [-1, 1]; samples and splats are in
heatmap pixels (x = column, y = row); the heatmap grid is g_j = 2j/(w - 1) - 1 ("align_corners=True").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MARGINS = ("smoothl1", "l1", "l2")
MARGIN_UNITS = ("normalised", "heatmap_px")
TARGETS = ("bilinear", "nearest")
REDUCTIONS = ("pixel_mean", "landmark_mean")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def grid_coordinates(h: int, w: int, device: torch.device | None = None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """Heatmap grid g (method.md 1.1) in row-major pixel order: (h*w, 2) with x = 2j/(w-1) - 1 from the
    column j and y = 2i/(h-1) - 1 from the row i (align-corners at the heatmap size)."""
    if h < 2 or w < 2:
        raise ValueError(f"heatmap must be at least 2x2, got {h}x{w}")
    gx = torch.linspace(-1.0, 1.0, w, device=device, dtype=dtype)
    gy = torch.linspace(-1.0, 1.0, h, device=device, dtype=dtype)
    yy, xx = torch.meshgrid(gy, gx, indexing="ij")
    return torch.stack((xx.reshape(-1), yy.reshape(-1)), dim=-1)


def normalised_to_heatmap_px(u: Tensor, h: int, w: int) -> Tensor:
    """Normalised label u (..., 2) -> heatmap px y_hm = (u + 1)(size - 1)/2 per axis (method.md 1.3, 5.6)."""
    # per-axis Python scalars, not a tensor made from a list: that would be a host-to-device copy every step
    return torch.stack(((u[..., 0] + 1.0) * ((w - 1) / 2.0), (u[..., 1] + 1.0) * ((h - 1) / 2.0)), dim=-1)


def margin_map(targets: Tensor, h: int, w: int, kind: str = "smoothl1", units: str = "normalised",
               s: float = 0.01) -> Tensor:
    """Margin Delta(y_n, p) of method.md 5.4 for every pixel p: (B, N, 2) normalised targets -> (B, N, h*w).

    kind: "smoothl1" (smooth-L1 with threshold ``s`` of the Euclidean norm), "l1" (|dx| + |dy|) or "l2"
    (squared norm). units: "normalised" (grid coordinates g) or "heatmap_px"; ``s`` is in the chosen units.
    Always measured from the annotated target (5.4), never from smoothing samples.
    """
    _check_choice("margin", kind, MARGINS)
    _check_choice("margin_units", units, MARGIN_UNITS)
    if s <= 0:
        raise ValueError(f"smooth-L1 threshold s must be > 0, got {s}")
    b, n, _ = targets.shape
    if units == "heatmap_px":
        targets = normalised_to_heatmap_px(targets, h, w)
        gx = torch.arange(w, device=targets.device, dtype=targets.dtype)
        gy = torch.arange(h, device=targets.device, dtype=targets.dtype)
    else:
        gx = torch.linspace(-1.0, 1.0, w, device=targets.device, dtype=targets.dtype)
        gy = torch.linspace(-1.0, 1.0, h, device=targets.device, dtype=targets.dtype)
    dx = (targets[..., 0:1] - gx)[:, :, None, :]  # (B, N, 1, w): separable, no (B, N, h*w, 2) temporary
    dy = (targets[..., 1:2] - gy)[:, :, :, None]  # (B, N, h, 1)
    if kind == "l1":
        return (dx.abs() + dy.abs()).reshape(b, n, h * w)
    d2 = (dx * dx + dy * dy).reshape(b, n, h * w)
    if kind == "l2":
        return d2
    # smooth-L1 of the norm: d^2/(2s) if d < s else d - s/2; sqrt on the linear branch only (finite grad).
    lin = torch.sqrt(d2.clamp_min(s * s)) - 0.5 * s
    return torch.where(d2 < s * s, d2 / (2.0 * s), lin)


def bilinear_splat(points_hm: Tensor, h: int, w: int) -> Tensor:
    """Mean over S of bilinear unit-mass splats (method.md 5.6): (B, N, S, 2) heatmap px -> (B, N, h*w).

    Each point (clipped to [0, w-1] x [0, h-1]) spreads mass 1 over its 4 neighbouring pixel centres, so
    sum_p q[p] * H[p] is the bilinear interpolation of H at the point."""
    b, n, s, _ = points_hm.shape
    x = points_hm[..., 0].clamp(0.0, w - 1.0)
    y = points_hm[..., 1].clamp(0.0, h - 1.0)
    x0 = x.detach().floor().clamp(max=w - 2)
    y0 = y.detach().floor().clamp(max=h - 2)
    fx, fy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    idx = torch.stack((y0 * w + x0, y0 * w + x0 + 1, (y0 + 1) * w + x0, (y0 + 1) * w + x0 + 1), dim=-1)
    wts = torch.stack(((1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy), dim=-1) / s
    out = points_hm.new_zeros(b, n, h * w)
    return out.scatter_add(2, idx.reshape(b, n, s * 4), wts.reshape(b, n, s * 4))


def nearest_splat(points_hm: Tensor, h: int, w: int) -> Tensor:
    """Mean over S of one-hot splats at the rounded point (method.md 5.6 "nearest"): (B,N,S,2) -> (B,N,hw)."""
    b, n, s, _ = points_hm.shape
    x = points_hm[..., 0].detach().clamp(0.0, w - 1.0).round().long()
    y = points_hm[..., 1].detach().clamp(0.0, h - 1.0).round().long()
    out = points_hm.new_zeros(b, n, h * w)
    src = points_hm.new_full((b, n, s), 1.0 / s)
    return out.scatter_add(2, y * w + x, src)


def rwsa_from_distribution(heatmaps: Tensor, q: Tensor, delta: Tensor, alpha: float = 1.0,
                           epsilon: float = 1.0) -> Tensor:
    """Stable RwSA loss of method.md 5.7 for an explicit target distribution.

    heatmaps (B, N, h, w) raw scores, q (B, N, h*w) with sum_p q = 1, delta (B, N, h*w) margin.
    Returns (B, N) fp32: -eps * sum_p q_p log_softmax(z)_p + alpha * sum_p q_p Delta_p with
    z = (H + alpha*Delta)/eps, which equals eps * LSE(z) - E_q[H] exactly when sum_p q = 1."""
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    b, n, h, w = heatmaps.shape
    with torch.autocast(device_type=heatmaps.device.type, enabled=False):
        scores = heatmaps.float().reshape(b, n, h * w)
        q = q.float()
        delta = delta.float()
        z = (scores + alpha * delta) / epsilon
        ce = -(q * F.log_softmax(z, dim=-1)).sum(-1)
        return epsilon * ce + alpha * (q * delta).sum(-1)


def rwsa_per_landmark(heatmaps: Tensor, targets: Tensor, samples: Tensor | None = None, alpha: float = 1.0,
                      epsilon: float = 1.0, margin: str = "smoothl1", margin_units: str = "normalised",
                      target: str = "bilinear") -> Tensor:
    """Per-landmark RwSA loss l (B, N) of method.md 5.2/5.6/5.7.

    heatmaps (B, N, h, w) raw scores; targets (B, N, 2) normalised labels in [-1, 1] (margin origin and,
    without samples, the target); samples (B, N, S, 2) in HEATMAP PX (label-smoothing draws, section 6)
    or None.
    target: "bilinear" or "nearest" splat of the target point(s) into q."""
    _check_choice("target", target, TARGETS)
    if heatmaps.dim() != 4:
        raise ValueError(f"heatmaps must be (B, N, h, w), got shape {tuple(heatmaps.shape)}")
    b, n, h, w = heatmaps.shape
    if targets.shape != (b, n, 2):
        raise ValueError(f"targets must be {(b, n, 2)}, got {tuple(targets.shape)}")
    if samples is not None and (samples.dim() != 4 or samples.shape[:2] != (b, n) or samples.shape[-1] != 2):
        raise ValueError(f"samples must be ({b}, {n}, S, 2), got {tuple(samples.shape)}")
    targets = targets.detach().float()
    delta = margin_map(targets, h, w, kind=margin, units=margin_units)
    if samples is None:
        points = normalised_to_heatmap_px(targets, h, w)[:, :, None, :]
    else:
        points = samples.detach().float()
    splat = bilinear_splat if target == "bilinear" else nearest_splat
    q = splat(points, h, w)
    return rwsa_from_distribution(heatmaps, q, delta, alpha=alpha, epsilon=epsilon)


class RWSALoss(nn.Module):
    """RwSA loss on one stack's heatmaps with reduction R of method.md 5.8.

    reduction "pixel_mean": sum_{b,n} l / (B*N*h*w) (default); "landmark_mean": mean over (b, n).
    forward(heatmaps (B,N,h,w), targets (B,N,2) normalised, samples (B,N,S,2) heatmap px | None)
    -> scalar fp32.
    """

    def __init__(self, alpha: float = 1.0, epsilon: float = 1.0, margin: str = "smoothl1",
                 margin_units: str = "normalised", reduction: str = "pixel_mean", target: str = "bilinear"):
        super().__init__()
        if epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        _check_choice("margin", margin, MARGINS)
        _check_choice("margin_units", margin_units, MARGIN_UNITS)
        _check_choice("reduction", reduction, REDUCTIONS)
        _check_choice("target", target, TARGETS)
        self.alpha, self.epsilon = float(alpha), float(epsilon)
        self.margin, self.margin_units = margin, margin_units
        self.reduction, self.target = reduction, target

    def forward(self, heatmaps: Tensor, targets: Tensor, samples: Tensor | None = None) -> Tensor:
        per = rwsa_per_landmark(heatmaps, targets, samples, alpha=self.alpha, epsilon=self.epsilon,
                                margin=self.margin, margin_units=self.margin_units, target=self.target)
        if self.reduction == "landmark_mean":
            return per.mean()
        return per.mean() / (heatmaps.shape[-2] * heatmaps.shape[-1])

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, epsilon={self.epsilon}, margin={self.margin!r}, "
                f"margin_units={self.margin_units!r}, reduction={self.reduction!r}, target={self.target!r}")
