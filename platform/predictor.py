"""``flare.Predictor``: load a trained model from anywhere and predict landmarks on photos.

``Predictor.load(uri)`` accepts ``models:/name@alias``, ``models:/name/version``, ``runs:/<run_id>``
(or a bare run id), a pulled model directory, or a training checkpoint directory. Weights are read with
``torch.load(weights_only=True)``; nothing received from elsewhere is unpickled.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch

from flare.datasets.augment import crop_matrix, to_tensor_image
from flare.datasets.crop_prior import CropPrior
from flare.losses.uncertainty import covariance_to_original, distribution_for, heatmap_uncertainty
from flare.models.decode import apply_affine, check_decoder, decode_heatmaps, label_to_crop
from flare.models.hourglass import StackedHourglass
from flare.models.layouts import Layout, get_layout
from flare.platform.builders import build_model
from flare.platform.checkpoints import best_checkpoint_dir, checkpoint_info, load_weights, selected_weights
from flare.platform.config import JobConfig, parse_job

CROP_ENLARGE = 1.05  # method.md 8.1
# Haar face box -> landmark-extent box, measured on 300 random 300W training images (279 detected):
# min side of the 68-point extent / Haar side = 0.869 (IQR 0.83-0.92); the extent's centre lies
# 0.154 Haar sides lower (IQR 0.12-0.18).
HAAR_SIDE_GAIN, HAAR_SHIFT_DOWN = 0.869, 0.154


class ModelLoadError(ValueError):
    """A model URI or directory that cannot be loaded; ``str()`` is one line naming it."""


class FaceUncertainty(NamedTuple):
    """One face: ``landmarks`` (N, 2) px as :meth:`Predictor.predict` returns them, ``covariance`` (N, 2, 2) px²
    and ``confidence`` (N,) in [0, 1] (losses/uncertainty.py), all in original image px."""

    landmarks: np.ndarray
    covariance: np.ndarray
    confidence: np.ndarray


@dataclass
class Predictor:
    """A trained model with its layout, crop size and validation-selected decoder: forward, decode and
    map back to the image (method.md 1.4, 5.9) in one place, for prediction, evaluation and validation.

    ``temperature`` is the argmax refinement's (RwSA's epsilon); ``job`` is the spec the model was trained
    with, when known (model cards, figures), and is never read to predict. ``crop_prior``: the training split's
    shape -> crop map (datasets/crop_prior.py) that re-crops from predicted landmarks (platform/refine.py); None
    for models saved before it existed (the extent rule is used)."""

    model: StackedHourglass
    layout: Layout
    input_size: int
    decoder: str
    temperature: float = 1.0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    info: dict[str, Any] = field(default_factory=dict)
    job: JobConfig | None = None
    crop_prior: CropPrior | None = None

    def __post_init__(self) -> None:
        check_decoder(self.decoder)

    # ------------------------------------------------------------------------------------ loading

    @classmethod
    def from_job(cls, model: StackedHourglass, job: JobConfig, layout: Layout, decoder: str,
                 info: dict[str, Any] | None = None, device: torch.device | None = None,
                 crop_prior: CropPrior | None = None) -> Predictor:
        """A predictor for ``model`` trained with ``job`` (crop size and RwSA's epsilon from the spec)."""
        return cls(model, layout, job.data.input_size, decoder, job.objective.rwsa.epsilon,
                   device or next(model.parameters()).device, dict(info or {}), job, crop_prior)

    @classmethod
    def from_files(cls, state_path: Path, job_path: Path, device: str | None = None) -> Predictor:
        """Build from a weights-only ``state.pt`` and its ``job.json``."""
        meta = json.loads(Path(job_path).read_text())
        job = parse_job(meta["job"], source=str(job_path))
        layout = get_layout(meta["layout"])
        prior = meta.get("crop_prior")
        try:
            crop_prior = None if prior is None else CropPrior.from_json(prior, layout.num_points, str(job_path))
        except ValueError as err:
            raise ModelLoadError(str(err)) from None
        state = load_weights(state_path)
        info = dict(meta.get("info", {}))
        if "model" in state and isinstance(state["model"], dict):  # a training checkpoint
            info = checkpoint_info(state)
            state = selected_weights(state)
        model = build_model(job, layout)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ModelLoadError(f"{state_path}: the weights do not fit the spec in {job_path} "
                                 f"({str(err).splitlines()[0]})") from None
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model.to(dev).eval()
        decoder = info.get("decoder") or ("argmax_refine" if job.objective.name == "rwsa" else "softargmax")
        return cls.from_job(model, job, layout, decoder, info, dev, crop_prior)

    @classmethod
    def from_dir(cls, directory: Path, device: str | None = None) -> Predictor:
        """A pulled model, a downloaded MLflow model, a checkpoint directory or a run directory (searched
        recursively; of several checkpoints in one folder, the one with the smallest val NME, method.md 9.6)."""
        directory = Path(directory)
        states = sorted(directory.rglob("state.pt"))
        if not states:
            raise ModelLoadError(f"{directory}: no state.pt found (not a flare model or checkpoint)")
        state = states[0]
        if len(states) > 1:
            folders = {s.parent.parent for s in states}
            if len(folders) > 1:
                raise ModelLoadError(f"{directory}: checkpoints in {len(folders)} folders; name one of them")
            best = best_checkpoint_dir(folders.pop())
            state = best / "state.pt" if best is not None else state
        job = state.parent / "job.json"
        if not job.is_file():
            raise ModelLoadError(f"{state.parent}: state.pt without job.json")
        return cls.from_files(state, job, device)

    @classmethod
    def load(cls, uri: str, device: str | None = None, tracking_uri: str | None = None) -> Predictor:
        """Load from a registry URI, a run, or a local directory (see the module docstring)."""
        if Path(uri).exists():
            return cls.from_dir(Path(uri), device)
        import mlflow

        from flare.platform.tracking import EXPORT_ARTIFACT, default_tracking_uri

        mlflow.set_tracking_uri(tracking_uri or default_tracking_uri())
        if uri.startswith("models:/"):
            artifact = uri
        else:
            run_id = uri.removeprefix("runs:/").split("/")[0]
            artifact = resolve_run_model(run_id, EXPORT_ARTIFACT)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(artifact_uri=artifact, dst_path=tmp)
            except Exception as err:  # noqa: BLE001 - MLflow raises many types for a bad URI
                raise ModelLoadError(f"{uri}: cannot load ({type(err).__name__}: {str(err).splitlines()[0]})") from None
            return cls.from_dir(Path(local), device)

    # ------------------------------------------------------------------------------------ predicting

    def heatmaps(self, images: torch.Tensor) -> torch.Tensor:
        """Last-stack fused maps (B, N, h, w), fp32 on the model's device, for input crops (B, 3, S, S)."""
        with torch.no_grad():
            return self.model(images.to(self.device))[-1].fused.float()

    def decode(self, heatmaps: torch.Tensor, decoder: str | None = None) -> np.ndarray:
        """Maps -> landmarks (B, N, 2) in crop px, float64 (method.md 1.4, 5.9)."""
        u = decode_heatmaps(heatmaps, decoder or self.decoder, self.temperature).double().cpu()
        return label_to_crop(u, self.input_size).numpy()

    def predict_batch(self, images: torch.Tensor, to_original: np.ndarray | torch.Tensor | None = None,
                      decoder: str | None = None) -> np.ndarray:
        """Landmarks (B, N, 2) for crops (B, 3, S, S): crop px, or original px through ``to_original``
        (B, 3, 3), the crop -> original matrices M^-1 (method.md 1.4)."""
        p = self.decode(self.heatmaps(images), decoder)
        if to_original is None:
            return p
        m = to_original.detach().cpu().double().numpy() if isinstance(to_original, torch.Tensor) else to_original
        return np.asarray(apply_affine(p, m), np.float64)

    def predict_crops(self, image_bgr: np.ndarray, centers: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """Landmarks (F, N, 2) in original px for faces given by crop centres/scales (method.md 1.2, 1.4)."""
        return self.predict_batch(*crop_batch(image_bgr, centers, scales, self.input_size))

    def predict(self, image_bgr: np.ndarray, boxes: np.ndarray | None = None, detect: bool = True) -> list[np.ndarray]:
        """(N, 2) landmarks in original px per face. ``boxes`` (F, 4) as x, y, w, h; else faces are
        found with OpenCV's Haar cascade, or the whole image is one face when ``detect`` is False."""
        image_bgr, centers, scales = face_crops(image_bgr, boxes, detect)
        if len(centers) == 0:
            return []
        return list(self.predict_crops(image_bgr, centers, scales))

    # ------------------------------------------------------------------------------------ uncertainty

    @property
    def distribution(self) -> str:
        """What the maps are read as for uncertainty: ``"softmax"`` (softmax(F/ε), ε = ``temperature``) for
        RwSA's signed scores, ``"normalised"`` (F/ΣF, STAR Eq. 1) otherwise (losses/uncertainty.py)."""
        return distribution_for(self.job.objective.name if self.job is not None else None, self.decoder)

    def uncertainty_batch(self, images: torch.Tensor, to_original: np.ndarray | None = None
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Landmarks (B, N, 2) as :meth:`predict_batch`, covariances (B, N, 2, 2) px² in the same frame and
        confidences (B, N), from one forward pass. Σ_crop = A Σ_hm Aᵀ with A = diag(S/(w−1), S/(h−1)) (method.md
        1.4); Σ_img = L Σ_crop Lᵀ with L the linear part of ``to_original`` (B, 3, 3)."""
        maps = self.heatmaps(images)
        p = self.decode(maps)
        u = heatmap_uncertainty(maps.double(), self.distribution, self.temperature)
        m = None if to_original is None else np.asarray(to_original, np.float64)
        cov = covariance_to_original(u.cov.cpu().numpy(), *maps.shape[-2:], self.input_size, m)
        if m is not None:
            p = np.asarray(apply_affine(p, m), np.float64)
        return p, cov, u.confidence.cpu().numpy()

    def predict_with_uncertainty(self, image_bgr: np.ndarray, boxes: np.ndarray | None = None,
                                 detect: bool = True) -> list[FaceUncertainty]:
        """:meth:`predict` plus, per landmark, the heatmap covariance (original px²) and a confidence."""
        image_bgr, centers, scales = face_crops(image_bgr, boxes, detect)
        if len(centers) == 0:
            return []
        return [FaceUncertainty(*face) for face in
                zip(*self.uncertainty_batch(*crop_batch(image_bgr, centers, scales, self.input_size)))]


def resolve_run_model(run_id: str, name: str) -> str:
    """The artifact URI of the model logged under ``name`` in run ``run_id``."""
    import mlflow

    models = mlflow.search_logged_models(filter_string=f"source_run_id = '{run_id}'", output_format="list")
    for m in models:
        if m.name == name:
            return m.model_uri
    raise ModelLoadError(f"run {run_id}: no logged model named {name!r}")


def face_crops(image_bgr: np.ndarray, boxes: np.ndarray | None, detect: bool
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(BGR image, crop centres (F, 2), scales (F,))`` by :meth:`Predictor.predict`'s rule for boxes/detect."""
    image_bgr = as_bgr(image_bgr)
    if boxes is None:
        boxes = detect_faces(image_bgr) if detect else whole_image_box(image_bgr)
        haar = detect
    else:
        haar = False
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return image_bgr, np.zeros((0, 2)), np.zeros(0)
    return (image_bgr, *boxes_to_crops(boxes, haar))


def crop_batch(image_bgr: np.ndarray, centers: np.ndarray, scales: np.ndarray, size: int
               ) -> tuple[torch.Tensor, np.ndarray]:
    """Crops (F, 3, S, S) and their crop -> original matrices M⁻¹ (F, 3, 3) (method.md 1.2, 1.4)."""
    mats, crops = [], []
    for c, s in zip(centers, scales):
        m = crop_matrix(np.asarray(c, np.float64), float(s), size)
        crops.append(to_tensor_image(cv2.warpAffine(image_bgr, m[:2], (size, size), flags=cv2.INTER_LINEAR,
                                                    borderMode=cv2.BORDER_CONSTANT, borderValue=0)))
        mats.append(np.linalg.inv(m))
    return torch.stack(crops), np.stack(mats)


def as_bgr(image: np.ndarray) -> np.ndarray:
    """Grey or BGRA -> BGR, as the predictor reads images."""
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def whole_image_box(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    return np.array([[0.0, 0.0, w, h]])


def detect_faces(image_bgr: np.ndarray, min_size: int = 30) -> np.ndarray:
    """Face boxes (F, 4) x, y, w, h from OpenCV's bundled frontal-face Haar cascade, largest first."""
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    if cascade.empty():
        raise RuntimeError("OpenCV's Haar cascade is missing (opencv-python-headless>=4.9,<5 ships it)")
    gray = cv2.equalizeHist(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2GRAY))
    faces = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_size, min_size))
    if len(faces) == 0:
        return np.zeros((0, 4))
    faces = np.asarray(faces, np.float64)
    return faces[np.argsort(-faces[:, 2] * faces[:, 3])]


def boxes_to_crops(boxes: np.ndarray, haar: bool) -> tuple[np.ndarray, np.ndarray]:
    """x, y, w, h boxes -> crop centres and scales with the method.md 8.1 rule (side = min(w, h),
    scale = 1.05 side / 200); Haar boxes are first mapped to landmark-extent boxes."""
    x, y, w, h = boxes.T
    cx, cy, side = x + w / 2, y + h / 2, np.minimum(w, h)
    if haar:
        cy = cy + HAAR_SHIFT_DOWN * side
        side = side * HAAR_SIDE_GAIN
    return np.stack([cx, cy], axis=1) - 0.5, CROP_ENLARGE * side / 200.0
