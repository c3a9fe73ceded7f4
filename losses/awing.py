"""Adaptive Wing loss for the AAM point/edge heads (method.md 4.8) and the optional distribution
regulariser of the STAR ablations (JS divergence to a Gaussian, method.md 4.11)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SUM_EPS = 1e-6  # sum-normalisation floor, method.md 4.1
LOG_FLOOR = 1e-12  # keeps 0 * log(0) finite in value and gradient


def awing_loss(pred: Tensor, target: Tensor, omega: float = 14.0, theta: float = 0.5, epsilon: float = 1.0,
               alpha: float = 2.1, weight: float = 10.0, weight_threshold: float = 0.2) -> Tensor:
    """AWing of method.md 4.8 [SC], a scalar: mean over all B x C x h x w elements of M_w * AW(|pred - y|, y).

    AW = omega * ln(1 + (d/eps)^(alpha - y)) for d < theta, else A*d - C, with A, C making it C^1 at theta.
    Weight map M_w = 1 + weight * [maxpool3x3,stride 1,pad 1(y) >= weight_threshold]. Computed in fp32.
    """
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"pred and target must both be (B, C, h, w), got {tuple(pred.shape)}, {tuple(target.shape)}")
    pred, y = pred.float(), target.float()
    delta = (pred - y).abs()
    power = alpha - y
    ratio = theta / epsilon
    a = omega * power * ratio ** (power - 1.0) / (epsilon * (1.0 + ratio**power))
    c = theta * a - omega * torch.log1p(ratio**power)
    inner = omega * torch.log1p((delta / epsilon) ** power)
    loss = torch.where(delta < theta, inner, a * delta - c)
    dilated = F.max_pool2d(y, kernel_size=3, stride=1, padding=1)
    weight_map = 1.0 + weight * (dilated >= weight_threshold).to(loss.dtype)
    return (weight_map * loss).mean()


def gaussian_targets(targets: Tensor, h: int, w: int, sigma: float = 1.0) -> Tensor:
    """Sum-normalised Gaussians (B, N, h, w) of ``sigma`` heatmap px centred at normalised labels
    ``targets`` (B, N, 2), placed on the align-corners grid: centre (u + 1)(size - 1)/2 (method.md 1.3)."""
    u = targets.float()
    cx = (u[..., 0] + 1.0) * (w - 1) / 2.0
    cy = (u[..., 1] + 1.0) * (h - 1) / 2.0
    cols = torch.arange(w, device=u.device, dtype=u.dtype)
    rows = torch.arange(h, device=u.device, dtype=u.dtype)
    dx2 = (cols - cx[..., None]) ** 2  # (B, N, w)
    dy2 = (rows - cy[..., None]) ** 2  # (B, N, h)
    logits = -(dy2[..., :, None] + dx2[..., None, :]) / (2.0 * sigma * sigma)
    return torch.softmax(logits.flatten(-2), dim=-1).view(*u.shape[:-1], h, w)


def js_gaussian_regulariser(heatmaps: Tensor, targets: Tensor, sigma: float = 1.0) -> Tensor:
    """Distribution regularisation (STAR ablation "DR", method.md 4.11): mean over (B, N) of the
    Jensen-Shannon divergence (nats) between P = F / max(sum F, 1e-6) (4.1) and a Gaussian Q of ``sigma``
    heatmap px centred at the normalised target (B, N, 2). Expects F >= 0; computed in fp32."""
    if heatmaps.ndim != 4 or targets.shape != (*heatmaps.shape[:2], 2):
        raise ValueError(f"need heatmaps (B, N, h, w) and targets (B, N, 2), got {tuple(heatmaps.shape)}, "
                         f"{tuple(targets.shape)}")
    f = heatmaps.float().flatten(-2)
    p = f / f.sum(-1, keepdim=True).clamp_min(SUM_EPS)
    q = gaussian_targets(targets, heatmaps.shape[-2], heatmaps.shape[-1], sigma).flatten(-2)
    log_m = torch.log((0.5 * (p + q)).clamp_min(LOG_FLOOR))
    kl_p = (p * (torch.log(p.clamp_min(LOG_FLOOR)) - log_m)).sum(-1)
    kl_q = (q * (torch.log(q.clamp_min(LOG_FLOOR)) - log_m)).sum(-1)
    return (0.5 * (kl_p + kl_q)).mean()
