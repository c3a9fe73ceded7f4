"""Run an exported flare ONNX model (:mod:`flare.platform.export`) on onnxruntime.

:class:`OnnxLandmarks` has the parts of :class:`~flare.platform.predictor.Predictor` that prediction uses
(``layout``, ``input_size``, ``decoder``, ``crop_prior``, ``predict_batch``, ``predict_crops``, ``predict``), so
``flare predict --backend onnx`` and :func:`~flare.platform.predict_files.predict_files` take it as is. The
decoder is the one baked into the graph; only crops, face detection and back-mapping run in Python.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flare.datasets.crop_prior import CropPrior
from flare.models.decode import apply_affine
from flare.models.layouts import Layout, get_layout
from flare.platform.predictor import ModelLoadError, Predictor


def _require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("the onnx backend needs onnxruntime: pip install 'flare-landmarks[onnx]'") from None
    return onnxruntime


class OnnxLandmarks:
    """An exported model on onnxruntime's CPU provider; ``threads`` sets intra-op threads (None: ORT's)."""

    # Face detection, cropping and back-mapping are Predictor's own code, run with this class's predict_batch.
    predict_crops = Predictor.predict_crops
    predict = Predictor.predict

    def __init__(self, path: Path | str | bytes, threads: int | None = None) -> None:
        ort = _require_onnxruntime()
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        source = path if isinstance(path, bytes) else str(path)
        try:
            self.session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ModelLoadError(f"{_name(path)}: not an ONNX model ({str(err).splitlines()[0]})") from None
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        if "flare.layout" not in self.metadata:
            raise ModelLoadError(f"{_name(path)}: an ONNX model without flare metadata (export it with flare)")
        self.layout: Layout = get_layout(self.metadata["flare.layout"])
        self.input_size = int(self.metadata["flare.input_size"])
        self.decoder = self.metadata["flare.decoder"]
        self.crop_prior = _crop_prior(self.metadata.get("flare.crop_prior"), self.layout, _name(path))
        self.input_name = self.session.get_inputs()[0].name

    def predict_batch(self, images: torch.Tensor | np.ndarray, to_original: np.ndarray | torch.Tensor | None = None,
                      decoder: str | None = None) -> np.ndarray:
        """Landmarks (B, N, 2) float64 for crops (B, 3, S, S): crop px, or original px through
        ``to_original`` (B, 3, 3), the crop -> original matrices (as :meth:`Predictor.predict_batch`).
        ``decoder`` may only name the graph's own (it is part of the exported graph)."""
        if decoder is not None and decoder != self.decoder:
            raise ValueError(f"--decoder {decoder}: this ONNX graph decodes with {self.decoder} (export it with "
                             f"--decoder {decoder})")
        x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        x = np.ascontiguousarray(x, dtype=np.float32)
        size = self.input_size
        if x.ndim != 4 or x.shape[1:] != (3, size, size):
            raise ValueError(f"crops must have shape (B, 3, {size}, {size}), got {x.shape}")
        p = self.session.run(None, {self.input_name: x})[0].astype(np.float64)
        if to_original is None:
            return p
        m = to_original.detach().cpu().double().numpy() if isinstance(to_original, torch.Tensor) else to_original
        return np.asarray(apply_affine(p, m), np.float64)


def _crop_prior(text: str | None, layout: Layout, name: str) -> CropPrior | None:
    """The ``flare.crop_prior`` metadata (JSON) as a :class:`CropPrior`; ModelLoadError naming the file and key
    for a malformed one, None when the model was exported without one."""
    if text is None:
        return None
    try:
        return CropPrior.from_json(json.loads(text), layout.num_points, f"{name} (flare.crop_prior)")
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{name}: flare.crop_prior is not JSON ({err.msg})") from None
    except ValueError as err:
        raise ModelLoadError(str(err)) from None


def _name(path: Path | str | bytes) -> str:
    return "<bytes>" if isinstance(path, bytes) else str(path)


def load_landmarks(model: str, backend: str = "torch", threads: int | None = None,
                   tracking_uri: str | None = None) -> Predictor | OnnxLandmarks:
    """``backend="torch"``: :meth:`Predictor.load`; ``"onnx"``: an exported ``.onnx`` file, or anything
    ``Predictor.load`` accepts, exported in memory first (registry models from ``tracking_uri``)."""
    if backend == "torch":
        return Predictor.load(model, tracking_uri=tracking_uri)
    if backend != "onnx":
        raise ValueError(f"--backend {backend!r}: expected torch or onnx")
    _require_onnxruntime()
    if Path(model).is_file():
        return OnnxLandmarks(model, threads)
    from flare.platform.export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        return OnnxLandmarks(export_onnx(Predictor.load(model, device="cpu", tracking_uri=tracking_uri),
                                         Path(tmp) / "model.onnx"), threads)
