"""``flare predict``: landmarks for image files and folders, a JSON and an overlay PNG per image plus one
``predictions.jsonl`` of all results.

Output names mirror the inputs' relative paths (``a/face.jpg`` and ``b/face.jpg`` give ``a/face.json`` and
``b/face.json``), so two inputs never overwrite each other. One bad image (unreadable, not a regular file,
over the pixel cap, no face, a box outside it) is reported and the others are still processed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from flare.datasets.records import DEFAULT_MAX_PIXELS, DataError, read_image_bgr
from flare.files import atomic_write_bytes
from flare.platform.plots import PRED_COLOR, draw_landmarks, write_png
from flare.platform.predictor import Predictor

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}  # what the header check reads
RESULTS_FILE = "predictions.jsonl"


def collect_images(inputs: Sequence[Path]) -> list[tuple[Path, Path]]:
    """``(image, output stem)`` pairs: folders are walked (sorted, image suffixes only) and mirrored below
    the output; files keep their path relative to the inputs' common folder. Stems are unique."""
    inputs = [Path(p) for p in inputs]
    files = [p for p in inputs if not p.is_dir()]
    common = Path(os.path.commonpath([str(p.resolve().parent) for p in files])) if files else None
    pairs: list[tuple[Path, Path]] = []
    for p in inputs:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and not f.is_dir())
            pairs += [(f, f.relative_to(p).with_suffix("")) for f in found]
        else:
            pairs.append((p, p.resolve().relative_to(common).with_suffix("")))
    seen: set[Path] = set()
    stems: set[Path] = set()
    out = []
    for path, stem in pairs:
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        unique, n = stem, 2
        while unique in stems:
            unique, n = stem.with_name(f"{stem.name}-{n}"), n + 1
        stems.add(unique)
        out.append((path, unique))
    return out


def check_box(box: Sequence[float], width: int, height: int) -> np.ndarray:
    """A face box ``x, y, w, h`` that is finite, has a positive size and overlaps the image; else ValueError."""
    b = np.asarray(box, np.float64).reshape(4)
    if not np.isfinite(b).all():
        raise ValueError(f"box {b.tolist()}: not finite")
    x, y, w, h = b
    if w <= 0 or h <= 0:
        raise ValueError(f"box {b.tolist()}: width and height must be positive")
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        raise ValueError(f"box {b.tolist()}: outside the {width}x{height} image")
    return b


def predict_files(predictor: Predictor, images: Sequence[Path], out: Path, boxes: list | None = None,
                  detect: bool = True, log: Callable[[str], None] = print,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[tuple[str, str]]:
    """Predict every image (files or folders); returns ``(path, reason)`` for the images that failed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    failures: list[tuple[str, str]] = []
    records: list[dict] = []
    for path, stem in collect_images(images):
        try:
            image = read_image_bgr(path, max_pixels)
            h, w = image.shape[:2]
            given = np.stack([check_box(b, w, h) for b in boxes]) if boxes else None
            faces = predictor.predict(image, boxes=given, detect=detect)
        except (DataError, ValueError, cv2.error) as err:
            failures.append((str(path), str(err).splitlines()[0]))
            continue
        if not faces:
            failures.append((str(path), "no face found (try --box x,y,w,h or --no-detect)"))
            continue
        record = {"image": str(path), "output": str(stem), "layout": predictor.layout.name, "width": w,
                  "height": h, "faces": [f.round(4).tolist() for f in faces],
                  "coordinates": "original image pixels, 0-based pixel centres, (x, y)"}
        target = out / stem
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target.with_name(f"{stem.name}.json"), (json.dumps(record) + "\n").encode())
        overlay = image
        for f in faces:
            overlay = draw_landmarks(overlay, f, PRED_COLOR)
        write_png(target.with_name(f"{stem.name}_overlay.png"), overlay)
        records.append(record)
        log(f"{path}: {len(faces)} face(s) -> {target.with_name(stem.name + '.json')}")
    if records:
        atomic_write_bytes(out / RESULTS_FILE, "".join(json.dumps(r) + "\n" for r in records).encode())
    return failures
