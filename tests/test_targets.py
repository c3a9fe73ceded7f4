"""Edge and point heatmap targets (method.md 7.1, 7.2)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import interpolate

from flare.datasets.targets import (
    edge_heatmaps,
    fit_curve,
    point_heatmaps,
    point_heatmaps_reference,
    point_heatmaps_torch,
)
from flare.models.layouts import COFW29, W300_68, WFLW98, BoundaryGroup, Layout


def face_300w(cx: float = 128.0, cy: float = 128.0, r: float = 70.0) -> np.ndarray:
    """A plausible, left-right symmetric 68-point face (0-based crop px)."""
    pts = np.zeros((68, 2))
    a = np.linspace(math.pi, 0.0, 17)  # jaw: image-left ear, chin, image-right ear
    pts[0:17] = np.stack([cx + r * np.cos(a), cy + 0.1 * r + 1.1 * r * np.sin(a)], 1)
    for k, x0 in enumerate((-0.75, 0.15)):  # brows 17-21 and 22-26
        t = np.linspace(0, 1, 5)
        pts[17 + 5 * k : 22 + 5 * k] = np.stack(
            [cx + r * (x0 + 0.6 * t), cy - 0.55 * r - 0.1 * r * np.sin(math.pi * t)], 1
        )
    pts[27:31] = np.stack([np.full(4, cx), cy - r * np.linspace(0.35, -0.15, 4)], 1)  # nose bridge
    pts[31:36] = np.stack([cx + r * np.linspace(-0.25, 0.25, 5), np.full(5, cy + 0.3 * r)], 1)
    e = np.linspace(0, 2 * math.pi, 7)[:-1]  # eyes: image-left corner, 2 top, image-right corner, 2 bottom
    for k, ex in enumerate((-0.45 * r, 0.45 * r)):
        eye = np.stack([cx + ex - 0.22 * r * np.cos(e), cy - 0.3 * r - 0.08 * r * np.sin(e)], 1)
        pts[36 + 6 * k : 42 + 6 * k] = eye
    lo = np.linspace(0, 2 * math.pi, 13)[:-1]
    pts[48:60] = np.stack([cx - 0.45 * r * np.cos(lo), cy + 0.65 * r - 0.15 * r * np.sin(lo)], 1)
    li = np.linspace(0, 2 * math.pi, 9)[:-1]
    pts[60:68] = np.stack([cx - 0.3 * r * np.cos(li), cy + 0.65 * r - 0.05 * r * np.sin(li)], 1)
    return pts


def literal_edges(
    points: np.ndarray, layout: Layout, size: int = 256, out: int = 64, area: bool = False
) -> np.ndarray:
    """A plain port of the [SC] procedure (7.1): per-interval linspace, full 4x canvas, INTER_AREA, then
    F.interpolate bilinear (or a 4x4 area average)."""
    maps = []
    for g in layout.groups:
        part = points[list(g.indices)].astype(np.float64)
        try:
            x, y = part[:, 0].copy(), part[:, 1].copy()
            if g.closed:
                x, y = np.append(x, x[0]), np.append(y, y[0])
            tck, u = interpolate.splprep([x, y], s=0, per=g.closed, k=3)
            iv = np.array([])
            for i in range(len(u) - 1):
                iv = np.concatenate((iv, np.linspace(u[i], u[i + 1], 5, endpoint=False)))
            if not g.closed:
                iv = np.concatenate((iv, [u[-1]]))
            part = np.stack(interpolate.splev(iv, tck, der=0), -1)
        except Exception:  # noqa: BLE001, S110 - [SC] draws the raw points when the fit fails
            pass
        part = np.clip(part, 0, size - 1)
        canvas = np.zeros((4 * size, 4 * size), np.float32)
        cv2.polylines(canvas, [(part * 4 + 0.5).astype(np.int32)], g.closed, 255, 4, cv2.LINE_AA)
        maps.append(cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA))
    m = torch.from_numpy(np.stack(maps) / 255.0).float()[None]
    if area:
        return F.avg_pool2d(m, size // out)[0].numpy()
    return F.interpolate(m, size=(out, out), mode="bilinear", align_corners=False)[0].numpy()


# ---------------------------------------------------------------------------------------------- 7.2
def spec_point_canvas(p: np.ndarray, size: int = 256) -> np.ndarray:
    """7.2 step 1 written from the spec: clamp, c = trunc(p - 4.5) + 5, exp(-d^2 / 4.5) on [c-5, c+4]^2."""
    q = np.clip(p, 0, size - 1)
    c = np.trunc(q - 4.5) + 5
    t = np.arange(size)
    gx = np.where((t >= c[0] - 5) & (t <= c[0] + 4), np.exp(-((t - c[0]) ** 2) / 4.5), 0.0)
    gy = np.where((t >= c[1] - 5) & (t <= c[1] + 4), np.exp(-((t - c[1]) ** 2) / 4.5), 0.0)
    return np.outer(gy, gx)


@pytest.fixture(scope="module")
def random_points() -> np.ndarray:
    rng = np.random.default_rng(7)
    pts = rng.uniform(0.0, 255.0, (120, 2))
    pts[:20] = rng.uniform(-20.0, 6.0, (20, 2))  # top/left border, many clamped
    pts[20:40] = rng.uniform(250.0, 280.0, (20, 2))  # bottom/right border, many clamped
    pts[40:45] = [[0.0, 0.0], [255.0, 255.0], [4.5, 2.5], [-3.0, 300.0], [1.2, 200.7]]
    return pts


@pytest.mark.parametrize("official_border", [False, True])
def test_direct_point_heatmaps_equal_256_canvas_then_resize(
    random_points: np.ndarray, official_border: bool
) -> None:
    direct = point_heatmaps(random_points, official_border=official_border)
    ref = point_heatmaps_reference(random_points, official_border=official_border)
    assert direct.shape == ref.shape == (len(random_points), 64, 64)
    assert direct.dtype == np.float32
    assert np.abs(direct - ref).max() < 1e-6
    batch = torch.from_numpy(np.stack([random_points, random_points[::-1]]))
    tor = point_heatmaps_torch(batch, official_border=official_border).numpy()
    assert tor.shape == (2, len(random_points), 64, 64)
    assert np.abs(tor[0] - ref).max() < 1e-6
    assert np.abs(tor[1] - ref[::-1]).max() < 1e-6
    tor32 = point_heatmaps_torch(batch.float(), official_border=official_border)
    assert tor32.dtype == torch.float32 and np.abs(tor32[0].numpy() - ref).max() < 1e-6


def test_point_heatmaps_match_the_spec_formula_and_cv2_resize(random_points: np.ndarray) -> None:
    direct = point_heatmaps(random_points[:50])
    for p, hm in zip(random_points[:50], direct):
        canvas = spec_point_canvas(p).astype(np.float32)
        expected = cv2.resize(canvas, (64, 64), interpolation=cv2.INTER_LINEAR)
        assert np.abs(hm - expected).max() < 1e-6


def test_official_border_quirk_only_changes_the_top_left_border(random_points: np.ndarray) -> None:
    spec = point_heatmaps(random_points)
    official = point_heatmaps(random_points, official_border=True)
    changed = np.abs(spec - official).max(axis=(1, 2)) > 1e-7
    near = (np.clip(random_points, 0, 255) < 4.5).any(axis=1)
    assert changed.any() and not changed[~near].any()
    # p = (0, 128): c = (1, 128). [SC] writes columns 0..4, the spec's window [-4, 5] also column 5, which
    # cell 1 samples (columns 5 and 6) with weight 1/2; along y, c = 128 = 4*32 puts rows 129, 130
    # (d = 1, 2) in cell 32, the row maximum.
    one = np.array([[0.0, 128.0]])
    diff = point_heatmaps(one)[0] - point_heatmaps(one, official_border=True)[0]
    gy = (math.exp(-1 / 4.5) + math.exp(-4 / 4.5)) / 2
    assert diff.max() == pytest.approx(gy * math.exp(-16 / 4.5) / 2, rel=1e-5)
    assert np.unravel_index(diff.argmax(), diff.shape) == (32, 1)
    assert np.abs(np.delete(diff, 1, axis=1)).max() < 1e-7


def test_point_heatmap_peak_is_phase_dependent_and_at_most_0_81() -> None:
    best = ((1.0 + math.exp(-1 / 4.5)) / 2.0) ** 2  # canvas centre on 4j+1 or 4j+2: 0.81066
    worse = ((math.exp(-1 / 4.5) + math.exp(-4 / 4.5)) / 2.0) ** 2  # centre on 4j or 4j+3
    hm = point_heatmaps(np.array([[129.3, 130.0], [131.2, 128.4], [128.0, 131.0]]))
    assert hm[0].max() == pytest.approx(best, abs=1e-6)  # c = (129, 130): both 4j+1 / 4j+2
    assert hm[1].max() == pytest.approx(worse, abs=1e-6)  # c = (131, 128)
    assert best < 0.8107
    rng = np.random.default_rng(3)
    assert point_heatmaps(rng.uniform(-5, 260, (500, 2))).max() <= best + 1e-6
    # the peak sits in the cell holding the canvas centre: c = 129 -> cell 32 (rows 4*32+1, +2)
    assert np.unravel_index(hm[0].argmax(), hm[0].shape) == (32, 32)


# ---------------------------------------------------------------------------------------------- 7.1
def line_layout(n: int, closed: bool = False) -> Layout:
    return Layout("test", n, (BoundaryGroup("g", tuple(range(n)), closed),), (), {})


def test_horizontal_open_line_lies_on_its_row() -> None:
    y = 101.5  # canvas row 406: crop rows 101-102, the two rows that heatmap row 25 samples
    pts = np.stack([np.linspace(60.0, 200.0, 5), np.full(5, y)], 1)
    for render in ("star", "area"):
        hm = edge_heatmaps(pts, line_layout(5), render=render)
        assert hm.shape == (1, 64, 64) and hm.dtype == np.float32
        assert hm.min() >= 0.0 and hm.max() <= 1.0
        expected_row = (y + 0.5) / 4 - 0.5  # 25.0, heatmap cell of crop row y
        cols = np.arange(17, 48)  # well inside crop x = 60 .. 200
        rows = hm[0][:, cols].argmax(axis=0)
        assert np.all(np.abs(rows - expected_row) <= 1.0), render
        assert hm[0][:, cols].max(axis=0).min() > 0.2, render  # drawn along the whole segment
        assert hm[0][:22].max() == 0.0 and hm[0][29:].max() == 0.0  # nothing away from the line
        assert hm[0][:, :13].max() == 0.0 and hm[0][:, 53:].max() == 0.0  # open: stops at its ends


def test_star_render_aliases_a_line_on_the_outer_rows_of_a_cell() -> None:
    """7.1 'known weakness': the bilinear 256 -> 64 step samples crop rows 4i+1, 4i+2 only. A horizontal
    line at crop y = 100.3 (canvas row 401, crop rows 99-100 = the outer rows of cells 24 and 25) vanishes
    with render="star" and is kept by the 4x4 area average."""
    pts = np.stack([np.linspace(60.0, 200.0, 5), np.full(5, 100.3)], 1)
    star = edge_heatmaps(pts, line_layout(5), render="star")[0]
    area = edge_heatmaps(pts, line_layout(5), render="area")[0]
    assert star.max() < 1e-3
    assert np.all(area[:, 17:48].argmax(axis=0) == 25) and area[25, 17:48].min() > 0.15  # round(24.7)


def test_closed_group_draws_its_closing_segment() -> None:
    ang = np.deg2rad(np.arange(0, 360, 45))
    cx, cy = 128.0, 129.5  # the bottom of the circle, y = 209.5, is on a row that render="star" samples
    pts = np.stack([cx + 80 * np.cos(ang), cy + 80 * np.sin(ang)], 1)
    mid = np.deg2rad(337.5)  # middle of the arc from the last point back to the first
    j, i = round((cx + 80 * np.cos(mid) + 0.5) / 4 - 0.5), round((cy + 80 * np.sin(mid) + 0.5) / 4 - 0.5)
    j2, i2 = 32, 52  # at 90 degrees (128, 209.5), between points 1 and 3: drawn either way
    for render in ("star", "area"):
        closed = edge_heatmaps(pts, line_layout(8, closed=True), render=render)[0]
        open_ = edge_heatmaps(pts, line_layout(8, closed=False), render=render)[0]
        assert closed[i - 2 : i + 3, j - 2 : j + 3].max() > 0.1, render
        assert open_[i - 2 : i + 3, j - 2 : j + 3].max() == 0.0, render
        assert closed[i2 - 2 : i2 + 3, j2 - 2 : j2 + 3].max() > 0.2, render
        assert open_[i2 - 2 : i2 + 3, j2 - 2 : j2 + 3].max() > 0.2, render


def test_300w_face_edges_shape_range_and_placement() -> None:
    # x = 130: the vertical nose line sits on crop column 130, sampled by render="star" (at x = 128 it
    # would fall on the outer columns of cells 31/32 and vanish, see the aliasing test above)
    pts = face_300w(cx=130.0)
    for render in ("star", "area"):
        hm = edge_heatmaps(pts, W300_68, render=render)
        assert hm.shape == (9, 64, 64) and hm.dtype == np.float32
        assert hm.min() >= 0.0 and hm.max() <= 1.0
        for e, g in enumerate(W300_68.groups):
            assert hm[e].max() > 0.3, (render, g.name)
            ii, jj = np.nonzero(hm[e] > 0.02)
            cell = (pts[list(g.indices)] + 0.5) / 4 - 0.5
            assert jj.min() >= cell[:, 0].min() - 2 and jj.max() <= cell[:, 0].max() + 2, g.name
            assert ii.min() >= cell[:, 1].min() - 3 and ii.max() <= cell[:, 1].max() + 3, g.name
            if render == "area":  # no aliasing: every landmark lies on (within 1 cell of) its curve
                for x, y in cell:
                    r, c = round(y), round(x)
                    assert hm[e, r - 1 : r + 2, c - 1 : c + 2].max() > 0.1, g.name


@pytest.mark.parametrize("layout", [W300_68, WFLW98, COFW29], ids=lambda lay: lay.name)
def test_windowed_render_equals_full_canvas_reference(layout: Layout) -> None:
    rng = np.random.default_rng(11)
    for k in range(3):
        centre = rng.uniform(60, 200, 2)
        pts = centre + rng.normal(0.0, 40.0, (layout.num_points, 2))
        if k == 2:
            pts = rng.uniform(-30, 290, (layout.num_points, 2))  # clipped at every border
        assert np.abs(edge_heatmaps(pts, layout) - literal_edges(pts, layout)).max() < 1e-6
    pts = face_300w() if layout is W300_68 else rng.uniform(40, 220, (layout.num_points, 2))
    area = edge_heatmaps(pts, layout, render="area")
    assert np.abs(area - literal_edges(pts, layout, area=True)).max() < 1e-6
    # other crop / heatmap sizes (loose crops): 512 -> 128
    big = edge_heatmaps(2 * pts, layout, size=512, out=128)
    assert np.abs(big - literal_edges(2 * pts, layout, size=512, out=128)).max() < 1e-6


def test_fit_curve_density_and_fallbacks() -> None:
    pts = np.array([[0.0, 0.0], [10.0, 5.0], [20.0, 0.0], [30.0, 5.0], [40.0, 0.0]])
    open_curve = fit_curve(pts, closed=False)
    assert open_curve.shape == (4 * 5 + 1, 2)  # 5 per interval + the last point
    assert np.allclose(open_curve[::5], pts, atol=1e-9)  # interpolating
    closed_curve = fit_curve(pts, closed=True)
    assert closed_curve.shape == (5 * 5, 2)  # the closing interval too, no repeated end point
    assert np.allclose(closed_curve[::5], pts, atol=1e-9)
    dup = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [5.0, 5.0], [9.0, 1.0]])  # 3 distinct points
    assert np.array_equal(fit_curve(dup, closed=False), dup)
    hm = edge_heatmaps(np.array([[10.0, 10.0], [10.0, 10.0], [100.0, 10.0], [100.0, 10.0]]), line_layout(4))
    row = round(10.5 / 4 - 0.5)
    assert hm[0, row, 5:23].min() > 0.05  # the polyline fallback is drawn


def test_point_heatmap_taps_are_made_once_and_never_as_inference_tensors() -> None:
    """The resize taps are cached per size, dtype and device (no host-to-device copy per step) and stay usable by
    training even when the first call ran under ``torch.inference_mode``."""
    from flare.datasets.targets import _device_taps, point_heatmaps_torch

    _device_taps.cache_clear()
    pts = torch.tensor([[[10.0, 20.0], [100.5, 3.25]]])
    with torch.inference_mode():
        first = point_heatmaps_torch(pts, size=128, out=32)
    taps = _device_taps(128, 32, torch.float32, pts.device)
    assert not any(t.is_inference() for t in taps)
    again = point_heatmaps_torch(pts, size=128, out=32)
    assert _device_taps.cache_info().hits >= 2 and _device_taps.cache_info().misses == 1
    assert torch.equal(first, again) and again.shape == (1, 2, 32, 32)
