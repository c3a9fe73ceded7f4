"""Peer landmark detectors for side-by-side measurements (``bench/peers.py``): dlib's 68-point shape predictor
(ensemble of regression trees, weights from ``face-recognition-models``; optional ``peers`` extra). Its points
follow the iBUG 68 order of 300W (method.md 2), so flare's NME (method.md 9.1) applies unchanged.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import cv2
import numpy as np

from flare.datasets.records import landmark_box
from flare.platform.detectors import GAINS, box_to_dlib_rect, dlib_model_file, require_dlib

SHAPE_MODEL = "shape_predictor_68_face_landmarks.dat"


@cache
def _shape_predictor() -> Any:
    return require_dlib().shape_predictor(str(dlib_model_file(SHAPE_MODEL)))


class DlibLandmarks:
    """dlib's 68-point shape predictor (``face-recognition-models``'s ``shape_predictor_68_face_landmarks``)."""

    num_points = 68

    def __init__(self) -> None:
        self.model = _shape_predictor()

    def predict(self, image_bgr: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Landmarks (F, 68, 2) in 0-based original px for boxes (F, 4) x, y, w, h (pixel edges, as
        :func:`flare.platform.detectors.detect` returns them). dlib's part coordinates are integer pixel
        indices, i.e. already 0-based pixel centres."""
        rgb = np.ascontiguousarray(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB))
        out = np.zeros((len(boxes), self.num_points, 2))
        for i, box in enumerate(np.asarray(boxes, np.float64).reshape(-1, 4)):
            shape = self.model(rgb, box_to_dlib_rect(box))
            out[i] = [(p.x, p.y) for p in shape.parts()]
        return out


def extent_box(landmarks: np.ndarray) -> np.ndarray:
    """The landmark extent as an x, y, w, h pixel-edge box (1, 4) (0-based pixel centres + 0.5)."""
    x0, y0, x1, y1 = landmark_box(landmarks)
    return np.array([[x0 + 0.5, y0 + 0.5, x1 - x0, y1 - y0]])


def detector_box_for(landmarks: np.ndarray, detector: str) -> np.ndarray:
    """The box (1, 4) ``detector`` would give for a face with these landmarks, by inverting its measured
    gains (:data:`flare.platform.detectors.GAINS`): a ground-truth box in the detector's convention."""
    g = GAINS[detector]
    x0, y0, x1, y1 = landmark_box(landmarks)
    side = min(x1 - x0, y1 - y0) / g.side
    cx = (x0 + x1) / 2 + 0.5 - g.shift_x * side
    cy = (y0 + y1) / 2 + 0.5 - g.shift_y * side
    return np.array([[cx - side / 2, cy - side / 2, side, side]])
