"""Crop matrix and the STAR training augmentation (method.md 1.2, 8.1-8.4, 6.4).

One matrix M = M_geo . M_crop(c') . F maps source pixels to crop pixels (8.3); the image is resampled
once with it, landmarks / covariances / edge maps are mapped with the same M, and M is returned so that
predictions can be taken back exactly (1.4). All randomness comes from the caller's
``np.random.Generator``: the same seed gives the same sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from flare.models.decode import apply_affine
from flare.models.layouts import Layout


# --------------------------------------------------------------------------------------------------
# matrices
# --------------------------------------------------------------------------------------------------
def crop_matrix(center: np.ndarray, scale: float, size: int = 256) -> np.ndarray:
    """M_crop (1.2): the similarity without rotation taking the face centre (source px) to the crop
    centre ((size - 1)/2, (size - 1)/2), with s = size / (200 scale). (3, 3) float64."""
    cx, cy = (float(v) for v in np.asarray(center, dtype=np.float64).reshape(2))
    s = size / (200.0 * float(scale))
    c0 = (size - 1) / 2.0
    return np.array([[s, 0.0, c0 - s * cx], [0.0, s, c0 - s * cy], [0.0, 0.0, 1.0]])


def flip_matrix(axis: float) -> np.ndarray:
    """F (8.3): x' = axis - x (axis = W_img - 1 for a 0-based mirror of the full image)."""
    return np.array([[-1.0, 0.0, float(axis)], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def geometry_matrix(theta: float, scale: float, shift: tuple[float, float], size: int = 256) -> np.ndarray:
    """M_geo (8.2): p -> s R(theta) (p - c0) + c0 + t about the crop centre c0 = ((size-1)/2, (size-1)/2),
    R(theta) = [[cos, -sin], [sin, cos]] acting on (x, y) [SC]. (3, 3) float64."""
    c0 = (size - 1) / 2.0
    a = scale * np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    m = np.eye(3)
    m[:2, :2] = a
    m[:2, 2] = np.array([c0, c0]) - a @ np.array([c0, c0]) + np.asarray(shift, dtype=np.float64)
    return m


def heatmap_matrix(n_px: int, n_hm: int) -> np.ndarray:
    """T: image px of an ``n_px`` crop -> cells of its ``n_hm`` heatmap, pixel-centre convention
    p_hm = (p + 0.5) n_hm / n_px - 0.5 (the frame of the 7.1 targets). (3, 3) float64."""
    k = n_hm / n_px
    return np.array([[k, 0.0, 0.5 * k - 0.5], [0.0, k, 0.5 * k - 0.5], [0.0, 0.0, 1.0]])


# --------------------------------------------------------------------------------------------------
# configuration and geometry
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AugmentConfig:
    """STAR training recipe (8.2, [SP][SC]); ``off()`` is the test-time crop. Probabilities per sample;
    sigmas of unclipped normals. ``shift_sigma_px`` is in crop px (0.05 * 255 at S = 256), at every size: the
    reduced 128 px models train with a 10% shift (RESULTS.md, face boxes), the tiny 64 px one with 20%.
    ``flip_offset_parity`` reproduces [SC]'s COFW mirror x' = W_img - x for the landmarks (the image
    itself is always mirrored about (W_img - 1)/2); ``gray_parity`` applies RGB weights to BGR (8.4)."""

    flip_prob: float = 0.5
    rotation_sigma_deg: float = 18.0
    scale_sigma: float = 0.1
    shift_sigma_px: float = 0.05 * 255
    occlusion_prob: float = 0.4
    blur_prob: float = 0.3
    gamma_prob: float = 0.2
    noise_prob: float = 0.2
    gray_prob: float = 0.2
    flip_offset_parity: bool = False
    gray_parity: bool = False

    @classmethod
    def off(cls) -> AugmentConfig:
        """No augmentation: M = M_crop (evaluation)."""
        return cls(
            flip_prob=0.0,
            rotation_sigma_deg=0.0,
            scale_sigma=0.0,
            shift_sigma_px=0.0,
            occlusion_prob=0.0,
            blur_prob=0.0,
            gamma_prob=0.0,
            noise_prob=0.0,
            gray_prob=0.0,
        )


@dataclass(frozen=True)
class Geometry:
    """One draw of the geometric augmentation (8.2): flip, rotation (rad), scale, shift (crop px).
    ``flip_offset`` is -1 (x' = W_img - 1 - x) or 0 ([SC] COFW parity); ``image_width`` (source px)
    is the default mirror width for :func:`compose_matrix`."""

    flipped: bool = False
    theta: float = 0.0
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)
    flip_offset: int = -1
    image_width: int | None = None


def sample_geometry(rng: np.random.Generator, cfg: AugmentConfig, image_width: int | None = None) -> Geometry:
    """Draw flip ~ B(flip_prob), t ~ N(0, shift_sigma_px^2) per axis, theta ~ N(0, rotation_sigma^2),
    s ~ N(1, scale_sigma^2), all unclipped (8.2), in that order from ``rng``."""
    flipped = bool(rng.random() < cfg.flip_prob)
    shift = rng.normal(0.0, cfg.shift_sigma_px, size=2)
    theta = float(rng.normal(0.0, math.radians(cfg.rotation_sigma_deg)))
    scale = float(rng.normal(1.0, cfg.scale_sigma))
    return Geometry(
        flipped=flipped,
        theta=theta,
        scale=scale,
        shift=(float(shift[0]), float(shift[1])),
        flip_offset=0 if cfg.flip_offset_parity else -1,
        image_width=image_width,
    )


def compose_matrix(
    geometry: Geometry, center: np.ndarray, scale: float, size: int = 256, image_width: int | None = None
) -> np.ndarray:
    """M = M_geo . M_crop(c') . F (8.3), source px -> crop px, (3, 3) float64. When flipped, F mirrors
    x' = W_img + flip_offset - x and the face centre's c_x is mirrored the same way."""
    center = np.asarray(center, dtype=np.float64).reshape(2).copy()
    flip = np.eye(3)
    if geometry.flipped:
        width = image_width if image_width is not None else geometry.image_width
        if width is None:
            raise ValueError("a flipped geometry needs image_width")
        flip = flip_matrix(width + geometry.flip_offset)
        center[0] = width + geometry.flip_offset - center[0]
    m_geo = geometry_matrix(geometry.theta, geometry.scale, geometry.shift, size)
    return m_geo @ crop_matrix(center, scale, size) @ flip


def group_flip_permutation(layout: Layout) -> np.ndarray:
    """perm[g] = the boundary group that group g's points come from after a horizontal flip: the group
    holding the flipped indices of g (left/right eyes and brows swap, symmetric groups map to themselves)."""
    lm_perm = layout.flip_permutation()
    sets = [frozenset(g.indices) for g in layout.groups]
    perm = np.empty(len(sets), dtype=np.int64)
    for g, members in enumerate(sets):
        flipped = frozenset(int(lm_perm[i]) for i in members)
        overlaps = [len(flipped & other) for other in sets]
        perm[g] = int(np.argmax(overlaps))
    return perm


# --------------------------------------------------------------------------------------------------
# texture (8.2, on the warped uint8 BGR crop, in this order)
# --------------------------------------------------------------------------------------------------
def _occlude(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Black rectangle [SC]: r_h ~ U[0.2, 0.8], r_w = r_h - 0.2 + U[0, 0.4], sides int(S/2 r), centre
    uniform over the crop, clipped."""
    h, w = image.shape[:2]
    rh = 0.2 + 0.6 * rng.random()
    rw = rh - 0.2 + 0.4 * rng.random()
    cx, cy = int((w - 1) * rng.random()), int((h - 1) * rng.random())
    dh, dw = int(h / 2 * rh), int(w / 2 * rw)
    x0, y0 = max(0, cx - dw // 2), max(0, cy - dh // 2)
    x1, y1 = min(w - 1, cx + dw // 2), min(h - 1, cy + dh // 2)
    image[y0 : y1 + 1, x0 : x1 + 1] = 0
    return image


def _blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Box filter of size int(S U[0, 0.05]), applied only if > 1."""
    k = int((image.shape[0] + image.shape[1]) / 2 * 0.05 * rng.random())
    return cv2.blur(image, (k, k)) if k > 1 else image


def _gamma(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """gamma ~ U[0.25, 1] or U[1, 4] (1/2 each); v -> floor(255 (v/255)^gamma)."""
    gamma = 0.25 + 0.75 * rng.random() if rng.random() < 0.5 else 1.0 + 3.0 * rng.random()
    return ((image / 255.0) ** gamma * 255.0).astype(np.uint8)


def _noise_blend(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """a ~ U[0, 0.5]; v -> (1 - a) v + a n, n uniform over 0..255 per pixel and channel; truncated."""
    noise = rng.integers(0, 256, size=image.shape, dtype=np.uint8)
    a = 0.5 * rng.random()
    return ((1.0 - a) * image + a * noise).astype(np.uint8)


def _grayscale(image: np.ndarray, parity: bool) -> np.ndarray:
    """Luminance replicated to 3 channels; BGR weights, or [SC]'s RGB weights on BGR when ``parity``."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY if parity else cv2.COLOR_BGR2GRAY)
    return np.repeat(gray[:, :, None], 3, axis=2)


def apply_texture(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """The texture steps of 8.2 in their fixed order: occlusion, blur, gamma, noise blend, grayscale.
    Returns a new (S, S, 3) uint8 array."""
    out = image.copy()
    for prob, step in (
        (cfg.occlusion_prob, _occlude),
        (cfg.blur_prob, _blur),
        (cfg.gamma_prob, _gamma),
        (cfg.noise_prob, _noise_blend),
    ):
        if rng.random() < prob:
            out = step(out, rng)
    if rng.random() < cfg.gray_prob:
        out = _grayscale(out, cfg.gray_parity)
    return out


# --------------------------------------------------------------------------------------------------
# one sample
# --------------------------------------------------------------------------------------------------
def _warp_edges(edges: np.ndarray, matrix: np.ndarray, src_px: int, out_px: int, out_hm: int) -> np.ndarray:
    """Warp (E, h, h) edge maps of an ``src_px`` crop by the crop-px matrix ``matrix`` expressed at
    heatmap resolution, H = T_out M T_in^-1 (bilinear, border 0): (E, out_hm, out_hm) float32."""
    maps = edges.astype(np.float32)
    if edges.dtype == np.uint8:
        maps /= 255.0
    h = heatmap_matrix(out_px, out_hm) @ matrix @ np.linalg.inv(heatmap_matrix(src_px, edges.shape[-1]))
    warped = cv2.warpAffine(
        np.ascontiguousarray(maps.transpose(1, 2, 0)),
        h[:2],
        (out_hm, out_hm),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    return warped.reshape(out_hm, out_hm, -1).transpose(2, 0, 1).copy()


def augment_sample(
    image: np.ndarray,
    landmarks: np.ndarray,
    edges: np.ndarray | None,
    cov: np.ndarray | None,
    center: np.ndarray,
    scale: float,
    layout: Layout,
    rng: np.random.Generator | None,
    cfg: AugmentConfig,
    size: int = 256,
) -> dict[str, np.ndarray | Geometry]:
    """Crop (and, in training, augment) one face with a single warp (8.3).

    Inputs are in source px of ``image`` (H, W, 3) uint8 BGR (e.g. the loose crop): ``landmarks`` (N, 2),
    ``edges`` (E, h, h) uint8 or float edge maps of the whole ``image`` (7.1; h = W/4 for a loose crop),
    ``cov`` (N, 2, 2), face ``center`` (2,) and ``scale`` (box side = 200 scale px). ``rng=None`` means
    no randomness at all (the test-time crop, whatever ``cfg`` says).

    Returns ``image`` (size, size, 3) uint8 BGR; ``landmarks`` (N, 2) float64 crop px, unclamped,
    permuted by the flip pairs when flipped; ``matrix`` M (3, 3) float64 with landmarks = M . source;
    ``edges`` (E, size/4, size/4) float32 (warped with M at heatmap resolution, channels permuted by
    :func:`group_flip_permutation` when flipped); ``cov`` (N, 2, 2) float64 = A Sigma A^T in crop px
    (6.4), permuted like the landmarks; ``geometry`` the draw.
    """
    width = image.shape[1]
    geometry = sample_geometry(rng, cfg, width) if rng is not None else Geometry(image_width=width)
    matrix = compose_matrix(geometry, center, scale, size)
    img_matrix = matrix
    if geometry.flipped and geometry.flip_offset != -1:
        # parity: landmarks use x' = W + offset - x, the pixels are still mirrored about (W - 1)/2
        img_matrix = matrix @ flip_matrix(width + geometry.flip_offset) @ flip_matrix(width - 1)
    warped = cv2.warpAffine(
        image,
        img_matrix[:2],
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    if rng is not None:
        warped = apply_texture(warped, rng, cfg)

    lm_perm = layout.flip_permutation() if geometry.flipped else np.arange(layout.num_points)
    out: dict[str, np.ndarray | Geometry] = {
        "image": warped,
        "landmarks": apply_affine(landmarks, matrix)[lm_perm],
        "matrix": matrix,
        "geometry": geometry,
    }
    if edges is not None:
        warped_edges = _warp_edges(edges, matrix, width, size, size // 4)
        out["edges"] = warped_edges[group_flip_permutation(layout)] if geometry.flipped else warped_edges
    if cov is not None:
        a = matrix[:2, :2]
        out["cov"] = (a @ np.asarray(cov, dtype=np.float64) @ a.T)[lm_perm]
    return out


def to_tensor_image(image: np.ndarray) -> torch.Tensor:
    """(S, S, 3) uint8 BGR -> (3, S, S) float32 in [-1, 1], x = (v - 127.5) / 127.5, BGR kept (1.5)."""
    chw = np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1), dtype=np.float32)
    return torch.from_numpy((chw - 127.5) / 127.5)
