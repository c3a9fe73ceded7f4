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
from flare.losses.uncertainty import describe
from flare.platform.plots import ELLIPSE_COLOR, PRED_COLOR, draw_ellipses, draw_landmarks, write_png
from flare.platform.predictor import FaceUncertainty, Predictor
from flare.platform.refine import DEFAULT_COMBINE, check_options, combine_passes, refine_faces

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}  # what the header check reads
RESULTS_FILE = "predictions.jsonl"


class PredictError(ValueError):
    """One image could not be predicted (the reason is one line); the others go on."""


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


def predict_one(predictor: Predictor, path: Path, stem: Path, out: Path, boxes: list | None = None,
                detect: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS, ellipses: bool = False,
                detector: str = "haar", passes: int = 1, combine: str = DEFAULT_COMBINE) -> dict:
    """One image: its JSON record, written with its overlay PNG as ``out/stem.json`` and
    ``out/stem_overlay.png``. Raises :class:`PredictError` (one line) when the image fails."""
    uncertain = isinstance(predictor, Predictor)
    found: list[FaceUncertainty] = []
    try:
        image = read_image_bgr(path, max_pixels)
        h, w = image.shape[:2]
        given = np.stack([check_box(b, w, h) for b in boxes]) if boxes else None
        earlier: list[np.ndarray] = []
        if passes > 1 or detector != "haar":  # the last pass's crops; predicted below
            given, earlier = refine_faces(predictor, image, given, detect, detector, passes)
        if uncertain:
            found = predictor.predict_with_uncertainty(image, boxes=given, detect=detect)
            faces = [f.landmarks for f in found]
        else:
            faces = predictor.predict(image, boxes=given, detect=detect)
        faces = combine_passes(earlier, faces, combine)
    except (DataError, ValueError, cv2.error) as err:
        raise PredictError(str(err).splitlines()[0]) from None
    if not faces:
        raise PredictError("no face found (try --box x,y,w,h or --no-detect)")
    record = {"image": str(path), "output": str(stem), "layout": predictor.layout.name, "width": w,
              "height": h, "faces": [f.round(4).tolist() for f in faces],
              "coordinates": "original image pixels, 0-based pixel centres, (x, y)"}
    if uncertain:
        record.update(covariance=[f.covariance.round(6).tolist() for f in found],
                      confidence=[f.confidence.round(4).tolist() for f in found],
                      uncertainty=describe(predictor.distribution, predictor.temperature))
    target = Path(out) / stem
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target.with_name(f"{stem.name}.json"), (json.dumps(record) + "\n").encode())
    overlay = image
    for i, f in enumerate(faces):
        if ellipses:
            overlay = draw_ellipses(overlay, f, found[i].covariance, ELLIPSE_COLOR, sigmas=2.0)
        overlay = draw_landmarks(overlay, f, PRED_COLOR)
    write_png(target.with_name(f"{stem.name}_overlay.png"), overlay)
    return record


def write_results(out: Path, records: Sequence[dict]) -> None:
    """``out/predictions.jsonl``: one line per predicted image, in input order (atomic)."""
    if records:
        atomic_write_bytes(Path(out) / RESULTS_FILE, "".join(json.dumps(r) + "\n" for r in records).encode())


def predict_files(predictor: Predictor, images: Sequence[Path], out: Path, boxes: list | None = None,
                  detect: bool = True, log: Callable[[str], None] = print,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS, ellipses: bool = False, detector: str = "haar",
                  passes: int = 1, combine: str = DEFAULT_COMBINE) -> list[tuple[str, str]]:
    """Predict every image (files or folders); returns ``(path, reason)`` for the images that failed.
    ``detector``, ``passes`` (re-crops from the predicted landmarks) and ``combine``: :mod:`flare.platform.refine`
    (covariances and confidences are the last pass's).

    A torch :class:`Predictor` also writes per face ``covariance`` (N, 2, 2) original px² and ``confidence``
    (N) with their definitions under ``uncertainty`` (losses/uncertainty.py); ``ellipses`` draws their 2-sigma
    ellipses on the overlays. The ONNX backend outputs landmarks only: no such fields, ``ellipses`` refused."""
    check_predict_options(isinstance(predictor, Predictor), ellipses, detector, passes, detect and not boxes,
                          combine)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    failures: list[tuple[str, str]] = []
    records: list[dict] = []
    for path, stem in collect_images(images):
        try:
            record = predict_one(predictor, path, stem, out, boxes, detect, max_pixels, ellipses, detector,
                                 passes, combine)
        except PredictError as err:
            failures.append((str(path), str(err)))
            continue
        records.append(record)
        log(f"{path}: {len(record['faces'])} face(s) -> {(out / stem).with_name(stem.name + '.json')}")
    write_results(out, records)
    return failures


def check_predict_options(torch_backend: bool, ellipses: bool, detector: str, passes: int, load: bool,
                          combine: str = DEFAULT_COMBINE) -> None:
    """Refuse what the backend cannot do before any image is read (``load``: the detector's weights)."""
    if ellipses and not torch_backend:
        raise ValueError("--ellipses: the onnx backend outputs landmarks only (no heatmaps); use --backend torch")
    check_options(detector, passes, load=load, combine=combine)
