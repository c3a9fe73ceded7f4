"""Crop matrix and STAR augmentation (method.md 1.2, 8.2-8.4, 6.4)."""

from __future__ import annotations

import math
from dataclasses import replace

import cv2
import numpy as np
import pytest
from scipy import ndimage

from flare.datasets.augment import (
    AugmentConfig,
    apply_texture,
    augment_sample,
    compose_matrix,
    crop_matrix,
    group_flip_permutation,
    sample_geometry,
    to_tensor_image,
)
from flare.datasets.targets import edge_heatmaps
from flare.models.layouts import COFW29, W300_68, WFLW98

LOOSE = 384  # loose-crop side (source image of the warp)
CENTER = np.array([191.5, 191.5])
SCALE = 1.0  # 200 px box -> crop factor s = 256 / 200 = 1.28
S_CROP = 256 / (200 * SCALE)
GEOMETRY_ONLY = replace(
    AugmentConfig(), occlusion_prob=0.0, blur_prob=0.0, gamma_prob=0.0, noise_prob=0.0, gray_prob=0.0
)
FLIP_ONLY = replace(AugmentConfig.off(), flip_prob=1.0)


def face_68(cx: float = 191.5, cy: float = 191.5, r: float = 70.0) -> np.ndarray:
    """A plausible 68-point face in loose-crop px (same construction as in test_targets)."""
    pts = np.zeros((68, 2))
    a = np.linspace(math.pi, 0.0, 17)
    pts[0:17] = np.stack([cx + r * np.cos(a), cy + 0.1 * r + 1.1 * r * np.sin(a)], 1)
    t = np.linspace(0, 1, 5)
    for k, x0 in enumerate((-0.75, 0.15)):
        pts[17 + 5 * k : 22 + 5 * k] = np.stack(
            [cx + r * (x0 + 0.6 * t), cy - 0.55 * r - 0.1 * r * np.sin(math.pi * t)], 1
        )
    pts[27:31] = np.stack([np.full(4, cx), cy - r * np.linspace(0.35, -0.15, 4)], 1)
    pts[31:36] = np.stack([cx + r * np.linspace(-0.25, 0.25, 5), np.full(5, cy + 0.3 * r)], 1)
    e = np.linspace(0, 2 * math.pi, 7)[:-1]
    for k, ex in enumerate((-0.45 * r, 0.45 * r)):
        pts[36 + 6 * k : 42 + 6 * k] = np.stack(
            [cx + ex - 0.22 * r * np.cos(e), cy - 0.3 * r - 0.08 * r * np.sin(e)], 1
        )
    lo = np.linspace(0, 2 * math.pi, 13)[:-1]
    pts[48:60] = np.stack([cx - 0.45 * r * np.cos(lo), cy + 0.65 * r - 0.15 * r * np.sin(lo)], 1)
    li = np.linspace(0, 2 * math.pi, 9)[:-1]
    pts[60:68] = np.stack([cx - 0.3 * r * np.cos(li), cy + 0.65 * r - 0.05 * r * np.sin(li)], 1)
    return pts


def smooth_image(seed: int = 0, size: int = LOOSE) -> np.ndarray:
    """Low-frequency random colour image (a few cycles per image), uint8 BGR."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    chans = []
    for _ in range(3):
        f = rng.uniform(0.5, 2.0, 4) * 2 * math.pi / size
        ph = rng.uniform(0, 2 * math.pi, 2)
        chans.append(
            127.5 + 60 * np.sin(f[0] * x + f[1] * y + ph[0]) + 50 * np.cos(f[2] * x - f[3] * y + ph[1])
        )
    return np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)


def bilinear(image: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """(K, 3) colours at sub-pixel (x, y) points, bilinear, pixel centres at integers."""
    return np.stack(
        [
            ndimage.map_coordinates(image[..., c].astype(np.float64), [pts[:, 1], pts[:, 0]], order=1)
            for c in range(3)
        ],
        -1,
    )


def random_cov(rng: np.random.Generator, n: int) -> np.ndarray:
    a = rng.normal(size=(n, 2, 2))
    return a @ a.transpose(0, 2, 1) + 0.1 * np.eye(2)


def principal_angle(cov: np.ndarray) -> float:
    _, v = np.linalg.eigh(cov)
    return math.atan2(v[1, 1], v[0, 1])


def angle_diff(a: float, b: float, period: float = math.pi) -> float:
    d = (a - b) % period
    return min(d, period - d)


# ------------------------------------------------------------------------------------------ crop
def test_crop_matrix_maps_the_centre_to_the_crop_centre_and_scales_by_s() -> None:
    c = np.array([310.2, 95.7])
    m = crop_matrix(c, 1.3)
    s = 256 / (200 * 1.3)
    assert m.dtype == np.float64 and m.shape == (3, 3)
    assert np.allclose(m @ [*c, 1.0], [127.5, 127.5, 1.0], atol=1e-12)
    assert np.allclose(m @ [c[0] + 10.0, c[1] - 20.0, 1.0], [127.5 + 10 * s, 127.5 - 20 * s, 1.0], atol=1e-12)
    assert np.allclose(crop_matrix(c, 1.3, size=128) @ [*c, 1.0], [63.5, 63.5, 1.0], atol=1e-12)
    # with no augmentation the full matrix is the crop matrix
    g = sample_geometry(np.random.default_rng(0), AugmentConfig.off(), LOOSE)
    assert np.allclose(compose_matrix(g, c, 1.3), m, atol=1e-12)


def test_off_config_is_the_plain_crop() -> None:
    img, lm = smooth_image(1), face_68()
    out = augment_sample(
        img, lm, None, None, CENTER, SCALE, W300_68, np.random.default_rng(5), AugmentConfig.off()
    )
    m = crop_matrix(CENTER, SCALE)
    expected = cv2.warpAffine(img, m[:2], (256, 256), flags=cv2.INTER_LINEAR, borderValue=0)
    assert np.array_equal(out["image"], expected)
    assert np.allclose(out["landmarks"], 127.5 + S_CROP * (lm - CENTER), atol=1e-9)
    none = augment_sample(img, lm, None, None, CENTER, SCALE, W300_68, None, AugmentConfig())
    assert np.array_equal(none["image"], expected)  # rng=None: test-time crop whatever the config


# ------------------------------------------------------------------------------------------ geometry
def test_pixel_under_each_landmark_is_preserved_by_the_warp() -> None:
    rng_lm = np.random.default_rng(42)
    perm = W300_68.flip_permutation()
    flips = []
    for seed in range(8):
        img = smooth_image(seed)
        lm = rng_lm.uniform(100, 284, (68, 2))
        out = augment_sample(
            img, lm, None, None, CENTER, SCALE, W300_68, np.random.default_rng(seed), GEOMETRY_ONLY
        )
        flipped = out["geometry"].flipped
        flips.append(flipped)
        src = lm[perm] if flipped else lm
        inside = np.all((out["landmarks"] > 1) & (out["landmarks"] < 254), axis=1)
        assert inside.sum() > 20
        diff = np.abs(bilinear(out["image"], out["landmarks"][inside]) - bilinear(img, src[inside]))
        assert diff.mean() < 3.0, (seed, diff.mean())
        # control: the colours under unrelated points differ a lot
        assert (
            np.abs(bilinear(out["image"], out["landmarks"][inside]) - bilinear(img, src[inside][::-1])).mean()
            > 10
        )
    assert any(flips) and not all(flips)


def test_inverse_matrix_maps_output_landmarks_back() -> None:
    for seed in range(6):
        lm = face_68() + np.random.default_rng(seed).normal(0, 3, (68, 2))
        out = augment_sample(
            smooth_image(0),
            lm,
            None,
            None,
            CENTER,
            SCALE,
            W300_68,
            np.random.default_rng(seed),
            GEOMETRY_ONLY,
        )
        m = out["matrix"]
        assert m.dtype == np.float64 and m.shape == (3, 3)
        back = (np.linalg.inv(m) @ np.c_[out["landmarks"], np.ones(68)].T).T[:, :2]
        src = lm[W300_68.flip_permutation()] if out["geometry"].flipped else lm
        assert np.abs(back - src).max() < 1e-6


def test_flip_swaps_eye_corners_and_mirrors_everything() -> None:
    img, lm = smooth_image(3), face_68(cx=180.0) + np.random.default_rng(0).normal(0, 2, (68, 2))
    rng_cov = np.random.default_rng(1)
    cov = random_cov(rng_cov, 68)
    edges = edge_heatmaps(lm, W300_68, size=LOOSE, out=LOOSE // 4)
    plain = augment_sample(
        img, lm, edges, cov, CENTER, SCALE, W300_68, np.random.default_rng(0), AugmentConfig.off()
    )
    flip = augment_sample(img, lm, edges, cov, CENTER, SCALE, W300_68, np.random.default_rng(0), FLIP_ONLY)
    assert flip["geometry"].flipped and not plain["geometry"].flipped
    # 36 (image-left outer eye corner) becomes the mirror of 45 and vice versa: x' = W-1-x, c_x' = W-1-c_x
    for a, b in ((36, 45), (45, 36), (39, 42)):
        expected = [127.5 + S_CROP * (CENTER[0] - lm[b, 0]), 127.5 + S_CROP * (lm[b, 1] - CENTER[1])]
        assert np.allclose(flip["landmarks"][a], expected, atol=1e-9)
    assert np.allclose(flip["landmarks"][36, 0], 255.0 - plain["landmarks"][45, 0], atol=1e-9)
    perm = W300_68.flip_permutation()
    mirrored = plain["landmarks"][perm].copy()
    mirrored[:, 0] = 255.0 - mirrored[:, 0]
    assert np.allclose(flip["landmarks"], mirrored, atol=1e-9)
    # the image is the mirror image of the unflipped crop (up to cv2's fixed-point interpolation)
    assert np.abs(flip["image"].astype(int) - plain["image"][:, ::-1].astype(int)).max() <= 1
    # edge channels: mirrored and the left/right groups swapped (300W: brows 1<->2, eyes 5<->6)
    gperm = [0, 2, 1, 3, 4, 6, 5, 7, 8]
    assert np.abs(flip["edges"] - plain["edges"][gperm][:, :, ::-1]).max() < 1e-4
    # covariance: A = s diag(-1, 1), so the off-diagonal changes sign; permuted like the landmarks
    src = cov[perm]
    expected_cov = S_CROP**2 * np.stack(
        [src[:, 0, 0], -src[:, 0, 1], -src[:, 1, 0], src[:, 1, 1]], -1
    ).reshape(-1, 2, 2)
    assert np.allclose(flip["cov"], expected_cov, atol=1e-9)


def test_group_flip_permutation_of_the_layouts() -> None:
    assert group_flip_permutation(W300_68).tolist() == [0, 2, 1, 3, 4, 6, 5, 7, 8]
    assert group_flip_permutation(WFLW98).tolist() == [0, 2, 1, 3, 4, 6, 5, 7, 8]
    assert group_flip_permutation(COFW29).tolist() == [1, 0, 3, 2, 4, 5, 6]


def test_flip_offset_parity_reproduces_the_official_cofw_flip() -> None:
    """[SC]: the pixels are mirrored with np.fliplr (x -> W-1-x) but the landmarks and centre with
    x -> W - x; the crop is then taken from the flipped image. A literal port of that is the reference."""
    img, lm = smooth_image(4), face_68(cx=170.0)
    cfg = replace(FLIP_ONLY, flip_offset_parity=True)
    out = augment_sample(img, lm, None, None, CENTER, SCALE, W300_68, np.random.default_rng(0), cfg)
    w = img.shape[1]
    lm_flip = lm[W300_68.flip_permutation()].copy()
    lm_flip[:, 0] = w - lm_flip[:, 0]
    m_official = crop_matrix([w - CENTER[0], CENTER[1]], SCALE)
    expected = cv2.warpAffine(
        np.fliplr(img).copy(), m_official[:2], (256, 256), flags=cv2.INTER_LINEAR, borderValue=0
    )
    assert np.abs(out["image"].astype(int) - expected.astype(int)).max() <= 1
    assert np.allclose(out["landmarks"], lm_flip @ m_official[:2, :2].T + m_official[:2, 2], atol=1e-9)
    default = augment_sample(img, lm, None, None, CENTER, SCALE, W300_68, np.random.default_rng(0), FLIP_ONLY)
    assert np.abs(out["image"].astype(int) - default["image"].astype(int)).mean() > 0.2  # a 1.28 px shift


def test_rotation_rotates_the_covariance_principal_axis() -> None:
    phi = math.radians(20.0)
    rot = np.array([[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]])
    cov = np.repeat((rot @ np.diag([9.0, 1.0]) @ rot.T)[None], 68, axis=0)
    cfg = replace(GEOMETRY_ONLY, flip_prob=0.0)
    for seed in range(5):
        lm = face_68()
        out = augment_sample(
            smooth_image(0), lm, None, cov, CENTER, SCALE, W300_68, np.random.default_rng(seed), cfg
        )
        g = out["geometry"]
        assert abs(g.theta) > 1e-3
        assert angle_diff(principal_angle(out["cov"][0]), phi + g.theta) < 1e-9
        assert np.allclose(np.linalg.eigvalsh(out["cov"][0]), (g.scale * S_CROP) ** 2 * np.array([1.0, 9.0]))
        # landmarks rotate the same way: the outer eye corner -> outer eye corner direction turns by theta
        d_in, d_out = lm[45] - lm[36], out["landmarks"][45] - out["landmarks"][36]
        turn = math.atan2(d_out[1], d_out[0]) - math.atan2(d_in[1], d_in[0])
        assert angle_diff(turn, g.theta, 2 * math.pi) < 1e-9
        assert np.linalg.norm(d_out) == pytest.approx(g.scale * S_CROP * np.linalg.norm(d_in), rel=1e-12)


def test_geometry_statistics_follow_the_recipe() -> None:
    rng = np.random.default_rng(0)
    draws = [sample_geometry(rng, AugmentConfig(), LOOSE) for _ in range(4000)]
    theta = np.array([g.theta for g in draws])
    assert np.std(theta) == pytest.approx(math.radians(18.0), rel=0.05)
    assert np.std([g.scale for g in draws]) == pytest.approx(0.1, rel=0.05)
    assert np.mean([g.scale for g in draws]) == pytest.approx(1.0, abs=0.01)
    assert np.std([g.shift for g in draws]) == pytest.approx(0.05 * 255, rel=0.05)
    assert np.mean([g.flipped for g in draws]) == pytest.approx(0.5, abs=0.03)


def test_edges_are_warped_at_heatmap_resolution_with_pixel_centre_convention() -> None:
    """A blob at cell T_in(p) of the 96-px map of the 384-px loose crop ends at T_out(M p) of the 64 map,
    T(p) = (p + 0.5) n_hm / n_px - 0.5; channels follow the group flip permutation."""
    pts = np.array([[150.3, 160.2], [230.7, 170.1], [191.5, 191.5], [170.0, 230.0], [210.2, 250.9]])
    pts = np.concatenate([pts, [[160.0, 140.0], [220.0, 140.0], [180.0, 262.0], [200.0, 205.0]]])
    q = (pts + 0.5) * 96 / LOOSE - 0.5
    yy, xx = np.mgrid[0:96, 0:96]
    blobs = np.exp(-((xx - q[:, 0, None, None]) ** 2 + (yy - q[:, 1, None, None]) ** 2) / (2 * 1.5**2))
    yy, xx = np.mgrid[0:64, 0:64]
    gperm = [0, 2, 1, 3, 4, 6, 5, 7, 8]
    flips = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        out = augment_sample(
            smooth_image(0),
            face_68(),
            blobs.astype(np.float32),
            None,
            CENTER,
            SCALE,
            W300_68,
            rng,
            GEOMETRY_ONLY,
        )
        m = out["matrix"]
        expected = ((pts @ m[:2, :2].T + m[:2, 2]) + 0.5) * 64 / 256 - 0.5
        if out["geometry"].flipped:
            expected = expected[gperm]
        flips.append(out["geometry"].flipped)
        a = out["edges"]
        centroid = np.stack([(a * xx).sum((1, 2)), (a * yy).sum((1, 2))], 1) / a.sum((1, 2))[:, None]
        assert np.abs(centroid - expected).max() < 0.05, seed
    assert any(flips) and not all(flips)


def test_warped_edges_agree_with_edges_rendered_after_augmentation() -> None:
    """Warping the precomputed loose-crop edges approximates re-rendering them from the augmented
    landmarks (same curves, resampled once more): close centroids and high overlap per channel."""
    lm = face_68()
    edges = edge_heatmaps(lm, W300_68, size=LOOSE, out=LOOSE // 4, render="area")
    edges_u8 = np.round(edges * 255).astype(np.uint8)
    yy, xx = np.mgrid[0:64, 0:64]
    for seed in range(4):
        out = augment_sample(
            smooth_image(0),
            lm,
            edges,
            None,
            CENTER,
            SCALE,
            W300_68,
            np.random.default_rng(seed),
            GEOMETRY_ONLY,
        )
        out_u8 = augment_sample(
            smooth_image(0),
            lm,
            edges_u8,
            None,
            CENTER,
            SCALE,
            W300_68,
            np.random.default_rng(seed),
            GEOMETRY_ONLY,
        )
        assert out["edges"].shape == (9, 64, 64) and out["edges"].dtype == np.float32
        assert np.abs(out_u8["edges"] - out["edges"]).max() < 1.0 / 255 + 1e-6
        fresh = edge_heatmaps(out["landmarks"], W300_68, render="area")
        for e in range(9):
            a, b = out["edges"][e], fresh[e]
            ca = np.array([(a * xx).sum(), (a * yy).sum()]) / a.sum()
            cb = np.array([(b * xx).sum(), (b * yy).sum()]) / b.sum()
            assert np.linalg.norm(ca - cb) < 0.6, (seed, e, ca, cb)
            cos = (a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)
            assert cos > 0.55, (seed, e, cos)


# ------------------------------------------------------------------------------------------ texture
def test_reproducible_with_a_fixed_seed() -> None:
    img, lm = smooth_image(2), face_68()
    edges = edge_heatmaps(lm, W300_68, size=LOOSE, out=LOOSE // 4)
    cov = random_cov(np.random.default_rng(0), 68)
    runs = [
        augment_sample(img, lm, edges, cov, CENTER, SCALE, W300_68, np.random.default_rng(s), AugmentConfig())
        for s in (123, 123, 124)
    ]
    for key in ("image", "landmarks", "matrix", "edges", "cov"):
        assert np.array_equal(runs[0][key], runs[1][key]), key
    assert not np.array_equal(runs[0]["landmarks"], runs[2]["landmarks"])
    assert runs[0]["image"].dtype == np.uint8 and runs[0]["image"].shape == (256, 256, 3)


def test_grayscale_uses_bgr_luminance_unless_parity() -> None:
    blue = np.zeros((8, 8, 3), np.uint8)
    blue[..., 0] = 255  # pure blue in BGR
    cfg = replace(AugmentConfig.off(), gray_prob=1.0)
    gray = apply_texture(blue, np.random.default_rng(0), cfg)
    assert np.all(gray == round(0.114 * 255))  # 29: blue weight
    parity = apply_texture(blue, np.random.default_rng(0), replace(cfg, gray_parity=True))
    assert np.all(parity == round(0.299 * 255))  # 76: [SC] applies the red weight to the B channel


def test_occlusion_is_one_clipped_black_rectangle() -> None:
    white = np.full((256, 256, 3), 255, np.uint8)
    cfg = replace(AugmentConfig.off(), occlusion_prob=1.0)
    sizes = []
    for seed in range(30):
        out = apply_texture(white, np.random.default_rng(seed), cfg)
        zero = np.all(out == 0, axis=2)
        ii, jj = np.nonzero(zero)
        h, w = ii.max() - ii.min() + 1, jj.max() - jj.min() + 1
        assert zero.sum() == h * w  # a filled axis-aligned rectangle
        assert np.all(out[~zero] == 255)
        assert h <= 2 * (int(128 * 0.8) // 2) + 1 and w <= 2 * (128 // 2) + 1  # r_h <= 0.8, r_w <= 1
        sizes.append(h)
    assert min(sizes) < 60 < max(sizes)
    assert np.array_equal(white, np.full((256, 256, 3), 255, np.uint8))  # input untouched


def test_to_tensor_image_scales_to_pm1_and_keeps_bgr() -> None:
    img = np.zeros((4, 5, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 255, 51, 0
    t = to_tensor_image(img)
    assert tuple(t.shape) == (3, 4, 5) and str(t.dtype) == "torch.float32"
    assert np.allclose(t[0].numpy(), 1.0) and np.allclose(t[2].numpy(), -1.0)
    assert np.allclose(t[1].numpy(), (51 - 127.5) / 127.5)
