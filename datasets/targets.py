"""Edge (boundary) and point heatmap targets (method.md section 7).

All inputs are landmarks in crop pixels p (method.md 1.1: 0-based pixel centres) of an ``size``-px
square crop; outputs are ``out`` x ``out`` heatmaps whose cell j covers crop pixels
[j*size/out - 0.5, (j+1)*size/out - 0.5) (the align_corners=False resampling of 7.1 step 4 / 7.2 step 2).

Both targets are the STAR reference procedures [SC], computed without the full-resolution canvases:
edges draw only a window of the 4x canvas around each group; point heatmaps are evaluated directly at
``out`` px from the two bilinear taps per axis of the separable 256-px Gaussian.
"""

from __future__ import annotations

import functools
import warnings
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy import interpolate

from flare.models.layouts import Layout

EdgeRender = Literal["star", "area"]

SUPERSAMPLE = 4  # canvas px per crop px (7.1 step 3)
LINE_THICKNESS = 4  # canvas px (= 1 crop px)
CURVE_DENSITY = 5  # spline samples per input interval (7.1 step 2)
_CANVAS_MARGIN = 8  # canvas px kept around a group's vertices (> half the AA line width)


# --------------------------------------------------------------------------------------------------
# resampling
# --------------------------------------------------------------------------------------------------
def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1-D bilinear align_corners=False resize from ``n_in`` to ``n_out`` samples as two taps:
    ``y[i] = (1 - w[i]) * x[i0[i]] + w[i] * x[i1[i]]`` (``F.interpolate`` / ``cv2.INTER_LINEAR``; source
    coordinate (i + 0.5) n_in / n_out - 0.5 clamped to [0, n_in - 1]). At n_in = 4 n_out: i0 = 4i + 1,
    i1 = 4i + 2, w = 0.5, the mean of the two central samples of each 4-sample cell (7.1 step 4, 7.2 step 2).
    """
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0


# --------------------------------------------------------------------------------------------------
# 7.1 edge heatmaps
# --------------------------------------------------------------------------------------------------
def fit_curve(points: np.ndarray, closed: bool, density: int = CURVE_DENSITY) -> np.ndarray:
    """Dense curve through a group's points (7.1 steps 1-2), (M, 2) float64 in the input frame.

    Interpolating parametric cubic spline (s=0, k=3; periodic with the first point appended when
    ``closed``), sampled at ``density`` evenly spaced parameters per input interval (start included, end
    excluded), plus the last point for open curves. Falls back to the raw points (a polyline) when the fit
    fails or the group has fewer than 4 distinct points.
    """
    pts = np.asarray(points, dtype=np.float64)
    if len(np.unique(pts, axis=0)) < 4:
        return pts
    x, y = pts[:, 0], pts[:, 1]
    if closed:
        x, y = np.append(x, x[0]), np.append(y, y[0])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tck, u = interpolate.splprep([x, y], s=0, per=int(closed), k=3)
            # np.linspace(u[i], u[i+1], density, endpoint=False) for every interval, vectorised
            params = (
                np.arange(density)[None, :] * ((u[1:] - u[:-1]) / density)[:, None] + u[:-1, None]
            ).ravel()
            if not closed:
                params = np.append(params, u[-1])
            cx, cy = interpolate.splev(params, tck, der=0)
    except Exception:  # noqa: BLE001 - any fit failure means "draw the raw polyline" (7.1 step 2)
        return pts
    curve = np.stack([cx, cy], axis=-1)
    return curve if np.isfinite(curve).all() else pts


def _draw_group(curve: np.ndarray, closed: bool, size: int, dst: np.ndarray) -> None:
    """Draw one group into ``dst`` (size x size float32, zero) at crop resolution (7.1 step 3 and the
    area step of 4): AA polyline, width 4, value 1, on the 4x canvas, then a 4x4 box average.

    Only a window of the canvas around the vertices is drawn (aligned to whole crop pixels, clamped to the
    canvas, margin wider than the line), so the result equals the full 1024^2 canvas bit for bit.
    """
    k = SUPERSAMPLE
    clipped = np.clip(curve, 0.0, size - 1)
    # [SC] rounds 4p (not the pixel-centre map 4p + 1.5): the line sits 3/8 crop px up-left of the points
    verts = np.floor(clipped * k + 0.5).astype(np.int32)
    x0, y0 = np.maximum((verts.min(axis=0) - _CANVAS_MARGIN) // k, 0)
    x1, y1 = np.minimum(-((-(verts.max(axis=0) + _CANVAS_MARGIN + 1)) // k), size)
    canvas = np.zeros(((y1 - y0) * k, (x1 - x0) * k), dtype=np.float32)
    shifted = (verts - np.array([x0, y0], dtype=np.int32) * k).reshape(-1, 1, 2)
    cv2.polylines(canvas, [shifted], closed, 255.0, thickness=LINE_THICKNESS, lineType=cv2.LINE_AA)
    dst[y0:y1, x0:x1] = cv2.resize(canvas, (int(x1 - x0), int(y1 - y0)), interpolation=cv2.INTER_AREA)


def edge_heatmaps(
    points: np.ndarray, layout: Layout, size: int = 256, out: int = 64, render: EdgeRender = "star"
) -> np.ndarray:
    """Boundary heatmaps (7.1), one channel per group of ``layout``: (E, out, out) float32 in [0, 1].

    ``points``: (N, 2) landmarks in crop px of a ``size``-px crop. ``render="star"`` [SC] resizes the
    crop-resolution map bilinearly (align_corners=False); ``"area"`` box-averages it (``cv2.INTER_AREA``).
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.shape != (layout.num_points, 2):
        raise ValueError(f"points must be ({layout.num_points}, 2), got {pts.shape}")
    if render not in ("star", "area"):
        raise ValueError(f"render must be 'star' or 'area', got {render!r}")
    full = np.zeros((layout.num_edges, size, size), dtype=np.float32)
    for e, group in enumerate(layout.groups):  # E <= 9 groups, each its own curve
        curve = fit_curve(pts[list(group.indices)], group.closed)
        _draw_group(curve, group.closed, size, full[e])
    full /= 255.0
    interp = cv2.INTER_LINEAR if render == "star" else cv2.INTER_AREA
    maps = np.stack([cv2.resize(m, (out, out), interpolation=interp) for m in full])
    return np.clip(maps, 0.0, 1.0, out=maps)


# --------------------------------------------------------------------------------------------------
# 7.2 point heatmaps
# --------------------------------------------------------------------------------------------------
def _window_consts(sigma: float) -> tuple[float, float, int]:
    """(3 sigma, centre offset c - ul, window length n) of [SC]'s ``_circle``: the Gaussian patch is
    ``np.arange(0, 6 sigma + 1)`` long (10 for sigma = 1.5) with its peak at index (6 sigma + 1) // 2 (5)."""
    half = 3.0 * sigma
    n = int(np.ceil(2.0 * half + 1.0))
    return half, float((2.0 * half + 1.0) // 2.0), n


def _profile(p: np.ndarray, t: np.ndarray, sigma: float, official_border: bool) -> np.ndarray:
    """1-D canvas profile g(t) of 7.2 for clamped coordinates ``p`` (...,) at integer canvas indices
    ``t`` (broadcast on a new last axis): exp(-(t - c)^2 / (2 sigma^2)) on the window, 0 elsewhere."""
    half, offset, n = _window_consts(sigma)
    ul = np.trunc(p - half)[..., None]
    last = np.trunc(p + half + 1.0)[..., None] - 1.0 if official_border else ul + (n - 1)
    g = np.exp(-((t - (ul + offset)) ** 2) / (2.0 * sigma**2))
    return np.where((t >= ul) & (t <= last), g, 0.0)


def point_heatmaps(
    points: np.ndarray, size: int = 256, out: int = 64, sigma: float = 1.5, official_border: bool = False
) -> np.ndarray:
    """Point heatmaps (7.2) computed directly at ``out`` px: (N, out, out) float32.

    The ``size`` canvas is a separable product g(x) g(y), g(t) = exp(-(t - c)^2 / (2 sigma^2)) on the
    window [c - 5, c + 4] (sigma = 1.5), c = trunc(p - 4.5) + 5 after clamping p to [0, size - 1]. The
    bilinear align_corners=False resize of a separable canvas is the outer product of the 1-D resizes, each
    two taps of g (at size = 4 out: the mean of canvas samples 4j+1 and 4j+2), so only 4 out values of g
    per landmark are evaluated.

    ``official_border=True`` reproduces [SC]'s window end ``int(p + 3 sigma + 1) - 1``, which drops the
    window's last index for 0 <= p < 3 sigma (unless p - 3 sigma is an integer): a quirk at the top/left
    crop border that the spec's [c - 5, c + 4] does not have.
    """
    i0, i1, w = bilinear_taps(size, out)
    p = np.clip(np.asarray(points, dtype=np.float64), 0.0, size - 1)  # (N, 2)
    prof = (1.0 - w) * _profile(p, i0, sigma, official_border) + w * _profile(p, i1, sigma, official_border)
    return (prof[:, 1, :, None] * prof[:, 0, None, :]).astype(np.float32)  # rows from y, columns from x


def _profile_torch(p: torch.Tensor, t: torch.Tensor, sigma: float, official_border: bool) -> torch.Tensor:
    """Torch twin of :func:`_profile`: ``p`` (..., 1) clamped coordinates, ``t`` (K,) canvas indices."""
    half, offset, n = _window_consts(sigma)
    ul = torch.trunc(p - half)
    last = torch.trunc(p + half + 1.0) - 1.0 if official_border else ul + (n - 1)
    g = torch.exp(-((t - (ul + offset)) ** 2) / (2.0 * sigma**2))
    return g * ((t >= ul) & (t <= last))


@functools.lru_cache(maxsize=32)
def _device_taps(size: int, out: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """:func:`bilinear_taps` as tensors on ``device``, made once: a tensor built from host data every call is a
    blocking host-to-device copy on CUDA, which waits for every kernel already launched. Made outside inference
    mode even when first asked inside it, so that later training steps may use them."""
    with torch.inference_mode(False):
        return tuple(torch.as_tensor(a, dtype=dtype, device=device) for a in bilinear_taps(size, out))


def point_heatmaps_torch(
    points: torch.Tensor, size: int = 256, out: int = 64, sigma: float = 1.5, official_border: bool = False
) -> torch.Tensor:
    """Batched :func:`point_heatmaps` on the tensor's device: (..., N, 2) crop px -> (..., N, out, out).
    Computed in the points' float dtype (float32 for integer input); no host synchronisation (the resize taps
    go to the device once per size, dtype and device: :func:`_device_taps`)."""
    dtype = points.dtype if points.dtype.is_floating_point else torch.float32
    i0, i1, w = _device_taps(size, out, dtype, points.device)
    p = points.to(dtype).clamp(0.0, size - 1)[..., None]  # (..., N, 2, 1)
    prof = (1.0 - w) * _profile_torch(p, i0, sigma, official_border) + w * _profile_torch(
        p, i1, sigma, official_border
    )  # (..., N, 2, out)
    return prof[..., 1, :, None] * prof[..., 0, None, :]


def point_heatmaps_reference(
    points: np.ndarray, size: int = 256, out: int = 64, sigma: float = 1.5, official_border: bool = False
) -> np.ndarray:
    """Slow literal 7.2 [SC]: draw each Gaussian on a ``size`` float32 canvas (``_circle``), then
    ``F.interpolate(bilinear, align_corners=False)`` to ``out``. For tests."""
    maps = np.zeros((len(points), size, size), dtype=np.float32)
    half = 3.0 * sigma
    grid = np.arange(0, 2 * half + 1, 1, dtype=np.float32)
    n = len(grid)
    x0 = (2 * half + 1) // 2
    g = np.exp(-((grid[None, :] - x0) ** 2 + (grid[:, None] - x0) ** 2) / (2 * sigma**2))
    for i, pt in enumerate(np.asarray(points, dtype=np.float64)):
        px, py = (max(0.0, min(size - 1.0, float(v))) for v in pt)
        ul = [int(px - half), int(py - half)]
        br = [int(px + half + 1), int(py + half + 1)] if official_border else [ul[0] + n, ul[1] + n]
        gx = max(0, -ul[0]), min(br[0], size) - ul[0]
        gy = max(0, -ul[1]), min(br[1], size) - ul[1]
        ix = max(0, ul[0]), min(br[0], size)
        iy = max(0, ul[1]), min(br[1], size)
        maps[i, iy[0] : iy[1], ix[0] : ix[1]] = 255 * g[gy[0] : gy[1], gx[0] : gx[1]]
    t = torch.from_numpy(maps / 255.0).float().unsqueeze(0)
    return F.interpolate(t, size=(out, out), mode="bilinear", align_corners=False)[0].numpy()
