"""Synthetic drawn faces with exact 68- or 98-point labels (method.md 2 layouts).

Each face is a set of parametric curves in a canonical face frame (half face width = 1, x right,
y down, z towards the camera): face ellipse, eyebrow bands, eyes (ellipses with iris and pupil),
nose bridge and base, outer and inner lips. Landmarks are points of those curves, and the drawn
polylines are dense samples of the same curves *including* the landmark parameters, so every
landmark is a vertex of something drawn. Pose (roll and a mild yaw on a hemispherical depth),
expression, lighting, background, blur and occlusion vary per face.

Nothing is stored on disk: a record's image is re-rendered from ``(seed, index)`` on demand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from flare.datasets.read_300w import write_pts
from flare.datasets.records import FaceRecord, landmark_box

__all__ = [
    "Expression",
    "FaceParams",
    "SyntheticImage",
    "canonical_landmarks",
    "face_params",
    "generate_synthetic",
    "render_face",
    "write_synthetic_folder",
]

_SHIFT = 4  # cv2 fixed-point bits: sub-pixel drawing accuracy of 1/16 px
_ONE = float(1 << _SHIFT)
Curve = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Expression:
    """Shape parameters in face units (neutral defaults give a left-right symmetric face)."""

    aspect: float = 1.25  # face ellipse height / width
    eye_open: float = 1.0
    brow_raise: float = 0.0
    mouth_open: float = 0.0
    smile: float = 0.0
    gaze: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class FaceParams:
    """Everything that determines one synthetic face."""

    expr: Expression
    center: tuple[float, float]  # image px
    half_width: float  # px per face unit
    roll: float  # rad, in-plane rotation
    yaw: float  # rad
    skin: tuple[float, float, float]  # BGR
    lip: tuple[float, float, float]
    brow: tuple[float, float, float]
    iris: tuple[float, float, float]
    gain: float
    gamma: float
    blur_sigma: float
    occluder: tuple[float, float, float, float] | None  # x0, y0, x1, y1 image px
    occluder_color: tuple[float, float, float]


# ----------------------------------------------------------------------------------------------
# Canonical geometry
# ----------------------------------------------------------------------------------------------


def _depth(x: np.ndarray, bump: np.ndarray | float = 0.0) -> np.ndarray:
    """Hemispherical face surface depth plus a feature bump (nose)."""
    return 0.45 * np.sqrt(np.clip(1.0 - x * x, 0.0, None)) + bump


def _xyz(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    x, y, z = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float), np.asarray(z, float))
    return np.stack([x, y, z], axis=-1)


def _curves(e: Expression) -> dict[str, Curve]:
    """Parametric curves (t array → (len(t), 3) canonical x, y, z)."""
    curves: dict[str, Curve] = {
        "contour": lambda t: _xyz(np.cos(t), e.aspect * np.sin(t), 0.0),
    }
    for side, tag in ((-1.0, "r"), (1.0, "l")):  # r = subject's right = image left

        def brow(s: np.ndarray, side: float = side, sign: float = -1.0) -> np.ndarray:
            x = side * (0.68 - 0.48 * s)  # s = 0 outer end, 1 inner end
            yc = -0.52 - e.brow_raise - 0.07 * np.sin(np.pi * (0.2 + 0.6 * s))
            th = 0.045 + 0.045 * s
            return _xyz(x, yc + sign * th / 2, _depth(x))

        def brow_lower(s: np.ndarray, side: float = side) -> np.ndarray:
            return brow(s, side, 1.0)

        def eye(t: np.ndarray, side: float = side) -> np.ndarray:
            x = side * 0.40 + 0.17 * np.cos(t)
            return _xyz(x, -0.20 - 0.085 * e.eye_open * np.sin(t), _depth(x))

        def pupil(t: np.ndarray, side: float = side) -> np.ndarray:
            x = side * 0.40 + e.gaze[0] + 0.0 * t
            return _xyz(x, -0.20 + e.gaze[1], _depth(x))

        curves[f"brow_upper_{tag}"] = brow
        curves[f"brow_lower_{tag}"] = brow_lower
        curves[f"eye_{tag}"] = eye
        curves[f"pupil_{tag}"] = pupil

    curves["nose_line"] = lambda t: _xyz(0.0 * t, -0.20 + 0.42 * t, _depth(0.0 * t, 0.25 * t))
    curves["nose_base"] = lambda u: _xyz(
        0.16 * u, 0.24 + 0.06 * (1 - u * u), _depth(0.16 * u, 0.15 * (1 - 0.5 * u * u))
    )

    w = 0.36 + 0.5 * max(e.smile, 0.0)

    def lip(u: np.ndarray, inner: bool, upper: bool) -> np.ndarray:
        """u ∈ [-1, 1] across the mouth; inner lips end at the inner corners (0.85 w)."""
        span = 0.85 if inner else 1.0
        x = w * span * u
        yc = 0.62 - e.smile * (span * u) ** 2
        gap = 0.5 * e.mouth_open * (1 - u * u)
        bulge = np.sqrt(np.clip(1 - u * u, 0, None))
        if inner:
            y = yc - gap if upper else yc + gap
        else:
            y = yc - gap - 0.07 * bulge if upper else yc + gap + 0.09 * bulge
        return _xyz(x, y, _depth(x))

    curves["lip_outer_upper"] = lambda u: lip(u, False, True)
    curves["lip_outer_lower"] = lambda u: lip(u, False, False)
    curves["lip_inner_upper"] = lambda u: lip(u, True, True)
    curves["lip_inner_lower"] = lambda u: lip(u, True, False)
    return curves


def _lin(a: float, b: float, n: int) -> list[float]:
    return list(np.linspace(a, b, n))


_DELTA = 0.2  # the jaw starts this many rad above the horizontal through the face centre
_EYE6 = [np.pi, 2 * np.pi / 3, np.pi / 3, 0.0, -np.pi / 3, -2 * np.pi / 3]
_EYE8 = [np.pi, 3 * np.pi / 4, np.pi / 2, np.pi / 4, 0.0, -np.pi / 4, -np.pi / 2, -3 * np.pi / 4]

# Landmark specs: (curve, parameter) in layout order (method.md 2.1, 2.2).
_SPEC: dict[int, list[tuple[str, float]]] = {
    68: [
        *(("contour", t) for t in _lin(np.pi + _DELTA, -_DELTA, 17)),
        *(("brow_upper_r", s) for s in _lin(0, 1, 5)),
        *(("brow_upper_l", s) for s in _lin(1, 0, 5)),
        *(("nose_line", t) for t in _lin(0, 1, 4)),
        *(("nose_base", u) for u in _lin(-1, 1, 5)),
        *(("eye_r", t) for t in _EYE6),
        *(("eye_l", t) for t in _EYE6),
        ("lip_outer_upper", -1.0),
        *(("lip_outer_upper", u) for u in (-0.6, -0.3, 0.0, 0.3, 0.6)),
        ("lip_outer_upper", 1.0),
        *(("lip_outer_lower", u) for u in (0.6, 0.3, 0.0, -0.3, -0.6)),
        ("lip_inner_upper", -1.0),
        *(("lip_inner_upper", u) for u in (-0.45, 0.0, 0.45)),
        ("lip_inner_upper", 1.0),
        *(("lip_inner_lower", u) for u in (0.45, 0.0, -0.45)),
    ],
    98: [
        *(("contour", t) for t in _lin(np.pi + _DELTA, -_DELTA, 33)),
        *(("brow_upper_r", s) for s in _lin(0, 1, 5)),
        *(("brow_lower_r", s) for s in (0.8, 0.6, 0.4, 0.2)),
        *(("brow_upper_l", s) for s in _lin(1, 0, 5)),
        *(("brow_lower_l", s) for s in (0.2, 0.4, 0.6, 0.8)),
        *(("nose_line", t) for t in _lin(0, 1, 4)),
        *(("nose_base", u) for u in _lin(-1, 1, 5)),
        *(("eye_r", t) for t in _EYE8),
        *(("eye_l", t) for t in _EYE8),
        ("lip_outer_upper", -1.0),
        *(("lip_outer_upper", u) for u in (-0.7, -0.35, 0.0, 0.35, 0.7)),
        ("lip_outer_upper", 1.0),
        *(("lip_outer_lower", u) for u in (0.7, 0.35, 0.0, -0.35, -0.7)),
        ("lip_inner_upper", -1.0),
        *(("lip_inner_upper", u) for u in (-0.45, 0.0, 0.45)),
        ("lip_inner_upper", 1.0),
        *(("lip_inner_lower", u) for u in (0.45, 0.0, -0.45)),
        ("pupil_r", 0.0),
        ("pupil_l", 0.0),
    ],
}


def _check_points(layout_points: int) -> None:
    if layout_points not in _SPEC:
        raise ValueError(f"layout_points must be 68 or 98, got {layout_points}")


def canonical_landmarks(layout_points: int = 68, expr: Expression | None = None) -> np.ndarray:
    """(N, 3) canonical landmarks (face units; x right, y down, z depth)."""
    _check_points(layout_points)
    curves = _curves(expr or Expression())
    return np.concatenate([curves[name](np.array([t])) for name, t in _SPEC[layout_points]])


def _dense(curves: dict[str, Curve], name: str, a: float, b: float, layout_points: int, n: int = 48):
    """Dense samples of a curve on [a, b] that include its landmark parameters of the layout."""
    ts = [t for c, t in _SPEC[layout_points] if c == name and min(a, b) <= t <= max(a, b)]
    t = np.union1d(np.linspace(min(a, b), max(a, b), n), ts)
    return curves[name](t if a <= b else t[::-1])


def _project(pts3: np.ndarray, p: FaceParams) -> np.ndarray:
    """Canonical (…, 3) → image px (…, 2): yaw about the vertical axis, scale, roll, translate."""
    x = pts3[..., 0] * np.cos(p.yaw) + pts3[..., 2] * np.sin(p.yaw)
    y = pts3[..., 1]
    c, s = np.cos(p.roll), np.sin(p.roll)
    u = p.half_width * (c * x - s * y) + p.center[0]
    v = p.half_width * (s * x + c * y) + p.center[1]
    return np.stack([u, v], axis=-1)


# ----------------------------------------------------------------------------------------------
# Random parameters
# ----------------------------------------------------------------------------------------------


def face_params(seed: int, index: int, size: int = 256, layout_points: int = 68) -> FaceParams:
    """Deterministic parameters of face ``index`` of stream ``seed`` (centred, inside the image)."""
    rng = np.random.default_rng([seed, index, 0])
    expr = Expression(
        aspect=rng.uniform(1.2, 1.35),
        eye_open=rng.uniform(0.7, 1.2),
        brow_raise=rng.uniform(0.0, 0.08),
        mouth_open=rng.uniform(0.03, 0.22) if rng.random() < 0.4 else 0.0,
        smile=rng.uniform(-0.02, 0.06),
        gaze=(rng.uniform(-0.05, 0.05), rng.uniform(-0.015, 0.015)),
    )
    roll = float(np.clip(rng.normal(0.0, np.radians(12)), -np.radians(30), np.radians(30)))
    yaw = rng.uniform(-np.radians(20), np.radians(20))
    half_width = rng.uniform(0.16, 0.27) * size
    center = size / 2 + rng.normal(0.0, 0.04 * size, 2)
    tone = rng.uniform(0, 1)
    skin = np.array([60, 85, 120]) + tone * np.array([130, 120, 110]) + rng.uniform(-12, 12, 3)
    lip = skin * np.array([0.6, 0.55, 0.95]) + np.array([0, 0, 25])
    brow = rng.uniform(20, 70) * np.array([1.0, 1.1, 1.25])
    iris = rng.choice([[40, 60, 90], [110, 80, 40], [60, 90, 50], [30, 40, 60]]) * rng.uniform(0.8, 1.2)
    gain = rng.uniform(0.65, 1.35)
    gamma = float(np.exp(rng.uniform(-0.4, 0.4)))
    blur = rng.uniform(0.6, 1.8) if rng.random() < 0.3 else 0.0
    base = FaceParams(expr, (0.0, 0.0), half_width, roll, yaw, _t(skin), _t(lip), _t(brow), _t(iris),
                      gain, gamma, blur, None, (0.0, 0.0, 0.0))
    # Keep every landmark at least 3 px inside the image: shift the centre as needed.
    pts = _project(canonical_landmarks(layout_points, expr), base)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    margin = 3.0
    c = np.clip(center, margin - lo, size - 1 - margin - hi)
    occluder = None
    if rng.random() < 0.3:
        side = rng.uniform(0.5, 1.1, 2) * half_width
        mid = c + rng.uniform(-0.8, 0.8, 2) * half_width
        occluder = _t(np.concatenate([mid - side / 2, mid + side / 2]))
    occ_color = _t(rng.uniform(0, 255, 3))
    return FaceParams(expr, _t(c), half_width, roll, yaw, _t(skin), _t(lip), _t(brow), _t(iris),
                      gain, gamma, blur, occluder, occ_color)


def _t(a) -> tuple[float, ...]:
    return tuple(float(v) for v in np.asarray(a, dtype=float).ravel())


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _fixed(pts: np.ndarray) -> np.ndarray:
    return np.round(pts * _ONE).astype(np.int32).reshape(-1, 1, 2)


def _fill(img: np.ndarray, pts: np.ndarray, color) -> None:
    cv2.fillPoly(img, [_fixed(pts)], _color(color), cv2.LINE_AA, _SHIFT)


def _line(img: np.ndarray, pts: np.ndarray, color, thickness: int, closed: bool = False) -> None:
    cv2.polylines(img, [_fixed(pts)], closed, _color(color), thickness, cv2.LINE_AA, _SHIFT)


def _color(c) -> tuple[float, ...]:
    return tuple(float(np.clip(v, 0, 255)) for v in c)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency coloured noise + a linear gradient + a few random shapes (uint8 BGR)."""
    g = int(rng.integers(3, 9))
    noise = cv2.resize(rng.uniform(0, 1, (g, g, 3)).astype(np.float32), (size, size),
                       interpolation=cv2.INTER_CUBIC)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    ramp = (np.cos(ang) * xx + np.sin(ang) * yy)[..., None]
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    img = c0 * (1 - ramp) + c1 * ramp + 80.0 * (noise - 0.5)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(2, 6))):
        col = _color(rng.uniform(0, 255, 3))
        p = rng.uniform(0, size, 4)
        if rng.random() < 0.5:
            cv2.rectangle(img, _ipt(p[:2]), _ipt(p[2:]), col, -1)
        else:
            cv2.circle(img, _ipt(p[:2]), int(p[2] / 6) + 2, col, -1, cv2.LINE_AA)
    return img


def _ipt(p) -> tuple[int, int]:
    return int(p[0]), int(p[1])


def render_face(p: FaceParams, size: int, seed: int, index: int, layout_points: int = 68) -> np.ndarray:
    """Draw face ``p`` as BGR uint8 size×size (texture noise from ``(seed, index)``)."""
    rng = np.random.default_rng([seed, index, 1])
    curves = _curves(p.expr)
    img = _background(size, rng)

    def proj(name: str, a: float, b: float) -> np.ndarray:
        return _project(_dense(curves, name, a, b, layout_points), p)

    # Face: skin with a lighting ramp, composited through an anti-aliased mask; dark outline.
    face = proj("contour", -np.pi + _DELTA, np.pi + _DELTA)
    mask = np.zeros((size, size), np.uint8)
    _fill(mask, face, (255,))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    light = rng.uniform(-1, 1, 2)
    ramp = 1.0 + 0.2 * (light[0] * (xx - p.center[0]) + light[1] * (yy - p.center[1])) / (2 * p.half_width)
    skin = np.clip(np.asarray(p.skin, np.float32) * ramp[..., None], 0, 255)
    m = (mask.astype(np.float32) / 255.0)[..., None]
    img = (img * (1 - m) + skin * m).astype(np.uint8)
    thick = max(1, round(p.half_width / 40))
    _line(img, face, np.asarray(p.skin) * 0.55, thick, closed=True)

    # Eyebrows: filled bands.
    for tag in ("r", "l"):
        band = np.concatenate([proj(f"brow_upper_{tag}", 0, 1), proj(f"brow_lower_{tag}", 1, 0)])
        _fill(img, band, p.brow)

    # Eyes: sclera, iris and pupil clipped to the eye, dark lid outline.
    for tag in ("r", "l"):
        eye = proj(f"eye_{tag}", -np.pi, np.pi)
        eye_mask = np.zeros((size, size), np.uint8)
        _fill(eye_mask, eye, (255,))
        layer = np.empty_like(img)
        layer[:] = _color(rng.uniform(215, 245) * np.ones(3))
        centre = _project(curves[f"pupil_{tag}"](np.zeros(1)), p)[0]
        c_fixed = tuple(int(v) for v in np.round(centre * _ONE))
        cv2.circle(layer, c_fixed, round(0.075 * p.half_width * _ONE), _color(p.iris), -1,
                   cv2.LINE_AA, _SHIFT)
        cv2.circle(layer, c_fixed, round(0.032 * p.half_width * _ONE), (10, 10, 10), -1,
                   cv2.LINE_AA, _SHIFT)
        em = (eye_mask.astype(np.float32) / 255.0)[..., None]
        img = (img * (1 - em) + layer * em).astype(np.uint8)
        _line(img, eye, (25, 25, 30), thick, closed=True)

    # Nose: bridge line and base arc.
    _line(img, proj("nose_line", 0, 1), np.asarray(p.skin) * 0.7, thick)
    _line(img, proj("nose_base", -1, 1), np.asarray(p.skin) * 0.45, thick + 1)

    # Mouth: lips, dark opening, lip seam and outline.
    outer_up = proj("lip_outer_upper", -1, 1)
    outer = np.concatenate([outer_up, proj("lip_outer_lower", 1, -1)])
    inner_up, inner_lo = proj("lip_inner_upper", -1, 1), proj("lip_inner_lower", 1, -1)
    _fill(img, outer, p.lip)
    if p.expr.mouth_open > 0:
        _fill(img, np.concatenate([inner_up, inner_lo]), (35, 25, 45))
    corner_l, corner_r = outer_up[0], outer_up[-1]
    seam = np.concatenate([corner_l[None], inner_up, corner_r[None]])
    _line(img, seam, np.asarray(p.lip) * 0.45, thick)
    _line(img, np.concatenate([corner_l[None], inner_lo[::-1], corner_r[None]]), np.asarray(p.lip) * 0.45,
          thick)
    _line(img, outer, np.asarray(p.lip) * 0.7, thick, closed=True)

    # Occluder: a flat textured rectangle.
    if p.occluder is not None:
        x0, y0, x1, y1 = (round(v) for v in p.occluder)
        cv2.rectangle(img, (x0, y0), (x1, y1), _color(p.occluder_color), -1)
        cv2.line(img, (x0, y0), (x1, y1), _color(255 - np.asarray(p.occluder_color)), 2, cv2.LINE_AA)

    # Photometric: gain and gamma, blur, sensor noise.
    f = np.clip(img.astype(np.float32) * p.gain / 255.0, 0, 1) ** p.gamma * 255.0
    if p.blur_sigma > 0:
        f = cv2.GaussianBlur(f, (0, 0), p.blur_sigma)
    f = f + rng.normal(0.0, 3.0, f.shape).astype(np.float32)
    return np.clip(np.round(f), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticImage:
    """Image source that re-renders face ``index`` of stream ``seed`` (picklable, no files)."""

    seed: int
    index: int
    size: int
    layout_points: int

    def load(self) -> np.ndarray:
        p = face_params(self.seed, self.index, self.size, self.layout_points)
        return render_face(p, self.size, self.seed, self.index, self.layout_points)


def _landmarks(p: FaceParams, layout_points: int) -> np.ndarray:
    return _project(canonical_landmarks(layout_points, p.expr), p)


def _occlusion(points: np.ndarray, occluder) -> np.ndarray:
    if occluder is None:
        return np.zeros(len(points), np.uint8)
    x0, y0, x1, y1 = (round(v) for v in occluder)  # the drawn rectangle (inclusive pixels)
    inside = (points[:, 0] >= x0 - 0.5) & (points[:, 0] <= x1 + 0.5)
    inside &= (points[:, 1] >= y0 - 0.5) & (points[:, 1] <= y1 + 0.5)
    return inside.astype(np.uint8)


def _attributes(p: FaceParams, occlusion: np.ndarray) -> dict[str, int]:
    """WFLW-style flags (method.md 9.3) so synthetic subsets can be evaluated like WFLW ones."""
    e = p.expr
    return {
        "pose": int(abs(p.yaw) > np.radians(15) or abs(p.roll) > np.radians(20)),
        "expression": int(e.mouth_open > 0.1 or e.smile > 0.04 or e.brow_raise > 0.06),
        "illumination": int(p.gain < 0.75 or p.gain > 1.25 or not 0.75 < p.gamma < 1.33),
        "makeup": 0,
        "occlusion": int(occlusion.any()),
        "blur": int(p.blur_sigma > 1.0),
    }


def generate_synthetic(
    n: int, layout_points: int = 68, size: int = 256, seed: int = 0, split: str = "train", start: int = 0
) -> list[FaceRecord]:
    """``n`` synthetic faces (indices ``start … start+n-1`` of stream ``seed``) with exact labels
    in 0-based image px; ``load_image()`` re-renders the face deterministically."""
    _check_points(layout_points)
    records = []
    for index in range(start, start + n):
        p = face_params(seed, index, size, layout_points)
        pts = _landmarks(p, layout_points)
        occ = _occlusion(pts, p.occluder)
        attrs = _attributes(p, occ)
        source = f"seed{seed}#{index}"
        records.append(
            FaceRecord(
                sample_id=f"synthetic:{source}",
                dataset="synthetic",
                split=split,
                subsets=("synthetic", *(k for k, v in attrs.items() if v)),
                source=source,
                group=source,
                landmarks=pts,
                box=landmark_box(pts),
                attributes=attrs,
                occlusion=occ,
                image=SyntheticImage(seed, index, size, layout_points),
                image_size=(size, size),
            )
        )
    return records


def write_synthetic_folder(
    out_dir: str | Path, n: int, size: int = 256, seed: int = 0, test_fraction: float = 0.2
) -> list[Path]:
    """Write ``n`` 68-point faces as PNG + headed 1-based .pts under ``<out_dir>/synthetic/
    {trainset,testset}/`` (the last ``round(n·test_fraction)`` go to testset), readable with
    ``read_300w(out_dir)``. Returns the .pts paths."""
    out = Path(out_dir) / "synthetic"
    n_test = round(n * test_fraction)
    written = []
    for k, rec in enumerate(generate_synthetic(n, 68, size, seed)):
        folder = out / ("testset" if k >= n - n_test else "trainset")
        folder.mkdir(parents=True, exist_ok=True)
        stem = folder / f"synth_{seed}_{k:05d}"
        if not cv2.imwrite(str(stem.with_suffix(".png")), rec.load_image()):
            raise OSError(f"cannot write {stem.with_suffix('.png')}")
        write_pts(stem.with_suffix(".pts"), rec.landmarks)
        written.append(stem.with_suffix(".pts"))
    return written
