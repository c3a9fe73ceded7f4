"""Two-pass prediction (method.md 8.1): the first pass crops the face from a detector (or given) box; every
further pass re-crops from the previous pass's landmarks to the crop training used for such a face, so the model
sees a crop with its training statistics instead of a detector's. The result is the last pass
(``combine="last"``) or the mean of all passes (``"mean"``: two crops, two partly independent errors).

The re-crop (:func:`recrop`) is the model's :class:`~flare.datasets.crop_prior.CropPrior` when it has one (fitted
on its training split's shapes and crops: the crop estimated from all points), else the data preparation's rule
on the landmarks themselves (:func:`flare.datasets.records.crop_center_scale`: landmark extent, side = min(w, h),
scale = 1.05 side / 200), which rests on the few extreme points, the noisiest predicted ones.

From a **detector's** box the first pass is a wide look: its crop is :data:`DETECTOR_FIRST_LOOK` times larger,
so a box that is off the face still holds the whole face, and that pass only places the next crop (it does not
vote in the mean). A detector box is often off by a tenth of the face (Haar on the 300W validation faces: centre
error s.d. 9% of the crop horizontally, scale 8%), and from such a crop the model's landmarks follow the crop, so
plain re-crops keep the error.

:func:`refine_faces` returns the last pass's crops as ``x, y, w, h`` boxes that :meth:`Predictor.predict` (and
``predict_with_uncertainty``) turn back into exactly those crops, so any prediction path can run the last pass,
plus the earlier passes' landmarks for :func:`combine_passes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flare.datasets.crop_prior import manifest_crop_prior
from flare.datasets.ingest import load_manifest
from flare.datasets.records import FaceRecord, crop_center_scale, landmark_box
from flare.platform.detectors import check_detector, detector_crops
from flare.platform.detectors import detect as detect_boxes
from flare.platform.predictor import CROP_ENLARGE, as_bgr, boxes_to_crops, whole_image_box

# What --refine runs (on by default in flare predict). Chosen on the 300W validation faces (bench/boxes.py
# --faces val, bench/results/boxes_val.txt): the mean of two passes beat one pass and the second pass alone with
# every box source (Haar, dlib HOG and CNN, ground-truth box); a third pass gained < 0.1 NME points for 1.5x time.
DEFAULT_PASSES = 2
# The detector path's first crop is this much larger (with passes >= 2). Chosen on the same validation faces
# (Haar, 14-epoch reduced RwSA model, extent-rule re-crops; bench/results/boxes_wide_val.txt): 1.0, 1.2, 1.3,
# 1.4, 1.5 -> gap of two passes to the ground-truth box 0.82, 0.31, 0.14, 0.12, 0.19 NME points (second pass).
# With the crop prior's re-crops the gap is +0.00 (bench/results/boxes_prior_val.txt); a third pass (mean of
# passes 2 and 3) gains 0.07 more, under the 0.1 that would make it the default.
DETECTOR_FIRST_LOOK = 1.4
COMBINE = ("last", "mean")
DEFAULT_COMBINE = "mean"
MAX_RESCALE = 2.0  # a re-crop more than 2x larger or smaller than the previous one is not taken


def landmark_crops(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop centres (F, 2) and scales (F,) for landmarks (F, N, 2) in 0-based original px: exactly the
    training crop of a face annotated with these landmarks (method.md 8.1, ``crop_center_scale``)."""
    pts = np.asarray(landmarks, np.float64)
    pts = pts.reshape(-1, *pts.shape[-2:])
    centers, scales = np.zeros((len(pts), 2)), np.zeros(len(pts))
    for i, p in enumerate(pts):
        record = FaceRecord(sample_id="predicted", dataset="", split="", subsets=(), source="", group="",
                            landmarks=p, box=landmark_box(p))
        centers[i], scales[i] = crop_center_scale(record)
    return centers, scales


def recrop(predictor: Any, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop centres (F, 2) and scales (F,) for the next pass from landmarks (F, N, 2): the predictor's
    ``crop_prior`` when it has one, else :func:`landmark_crops` (module docstring)."""
    prior = getattr(predictor, "crop_prior", None)
    return prior.crops(landmarks) if prior is not None else landmark_crops(landmarks)


def fit_missing_prior(predictor: Any, manifest: Path | None) -> str:
    """Give a model saved without a crop prior the one of ``manifest``'s train split (the data it was trained
    on; :func:`~flare.datasets.crop_prior.manifest_crop_prior`); returns which re-crop rule it now uses."""
    if predictor.crop_prior is None and manifest is not None:
        predictor.crop_prior = manifest_crop_prior(load_manifest(manifest), "train")
        return f"a crop prior fitted on {manifest}'s train split"
    return "the model's crop prior" if predictor.crop_prior is not None else "the landmark-extent rule"


def crops_to_boxes(centers: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Square boxes (F, 4) x, y, w, h that :func:`boxes_to_crops` (given boxes) maps back to these crops."""
    side = np.asarray(scales, np.float64).reshape(-1) * 200.0 / CROP_ENLARGE
    c = np.asarray(centers, np.float64).reshape(-1, 2) + 0.5  # pixel-centre -> pixel-edge coordinates
    return np.stack([c[:, 0] - side / 2, c[:, 1] - side / 2, side, side], axis=1)


def first_pass_crops(image_bgr: np.ndarray, boxes: np.ndarray | None, detect: bool,
                     detector: str) -> tuple[np.ndarray, np.ndarray]:
    """Crop centres and scales for the first pass: given boxes (x, y, w, h; taken as landmark-extent boxes),
    else the detector's boxes mapped with its gains, else the whole image (method.md 8.1)."""
    if boxes is not None:
        return boxes_to_crops(np.asarray(boxes, np.float64).reshape(-1, 4), haar=False)
    if detect:
        return detector_crops(detect_boxes(image_bgr, detector), detector)
    return boxes_to_crops(whole_image_box(image_bgr), haar=False)


def refine_crops(predictor: Any, image_bgr: np.ndarray, centers: np.ndarray, scales: np.ndarray,
                 recrops: int = 1, first: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Crops after ``recrops`` rounds of predict -> :func:`recrop` of the landmarks (method.md 8.1), and the
    ``recrops`` landmark sets (F, N, 2) predicted on the way; ``first``: the landmarks already predicted on the
    given crops. A face whose re-crop is implausible (:func:`plausible`) keeps its previous crop."""
    centers = np.array(centers, np.float64).reshape(-1, 2)
    scales = np.array(scales, np.float64).reshape(-1)
    history: list[np.ndarray] = []
    for i in range(recrops):
        if not len(centers):
            break
        pts = first if i == 0 and first is not None else predictor.predict_crops(image_bgr, centers, scales)
        history.append(np.asarray(pts, np.float64))
        new_centers, new_scales = recrop(predictor, pts)
        keep = plausible(new_scales, scales)
        centers[keep], scales[keep] = new_centers[keep], new_scales[keep]
    return centers, scales, history


def plausible(new_scales: np.ndarray, scales: np.ndarray, factor: float = MAX_RESCALE) -> np.ndarray:
    """Faces whose re-crop is within ``factor`` of the previous crop's size; the others keep their crop (a
    first pass that found no face: an untrained model, a false detection)."""
    ratio = np.asarray(new_scales, np.float64) / np.asarray(scales, np.float64)
    return np.isfinite(ratio) & (ratio >= 1 / factor) & (ratio <= factor)


def first_look(scales: np.ndarray, passes: int) -> np.ndarray:
    """Scales of a detector's first crops: :data:`DETECTOR_FIRST_LOOK` times larger when more passes follow."""
    return np.asarray(scales, np.float64) * (DETECTOR_FIRST_LOOK if passes > 1 else 1.0)


def refine_detected(predictor: Any, image_bgr: np.ndarray, centers: np.ndarray, scales: np.ndarray, passes: int
                    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """The detector path of :func:`refine_crops`: from a detector's crops, the wide first look
    (:func:`first_look`) and ``passes`` - 1 re-crops; the crops of the last pass and the landmarks of the
    passes that vote (all earlier ones but the wide look)."""
    centers, scales, history = refine_crops(predictor, image_bgr, centers, first_look(scales, passes), passes - 1)
    return centers, scales, history[1:]


def refine_faces(predictor: Any, image_bgr: np.ndarray, boxes: np.ndarray | None = None, detect: bool = True,
                 detector: str = "haar", passes: int = DEFAULT_PASSES) -> tuple[np.ndarray, list[np.ndarray]]:
    """Boxes (F, 4) for the last of ``passes`` predictions (``predictor.predict(image, boxes=...)`` on them is
    pass ``passes``) and the landmarks (F, N, 2) of the earlier passes that vote in ``combine="mean"``: passes
    1 .. passes-1, but not a detector's wide first look (:func:`first_look`). ``passes`` = 1: the first-pass crop,
    nothing predicted. A face whose re-crop is implausible (:func:`plausible`) keeps its crop."""
    check_options(detector, passes)
    image_bgr = as_bgr(image_bgr)
    centers, scales = first_pass_crops(image_bgr, boxes, detect, detector)
    if boxes is None and detect:
        centers, scales, history = refine_detected(predictor, image_bgr, centers, scales, passes)
    else:  # given boxes or the whole image: no wide look
        centers, scales, history = refine_crops(predictor, image_bgr, centers, scales, passes - 1)
    return crops_to_boxes(centers, scales), history


def face_boxes(predictor: Any, image_bgr: np.ndarray, boxes: np.ndarray | None = None, detect: bool = True,
               detector: str = "haar", passes: int = DEFAULT_PASSES) -> np.ndarray:
    """The last pass's boxes of :func:`refine_faces`."""
    return refine_faces(predictor, image_bgr, boxes, detect, detector, passes)[0]


def combine_passes(earlier: list[np.ndarray], last: Sequence[np.ndarray], combine: str = DEFAULT_COMBINE
                   ) -> list[np.ndarray]:
    """Per face (N, 2): the last pass, or the mean over all passes (``earlier``: (F, N, 2) per pass)."""
    if combine not in COMBINE:
        raise ValueError(f"unknown combine {combine!r}; known: {', '.join(COMBINE)}")
    if combine == "last" or not earlier or not len(last):
        return list(last)
    return list(np.mean(np.stack([*earlier, np.stack(list(last))]), axis=0))


def predict_faces(predictor: Any, image_bgr: np.ndarray, boxes: np.ndarray | None = None, detect: bool = True,
                  detector: str = "haar", passes: int = DEFAULT_PASSES, combine: str = DEFAULT_COMBINE
                  ) -> list[np.ndarray]:
    """(N, 2) landmarks in original px per face: :meth:`Predictor.predict` with a detector choice, ``passes``
    (1: one prediction from the box; 2: one more from the first landmarks' training crop) and ``combine``."""
    check_options(detector, passes, combine=combine)
    last, earlier = refine_faces(predictor, image_bgr, boxes, detect, detector, passes)
    return combine_passes(earlier, predictor.predict(image_bgr, boxes=last), combine)


def check_options(detector: str, passes: int, load: bool = False, combine: str = DEFAULT_COMBINE) -> None:
    """ValueError for an unknown detector or combine, or ``passes`` < 1; with ``load``, the detector is loaded
    now (MissingExtraError with the install hint when its extra is missing)."""
    check_detector(detector, load)
    if passes < 1:
        raise ValueError(f"passes must be at least 1, got {passes}")
    if combine not in COMBINE:
        raise ValueError(f"unknown combine {combine!r}; known: {', '.join(COMBINE)}")


