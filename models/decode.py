"""Coordinate frames and heatmap decoders (method.md sections 1, 4.1-4.2 and 5.9).

Frames (1.1): original pixels P, crop pixels p (P -> p by the sample's 3x3 matrix M), normalised labels
u = (2p + 1)/S - 1 and heatmap indices / heatmap px (j, i). Every function names the frames it maps between;
the low-level helpers take the grid convention as a required argument (1.6 rule 1):

- ``"corners"``: g_j = 2j/(W - 1) - 1 (STAR default, "align_corners=True" at W) [SC];
- ``"consistent"``: g_j = (2j + 1)/W - 1 (geometrically consistent, fresh experiments only).

Points are (..., 2) arrays with x (column) first. The affine helpers accept numpy arrays or torch tensors;
the decoders work on torch tensors (B, N, h, w) on any device, without host synchronisation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

CONVENTIONS = ("corners", "consistent")
REFINEMENTS = ("none", "local_softargmax", "quarter_offset")
DECODERS = ("softargmax", "argmax", "argmax_refine")  # the job spec's names (decode: ...)

ArrayLike = Any  # numpy array, torch tensor or Python scalar


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown grid convention {convention!r}; known: {CONVENTIONS}")


# --------------------------------------------------------------------------------------------------------------
# Crop pixels <-> normalised labels <-> heatmap grid (1.3, 1.4)
# --------------------------------------------------------------------------------------------------------------


def crop_to_label(p: ArrayLike, size: int) -> ArrayLike:
    """Crop px -> normalised label: u = (2p + 1)/S - 1, so p = -0.5 -> -1 and p = S - 0.5 -> +1 (1.3)."""
    return (2.0 * p + 1.0) / size - 1.0


def label_to_crop(u: ArrayLike, size: int) -> ArrayLike:
    """Normalised label -> crop px: p = ((u + 1)S - 1)/2 (1.4)."""
    return ((u + 1.0) * size - 1.0) / 2.0


def grid_index_to_label(j: ArrayLike, width: int, convention: str) -> ArrayLike:
    """Heatmap index / heatmap px j -> grid coordinate g_j in [-1, 1] (1.1, 1.3).

    ``"corners"``: g_j = 2j/(W - 1) - 1; ``"consistent"``: g_j = (2j + 1)/W - 1. Fractional j is allowed.
    """
    _check_convention(convention)
    if convention == "corners":
        if width < 2:
            raise ValueError("the 'corners' grid needs width >= 2")
        return 2.0 * j / (width - 1) - 1.0
    return (2.0 * j + 1.0) / width - 1.0


def label_to_grid_index(u: ArrayLike, width: int, convention: str) -> ArrayLike:
    """Grid coordinate / label u -> fractional heatmap index j; the inverse of :func:`grid_index_to_label`.

    ``"corners"``: j = (u + 1)(W - 1)/2; ``"consistent"``: j = ((u + 1)W - 1)/2 (1.3).
    """
    _check_convention(convention)
    if convention == "corners":
        if width < 2:
            raise ValueError("the 'corners' grid needs width >= 2")
        return (u + 1.0) * (width - 1) / 2.0
    return ((u + 1.0) * width - 1.0) / 2.0


def align_corners_grid(n: int, device: torch.device | str | None = None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The STAR training grid along one axis: g_j = 2j/(n - 1) - 1 for j = 0..n-1 (1.3, "corners")."""
    return grid_index_to_label(torch.arange(n, device=device, dtype=dtype), n, "corners")


def heatmap_px_to_label(
    p_hm: ArrayLike, width: int, convention: str = "corners", height: int | None = None
) -> ArrayLike:
    """Heatmap px (x, y) (..., 2) -> normalised label (..., 2) (5.9 step 3). ``height`` defaults to ``width``."""
    height = width if height is None else height
    gx = grid_index_to_label(p_hm[..., 0], width, convention)
    gy = grid_index_to_label(p_hm[..., 1], height, convention)
    if isinstance(p_hm, torch.Tensor):
        return torch.stack((gx, gy), dim=-1)
    return np.stack((gx, gy), axis=-1)


# --------------------------------------------------------------------------------------------------------------
# Affine matrices: original px <-> crop px (1.2, 1.4)
# --------------------------------------------------------------------------------------------------------------


def _check_matrix_shape(shape: tuple[int, ...]) -> None:
    if tuple(shape[-2:]) not in ((3, 3), (2, 3)):
        raise ValueError(f"matrix must have shape (..., 3, 3) or (..., 2, 3), got {tuple(shape)}")


def apply_affine(points: ArrayLike, matrix: ArrayLike) -> ArrayLike:
    """Map points (..., N, 2) by affine matrices (..., 3, 3) or (..., 2, 3): p = A·[P, 1]ᵀ (1.2).

    The last row of a 3x3 matrix is taken to be [0, 0, 1] (the crop and augmentation matrices of 8.3 are
    affine). Batch dimensions broadcast. If either argument is a torch tensor, the result is a tensor on the
    points' device with the promoted floating dtype; otherwise a numpy array.
    """
    _check_matrix_shape(tuple(matrix.shape) if hasattr(matrix, "shape") else np.shape(matrix))
    if isinstance(points, torch.Tensor) or isinstance(matrix, torch.Tensor):
        pts = torch.as_tensor(points)
        mat = torch.as_tensor(matrix, device=pts.device)
        dtype = torch.promote_types(pts.dtype, mat.dtype)
        if not dtype.is_floating_point:
            dtype = torch.get_default_dtype()
        pts, mat = pts.to(dtype), mat.to(dtype)
        return pts @ mat[..., :2, :2].transpose(-1, -2) + mat[..., None, :2, 2]
    pts, mat = np.asarray(points), np.asarray(matrix)
    dtype = np.result_type(pts, mat, np.float32)
    pts, mat = pts.astype(dtype, copy=False), mat.astype(dtype, copy=False)
    return pts @ np.swapaxes(mat[..., :2, :2], -1, -2) + mat[..., None, :2, 2]


def invert_affine(matrix: ArrayLike) -> ArrayLike:
    """Inverse of affine matrices (..., 3, 3) or (..., 2, 3), same shape out; full 3x3 inverse (1.4)."""
    shape = tuple(matrix.shape) if hasattr(matrix, "shape") else np.shape(matrix)
    _check_matrix_shape(shape)
    is_2x3 = shape[-2] == 2
    if isinstance(matrix, torch.Tensor):
        mat = matrix if matrix.dtype.is_floating_point else matrix.to(torch.get_default_dtype())
        if is_2x3:
            last = torch.tensor([0.0, 0.0, 1.0], dtype=mat.dtype, device=mat.device)
            mat = torch.cat((mat, last.expand(*mat.shape[:-2], 1, 3)), dim=-2)
        inv = torch.linalg.inv(mat)
    else:
        mat = np.asarray(matrix)
        mat = mat.astype(np.result_type(mat, np.float32), copy=False)
        if is_2x3:
            last = np.broadcast_to(np.array([0.0, 0.0, 1.0], dtype=mat.dtype), (*mat.shape[:-2], 1, 3))
            mat = np.concatenate((mat, last), axis=-2)
        inv = np.linalg.inv(mat)
    return inv[..., :2, :] if is_2x3 else inv


def crop_to_original(points_crop: ArrayLike, matrix: ArrayLike) -> ArrayLike:
    """Crop px -> original-image px: P = M⁻¹·[p, 1]ᵀ with the full 3x3 inverse of the sample's M (1.4)."""
    return apply_affine(points_crop, invert_affine(matrix))


def _as_float(heatmaps: torch.Tensor) -> torch.Tensor:
    """fp32 for low-precision inputs (AMP), float64 kept; checks the (B, N, h, w) shape."""
    if not isinstance(heatmaps, torch.Tensor):
        raise TypeError(f"heatmaps must be a torch.Tensor, got {type(heatmaps).__name__}")
    if heatmaps.ndim != 4:
        raise ValueError(f"heatmaps must have shape (B, N, h, w), got {tuple(heatmaps.shape)}")
    return heatmaps if heatmaps.dtype == torch.float64 else heatmaps.float()


def soft_argmax(heatmaps: torch.Tensor, convention: str = "corners") -> torch.Tensor:
    """STAR soft-argmax (4.1-4.2, Eq. 1): (B, N, h, w) -> normalised (x, y) (B, N, 2).

    P = F / max(Σ F, 1e-6) (no softmax), μ = Σ P·g with g on the ``convention`` grid (STAR: ``"corners"``).
    Only for non-negative maps (5.9 step 5); an all-zero map decodes to (0, 0). Maps whose values exceed 1
    are first divided by their largest magnitude (detached; P is scale-invariant), so sums never overflow.
    """
    f = _as_float(heatmaps)
    _, _, h, w = f.shape
    f = f / f.detach().abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1.0)
    total = f.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    prob = f / total
    gx = grid_index_to_label(torch.arange(w, device=f.device, dtype=f.dtype), w, convention)
    gy = grid_index_to_label(torch.arange(h, device=f.device, dtype=f.dtype), h, convention)
    mx = (prob.sum(dim=-2) * gx).sum(dim=-1)
    my = (prob.sum(dim=-1) * gy).sum(dim=-1)
    return torch.stack((mx, my), dim=-1)


def argmax_decode(
    heatmaps: torch.Tensor,
    refine: str = "local_softargmax",
    radius: int = 1,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Argmax decoding with optional sub-pixel refinement (5.9): (B, N, h, w) -> HEATMAP PX (x, y) (B, N, 2).

    - p* = argmax of each map; ties go to the first index in row-major order.
    - ``"none"``: p* (integer-valued floats).
    - ``"local_softargmax"``: p̂ = Σ_win p·exp(H[p]/τ) / Σ_win exp(H[p]/τ) over the (2r+1)² window around p*,
      clipped at the borders, computed max-subtracted (τ = ``temperature``, r = ``radius``).
    - ``"quarter_offset"``: 0.25 px towards the larger neighbour per axis (no shift on ties, nor along an
      axis where p* lies on the border).
    """
    if refine not in REFINEMENTS:
        raise ValueError(f"unknown refinement {refine!r}; known: {REFINEMENTS}")
    f = _as_float(heatmaps)
    b, n, h, w = f.shape
    flat = f.reshape(b, n, h * w)
    idx = flat.argmax(dim=-1)  # first maximal index (row-major) on ties
    row = torch.div(idx, w, rounding_mode="floor")
    col = idx - row * w
    if refine == "none":
        return torch.stack((col, row), dim=-1).to(f.dtype)
    if refine == "quarter_offset":
        return _quarter_offset(flat, row, col, h, w)
    if int(radius) != radius or radius < 0:
        raise ValueError(f"radius must be a non-negative integer, got {radius!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    return _local_softargmax(flat, row, col, h, w, int(radius), float(temperature))


def _local_softargmax(
    flat: torch.Tensor, row: torch.Tensor, col: torch.Tensor, h: int, w: int, radius: int, temperature: float
) -> torch.Tensor:
    """Window expectation of 5.9 step 2 on flattened maps (B, N, h·w); out-of-image cells get -inf."""
    offs = torch.arange(-radius, radius + 1, device=flat.device)
    dy, dx = torch.meshgrid(offs, offs, indexing="ij")
    rows = row[..., None] + dy.reshape(-1)  # (B, N, K)
    cols = col[..., None] + dx.reshape(-1)
    valid = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    lin = rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)
    logits = (flat.gather(-1, lin) / temperature).masked_fill(~valid, float("-inf"))
    weights = torch.softmax(logits, dim=-1)  # max-subtracted
    x = (weights * cols.to(flat.dtype)).sum(dim=-1)
    y = (weights * rows.to(flat.dtype)).sum(dim=-1)
    return torch.stack((x, y), dim=-1)


def _quarter_offset(flat: torch.Tensor, row: torch.Tensor, col: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """p* + 0.25·sign(neighbour difference) per axis, interior cells only (5.9 step 4)."""

    def at(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return flat.gather(-1, (r.clamp(0, h - 1) * w + c.clamp(0, w - 1))[..., None])[..., 0]

    dx = torch.sign(at(row, col + 1) - at(row, col - 1)) * ((col > 0) & (col < w - 1))
    dy = torch.sign(at(row + 1, col) - at(row - 1, col)) * ((row > 0) & (row < h - 1))
    x = col.to(flat.dtype) + 0.25 * dx
    y = row.to(flat.dtype) + 0.25 * dy
    return torch.stack((x, y), dim=-1)


# --------------------------------------------------------------------------------------------------------------
# The one dispatcher, with the job spec's names (5.9)
# --------------------------------------------------------------------------------------------------------------


def check_decoder(method: str) -> str:
    """``method`` if it is one of :data:`DECODERS`, else ValueError naming the known ones."""
    if method not in DECODERS:
        raise ValueError(f"unknown decoder {method!r}; known: {', '.join(DECODERS)}")
    return method


def decode_heatmaps(heatmaps: torch.Tensor, method: str, temperature: float = 1.0) -> torch.Tensor:
    """(B, N, h, w) last-stack maps -> (B, N, 2) normalised labels u on the STAR grid (1.3, 5.9).

    ``"softargmax"``: Eq. 1 on non-negative maps (STAR, soft-argmax baselines); ``"argmax"``: the peak;
    ``"argmax_refine"``: the peak refined by a 3x3 local soft-argmax at ``temperature`` (RwSA's epsilon).
    Never the sum-normalised decoder on RwSA's signed scores (5.9).
    """
    if check_decoder(method) == "softargmax":
        return soft_argmax(heatmaps)
    refine = "local_softargmax" if method == "argmax_refine" else "none"
    p_hm = argmax_decode(heatmaps, refine=refine, radius=1, temperature=temperature)
    return heatmap_px_to_label(p_hm, heatmaps.shape[-1], convention="corners", height=heatmaps.shape[-2])


def decoders_for(objective: str, decode: str = "auto") -> list[str]:
    """Decoders compared on validation (9.6): ``decode`` if set, else both argmax variants for RwSA's signed
    scores and soft-argmax for the non-negative maps of the other objectives (5.9)."""
    if decode != "auto":
        return [check_decoder(decode)]
    return ["argmax_refine", "argmax"] if objective == "rwsa" else ["softargmax"]
