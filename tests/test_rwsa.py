"""RwSA loss (method.md section 5): limits, bounds, gradient and reductions against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flare.losses.rwsa import (
    RWSALoss,
    bilinear_splat,
    grid_coordinates,
    margin_map,
    nearest_splat,
    rwsa_from_distribution,
    rwsa_per_landmark,
)

B, N, H, W = 2, 3, 6, 8


def _pixel_targets(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets exactly on pixel centres: returns (u (B,N,2) normalised, col (B,N), row (B,N))."""
    col = torch.randint(0, W, (B, N), generator=gen)
    row = torch.randint(0, H, (B, N), generator=gen)
    u = torch.stack((2.0 * col / (W - 1) - 1.0, 2.0 * row / (H - 1) - 1.0), dim=-1)
    return u, col, row


def _ref_margin(u: np.ndarray, kind: str = "smoothl1", units: str = "normalised",
                s: float = 0.01) -> np.ndarray:
    """Plain-loop margin Delta (method.md 5.4), (B, N, H*W)."""
    out = np.zeros((u.shape[0], u.shape[1], H * W))
    for b in range(u.shape[0]):
        for n in range(u.shape[1]):
            for i in range(H):
                for j in range(W):
                    gx, gy = 2.0 * j / (W - 1) - 1.0, 2.0 * i / (H - 1) - 1.0
                    tx, ty = u[b, n]
                    if units == "heatmap_px":
                        gx, gy = j, i
                        tx, ty = (tx + 1) * (W - 1) / 2, (ty + 1) * (H - 1) / 2
                    dx, dy = tx - gx, ty - gy
                    d = math.hypot(dx, dy)
                    if kind == "l1":
                        v = abs(dx) + abs(dy)
                    elif kind == "l2":
                        v = dx * dx + dy * dy
                    else:
                        v = d * d / (2 * s) if d < s else d - s / 2
                    out[b, n, i * W + j] = v
    return out


def _ref_bilinear_q(points: np.ndarray) -> np.ndarray:
    """Plain-loop bilinear splat, mean over samples: points (B, N, S, 2) heatmap px -> (B, N, H*W)."""
    b_, n_, s_, _ = points.shape
    q = np.zeros((b_, n_, H * W))
    for b in range(b_):
        for n in range(n_):
            for s in range(s_):
                x = min(max(points[b, n, s, 0], 0.0), W - 1.0)
                y = min(max(points[b, n, s, 1], 0.0), H - 1.0)
                for i in range(H):
                    for j in range(W):
                        wx, wy = max(0.0, 1 - abs(x - j)), max(0.0, 1 - abs(y - i))
                        q[b, n, i * W + j] += wx * wy / s_
    return q


def test_grid_coordinates_align_corners() -> None:
    g = grid_coordinates(H, W, torch.device("cpu"), torch.float64)
    assert g.shape == (H * W, 2)
    # pixel (i=2, j=5) in row-major order: x = 2*5/7 - 1, y = 2*2/5 - 1
    assert g[2 * W + 5].tolist() == pytest.approx([10 / 7 - 1, 4 / 5 - 1])
    assert g[0].tolist() == [-1.0, -1.0] and g[-1].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("kind", ["smoothl1", "l1", "l2"])
@pytest.mark.parametrize("units", ["normalised", "heatmap_px"])
def test_margin_map_matches_plain_reference(kind: str, units: str) -> None:
    u = torch.rand(B, N, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    # on the centre of pixel (row 1, column 3): Delta = 0 there
    u[0, 0] = torch.tensor([2.0 * 3 / (W - 1) - 1, 2.0 * 1 / (H - 1) - 1], dtype=torch.float64)
    got = margin_map(u, H, W, kind=kind, units=units).numpy()
    np.testing.assert_allclose(got, _ref_margin(u.numpy(), kind, units), rtol=1e-10, atol=1e-12)
    assert got[0, 0, 1 * W + 3] == pytest.approx(0.0, abs=1e-12)


def test_margin_smoothl1_quadratic_branch_and_finite_grad() -> None:
    # offset 0.004 < s = 0.01 -> d^2/(2s) = 0.0008 at the nearest pixel
    u = torch.tensor([[[0.004 - 1.0, -1.0]]], dtype=torch.float64, requires_grad=True)
    d = margin_map(u, H, W)
    assert d[0, 0, 0].item() == pytest.approx(0.004**2 / 0.02, rel=1e-9)
    d.sum().backward()
    assert torch.isfinite(u.grad).all()


def test_bilinear_splat_matches_plain_reference_and_interpolates() -> None:
    gen = torch.Generator().manual_seed(1)
    pts = torch.rand(B, N, 4, 2, generator=gen, dtype=torch.float64) * torch.tensor([W + 2.0, H + 2.0]) - 1.0
    q = bilinear_splat(pts, H, W)
    np.testing.assert_allclose(q.numpy(), _ref_bilinear_q(pts.numpy()), atol=1e-12)
    np.testing.assert_allclose(q.sum(-1).numpy(), 1.0, atol=1e-12)
    # sum_p q_p H_p = bilinear interpolation of H at the point, written out by hand for one point
    hm = torch.randn(H, W, generator=gen, dtype=torch.float64)
    x, y = 2.3, 4.75
    ref = (0.7 * 0.25 * hm[4, 2] + 0.3 * 0.25 * hm[4, 3]
           + 0.7 * 0.75 * hm[5, 2] + 0.3 * 0.75 * hm[5, 3]).item()
    q1 = bilinear_splat(torch.tensor([[[[x, y]]]], dtype=torch.float64), H, W)[0, 0]
    assert (q1 * hm.reshape(-1)).sum().item() == pytest.approx(ref, rel=1e-12)


def test_nearest_splat_rounds_and_clips() -> None:
    pts = torch.tensor([[[[2.4, 1.6], [-3.0, 9.0]]]])
    q = nearest_splat(pts, H, W)[0, 0]
    assert q[2 * W + 2].item() == pytest.approx(0.5)  # (x=2, y=2)
    assert q[(H - 1) * W + 0].item() == pytest.approx(0.5)  # clipped to (0, H-1)
    assert q.sum().item() == pytest.approx(1.0)


def test_small_epsilon_approaches_structured_hinge() -> None:
    gen = torch.Generator().manual_seed(2)
    u, col, row = _pixel_targets(gen)
    hm = torch.randn(B, N, H, W, generator=gen, dtype=torch.float64)
    delta = _ref_margin(u.numpy())
    hmf = hm.reshape(B, N, -1).numpy()
    hinge = (hmf + delta).max(-1) - hmf[np.arange(B)[:, None], np.arange(N)[None], (row * W + col).numpy()]
    eps = 1e-3
    got = rwsa_per_landmark(hm, u, alpha=1.0, epsilon=eps).numpy()
    # eps*LSE(z) - max z*eps lies in [0, eps*log(h*w)]
    assert np.all(got >= hinge - 1e-5)
    assert np.all(got <= hinge + eps * math.log(H * W) + 1e-5)
    assert np.all(hinge >= 0)  # hard target with Delta(y, y) = 0


def test_alpha0_eps1_is_pixel_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(3)
    u, col, row = _pixel_targets(gen)
    hm = torch.randn(B, N, H, W, generator=gen) * 3
    got = rwsa_per_landmark(hm, u, alpha=0.0, epsilon=1.0)
    idx = (row * W + col).reshape(-1)
    ref = F.cross_entropy(hm.reshape(B * N, H * W), idx, reduction="none").reshape(B, N)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("smoothed", [False, True])
def test_gradient_is_tilted_softmax_minus_target(smoothed: bool) -> None:
    gen = torch.Generator().manual_seed(4)
    u, col, row = _pixel_targets(gen)
    alpha, eps = 0.7, 0.5
    hm = torch.randn(B, N, H, W, generator=gen, dtype=torch.float64, requires_grad=True)
    if smoothed:
        pts = (u.double() + 1) * torch.tensor([(W - 1) / 2, (H - 1) / 2], dtype=torch.float64)
        samples = pts[:, :, None, :] + 0.6 * torch.randn(B, N, 10, 2, generator=gen, dtype=torch.float64)
        q = _ref_bilinear_q(samples.numpy())
    else:
        samples = None
        q = np.zeros((B, N, H * W))
        q[np.arange(B)[:, None], np.arange(N)[None], (row * W + col).numpy()] = 1.0
    rwsa_per_landmark(hm, u, samples, alpha=alpha, epsilon=eps).sum().backward()
    z = (hm.detach().reshape(B, N, -1).numpy() + alpha * _ref_margin(u.numpy())) / eps
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(hm.grad.reshape(B, N, -1).numpy(), p - q, atol=1e-6)


def test_stable_form_equals_lse_minus_expected_score() -> None:
    gen = torch.Generator().manual_seed(5)
    u, _, _ = _pixel_targets(gen)
    samples = torch.rand(B, N, 10, 2, generator=gen, dtype=torch.float64) * torch.tensor([W - 1.0, H - 1.0])
    hm = torch.randn(B, N, H, W, generator=gen, dtype=torch.float64) * 5
    alpha, eps = 1.3, 0.8
    q = _ref_bilinear_q(samples.numpy())
    z = (hm.reshape(B, N, -1).numpy() + alpha * _ref_margin(u.numpy())) / eps
    zmax = z.max(-1, keepdims=True)
    lse = (zmax + np.log(np.exp(z - zmax).sum(-1, keepdims=True)))[..., 0]
    ref = eps * lse - (q * hm.reshape(B, N, -1).numpy()).sum(-1)
    got = rwsa_per_landmark(hm, u, samples, alpha=alpha, epsilon=eps).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_soft_target_lower_bound_and_minimiser() -> None:
    gen = torch.Generator().manual_seed(6)
    u, _, _ = _pixel_targets(gen)
    pts = (u.double() + 1) * torch.tensor([(W - 1) / 2, (H - 1) / 2], dtype=torch.float64)
    samples = (pts[:, :, None, :] + 0.8 * torch.randn(B, N, 10, 2, generator=gen, dtype=torch.float64))
    alpha, eps = 1.0, 0.7
    q = _ref_bilinear_q(samples.numpy())
    delta = _ref_margin(u.numpy())
    logq = np.where(q > 0, np.log(np.where(q > 0, q, 1.0)), 0.0)
    bound = alpha * (q * delta).sum(-1) - eps * (q * logq).sum(-1)  # alpha*E_q[Delta] + eps*H(q)
    for _ in range(5):
        hm = torch.randn(B, N, H, W, generator=gen, dtype=torch.float64) * 2
        got = rwsa_per_landmark(hm, u, samples, alpha=alpha, epsilon=eps).numpy()
        assert np.all(got >= bound - 1e-9)
        assert np.all(got > bound + 1e-3)  # random scores are far from the minimiser
    # minimiser H = eps*log q - alpha*Delta + const (a very negative score where q = 0)
    h_star = np.where(q > 0, eps * logq - alpha * delta, -1e4) + 3.0
    got = rwsa_per_landmark(torch.from_numpy(h_star).reshape(B, N, H, W), u, samples, alpha=alpha,
                            epsilon=eps).numpy()
    np.testing.assert_allclose(got, bound, rtol=1e-7, atol=1e-7)


def test_fp32_stable_for_huge_scores_and_half_inputs() -> None:
    gen = torch.Generator().manual_seed(7)
    u, col, row = _pixel_targets(gen)
    hm = torch.randn(B, N, H, W, generator=gen) * 1e4
    got = rwsa_per_landmark(hm, u)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    hmf = hm.reshape(B, N, -1).double().numpy()
    hinge = (hmf + _ref_margin(u.numpy())).max(-1) - hmf[np.arange(B)[:, None], np.arange(N)[None],
                                                        (row * W + col).numpy()]
    np.testing.assert_allclose(got.double().numpy(), hinge, rtol=1e-4, atol=2.0)
    # half-precision input and autocast: computed in fp32 from the rounded input
    hb = (torch.randn(B, N, H, W, generator=gen) * 50).to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = RWSALoss(reduction="landmark_mean")(hb, u)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    ref = rwsa_per_landmark(hb.detach().float(), u).mean()
    torch.testing.assert_close(out, ref)
    out.backward()
    assert hb.grad is not None and torch.isfinite(hb.grad.float()).all()


def test_reductions_differ_by_pixel_count() -> None:
    gen = torch.Generator().manual_seed(8)
    u, _, _ = _pixel_targets(gen)
    hm = torch.randn(B, N, H, W, generator=gen)
    per = rwsa_per_landmark(hm, u)
    pix = RWSALoss(reduction="pixel_mean")(hm, u)
    lm = RWSALoss(reduction="landmark_mean")(hm, u)
    assert lm.item() == pytest.approx(per.sum().item() / (B * N), rel=1e-6)
    assert pix.item() == pytest.approx(per.sum().item() / (B * N * H * W), rel=1e-6)
    assert lm.item() / pix.item() == pytest.approx(H * W, rel=1e-5)


def test_explicit_distribution_entry_point() -> None:
    gen = torch.Generator().manual_seed(9)
    hm = torch.randn(1, 1, H, W, generator=gen, dtype=torch.float64)
    q = torch.softmax(torch.randn(1, 1, H * W, generator=gen, dtype=torch.float64), -1)
    delta = torch.rand(1, 1, H * W, generator=gen, dtype=torch.float64)
    got = rwsa_from_distribution(hm, q, delta, alpha=2.0, epsilon=0.5).item()
    z = (hm.reshape(-1) + 2.0 * delta.reshape(-1)) / 0.5
    ref = 0.5 * math.log(sum(math.exp(v) for v in z.tolist())) - float((q.reshape(-1) * hm.reshape(-1)).sum())
    assert got == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [{"epsilon": 0.0}, {"epsilon": -1.0}, {"alpha": -0.5}, {"margin": "huber"}, {"margin_units": "crop_px"},
     {"reduction": "sum"}, {"target": "gaussian"}],
)
def test_bad_constructor_args_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        RWSALoss(**kwargs)


def test_bad_shapes_raise() -> None:
    loss = RWSALoss()
    hm = torch.zeros(B, N, H, W)
    with pytest.raises(ValueError):
        loss(hm, torch.zeros(B, N + 1, 2))
    with pytest.raises(ValueError):
        loss(hm, torch.zeros(B, N, 2), torch.zeros(B, N, 2))
    with pytest.raises(ValueError):
        loss(hm.reshape(B, N, -1), torch.zeros(B, N, 2))
