"""Per-landmark uncertainty read from the heatmaps: mean, 2×2 covariance and a confidence (STAR Fig. 3/7).

Each map F_n of (B, N, h, w) is read as a distribution P_n over the heatmap cells:

- ``"normalised"`` (STAR and the other non-negative maps): P = F / max(ΣF, 1e-6), STAR Eq. 1 (method.md 4.1);
- ``"softmax"`` (RwSA's signed scores): P = softmax(F / ε) with the model's ε (``objective.rwsa.epsilon``), the
  distribution inside RwSA's log-sum-exp (method.md 5.2); a sum normalisation is undefined on signed scores (5.9).

Mean and covariance are STAR's on P: μ = Σ P g (Eq. 1) and the unbiased weighted covariance Σ = C / (V1 − V2/V1)
(Eq. 3-4, "we commonly use Σ = Σ_ub"; method.md 4.2-4.3), computed by :func:`flare.losses.star.weighted_moments`.
Σ exceeds P's plain second moment C by 1/(1 − ΣP²): about 3.5% for a σ = 1.5 px blob. Both are returned in
HEATMAP PX (x, y), on the "corners" grid the decoders use (method.md 1.3): j = (g + 1)(w − 1)/2.

Confidence: the probability mass of P on the cells whose centres lie within ``radius`` heatmap px of μ (default
3 px, 12 crop px at S = 256, w = 64), in [0, 1]; for a Gaussian blob of std σ it is about 1 − exp(−r²/2σ²).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from flare.losses.star import weighted_moments
from flare.models.decode import label_to_grid_index

DISTRIBUTIONS = ("normalised", "softmax")
CONFIDENCE_RADIUS = 3.0  # heatmap px
_MASS_EPS = 1e-6  # max(ΣF, 1e-6), STAR's normalisation (method.md 4.1)


class Uncertainty(NamedTuple):
    """``mean`` (B, N, 2) heatmap px (x, y); ``cov`` (B, N, 2, 2) heatmap px²; ``confidence`` (B, N) in [0, 1]."""

    mean: torch.Tensor
    cov: torch.Tensor
    confidence: torch.Tensor


def distribution_for(objective: str | None, decoder: str) -> str:
    """The distribution a model's maps stand for: ``"softmax"`` for RwSA's scores, ``"normalised"`` for the
    other objectives; with the objective unknown, by decoder (soft-argmax reads non-negative maps, 5.9)."""
    if objective is not None:
        return "softmax" if objective == "rwsa" else "normalised"
    return "normalised" if decoder == "softargmax" else "softmax"


def landmark_distribution(maps: torch.Tensor, distribution: str, epsilon: float = 1.0) -> torch.Tensor:
    """(B, N, h, w) maps -> P (B, N, h, w), each map summing to 1 (0 for an all-zero normalised map)."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; known: {', '.join(DISTRIBUTIONS)}")
    if maps.ndim != 4:
        raise ValueError(f"maps must have shape (B, N, h, w), got {tuple(maps.shape)}")
    f = maps if maps.dtype == torch.float64 else maps.float()
    if distribution == "softmax":
        if not epsilon > 0:
            raise ValueError(f"epsilon must be positive, got {epsilon!r}")
        return torch.softmax(f.flatten(-2) / epsilon, dim=-1).view_as(f)
    f = f / f.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1.0)  # P is scale-invariant; sums never overflow
    return f / f.sum(dim=(-2, -1), keepdim=True).clamp_min(_MASS_EPS)


def heatmap_uncertainty(maps: torch.Tensor, distribution: str, epsilon: float = 1.0,
                        radius: float = CONFIDENCE_RADIUS) -> Uncertainty:
    """Mean, STAR covariance (Eq. 1, 3-4) and confidence of every map, in heatmap px (see the module docstring)."""
    if not radius > 0:
        raise ValueError(f"radius must be positive, got {radius!r}")
    p = landmark_distribution(maps, distribution, epsilon)
    h, w = p.shape[-2:]
    if h < 2 or w < 2:
        raise ValueError(f"maps must be at least 2x2, got {h}x{w}")
    mu_g, cov_g = weighted_moments(p)  # normalised grid units
    scale = torch.tensor([(w - 1) / 2.0, (h - 1) / 2.0], dtype=p.dtype, device=p.device)
    mean = torch.stack((label_to_grid_index(mu_g[..., 0], w, "corners"),
                        label_to_grid_index(mu_g[..., 1], h, "corners")), dim=-1)
    cov = cov_g * scale[:, None] * scale[None, :]
    dx = torch.arange(w, dtype=p.dtype, device=p.device) - mean[..., 0, None]  # (B, N, w)
    dy = torch.arange(h, dtype=p.dtype, device=p.device) - mean[..., 1, None]  # (B, N, h)
    inside = dy[..., :, None] ** 2 + dx[..., None, :] ** 2 <= radius * radius
    confidence = (p * inside).sum(dim=(-2, -1)).clamp(0.0, 1.0)
    return Uncertainty(mean, cov, confidence)


def heatmap_to_crop_linear(h: int, w: int, size: int) -> np.ndarray:
    """The linear part (2, 2) of heatmap px -> crop px on the decoders' grid: p = S·j/(w − 1) − 0.5 (1.4)."""
    return np.diag([size / (w - 1.0), size / (h - 1.0)])


def transform_covariance(cov: np.ndarray, linear: np.ndarray) -> np.ndarray:
    """Σ' = A Σ Aᵀ for covariances (..., 2, 2) under the affine map whose linear part is A (..., 2, 2)."""
    a = np.asarray(linear, np.float64)
    out = a @ np.asarray(cov, np.float64) @ np.swapaxes(a, -1, -2)
    return 0.5 * (out + np.swapaxes(out, -1, -2))  # exactly symmetric


def covariance_to_original(cov_hm: np.ndarray, h: int, w: int, size: int,
                           to_original: np.ndarray | None = None) -> np.ndarray:
    """Heatmap px² (B, N, 2, 2) -> crop px² (``to_original`` None) or original px² through the crop -> original
    matrices (B, 3, 3): Σ = A Σ_hm Aᵀ, A = L·diag(S/(w − 1), S/(h − 1)), L the matrices' linear part (1.4)."""
    linear = heatmap_to_crop_linear(h, w, size)
    if to_original is not None:
        linear = np.asarray(to_original, np.float64)[:, None, :2, :2] @ linear
    return transform_covariance(cov_hm, linear)


def describe(distribution: str, epsilon: float, radius: float = CONFIDENCE_RADIUS) -> dict[str, Any]:
    """What the covariance and confidence fields mean, for a JSON record."""
    formula = (f"P = softmax(F / epsilon), epsilon = {epsilon:g} (RwSA signed scores)" if distribution == "softmax"
               else "P = F / sum(F) (STAR Eq. 1, non-negative maps)")
    return {"distribution": distribution, "formula": formula,
            "covariance": "STAR Eq. 3-4 unbiased weighted covariance of P, original image px^2, (x, y)",
            "confidence": f"mass of P within {radius:g} heatmap px of its mean"}
