"""``flare predict``: landmarks for image files, written as JSON plus an overlay PNG per image."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from flare.files import atomic_write_bytes
from flare.platform.plots import PRED_COLOR, draw_landmarks, write_png
from flare.platform.predictor import Predictor


def predict_files(predictor: Predictor, images: Sequence[Path], out: Path, boxes: list | None = None,
                  detect: bool = True, log: Callable[[str], None] = print) -> list[tuple[str, str]]:
    """Predict every image; returns ``(path, reason)`` for the images that failed (unreadable, no face)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    failures: list[tuple[str, str]] = []
    for path in map(Path, images):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            failures.append((str(path), "unreadable image (missing, corrupt or not an image)"))
            continue
        faces = predictor.predict(image, boxes=np.asarray(boxes) if boxes else None, detect=detect)
        if not faces:
            failures.append((str(path), "no face found (try --box x,y,w,h or --no-detect)"))
            continue
        record = {"image": str(path), "layout": predictor.layout.name, "width": image.shape[1],
                  "height": image.shape[0], "faces": [f.round(4).tolist() for f in faces],
                  "coordinates": "original image pixels, 0-based pixel centres, (x, y)"}
        atomic_write_bytes(out / f"{path.stem}.json", (json.dumps(record) + "\n").encode())
        overlay = image
        for f in faces:
            overlay = draw_landmarks(overlay, f, PRED_COLOR)
        write_png(out / f"{path.stem}_overlay.png", overlay)
        log(f"{path}: {len(faces)} face(s) -> {out / (path.stem + '.json')}")
    return failures
