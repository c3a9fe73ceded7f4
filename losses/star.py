"""STAR loss (Zhou et al., CVPR 2023; method.md §4).

Heatmap → normalised distribution → weighted mean and unbiased covariance (Eq. 1, 3–4) → closed-form 2×2
eigendecomposition on the tensor's own device (Eq. 5) → ambiguity-guided decomposition of the error (Eq. 6)
plus an eigenvalue restriction (Eq. 7). Everything is computed in fp32 (or the input's wider dtype), with
autocast disabled, and with no host synchronisation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from flare.losses.distances import DISTANCES, Distance, get_distance

__all__ = [
    "STARLoss",
    "degenerate_mask",
    "eig2x2",
    "star_loss_per_landmark",
    "weighted_moments",
]

_MASS_EPS = 1e-6  # max(Σ F, 1e-6) in the normalisation (§4.1)
_V_EPS = 1e-5  # epsilons of V1 and V2 (§4.3)
_SQRT_EPS = 1e-5  # ε inside sqrt(λ + ε) (§4.5)
_NORM_FLOOR = 1e-12  # floor of ‖z‖² in variant v1, a NaN guard for the gradient at z = 0

RESTRICTIONS = ("value", "detach", "none")
VALUE_FORMS = ("sum_abs", "half_sum")
VARIANTS = ("v1", "v2")


def _grid(n: int, like: Tensor) -> Tensor:
    """Align-corners grid g_j = 2j/(n − 1) − 1 on ``like``'s device and dtype (§1.1)."""
    if n == 1:
        return torch.zeros(1, device=like.device, dtype=like.dtype)
    return torch.arange(n, device=like.device, dtype=like.dtype) * (2.0 / (n - 1)) - 1.0


class _MapStats(torch.autograd.Function):
    """Per-map statistics of F̂ = F / s with a fused backward; s = max(max F, max_i |Σ_j F_ij|, 1) per map is a
    constant for autograd.

    Returns the column marginal Σ_i F̂_ij (…, w), the row marginal Σ_j F̂_ij (…, h), the row first moments
    Σ_j F̂_ij g_j (…, h) and Σ_ij F̂_ij² (…). |F̂| ≤ w + 1 for any F (a positive entry is at most max F, a
    negative one at most |row sum| + w·max F), so nothing overflows; for F ≥ 0, s ≤ ΣF and every ratio that
    weighted_moments forms is unchanged (s = 1 leaves F as it is). A row sum that overflows (|F| ≳ 3e38 / w)
    makes s = inf: that map counts as all-zero. The first backward writes the gradient into F̂'s buffer.
    """

    @staticmethod
    def forward(ctx, f: Tensor, gx: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # type: ignore[override]
        row = f.sum(dim=-1)
        scale = torch.maximum(f.amax(dim=(-2, -1)), row.abs().amax(dim=-1))
        scale = scale.nan_to_num_(nan=math.inf, posinf=math.inf).clamp_min_(1.0)
        inv = 1.0 / scale
        fs = f * inv[..., None, None]
        ctx.save_for_backward(f, gx, inv)
        ctx.buffer = fs  # an intermediate outside the graph: safe to keep on ctx
        sq = torch.linalg.vector_norm(fs, dim=(-2, -1))
        col = fs.new_ones(fs.shape[-2]) @ fs  # a matvec: faster than the strided sum over rows
        return col, (row * inv[..., None]).nan_to_num_(nan=0.0), fs @ gx, sq * sq

    @staticmethod
    @once_differentiable
    def backward(ctx, g_col: Tensor, g_row: Tensor, g_rx: Tensor, g_sq: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        f, gx, inv = ctx.saved_tensors  # inv = 1 / s = d F̂ / d F
        grad, ctx.buffer = ctx.buffer, None
        if grad is None:  # a second backward (retain_graph): the buffer was used by the first
            grad = f * inv[..., None, None]
        torch.addcmul((g_col * inv[..., None]).unsqueeze(-2), grad, (2.0 * g_sq * inv)[..., None, None], out=grad)
        grad.add_((g_row * inv[..., None]).unsqueeze(-1))
        grad.addcmul_((g_rx * inv[..., None]).unsqueeze(-1), gx)
        return grad, None


def weighted_moments(heatmaps: Tensor) -> tuple[Tensor, Tensor]:
    """Soft-argmax mean and unbiased weighted covariance of each map (§4.1–4.3, Eq. 1, 3–4).

    ``heatmaps`` (B, N, h, w), F ≥ 0. Returns ``mu`` (B, N, 2) as (x, y) and ``cov`` (B, N, 2, 2).
    P = F / max(ΣF, 1e-6) is never materialised: the means and the diagonal second moments come from the
    row/column marginals, the cross term from the centred bilinear form Σ_i (g_i − μ_y)·Σ_j F_ij (g_j − μ_x),
    and Σ P² from Σ F² / max(ΣF, 1e-6)²; all four statistics come from one pass-light autograd node, on
    F scaled down per map (see ``_MapStats``), so that they stay finite for any finite F (P is the same for
    F ≥ 0).
    """
    if heatmaps.dim() != 4:
        raise ValueError(f"heatmaps must be (B, N, h, w), got shape {tuple(heatmaps.shape)}")
    h, w = heatmaps.shape[-2:]
    gx = _grid(w, heatmaps)  # x from the column index j
    gy = _grid(h, heatmaps)  # y from the row index i
    f_col, f_row, f_rx, f_sq = _MapStats.apply(heatmaps, gx)

    total = f_row.sum(dim=-1)  # (B, N)
    inv = 1.0 / torch.clamp(total, min=_MASS_EPS)
    px = f_col * inv.unsqueeze(-1)
    py = f_row * inv.unsqueeze(-1)
    mu_x = px @ gx
    mu_y = py @ gy
    dx = gx - mu_x.unsqueeze(-1)  # (B, N, w)
    dy = gy - mu_y.unsqueeze(-1)  # (B, N, h)

    c_xx = (px * dx * dx).sum(dim=-1)
    c_yy = (py * dy * dy).sum(dim=-1)
    row_dx = f_rx - f_row * mu_x.unsqueeze(-1)  # Σ_j F_ij (g_j − μ_x), centred per row
    c_xy = (row_dx * dy).sum(dim=-1) * inv

    v1 = total * inv + _V_EPS  # Σ P + 1e-5 (Σ P = 1, or 0 for an all-zero map)
    v2 = f_sq * (inv * inv) + _V_EPS
    denom = v1 - v2 / v1

    mu = torch.stack((mu_x, mu_y), dim=-1)
    cov = torch.stack((c_xx, c_xy, c_xy, c_yy), dim=-1).unflatten(-1, (2, 2)) / denom[..., None, None]
    return mu, cov


def eig2x2(a: Tensor, b: Tensor, c: Tensor, min_gap: float = 1e-7) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form eigendecomposition of the symmetric matrices [[a, b], [b, c]] (§4.4, Eq. 5).

    Returns ``lam_min``, ``lam_max`` (shape of ``a``) and ``V`` (..., 2, 2) whose COLUMNS are
    [v_min | v_max] with v_max = (cos θ, sin θ), v_min = (−sin θ, cos θ), θ = ½·atan2(2b, a − c).
    Where r = sqrt(((a − c)/2)² + b²) ≤ ``min_gap`` the arguments of atan2 are replaced by (0, 1) before the
    call (θ = 0, axis-aligned basis, no gradient through θ), and r carries no gradient, so no NaN or Inf
    reaches the backward pass.
    """
    if min_gap < 0:
        raise ValueError(f"min_gap must be >= 0, got {min_gap}")
    m = 0.5 * (a + c)
    half_diff = 0.5 * (a - c)
    q = half_diff * half_diff + b * b
    guard = q <= min_gap * min_gap
    r = torch.where(guard, torch.sqrt(q.detach()), torch.sqrt(torch.where(guard, torch.ones_like(q), q)))
    y = torch.where(guard, torch.zeros_like(b), 2.0 * b)
    x = torch.where(guard, torch.ones_like(a), a - c)
    theta = 0.5 * torch.atan2(y, x)
    cos, sin = torch.cos(theta), torch.sin(theta)
    vecs = torch.stack((-sin, cos, cos, sin), dim=-1).unflatten(-1, (2, 2))  # rows: (v_min_x, v_max_x), ...
    return m - r, m + r, vecs


def degenerate_mask(heatmaps: Tensor, eig_min_gap: float = 1e-7) -> Tensor:
    """(B, N) bool: maps with V1 < 1e-3 or r < ``eig_min_gap`` (the counter suggested in §4.9)."""
    with torch.no_grad():
        f = heatmaps.float() if heatmaps.dtype != torch.float64 else heatmaps
        mass = f.sum(dim=(-2, -1))
        v1 = mass / torch.clamp(mass, min=_MASS_EPS) + _V_EPS
        _, cov = weighted_moments(f)
        lo, hi, _ = eig2x2(cov[..., 0, 0], cov[..., 0, 1], cov[..., 1, 1], eig_min_gap)
        return (v1 < 1e-3) | (0.5 * (hi - lo) < eig_min_gap)


def star_loss_per_landmark(
    heatmaps: Tensor,
    targets: Tensor,
    dist: Distance,
    w: float = 1.0,
    restriction: str = "value",
    value_form: str = "sum_abs",
    eig_clamp: tuple[float, float] | None = (1e-6, 1e2),
    eig_min_gap: float = 1e-7,
    variant: str = "v2",
) -> Tensor:
    """Per-landmark STAR loss ℓ[b, n] = L_trans + L_val (§4.5, §4.7, §4.10), shape (B, N).

    ``heatmaps`` (B, N, h, w) ≥ 0 and ``targets`` (B, N, 2) normalised (x, y) ∈ [−1, 1], both in the dtype
    to compute in. ``restriction``: "value" (w·(|λ_min| + |λ_max|) or w·(λ_min + λ_max)/2), "detach" (λ, V
    constants, w = 0) or "none" (w = 0, λ and V live). ``eig_clamp`` clamps λ in the denominator only.
    """
    mu, cov = weighted_moments(heatmaps)
    lam_min, lam_max, vecs = eig2x2(cov[..., 0, 0], cov[..., 0, 1], cov[..., 1, 1], eig_min_gap)
    if restriction == "detach":
        lam_min, lam_max, vecs = lam_min.detach(), lam_max.detach(), vecs.detach()

    err = targets - mu  # (B, N, 2)
    e_min = (vecs[..., :, 0] * err).sum(dim=-1)  # projection on the eigenvector COLUMNS (§4.4)
    e_max = (vecs[..., :, 1] * err).sum(dim=-1)
    den_min, den_max = lam_min, lam_max
    if eig_clamp is not None:
        den_min = torch.clamp(den_min, min=eig_clamp[0], max=eig_clamp[1])
        den_max = torch.clamp(den_max, min=eig_clamp[0], max=eig_clamp[1])
    s_min = torch.sqrt(den_min + _SQRT_EPS)
    s_max = torch.sqrt(den_max + _SQRT_EPS)

    if variant == "v2":  # Eq. 6: Σ_k d(v_kᵀ e) / sqrt(λ_k + ε)
        trans = dist(e_min) / s_min + dist(e_max) / s_max
    else:  # v1: d(‖Λ^{-1/2} Vᵀ e‖₂)
        z2 = (e_min / s_min) ** 2 + (e_max / s_max) ** 2
        trans = dist(torch.sqrt(torch.clamp(z2, min=_NORM_FLOOR)))

    if restriction != "value" or w == 0.0:
        return trans
    if value_form == "sum_abs":
        return trans + w * (lam_min.abs() + lam_max.abs())
    return trans + w * 0.5 * (lam_min + lam_max)


class STARLoss(nn.Module):
    """STAR loss of one stack: mean over (b, n) of L_trans + L_val (method.md §4.8), computed in fp32.

    ``forward(heatmaps (B, N, h, w), targets (B, N, 2) normalised (x, y)) -> scalar``. Extra keyword
    arguments are passed to the distance (e.g. ``s`` for smoothl1, ``omega``/``epsilon`` for wing).
    With ``restriction="detach"`` or ``"none"`` the value term is off (w is ignored, §4.7).
    """

    def __init__(
        self,
        w: float = 1.0,
        distance: str = "smoothl1",
        restriction: str = "value",
        value_form: str = "sum_abs",
        eig_clamp: tuple[float, float] | None = (1e-6, 1e2),
        eig_min_gap: float = 1e-7,
        variant: str = "v2",
        **distance_kwargs: float,
    ) -> None:
        super().__init__()
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ValueError(f"w must be a finite number >= 0, got {w!r}")
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; expected one of {sorted(DISTANCES)}")
        if restriction not in RESTRICTIONS:
            raise ValueError(f"unknown restriction {restriction!r}; expected one of {RESTRICTIONS}")
        if value_form not in VALUE_FORMS:
            raise ValueError(f"unknown value_form {value_form!r}; expected one of {VALUE_FORMS}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
        if eig_clamp is not None:
            if len(eig_clamp) != 2 or not 0 <= eig_clamp[0] < eig_clamp[1]:
                raise ValueError(f"eig_clamp must be None or (lo, hi) with 0 <= lo < hi, got {eig_clamp!r}")
            eig_clamp = (float(eig_clamp[0]), float(eig_clamp[1]))
        if not (math.isfinite(eig_min_gap) and eig_min_gap >= 0):
            raise ValueError(f"eig_min_gap must be a finite number >= 0, got {eig_min_gap!r}")
        self.dist = get_distance(distance, **distance_kwargs)
        self.distance = distance
        self.w = float(w)
        self.restriction = restriction
        self.value_form = value_form
        self.eig_clamp = eig_clamp
        self.eig_min_gap = float(eig_min_gap)
        self.variant = variant

    def per_landmark(self, heatmaps: Tensor, targets: Tensor) -> Tensor:
        """ℓ[b, n] (B, N) in fp32 (float64 inputs stay float64), autocast disabled."""
        if heatmaps.dim() != 4 or targets.shape != (*heatmaps.shape[:2], 2):
            raise ValueError(
                f"expected heatmaps (B, N, h, w) and targets (B, N, 2), got {tuple(heatmaps.shape)} "
                f"and {tuple(targets.shape)}"
            )
        dtype = torch.float64 if heatmaps.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=heatmaps.device.type, enabled=False):
            return star_loss_per_landmark(
                heatmaps.to(dtype),
                targets.to(dtype),
                self.dist,
                w=self.w,
                restriction=self.restriction,
                value_form=self.value_form,
                eig_clamp=self.eig_clamp,
                eig_min_gap=self.eig_min_gap,
                variant=self.variant,
            )

    def forward(self, heatmaps: Tensor, targets: Tensor) -> Tensor:
        """Scalar L_STAR = mean_{b,n} ℓ[b, n] (§4.8)."""
        return self.per_landmark(heatmaps, targets).mean()

    def extra_repr(self) -> str:
        return (
            f"w={self.w}, distance={self.distance!r}, restriction={self.restriction!r}, "
            f"value_form={self.value_form!r}, eig_clamp={self.eig_clamp}, variant={self.variant!r}"
        )
