"""Face detectors for ``flare predict`` (method.md 8.1, ``crop.box_source = "detector"``): OpenCV's Haar
cascade (the default, no extra) or dlib's HOG / CNN (MMOD) detectors from the optional ``peers`` extra
(``dlib-bin`` + ``face-recognition-models``, whose wheel ships the CNN weights: nothing is downloaded at run
time). Each detector's box is mapped to an estimate of the 68-point landmark extent with gains measured on the
300W *training* images (``bench/detectors.py``), then to a crop with the training rule (side = min(w, h),
scale = 1.05 side / 200).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from flare.datasets.records import landmark_box
from flare.errors import FlareError
from flare.platform.predictor import CROP_ENLARGE, boxes_to_crops, detect_faces

DETECTORS = ("haar", "dlib", "dlib_cnn")
PEERS_HINT = "pip install 'flare-landmarks[peers]' (dlib-bin, face-recognition-models)"


@dataclass(frozen=True)
class BoxGain:
    """Detector box -> landmark-extent box: side = ``side`` x min(w, h); the centre moves by ``shift_x``,
    ``shift_y`` detector sides (positive: right, down)."""

    side: float
    shift_x: float
    shift_y: float


# Measured by `bench/detectors.py` on the 300W training images (afw + helen/trainset + lfpw/trainset: all 2,012
# faces for HOG, every 4th (503) for the slower CNN); medians over the faces each detector found (HOG 1,926,
# CNN 503), IQR in bench/results/detectors_cpu.txt. Never fitted on the test set.
GAINS: dict[str, BoxGain] = {
    "dlib": BoxGain(side=0.924, shift_x=-0.011, shift_y=0.079),
    "dlib_cnn": BoxGain(side=0.985, shift_x=0.055, shift_y=0.152),
}
# Image upsampling before detection (dlib's second argument), chosen on the training images: HOG missed 86 of
# 2,012 faces without upsampling and 94 with one (at 4x the time); the CNN missed none without.
UPSAMPLE: dict[str, int] = {"dlib": 0, "dlib_cnn": 0}


class MissingExtraError(FlareError, ImportError):
    """An optional detector or peer whose packages are not installed; ``str()`` is the one-line install hint."""


def require_dlib() -> Any:
    """The ``dlib`` module, or :class:`MissingExtraError` with the install hint."""
    try:
        import dlib
    except ImportError:
        raise MissingExtraError(f"dlib is not installed: {PEERS_HINT}") from None
    return dlib


def dlib_model_file(name: str) -> Path:
    """A weights file shipped by ``face-recognition-models`` (located without importing the package, whose
    ``__init__`` needs ``pkg_resources``, gone from recent setuptools)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(f"face-recognition-models is not installed: {PEERS_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / name
    if not path.is_file():
        raise MissingExtraError(f"{path} is missing; reinstall face-recognition-models: {PEERS_HINT}")
    return path


def check_detector(name: str, load: bool = False) -> str:
    """``name`` when known, else ValueError listing the detectors; with ``load``, the detector is loaded
    now (MissingExtraError with the install hint when its extra is missing)."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; known: {', '.join(DETECTORS)}")
    if load and name != "haar":
        _dlib_detector(name)
    return name


@cache
def _dlib_detector(name: str) -> Any:
    dlib = require_dlib()
    if name == "dlib":
        return dlib.get_frontal_face_detector()
    return dlib.cnn_face_detection_model_v1(str(dlib_model_file("mmod_human_face_detector.dat")))


def detect(image_bgr: np.ndarray, detector: str = "haar", upsample: int | None = None) -> np.ndarray:
    """Face boxes (F, 4) as x, y, w, h in pixel-edge coordinates, largest first; ``upsample``: dlib's image
    upsampling count (default: :data:`UPSAMPLE`)."""
    if check_detector(detector) == "haar":
        return detect_faces(image_bgr)
    rgb = np.ascontiguousarray(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB))
    found = _dlib_detector(detector)(rgb, UPSAMPLE[detector] if upsample is None else int(upsample))
    rects = [getattr(r, "rect", r) for r in found]  # the CNN returns mmod_rectangles
    if not rects:
        return np.zeros((0, 4))
    boxes = np.array([[r.left(), r.top(), r.right() - r.left() + 1, r.bottom() - r.top() + 1] for r in rects],
                     np.float64)
    return boxes[np.argsort(-boxes[:, 2] * boxes[:, 3], kind="stable")]


def extent_boxes(boxes: np.ndarray, detector: str) -> tuple[np.ndarray, np.ndarray]:
    """Detector boxes (F, 4) -> estimated landmark-extent centres (F, 2) in 0-based pixel-centre coordinates
    and sides (F,) (the min(w, h) of the extent, method.md 8.1)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if check_detector(detector) == "haar":
        centers, scales = boxes_to_crops(boxes, haar=True)
        return centers, scales * 200.0 / CROP_ENLARGE
    g = GAINS[detector]
    x, y, w, h = boxes.T
    side = np.minimum(w, h)
    centers = np.stack([x + w / 2 - 0.5 + g.shift_x * side, y + h / 2 - 0.5 + g.shift_y * side], axis=1)
    return centers, g.side * side


def detector_crops(boxes: np.ndarray, detector: str) -> tuple[np.ndarray, np.ndarray]:
    """Detector boxes (F, 4) -> crop centres (F, 2) and scales (F,) with the training rule (method.md 8.1)."""
    centers, sides = extent_boxes(boxes, detector)
    return centers, CROP_ENLARGE * sides / 200.0


def box_to_dlib_rect(box: np.ndarray) -> Any:
    """An x, y, w, h pixel-edge box as a ``dlib.rectangle`` (inclusive integer corners)."""
    dlib = require_dlib()
    x, y, w, h = (float(v) for v in np.asarray(box, np.float64).reshape(4))
    return dlib.rectangle(round(x), round(y), round(x + w) - 1, round(y + h) - 1)


def match_detection(boxes: np.ndarray, landmarks: np.ndarray, max_ratio: float = 2.0) -> int | None:
    """Index of the box (x, y, w, h) that found the face annotated with ``landmarks`` (N, 2; 0-based px):
    its centre lies inside the landmark extent and its min side is within ``max_ratio`` of the extent's;
    the nearest centre among those. None: the detector missed the face."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    x0, y0, x1, y1 = landmark_box(landmarks)
    side = min(x1 - x0, y1 - y0)
    cx, cy = boxes[:, 0] + boxes[:, 2] / 2 - 0.5, boxes[:, 1] + boxes[:, 3] / 2 - 0.5
    ratio = np.minimum(boxes[:, 2], boxes[:, 3]) / side
    ok = (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1) & (ratio <= max_ratio) & (ratio >= 1 / max_ratio)
    if not ok.any():
        return None
    dist = np.hypot(cx - (x0 + x1) / 2, cy - (y0 + y1) / 2)
    return int(np.flatnonzero(ok)[np.argmin(dist[ok])])

