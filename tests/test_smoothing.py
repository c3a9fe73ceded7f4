"""Image-aware label smoothing (method.md section 6) against plain references and geometric facts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flare.losses.smoothing import (
    blur_sharpen,
    default_gamma,
    flip_covariance,
    gaussian_blur,
    gaussian_kernel1d,
    label_smoothing_samples,
    landmark_covariance,
    sample_smoothing,
    sharpen,
    torchvision_sigma,
    transform_covariance,
)
from flare.models.layouts import WFLW98

S = 64


def _gauss_taps(sigma: float = 1.7, half: int = 4) -> np.ndarray:
    t = np.array([math.exp(-(i * i) / (2 * sigma * sigma)) for i in range(-half, half + 1)])
    return t / t.sum()


def _ref_blur(img: np.ndarray) -> np.ndarray:
    """2-D blur by explicit shifts of a reflect-padded map (numpy 'reflect' = edge not repeated)."""
    g = _gauss_taps()
    pad = np.pad(img, 4, mode="reflect")
    out = np.zeros_like(img)
    for dy in range(9):
        for dx in range(9):
            out += g[dy] * g[dx] * pad[dy:dy + img.shape[0], dx:dx + img.shape[1]]
    return out


def _ref_sharpen(img: np.ndarray, f: float = 5.0) -> np.ndarray:
    deg = img.copy()
    for i in range(1, img.shape[0] - 1):
        for j in range(1, img.shape[1] - 1):
            deg[i, j] = (img[i - 1:i + 2, j - 1:j + 2].sum() + 4 * img[i, j]) / 13.0
    return np.clip(f * img + (1 - f) * deg, 0.0, 1.0)


def _ref_cov(ep: np.ndarray, y: tuple[float, float], k: int = 7, unbiased: bool = True) -> np.ndarray:
    """Plain-loop Sigma_{M_n} of method.md 6.3 on an already refined map E'."""
    h, w = ep.shape
    cx, cy = int(np.rint(y[0])), int(np.rint(y[1]))  # half to even, like torch.round
    pix, edge, gauss = [], [], []
    for oy in range(-k, k + 1):
        for ox in range(-k, k + 1):
            x, yy = cx + ox, cy + oy
            pix.append((x, yy))
            edge.append(ep[yy, x] if 0 <= x < w and 0 <= yy < h else 0.0)
            inside5 = abs(ox) <= 2 and abs(oy) <= 2
            gauss.append(math.exp(-((x - y[0]) ** 2 + (yy - y[1]) ** 2) / (2 * 1.1**2)) if inside5 else 0.0)
    pix, edge, gauss = np.array(pix, float), np.array(edge), np.array(gauss)
    edge = edge / edge.max() if edge.max() > 0 else edge
    m = 0.01 * edge + gauss / gauss.max()
    p = m / m.sum()
    mu = (p[:, None] * pix).sum(0)
    d = pix - mu
    cov = (p[:, None, None] * d[:, :, None] * d[:, None, :]).sum(0)
    if unbiased:
        v1, v2 = p.sum() + 1e-5, (p * p).sum() + 1e-5
        cov = cov / (v1 - v2 / v1)
    return cov


def _principal(cov: np.ndarray) -> tuple[np.ndarray, float]:
    """Principal eigenvector and eigenvalue ratio by numpy's eigh."""
    ev, vec = np.linalg.eigh(cov)
    return vec[:, 1], ev[1] / ev[0]


def _axis_angle_deg(v: np.ndarray, t: np.ndarray) -> float:
    c = abs(float(v @ t)) / (np.linalg.norm(v) * np.linalg.norm(t))
    return math.degrees(math.acos(min(1.0, c)))


def test_blur_kernel_is_normalised_gaussian_sigma_1_7() -> None:
    assert torchvision_sigma(9) == pytest.approx(1.7)
    assert torchvision_sigma(5) == pytest.approx(1.1)
    k = gaussian_kernel1d(9, dtype=torch.float64)
    assert k.sum().item() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(k.numpy(), _gauss_taps(1.7), rtol=1e-12)
    # blurring a centred delta returns the outer product of the taps
    delta = torch.zeros(1, 21, 21, dtype=torch.float64)
    delta[0, 10, 10] = 1.0
    g = _gauss_taps(1.7)
    np.testing.assert_allclose(gaussian_blur(delta)[0, 6:15, 6:15].numpy(), np.outer(g, g), atol=1e-14)


def test_blur_and_sharpen_match_plain_references() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((2, 16, 20))
    t = torch.from_numpy(img)
    blurred = gaussian_blur(t).numpy()
    for b in range(2):
        np.testing.assert_allclose(blurred[b], _ref_blur(img[b]), atol=1e-12)
    sharp = sharpen(t).numpy()
    for b in range(2):
        np.testing.assert_allclose(sharp[b], _ref_sharpen(img[b]), atol=1e-12)
    np.testing.assert_allclose(sharp[:, 0, :], np.clip(img[:, 0, :], 0, 1))  # border: x~ = x
    both = blur_sharpen(t).numpy()
    np.testing.assert_allclose(both[0], _ref_sharpen(_ref_blur(img[0])), atol=1e-12)
    assert both.min() >= 0.0 and both.max() <= 1.0


def test_landmark_covariance_matches_plain_loop() -> None:
    rng = np.random.default_rng(1)
    edge = (rng.random((2, S, S)) > 0.93).astype(np.float64)
    edge[1, :, :] = 0.0
    edge[1, 40, 10:50] = 1.0
    pts = np.array([[[32.3, 31.6], [1.2, 62.8], [0.0, 0.0], [50.49, 12.51]],
                    [[30.0, 40.0], [63.0, 40.2], [20.7, 5.5], [45.0, 41.4]]])
    refined = blur_sharpen(torch.from_numpy(edge)).numpy()
    for unbiased in (True, False):
        got = landmark_covariance(torch.from_numpy(edge), torch.from_numpy(pts), unbiased=unbiased).numpy()
        assert got.shape == (2, 4, 2, 2)
        for b in range(2):
            for n in range(4):
                ref = _ref_cov(refined[b], tuple(pts[b, n]), unbiased=unbiased)
                np.testing.assert_allclose(got[b, n], ref, rtol=1e-9, atol=1e-12)


def test_empty_edge_map_gives_isotropic_covariance() -> None:
    g = np.array([math.exp(-(i * i) / (2 * 1.1**2)) for i in range(-2, 3)])
    w2 = np.outer(g, g)
    p = w2 / w2.sum()
    offs = np.arange(-2, 3)
    var = (p.sum(0) * offs**2).sum()  # mean is 0 by symmetry
    v1, v2 = 1 + 1e-5, (p * p).sum() + 1e-5
    expected = var / (v1 - v2 / v1)
    pts = torch.tensor([[[32.0, 32.0], [0.0, 0.0], [63.0, 17.0]]], dtype=torch.float64)
    cov = landmark_covariance(torch.zeros(1, S, S, dtype=torch.float64), pts).numpy()
    for n in range(3):
        np.testing.assert_allclose(cov[0, n], expected * np.eye(2), rtol=1e-9, atol=1e-12)
    assert expected == pytest.approx(1.1355, abs=1e-3)


@pytest.mark.parametrize("theta", [0.5, 1.0, 2.2, 4.0])
def test_curved_edge_elongates_along_tangent(theta: float) -> None:
    radius, cx, cy = 15.0, 32.0, 32.0
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float64)
    ring = np.clip(1.0 - np.abs(np.hypot(xx - cx, yy - cy) - radius), 0.0, 1.0)  # 1-px-wide circle
    pt = (cx + radius * math.cos(theta), cy + radius * math.sin(theta))
    cov = landmark_covariance(torch.from_numpy(ring)[None], torch.tensor([[pt]], dtype=torch.float64))
    v, ratio = _principal(cov[0, 0].numpy())
    tangent = np.array([-math.sin(theta), math.cos(theta)])
    assert _axis_angle_deg(v, tangent) < 15.0
    assert ratio > 1.5


def test_straight_edge_ratio_grows_with_patch_size() -> None:
    edge = torch.zeros(1, S, S, dtype=torch.float64)
    edge[0, 32, :] = 1.0
    ratios = []
    for k in (5, 7, 9):
        pt = torch.tensor([[[32.0, 32.0]]], dtype=torch.float64)
        cov = landmark_covariance(edge, pt, k=k)[0, 0].numpy()
        v, ratio = _principal(cov)
        assert _axis_angle_deg(v, np.array([1.0, 0.0])) < 1e-6
        ratios.append(ratio)
    assert 1.2 < ratios[0] < ratios[1] < ratios[2]
    assert 1.8 < ratios[1] < 3.0


def test_covariance_is_flip_equivariant() -> None:
    rng = np.random.default_rng(2)
    edge = torch.from_numpy((rng.random((1, S, S)) > 0.9).astype(np.float64))
    pts = torch.tensor([[[20.2, 30.7], [50.9, 3.3]]], dtype=torch.float64)
    flipped_pts = pts.clone()
    flipped_pts[..., 0] = S - 1 - pts[..., 0]
    cov = landmark_covariance(edge, pts)
    cov_f = landmark_covariance(edge.flip(-1), flipped_pts)
    torch.testing.assert_close(cov_f, flip_covariance(cov, [0, 1]), rtol=1e-9, atol=1e-12)


def test_sampled_covariance_matches_gamma_sigma() -> None:
    cov = torch.tensor([[[[3.0, 1.2], [1.2, 2.0]]]], dtype=torch.float64)
    pts = torch.tensor([[[30.0, 20.0]]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for gamma, unit in ((0.01, 1.0), (0.01, 16.0)):
        smp = sample_smoothing(pts, cov, gamma=gamma, num_samples=20000, generator=gen, unit_factor=unit)
        assert smp.shape == (1, 1, 20000, 2)
        x = smp[0, 0].numpy()
        emp = np.cov(x.T)
        target = gamma * unit * cov[0, 0].numpy()
        assert np.linalg.norm(emp - target) / np.linalg.norm(target) < 0.05
        np.testing.assert_allclose(x.mean(0), [30.0, 20.0], atol=5 * math.sqrt(target.max() / 20000))


def test_sampling_singular_clipping_and_determinism() -> None:
    pts = torch.tensor([[[10.0, 10.0], [0.0, 63.0]]])
    cov = torch.tensor([[[[4.0, 4.0], [4.0, 4.0]], [[100.0, 0.0], [0.0, 100.0]]]])  # rank 1; wide
    smp = sample_smoothing(pts, cov, gamma=1.0, num_samples=500, generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(smp).all()
    d = smp[0, 0] - pts[0, 0]
    assert (d[:, 0] - d[:, 1]).abs().max().item() < 1e-3  # rank-1 Sigma: samples on the line x - y = 0
    assert smp[0, 1].min().item() >= 0.0 and smp[0, 1].max().item() <= 63.0
    assert (smp[0, 1, :, 0] == 0.0).any() and (smp[0, 1, :, 1] == 63.0).any()  # clipping happened
    a = sample_smoothing(pts, cov, generator=torch.Generator().manual_seed(5))
    b = sample_smoothing(pts, cov, generator=torch.Generator().manual_seed(5))
    assert a.shape == (1, 2, 10, 2) and torch.equal(a, b)
    zero = sample_smoothing(pts, cov, gamma=0.0)
    torch.testing.assert_close(zero, pts[:, :, None, :].expand_as(zero), atol=1e-5, rtol=0)


def test_transform_covariance_rotates_principal_axis() -> None:
    cov = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # principal axis along x
    phi = math.radians(30.0)
    rot = torch.tensor([[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]], dtype=torch.float64)
    out = transform_covariance(cov, rot).numpy()
    v, ratio = _principal(out)
    assert _axis_angle_deg(v, np.array([math.cos(phi), math.sin(phi)])) < 1e-6
    assert ratio == pytest.approx(4.0)
    # closed form of R diag(4, 1) R^T, and a pure scale s gives s^2 Sigma (units change, 6.4)
    c, s = math.cos(phi), math.sin(phi)
    expected = [[4 * c * c + s * s, 3 * c * s], [3 * c * s, 4 * s * s + c * c]]
    np.testing.assert_allclose(out, expected, atol=1e-12)
    scale = torch.eye(2, dtype=torch.float64) * (63 / 256)
    np.testing.assert_allclose(transform_covariance(cov, scale).numpy(), (63 / 256) ** 2 * cov.numpy())


def test_flip_covariance_negates_off_diagonal_and_permutes() -> None:
    perm = WFLW98.flip_permutation()
    cov = torch.randn(2, 98, 2, 2, generator=torch.Generator().manual_seed(4))
    cov = cov @ cov.transpose(-1, -2)
    out = flip_covariance(cov, perm)
    for i in (0, 32, 60, 96):
        src = cov[:, int(perm[i])]
        torch.testing.assert_close(out[:, i, 0, 0], src[:, 0, 0])
        torch.testing.assert_close(out[:, i, 1, 1], src[:, 1, 1])
        torch.testing.assert_close(out[:, i, 0, 1], -src[:, 0, 1])
        torch.testing.assert_close(out[:, i, 1, 0], -src[:, 1, 0])
    torch.testing.assert_close(flip_covariance(out, perm), cov)


def test_pipeline_takes_max_over_channels() -> None:
    edges = torch.zeros(1, 2, S, S, dtype=torch.float64)
    edges[0, 0, 30, :] = 1.0
    edges[0, 1, :, 40] = 1.0
    pts = torch.tensor([[[20.0, 30.0], [40.0, 50.0]]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(6)
    smp = label_smoothing_samples(edges, pts, gamma=0.01, num_samples=7, generator=gen)
    assert smp.shape == (1, 2, 7, 2)
    cov = landmark_covariance(edges.amax(1), pts)[0].numpy()
    assert _axis_angle_deg(_principal(cov[0])[0], np.array([1.0, 0.0])) < 1e-6  # on the horizontal line
    assert _axis_angle_deg(_principal(cov[1])[0], np.array([0.0, 1.0])) < 1e-6  # on the vertical line


def test_default_gamma_and_bad_args() -> None:
    assert default_gamma("cofw29") == 0.001
    assert default_gamma("wflw98") == 0.01
    assert default_gamma(WFLW98) == 0.01
    assert default_gamma("300w68") == 0.01
    with pytest.raises(ValueError):
        landmark_covariance(torch.zeros(1, S, S), torch.zeros(1, 2, 2), k=1)
    with pytest.raises(ValueError):
        landmark_covariance(torch.zeros(1, 1, S, S), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError):
        sample_smoothing(torch.zeros(1, 1, 2), torch.eye(2).expand(1, 1, 2, 2), gamma=-1.0)
