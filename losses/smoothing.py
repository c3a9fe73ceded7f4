"""Image-aware label smoothing of RwSA (method.md section 6; RwSA appendix A1.3).

Pipeline: E' = sharpen_5(blur_9(E)); per landmark, M_n = 0.01 * patch(E')/max + N_n (Gaussian, 5x5);
Sigma_n = weighted covariance of the patch pixel coordinates under M_n; samples y' ~ N(y, gamma * Sigma_n).
Every coordinate here is in 64-heatmap pixels (x = column, y = row), the frame of method.md 6.2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from flare.models.layouts import Layout, get_layout

_GAMMA = {"wflw98": 0.01, "300w68": 0.01, "cofw29": 0.001}  # method.md 6.1 / 5.10 [RA]


def default_gamma(layout: str | Layout) -> float:
    """Smoothing scale gamma (method.md 6.1): 0.001 for COFW-29, 0.01 for WFLW-98 and 300W-68."""
    lay = layout if isinstance(layout, Layout) else get_layout(layout)
    if lay.name not in _GAMMA:
        raise KeyError(f"no default gamma for layout {lay.name!r}")
    return _GAMMA[lay.name]


def torchvision_sigma(kernel_size: int) -> float:
    """torchvision's default sigma for a kernel size: 0.3 * ((k - 1)/2 - 1) + 0.8 (method.md 6.2)."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


def gaussian_kernel1d(kernel_size: int = 9, sigma: float | None = None, device: torch.device | None = None,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """Normalised 1-D Gaussian taps at integer offsets -k//2 .. k//2 (torchvision semantics)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    sigma = torchvision_sigma(kernel_size) if sigma is None else sigma
    half = kernel_size // 2
    x = torch.arange(-half, half + 1, device=device, dtype=dtype)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return pdf / pdf.sum()


def gaussian_blur(img: Tensor, kernel_size: int = 9, sigma: float | None = None) -> Tensor:
    """Separable Gaussian blur of (B, h, w) maps with reflect padding (torchvision ``gaussian_blur``)."""
    k1 = gaussian_kernel1d(kernel_size, sigma, img.device, img.dtype)
    half = kernel_size // 2
    x = F.pad(img[:, None], (half, half, half, half), mode="reflect")
    x = F.conv2d(x, k1.view(1, 1, 1, -1))
    x = F.conv2d(x, k1.view(1, 1, -1, 1))
    return x[:, 0]


def sharpen(img: Tensor, factor: float = 5.0) -> Tensor:
    """torchvision ``adjust_sharpness`` on float (B, h, w) maps in [0, 1] (method.md 6.2):
    clamp(f*x + (1-f)*x~, 0, 1), x~ = x * [[1,1,1],[1,5,1],[1,1,1]]/13 inside, x~ = x on the 1-px border."""
    if img.shape[-1] <= 2 or img.shape[-2] <= 2:
        return img
    kernel = img.new_tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    inner = F.conv2d(img[:, None], kernel.view(1, 1, 3, 3))[:, 0]
    degenerate = img.clone()
    degenerate[:, 1:-1, 1:-1] = inner
    return (factor * img + (1.0 - factor) * degenerate).clamp(0.0, 1.0)


def blur_sharpen(edge: Tensor, kernel_size: int = 9, sigma: float | None = None,
                 factor: float = 5.0) -> Tensor:
    """E' = sharpness(GaussianBlur(E, 9, sigma 1.7), 5) of method.md 6.1-6.2: (B, h, w) -> (B, h, w)."""
    return sharpen(gaussian_blur(edge, kernel_size, sigma), factor)


def landmark_covariance(edge: Tensor, points_hm: Tensor, k: int = 7, sigma_n: float = 1.1,
                        edge_weight: float = 0.01, unbiased: bool = True, refine: bool = True) -> Tensor:
    """Covariance Sigma_{M_n} (B, N, 2, 2) in heatmap px² of method.md 6.3.

    edge (B, h, w): single-channel edge map E in [0, 1] (the caller takes the max over boundary channels);
    ``refine`` applies :func:`blur_sharpen` first (set False if ``edge`` is already E').
    points_hm (B, N, 2): landmarks in heatmap px. Patch (2k+1)² around c = round(y), zero-padded outside
    the map, normalised to max 1 (0 if empty); N_n = exp(-|x - y|²/(2 sigma_n²)) on the 5x5 pixels around c
    (defined on the patch even where it leaves the map), normalised to max 1; M_n = edge_weight * patch + N_n.
    Weighted covariance about the weighted mean, with STAR's unbiased divisor V1 - V2/V1 (method.md 4.3)
    if ``unbiased``.
    """
    if k < 2:
        raise ValueError(f"k must be >= 2 so that the 5x5 Gaussian fits in the patch, got {k}")
    bad_pts = points_hm.dim() != 3 or points_hm.shape[-1] != 2 or points_hm.shape[0] != edge.shape[0]
    if edge.dim() != 3 or bad_pts:
        raise ValueError(f"edge must be (B, h, w) and points (B, N, 2); got {tuple(edge.shape)}, "
                         f"{tuple(points_hm.shape)}")
    b, h, w = edge.shape
    n = points_hm.shape[1]
    dtype = torch.float32 if edge.dtype in (torch.float16, torch.bfloat16) else edge.dtype
    edge = edge.detach().to(dtype)
    pts = points_hm.detach().to(dtype)
    if refine:
        edge = blur_sharpen(edge)

    off = torch.arange(-k, k + 1, device=edge.device)
    oy, ox = torch.meshgrid(off, off, indexing="ij")
    ox, oy = ox.reshape(-1), oy.reshape(-1)  # (K²,), row-major patch order
    c = pts.round().long()  # (B, N, 2)
    ix = c[..., 0:1] + ox  # (B, N, K²)
    iy = c[..., 1:2] + oy
    inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    flat = (iy.clamp(0, h - 1) * w + ix.clamp(0, w - 1)).reshape(b, -1)
    patch = torch.gather(edge.reshape(b, -1), 1, flat).reshape(b, n, -1) * inside
    peak = patch.amax(-1, keepdim=True)
    patch = torch.where(peak > 0, patch / peak.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(patch))

    coords = torch.stack((ix, iy), dim=-1).to(dtype)  # (B, N, K², 2) pixel centres
    d2 = ((coords - pts[:, :, None, :]) ** 2).sum(-1)
    window = (ox.abs() <= 2) & (oy.abs() <= 2)
    gauss = torch.exp(-d2 / (2.0 * sigma_n**2)) * window
    gauss = gauss / gauss.amax(-1, keepdim=True)
    m = edge_weight * patch + gauss

    p = m / m.sum(-1, keepdim=True)
    rel = torch.stack((ox, oy), dim=-1).to(dtype)  # offsets: the covariance is translation invariant
    mu = (p[..., None] * rel).sum(-2)
    e = rel - mu[:, :, None, :]
    cov = torch.einsum("bnk,bnki,bnkj->bnij", p, e, e)
    if unbiased:
        v1 = p.sum(-1) + 1e-5
        v2 = (p * p).sum(-1) + 1e-5
        cov = cov / (v1 - v2 / v1)[..., None, None]
    return cov


def sample_smoothing(points_hm: Tensor, cov: Tensor, gamma: float = 0.01, num_samples: int = 10,
                     generator: torch.Generator | None = None, unit_factor: float = 1.0, width: int = 64,
                     height: int | None = None, jitter: float = 1e-12) -> Tensor:
    """Draw y' ~ N(y, gamma * unit_factor * Sigma) (method.md 6.3): (B,N,2), (B,N,2,2) -> (B,N,S,2) heatmap
    px, clipped to [0, width-1] x [0, height-1] (height defaults to width). Closed-form batched 2x2 Cholesky
    with a tiny diagonal ``jitter`` (heatmap px²) so that singular Sigma still samples."""
    if gamma < 0 or unit_factor <= 0 or num_samples < 1:
        raise ValueError(f"need gamma >= 0, unit_factor > 0, num_samples >= 1; got {gamma}, {unit_factor}, "
                         f"{num_samples}")
    height = width if height is None else height
    s = cov * (gamma * unit_factor)
    a = s[..., 0, 0] + jitter
    l11 = torch.sqrt(a.clamp_min(0.0))
    l21 = torch.where(l11 > 0, s[..., 1, 0] / l11.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(a))
    l22 = torch.sqrt((s[..., 1, 1] + jitter - l21 * l21).clamp_min(0.0))
    z = torch.randn(*points_hm.shape[:2], num_samples, 2, generator=generator, device=points_hm.device,
                    dtype=points_hm.dtype)
    dx = l11[..., None] * z[..., 0]
    dy = l21[..., None] * z[..., 0] + l22[..., None] * z[..., 1]
    x = (points_hm[..., None, 0] + dx).clamp(0.0, width - 1.0)
    y = (points_hm[..., None, 1] + dy).clamp(0.0, height - 1.0)
    return torch.stack((x, y), dim=-1)


def transform_covariance(cov: Tensor, a: Tensor) -> Tensor:
    """Sigma' = A Sigma A^T for the linear part A (..., 2, 2) of an affine map (method.md 6.4); broadcasts."""
    return a @ cov @ a.transpose(-1, -2)


def flip_covariance(cov: Tensor, perm: Sequence[int] | Tensor) -> Tensor:
    """Horizontal flip (method.md 6.4): A = diag(-1, 1) negates the off-diagonal, and landmarks are permuted,
    Sigma'_i = Sigma_{perm[i]} with perm the flip pairing (``layout.flip_permutation()``).
    cov (B, N, 2, 2)."""
    idx = torch.as_tensor(perm, device=cov.device, dtype=torch.long)
    sign = cov.new_tensor([[1.0, -1.0], [-1.0, 1.0]])
    return cov.index_select(1, idx) * sign


def label_smoothing_samples(edges: Tensor, points_hm: Tensor, gamma: float = 0.01, num_samples: int = 10,
                            k: int = 7, generator: torch.Generator | None = None,
                            unit_factor: float = 1.0) -> Tensor:
    """Convenience pipeline of method.md 6.3: edge channels (B, E, h, w) -> max over E -> Sigma -> samples
    (B, N, S, 2) heatmap px, ready for ``rwsa_per_landmark(..., samples=...)``."""
    edge = edges.amax(1) if edges.dim() == 4 else edges
    cov = landmark_covariance(edge, points_hm, k=k)
    return sample_smoothing(points_hm.detach().to(cov.dtype), cov, gamma=gamma, num_samples=num_samples,
                            generator=generator, unit_factor=unit_factor, width=edge.shape[-1],
                            height=edge.shape[-2])
