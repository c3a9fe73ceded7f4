"""Coordinate frames and decoders (method.md 1.2-1.6, 4.1-4.2, 5.9); expectations are hand-derived."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flare.models.decode import (
    align_corners_grid,
    apply_affine,
    argmax_decode,
    crop_to_label,
    crop_to_original,
    decode_heatmaps,
    decoders_for,
    grid_index_to_label,
    heatmap_px_to_label,
    invert_affine,
    label_to_crop,
    label_to_grid_index,
    soft_argmax,
)

S, W = 256, 64


def similarity(scale: float, theta: float, tx: float, ty: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty], [0.0, 0.0, 1.0]])


def crop_matrix(cx: float, cy: float, scale: float) -> np.ndarray:
    """M_crop of method.md 1.2, written out independently."""
    s = S / (200.0 * scale)
    return np.array([[s, 0.0, 127.5 - s * cx], [0.0, s, 127.5 - s * cy], [0.0, 0.0, 1.0]])


# ---------------------------------------------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------------------------------------------


def test_round_trip_original_crop_label_grid_numpy() -> None:
    rng = np.random.default_rng(0)
    m = similarity(1.37, 0.4, -55.0, 80.0) @ crop_matrix(412.3, 301.7, 1.9)
    pts = rng.uniform(-100, 900, size=(5, 98, 2))  # unclamped: many fall outside the crop
    p = apply_affine(pts, m)
    u = crop_to_label(p, S)
    j = label_to_grid_index(u, W, "corners")
    p_back = label_to_crop(grid_index_to_label(j, W, "corners"), S)
    back = crop_to_original(p_back, m)
    assert np.abs(back - pts).max() < 1e-4
    # and the forward map is the literal homogeneous product
    ref = np.einsum("ij,mnj->mni", m, np.concatenate([pts, np.ones((5, 98, 1))], -1))[..., :2]
    np.testing.assert_allclose(p, ref, atol=1e-9)


def test_round_trip_torch_batched_matrices_float64() -> None:
    gen = torch.Generator().manual_seed(1)
    mats = torch.tensor(np.stack([similarity(0.8, -0.3, 10, 20), similarity(2.1, 1.2, -40, 5)]))
    pts = torch.rand(2, 29, 2, generator=gen, dtype=torch.float64) * 500
    p = apply_affine(pts, mats)
    u = crop_to_label(p, S)
    back = crop_to_original(label_to_crop(u, S), mats)
    assert isinstance(back, torch.Tensor) and back.dtype == torch.float64
    assert (back - pts).abs().max().item() < 1e-4
    # per-sample matrices: sample 1 must use its own matrix
    p1 = apply_affine(pts[1], mats[1, :2])  # 2x3 form
    assert torch.allclose(p[1], p1)


def test_grid_endpoints_corners() -> None:
    assert label_to_crop(grid_index_to_label(0, W, "corners"), S) == pytest.approx(-0.5)
    assert label_to_crop(grid_index_to_label(63, W, "corners"), S) == pytest.approx(255.5)
    # 1.4: p = S*j/(W-1) - 0.5
    assert label_to_crop(grid_index_to_label(10, W, "corners"), S) == pytest.approx(256 * 10 / 63 - 0.5)
    assert crop_to_label(-0.5, S) == -1.0 and crop_to_label(255.5, S) == 1.0


def test_crop_centre_maps_to_127_5() -> None:
    cx, cy, scale = 321.25, 188.5, 1.4
    m = crop_matrix(cx, cy, scale)
    out = apply_affine(np.array([[cx, cy]]), m)
    np.testing.assert_allclose(out, [[127.5, 127.5]], atol=1e-12)
    np.testing.assert_allclose(crop_to_original(np.array([[127.5, 127.5]]), m), [[cx, cy]], atol=1e-9)
    # a point 100 original px right of the centre lands s*100 crop px right of 127.5
    out2 = apply_affine(np.array([[cx + 100.0, cy]]), m)
    np.testing.assert_allclose(out2, [[127.5 + 100 * 256 / 280, 127.5]], atol=1e-9)


def test_corners_vs_consistent_half_pixel_at_edges() -> None:
    u = np.array([-1.0, 0.0, 1.0])  # left edge, centre, right edge of the crop
    j_corners = label_to_grid_index(u, W, "corners")
    j_consistent = label_to_grid_index(u, W, "consistent")
    np.testing.assert_allclose(j_corners, [0.0, 31.5, 63.0])
    np.testing.assert_allclose(j_consistent, [-0.5, 31.5, 63.5])
    np.testing.assert_allclose(j_corners - j_consistent, [0.5, 0.0, -0.5])
    # 1.3 closed form: difference = 1/2 - (2p + 1)/(2S)
    p = np.array([3.0, 100.0, 200.0])
    diff = label_to_grid_index(crop_to_label(p, S), W, "corners") - label_to_grid_index(
        crop_to_label(p, S), W, "consistent"
    )
    np.testing.assert_allclose(diff, 0.5 - (2 * p + 1) / (2 * S), atol=1e-12)
    assert grid_index_to_label(0, W, "consistent") == pytest.approx(1 / 64 - 1)


def test_invert_affine_shapes_and_unknown_convention() -> None:
    m = similarity(1.5, 0.2, 3.0, -4.0)
    np.testing.assert_allclose(invert_affine(m) @ m, np.eye(3), atol=1e-12)
    inv23 = invert_affine(m[:2])
    assert inv23.shape == (2, 3)
    np.testing.assert_allclose(inv23, np.linalg.inv(m)[:2], atol=1e-12)
    with pytest.raises(ValueError):
        grid_index_to_label(3, W, "centres")
    with pytest.raises(ValueError):
        apply_affine(np.zeros((3, 2)), np.eye(2))


# ---------------------------------------------------------------------------------------------------------------
# Soft-argmax (4.1-4.2)
# ---------------------------------------------------------------------------------------------------------------


def test_soft_argmax_one_hot_and_block() -> None:
    h = torch.zeros(1, 2, 8, 8)
    h[0, 0, 2, 5] = 3.7  # row 2, column 5
    h[0, 1, 3:5, 3:5] = 1.0  # symmetric 2x2 block centred on (3.5, 3.5)
    mu = soft_argmax(h)
    assert mu.shape == (1, 2, 2)
    torch.testing.assert_close(mu[0, 0], torch.tensor([2 * 5 / 7 - 1, 2 * 2 / 7 - 1]))
    torch.testing.assert_close(mu[0, 1], torch.tensor([0.0, 0.0]), atol=1e-7, rtol=0)


def test_soft_argmax_matches_plain_reference_and_zero_map() -> None:
    gen = torch.Generator().manual_seed(2)
    h = torch.rand(2, 3, 5, 7, generator=gen, dtype=torch.float64)
    h[1, 2] = 0.0
    mu = soft_argmax(h)
    for b in range(2):
        for n in range(3):
            f = h[b, n].numpy()
            tot = max(f.sum(), 1e-6)
            xs = np.array([2 * j / 6 - 1 for j in range(7)])
            ys = np.array([2 * i / 4 - 1 for i in range(5)])
            ex = sum(f[i, j] / tot * xs[j] for i in range(5) for j in range(7))
            ey = sum(f[i, j] / tot * ys[i] for i in range(5) for j in range(7))
            assert mu[b, n].tolist() == pytest.approx([ex, ey], abs=1e-12)
    assert mu[1, 2].tolist() == [0.0, 0.0]


def test_soft_argmax_half_precision_computes_in_fp32() -> None:
    h = torch.zeros(1, 1, 64, 64, dtype=torch.float16)
    h[0, 0, 10, 20] = 1.0
    mu = soft_argmax(h)
    assert mu.dtype == torch.float32
    assert mu[0, 0].tolist() == pytest.approx([2 * 20 / 63 - 1, 2 * 10 / 63 - 1], abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Argmax decoders (5.9)
# ---------------------------------------------------------------------------------------------------------------


def test_argmax_none_integer_coords_and_tie_break() -> None:
    h = torch.zeros(2, 2, 6, 9)
    h[0, 0, 4, 7] = 2.0
    h[0, 1, 1, 6] = 5.0
    h[0, 1, 3, 2] = 5.0  # tie: (row 1, col 6) comes first in row-major order
    h[1, 0, 2, 3] = 5.0
    h[1, 0, 2, 8] = 5.0  # same row: lower column first
    h[1, 1] = 1.0  # constant map: index 0
    out = argmax_decode(h, refine="none")
    assert out.tolist() == [[[7.0, 4.0], [6.0, 1.0]], [[3.0, 2.0], [0.0, 0.0]]]


def test_local_softargmax_inverts_bilinear_splat() -> None:
    x0, y0 = 10.3, 20.6
    fx, fy = x0 - 10, y0 - 20
    weights = {(20, 10): (1 - fx) * (1 - fy), (20, 11): fx * (1 - fy), (21, 10): (1 - fx) * fy, (21, 11): fx * fy}
    for tau in (1.0, 0.5):
        h = torch.full((1, 1, 32, 32), -1e4, dtype=torch.float64)
        for (i, j), wgt in weights.items():
            h[0, 0, i, j] = tau * math.log(wgt)
        out = argmax_decode(h, refine="local_softargmax", radius=1, temperature=tau)
        assert out[0, 0].tolist() == pytest.approx([x0, y0], abs=1e-10)
        # plain argmax is the heaviest corner (row 21, column 10, weight 0.42)
        assert argmax_decode(h, refine="none")[0, 0].tolist() == [10.0, 21.0]
    # normalised output through the dispatcher: corners grid
    u = decode_heatmaps(h, "argmax_refine", temperature=0.5)
    assert u[0, 0].tolist() == pytest.approx([2 * x0 / 31 - 1, 2 * y0 / 31 - 1], abs=1e-10)


def _local_reference(f: np.ndarray, r: int, tau: float) -> tuple[float, float]:
    """Plain loop version of 5.9 step 2 for one map."""
    h, w = f.shape
    i0, j0 = divmod(int(np.argmax(f)), w)
    cells = [(i, j) for i in range(i0 - r, i0 + r + 1) for j in range(j0 - r, j0 + r + 1) if 0 <= i < h and 0 <= j < w]
    m = max(f[i, j] for i, j in cells)
    ws = [math.exp((f[i, j] - m) / tau) for i, j in cells]
    z = sum(ws)
    return sum(wt * j for wt, (i, j) in zip(ws, cells)) / z, sum(wt * i for wt, (i, j) in zip(ws, cells)) / z


def test_local_softargmax_matches_loop_reference_with_border_clipping() -> None:
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(3, 4, 7, 6, generator=gen, dtype=torch.float64) * 3
    h[0, 0, 0, 0] = 50.0  # corner peak: window clipped to 2x2
    h[0, 1, 6, 3] = 50.0  # bottom edge
    h[1, 2, 2, 5] = 50.0  # right edge
    for r, tau in ((1, 1.0), (2, 0.7)):
        out = argmax_decode(h, refine="local_softargmax", radius=r, temperature=tau)
        for b in range(3):
            for n in range(4):
                assert out[b, n].tolist() == pytest.approx(_local_reference(h[b, n].numpy(), r, tau), abs=1e-12)


def test_local_softargmax_large_scores_are_stable() -> None:
    h = torch.zeros(1, 1, 5, 5)
    h[0, 0, 2, 2] = 1e4
    h[0, 0, 2, 3] = 1e4 - math.log(3.0)  # weight 1/3 of the peak -> x = (2 + 3/3)/(1 + 1/3) = 2.25
    out = argmax_decode(h, refine="local_softargmax")
    assert torch.isfinite(out).all()
    assert out[0, 0].tolist() == pytest.approx([2.25, 2.0], abs=2e-3)


def test_quarter_offset() -> None:
    h = torch.zeros(1, 3, 5, 5)
    h[0, 0, 2, 2] = 1.0
    h[0, 0, 2, 3] = 0.5  # right neighbour larger than left -> +0.25 in x
    h[0, 0, 1, 2] = 0.2  # upper neighbour larger than lower -> -0.25 in y
    h[0, 1, 3, 1] = 1.0  # symmetric neighbours -> no shift
    h[0, 2, 0, 4] = 1.0  # corner: no shift on either axis
    h[0, 2, 1, 4] = 0.9
    out = argmax_decode(h, refine="quarter_offset")
    assert out[0].tolist() == [[2.25, 1.75], [1.0, 3.0], [4.0, 0.0]]


def test_decode_dispatch_and_errors() -> None:
    h = torch.zeros(1, 1, 64, 64)
    h[0, 0, 16, 48] = 1.0
    expected = [2 * 48 / 63 - 1, 2 * 16 / 63 - 1]
    for method in ("softargmax", "argmax", "argmax_refine"):
        assert decode_heatmaps(h, method)[0, 0].tolist() == pytest.approx(expected, abs=1e-6), method
    # consistent grid: (2j + 1)/W - 1
    p_hm = argmax_decode(h, refine="none")
    assert heatmap_px_to_label(p_hm, 64, "consistent")[0, 0].tolist() == pytest.approx([97 / 64 - 1, 33 / 64 - 1])
    assert heatmap_px_to_label(np.array([0.0, 63.0]), W).tolist() == [-1.0, 1.0]
    assert align_corners_grid(5).tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="unknown decoder 'soft_argmax'"):
        decode_heatmaps(h, "soft_argmax")  # the job spec's names only
    with pytest.raises(ValueError):
        argmax_decode(h, refine="parabola")
    with pytest.raises(ValueError):
        decode_heatmaps(h[0], "argmax")


def test_decoders_for() -> None:
    assert decoders_for("rwsa") == ["argmax_refine", "argmax"]
    assert decoders_for("star") == decoders_for("smoothl1") == ["softargmax"]
    assert decoders_for("star", "argmax") == ["argmax"]
    with pytest.raises(ValueError, match="bogus"):
        decoders_for("star", "bogus")
