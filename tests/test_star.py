"""Tests of the STAR loss (method.md §4) against an independent float64 reference that follows the paper
literally: explicit outer products over all pixels, ``torch.linalg.eigh``, projection on eigenvector columns."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from flare.losses.distances import get_distance
from flare.losses.star import STARLoss, degenerate_mask, eig2x2, weighted_moments

B, N, H, W = 2, 5, 64, 64


# ----------------------------------------------------------------------------- reference (paper, literal)
def _ref_dist(name: str, x: torch.Tensor) -> torch.Tensor:
    ax = x.abs()
    if name == "l1":
        return ax
    if name == "l2":
        return x**2
    if name == "smoothl1":  # Eq. 8, s = 0.01
        s = 0.01
        return torch.where(ax < s, 0.5 / s * x**2, ax - 0.5 * s)
    if name == "wing":  # ω = 0.01, ε = 2
        om, ep = 0.01, 2.0
        return torch.where(ax < om, om * torch.log(1 + ax / ep), ax - (om - om * math.log(1 + om / ep)))
    raise AssertionError(name)


def _ref_moments(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, h, w = f.shape
    p = f / f.sum(dim=(2, 3), keepdim=True).clamp(min=1e-6)
    gy = torch.tensor([2 * i / (h - 1) - 1 for i in range(h)], dtype=f.dtype)
    gx = torch.tensor([2 * j / (w - 1) - 1 for j in range(w)], dtype=f.dtype)
    yy, xx = torch.meshgrid(gy, gx, indexing="ij")
    g = torch.stack((xx, yy), dim=-1).reshape(h * w, 2)  # (x, y) per pixel, row-major
    pf = p.reshape(b, n, h * w)
    mu = (pf[..., None] * g).sum(dim=2)
    diff = g[None, None] - mu[:, :, None, :]  # (B, N, K, 2)
    outer = diff[..., :, None] * diff[..., None, :]  # (B, N, K, 2, 2)
    c = (pf[..., None, None] * outer).sum(dim=2)
    v1 = pf.sum(dim=2) + 1e-5
    v2 = (pf**2).sum(dim=2) + 1e-5
    return mu, c / (v1 - v2 / v1)[..., None, None]


def _ref_star(f, u, dist="smoothl1", w=1.0, restriction="value", value_form="sum_abs",
              clamp=(1e-6, 1e2), variant="v2"):
    mu, sigma = _ref_moments(f)
    lam, vec = torch.linalg.eigh(sigma)  # ascending; eigenvectors in COLUMNS
    if restriction == "detach":
        lam, vec = lam.detach(), vec.detach()
    e = u - mu
    proj = torch.einsum("bnd,bndk->bnk", e, vec)  # proj[..., k] = v_k^T e
    den = lam.clamp(*clamp) if clamp is not None else lam
    scale = torch.sqrt(den + 1e-5)
    if variant == "v2":
        trans = (_ref_dist(dist, proj) / scale).sum(dim=-1)
    else:
        trans = _ref_dist("smoothl1", torch.linalg.vector_norm(proj / scale, dim=-1))
    if restriction != "value":
        val = 0.0
    elif value_form == "sum_abs":
        val = w * lam.abs().sum(dim=-1)
    else:
        val = w * lam.sum(dim=-1) / 2
    return (trans + val).mean()


# ----------------------------------------------------------------------------- inputs
def _gaussians(seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random anisotropic Gaussian heatmaps (B, N, H, W), their continuous means and targets nearby."""
    gen = torch.Generator().manual_seed(seed)
    centre = (torch.rand(B, N, 2, generator=gen, dtype=dtype) - 0.5) * 1.2  # normalised (x, y)
    sig_a = 1.0 + 3.0 * torch.rand(B, N, generator=gen, dtype=dtype)  # heatmap px
    sig_b = sig_a * (0.3 + 0.5 * torch.rand(B, N, generator=gen, dtype=dtype))  # clearly anisotropic
    ang = math.pi * torch.rand(B, N, generator=gen, dtype=dtype)
    c, s = torch.cos(ang), torch.sin(ang)
    rot = torch.stack((c, -s, s, c), dim=-1).reshape(B, N, 2, 2)
    px = 2.0 / (W - 1)
    cov = rot @ torch.diag_embed(torch.stack((sig_a, sig_b), -1) * px) ** 2 @ rot.transpose(-1, -2)
    gy = torch.linspace(-1, 1, H, dtype=dtype)
    gx = torch.linspace(-1, 1, W, dtype=dtype)
    yy, xx = torch.meshgrid(gy, gx, indexing="ij")
    d = torch.stack((xx, yy), -1)[None, None] - centre[:, :, None, None, :]  # (B, N, H, W, 2)
    prec = torch.linalg.inv(cov)[:, :, None, None]
    maha = (d[..., None, :] @ prec @ d[..., :, None])[..., 0, 0]
    f = torch.exp(-0.5 * maha)
    targets = centre + 0.03 * torch.randn(B, N, 2, generator=gen, dtype=dtype)
    return f, centre, targets


def _value_and_grad(fn, f, u):
    f = f.clone().requires_grad_(True)
    u = u.clone().requires_grad_(True)
    val = fn(f, u)
    gf, gu = torch.autograd.grad(val, (f, u))
    return val.detach(), gf, gu


def _assert_close(ours, ref):
    (v, gf, gu), (rv, rgf, rgu) = ours, ref
    assert abs(v.item() - rv.item()) <= 1e-6 * abs(rv.item())
    assert (gf - rgf).abs().max().item() <= 1e-5 * rgf.abs().max().item()
    assert (gu - rgu).abs().max().item() <= 1e-5 * rgu.abs().max().item()


# ----------------------------------------------------------------------------- tests
CASES = [
    {"distance": "l1"},
    {"distance": "l2"},
    {"distance": "smoothl1"},
    {"distance": "wing"},
    {"distance": "smoothl1", "restriction": "detach"},
    {"distance": "l2", "restriction": "detach"},
    {"distance": "smoothl1", "restriction": "none"},
    {"distance": "smoothl1", "value_form": "half_sum", "w": 3.0},
    {"distance": "smoothl1", "variant": "v1"},
    {"distance": "smoothl1", "eig_clamp": None},
]


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_star_matches_literal_reference(cfg):
    f, _, u = _gaussians(seed=1)
    loss = STARLoss(**cfg)
    ref_kw = {
        "dist": cfg["distance"],
        "w": cfg.get("w", 1.0),
        "restriction": cfg.get("restriction", "value"),
        "value_form": cfg.get("value_form", "sum_abs"),
        "clamp": cfg.get("eig_clamp", (1e-6, 1e2)),
        "variant": cfg.get("variant", "v2"),
    }
    ours = _value_and_grad(loss, f, u)
    ref = _value_and_grad(lambda a, b: _ref_star(a, b, **ref_kw), f, u)
    _assert_close(ours, ref)
    if cfg.get("restriction") == "detach":  # gradient only through μ, which the value term cannot reach
        assert ref[0].item() > 0


def test_detach_differs_from_value_in_gradient_only_through_eigenpairs():
    f, _, u = _gaussians(seed=2)
    _, g_det, _ = _value_and_grad(STARLoss(restriction="detach"), f, u)
    _, g_none, _ = _value_and_grad(STARLoss(restriction="none"), f, u)
    assert (g_det - g_none).abs().max().item() > 1e-3 * g_none.abs().max().item()


def test_fp32_path_close_to_float64_reference():
    f, _, u = _gaussians(seed=3)
    ours = STARLoss()(f.float(), u.float())
    assert ours.dtype == torch.float32
    ref = _ref_star(f, u)
    assert abs(ours.item() - ref.item()) <= 1e-4 * ref.item()


def test_autocast_bf16_input_computes_in_fp32():
    f, _, u = _gaussians(seed=4)
    fb = f.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = STARLoss()(fb, u)
    assert out.dtype == torch.float32
    ref = _ref_star(fb.double(), u)
    assert abs(out.item() - ref.item()) <= 1e-4 * ref.item()


def test_weighted_moments_match_reference():
    f, centre, _ = _gaussians(seed=5)
    mu, cov = weighted_moments(f)
    rmu, rcov = _ref_moments(f)
    assert torch.allclose(mu, rmu, rtol=0, atol=1e-12)
    assert torch.allclose(cov, rcov, rtol=1e-10, atol=1e-15)
    # Well inside the map, the soft-argmax of a sampled Gaussian is its continuous centre.
    inside = (centre.abs() < 0.45).all(-1)
    assert (mu - centre)[inside].abs().max().item() < 1e-3


def test_eig2x2_matches_eigh():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(200, 2, 2, generator=gen, dtype=torch.float64) * 0.05
    sigma = m @ m.transpose(-1, -2) + 1e-4 * torch.eye(2, dtype=torch.float64)
    lo, hi, vec = eig2x2(sigma[:, 0, 0], sigma[:, 0, 1], sigma[:, 1, 1])
    lam, evec = torch.linalg.eigh(sigma)
    assert ((lo - lam[:, 0]).abs() / lam[:, 0]).max().item() < 1e-6
    assert ((hi - lam[:, 1]).abs() / lam[:, 1]).max().item() < 1e-6
    # Columns match eigh's columns up to sign.
    dots = (vec * evec).sum(dim=-2).abs()  # |v_k^T e_k| for each column k
    assert (dots - 1).abs().max().item() < 1e-6
    recon = vec @ torch.diag_embed(torch.stack((lo, hi), -1)) @ vec.transpose(-1, -2)
    assert (recon - sigma).abs().max().item() < 1e-12


def test_eig2x2_column_convention_on_rotation():
    # Σ = R diag(4, 1) Rᵀ with R a rotation by 30°: v_max is R's first column, v_min its second.
    t = math.radians(30)
    r = torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]], dtype=torch.float64)
    sigma = r @ torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)) @ r.T
    lo, hi, vec = eig2x2(sigma[0, 0], sigma[0, 1], sigma[1, 1])
    assert lo.item() == pytest.approx(1.0, rel=1e-12) and hi.item() == pytest.approx(4.0, rel=1e-12)
    assert abs(float(vec[:, 1] @ r[:, 0])) == pytest.approx(1.0, abs=1e-12)
    assert abs(float(vec[:, 0] @ r[:, 1])) == pytest.approx(1.0, abs=1e-12)


def test_eig2x2_isotropic_guard_has_finite_gradient():
    a = torch.tensor([2e-3, 0.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.0, 0.0], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([2e-3, 0.0], dtype=torch.float64, requires_grad=True)
    lo, hi, vec = eig2x2(a, b, c)
    # θ = 0: v_max = (1, 0), v_min = (0, 1), columns [v_min | v_max].
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    assert torch.equal(vec.abs(), swap.expand(2, 2, 2))
    assert torch.equal(lo, a.detach()) and torch.equal(hi, a.detach())
    (lo.sum() + 2 * hi.sum() + (vec * torch.arange(4.0, dtype=torch.float64).view(2, 2)).sum()).backward()
    for t in (a, b, c):
        assert torch.isfinite(t.grad).all()
    assert torch.allclose(a.grad, torch.full((2,), 1.5, dtype=torch.float64))  # dm/da·(1 + 2), r frozen


def _degenerate_inputs():
    one_hot = torch.zeros(1, 2, 16, 16, dtype=torch.float64)
    one_hot[0, 0, 3, 11] = 1.0
    one_hot[0, 1, 15, 0] = 5.0
    zero = torch.zeros(1, 2, 16, 16, dtype=torch.float64)
    g = torch.linspace(-1, 1, 33, dtype=torch.float64)
    yy, xx = torch.meshgrid(g, g, indexing="ij")
    iso = torch.exp(-0.5 * (xx**2 + yy**2) / (2 * 2 / 32) ** 2).expand(1, 2, 33, 33).clone()
    return {"one_hot": one_hot, "zero": zero, "isotropic": iso}


@pytest.mark.parametrize("name", ["one_hot", "zero", "isotropic"])
@pytest.mark.parametrize("cfg", [{}, {"distance": "l1"}, {"variant": "v1"}, {"restriction": "detach"},
                                 {"restriction": "none", "distance": "wing"}])
def test_degenerate_maps_are_finite(name, cfg):
    f = _degenerate_inputs()[name]
    u = torch.tensor([[[0.3, -0.2], [-0.5, 0.1]]], dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        fi = f.to(dtype).clone().requires_grad_(True)
        ui = u.to(dtype).clone().requires_grad_(True)
        loss = STARLoss(**cfg)(fi, ui)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(fi.grad).all() and torch.isfinite(ui.grad).all()


def test_one_hot_and_zero_maps_hand_values():
    # Σ = 0, so λ = 0 → clamp 1e-6 → scale sqrt(1e-6 + 1e-5); axis-aligned V; value term 0.
    maps = _degenerate_inputs()
    u = torch.tensor([[[0.3, -0.2], [-0.5, 0.1]]], dtype=torch.float64)
    g = torch.linspace(-1, 1, 16, dtype=torch.float64)
    scale = math.sqrt(1.1e-5)
    mu_hot = torch.stack((torch.stack((g[11], g[3])), torch.stack((g[0], g[15]))))[None]
    for f, mu in ((maps["one_hot"], mu_hot), (maps["zero"], torch.zeros(1, 2, 2, dtype=torch.float64))):
        e = (u - mu).abs()
        expected = ((e - 0.005) / scale).sum(-1).mean()  # every |e| > s: linear branch of Eq. 8
        assert STARLoss()(f, u).item() == pytest.approx(expected.item(), rel=1e-9)


def test_isotropic_eigenvalues_equal():
    f = _degenerate_inputs()["isotropic"]
    _, cov = weighted_moments(f)
    lo, hi, _ = eig2x2(cov[..., 0, 0], cov[..., 0, 1], cov[..., 1, 1])
    assert torch.allclose(lo, hi, rtol=1e-9, atol=0)


@pytest.mark.parametrize("cfg", [{}, {"distance": "l2"}, {"variant": "v1"}, {"restriction": "detach"}])
def test_loss_decreases_as_target_moves_to_mean(cfg):
    f, _, _ = _gaussians(seed=6)
    mu, _ = _ref_moments(f)
    offset = torch.tensor([0.2, -0.15], dtype=torch.float64)
    loss = STARLoss(**cfg)
    vals = [loss(f, mu + t * offset).item() for t in (1.0, 0.5, 0.2, 0.05, 0.0)]
    assert all(a > b for a, b in itertools.pairwise(vals))


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="'huber'"):
        STARLoss(distance="huber")
    with pytest.raises(ValueError, match="'huber'"):
        get_distance("huber")
    with pytest.raises(ValueError):
        get_distance("wing", s=0.1)
    for bad in ({"restriction": "soft"}, {"value_form": "max"}, {"variant": "v3"}, {"w": -1.0},
                {"eig_clamp": (1e-2, 1e-3)}, {"eig_min_gap": -1.0}):
        with pytest.raises(ValueError):
            STARLoss(**bad)


def test_distances_hand_values():
    x = torch.tensor([-0.02, -0.005, 0.0, 0.004, 0.5], dtype=torch.float64)
    sl1 = get_distance("smoothl1")(x)
    assert torch.allclose(sl1, torch.tensor([0.015, 0.00125, 0.0, 0.0008, 0.495], dtype=torch.float64))
    wg = get_distance("wing")(x)
    c = 0.01 - 0.01 * math.log(1.005)
    assert torch.allclose(wg, torch.tensor([0.02 - c, 0.01 * math.log(1.0025), 0.0, 0.01 * math.log(1.002),
                                            0.5 - c], dtype=torch.float64))
    assert torch.equal(get_distance("l1")(x), x.abs())
    assert torch.equal(get_distance("l2")(x), x * x)
    # awing with y = 0: x' = |x|·31.5 heatmap px; continuous at θ = 0.5.
    aw = get_distance("awing")
    x_theta = torch.tensor([0.5 / 31.5], dtype=torch.float64)
    inner = 14 * math.log(1 + 0.5**2.1)
    assert aw(x_theta - 1e-12).item() == pytest.approx(inner, rel=1e-9)
    assert aw(x_theta + 1e-12).item() == pytest.approx(inner, rel=1e-9)
    assert get_distance("smoothl1", s=0.1)(torch.tensor([0.05])).item() == pytest.approx(0.0125)


def test_non_square_maps_match_reference_and_gradcheck():
    gen = torch.Generator().manual_seed(7)
    f = torch.rand(1, 3, 12, 20, generator=gen, dtype=torch.float64) ** 4  # h != w, x from columns
    u = torch.rand(1, 3, 2, generator=gen, dtype=torch.float64) * 2 - 1
    mu, cov = weighted_moments(f)
    rmu, rcov = _ref_moments(f)
    assert torch.allclose(mu, rmu, rtol=0, atol=1e-12) and torch.allclose(cov, rcov, rtol=1e-10, atol=1e-15)
    assert torch.autograd.gradcheck(lambda a, b: STARLoss(distance="l2")(a, b),
                                    (f.requires_grad_(True), u.requires_grad_(True)))


def test_degenerate_mask_flags_point_zero_and_isotropic_maps_only():
    maps = _degenerate_inputs()
    assert degenerate_mask(maps["one_hot"]).all() and degenerate_mask(maps["zero"]).all()
    assert degenerate_mask(maps["isotropic"]).all()  # r = 0 up to round-off
    f, _, _ = _gaussians(seed=8)
    assert not degenerate_mask(f).any()


# ----------------------------------------------------------------------------- magnitudes
@pytest.mark.parametrize("scale", [1e-3, 0.5, 7.0, 300.0])
@pytest.mark.parametrize("cfg", [{}, {"distance": "l2"}, {"variant": "v1"}, {"restriction": "none"}],
                         ids=["default", "l2", "v1", "none"])
def test_normalisation_keeps_value_and_gradient_at_ordinary_magnitudes(scale, cfg):
    """The per-map scaling inside the moments changes neither value nor gradient (float64 reference)."""
    f, _, u = _gaussians(seed=9)
    ref_kw = {"dist": cfg.get("distance", "smoothl1"), "restriction": cfg.get("restriction", "value"),
              "variant": cfg.get("variant", "v2")}
    ours = _value_and_grad(STARLoss(**cfg), f * scale, u)
    ref = _value_and_grad(lambda a, b: _ref_star(a, b, **ref_kw), f * scale, u)
    _assert_close(ours, ref)
    fp32 = STARLoss(**cfg)(f.float() * scale, u.float())
    assert abs(fp32.item() - ref[0].item()) <= 1e-4 * abs(ref[0].item())


@pytest.mark.parametrize("magnitude", [1e19, 1e30])
def test_huge_peaks_give_the_ordinary_value_and_scaled_gradient(magnitude):
    """STAR normalises F to a distribution: F·1e30 has the value of F, and the gradient of F divided by 1e30."""
    f, _, u = _gaussians(seed=10)
    ref_v, ref_gf, _ = _value_and_grad(_ref_star, f, u)  # float64, ordinary magnitude
    big = (f.float() * magnitude).requires_grad_(True)
    val = STARLoss()(big, u.float())
    (grad,) = torch.autograd.grad(val, big)
    assert abs(val.item() - ref_v.item()) <= 1e-4 * ref_v.item()
    assert ((grad.double() * magnitude - ref_gf).abs().max() <= 1e-3 * ref_gf.abs().max()).item()


def test_scaled_maps_gradcheck_and_repeated_backward():
    gen = torch.Generator().manual_seed(11)
    f = (torch.rand(1, 3, 12, 20, generator=gen, dtype=torch.float64) ** 4 * 50.0).requires_grad_(True)
    u = (torch.rand(1, 3, 2, generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: STARLoss(distance="l2")(a, b), (f, u))
    val = STARLoss()(f, u)
    (first,) = torch.autograd.grad(val, f, retain_graph=True)  # the first backward reuses a forward buffer
    (second,) = torch.autograd.grad(val, f)
    assert torch.equal(first, second)
