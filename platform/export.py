"""Export a :class:`~flare.platform.predictor.Predictor` as one ONNX graph: crops in, crop px out.

The graph holds the network AND its validation-selected decoder (method.md 5.9), so a consumer needs no
flare code: feed (B, 3, S, S) float32 crops, read (B, N, 2) landmarks (x, y) in crop pixels. The decoders
are the ones in :mod:`flare.models.decode`, written with export-friendly ops only (argmax + gather for the
peak, gather + masked softmax for the 3x3 refinement, sums over constant grids for soft-argmax).

We use the TorchScript exporter (``dynamo=False``) with ``dynamic_axes`` for the batch: with torch 2.13 the
dynamo exporter fails on the hourglass's ``r.amax()`` without ``dim`` (CoordConv), the TorchScript one works.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flare.files import atomic_write_bytes
from flare.models.decode import check_decoder, decode_heatmaps, label_to_crop

DEFAULT_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "crops", "landmarks"
FORMAT_VERSION = "1"
INPUT_CONVENTION = (
    "float32 (B, 3, S, S) crop of a BGR uint8 image (channel order B, G, R as OpenCV reads it, not RGB), "
    "scaled x = (v - 127.5) / 127.5 to [-1, 1]"
)
CROP_RULE = (
    "face box x, y, w, h -> centre c = (x + w/2 - 0.5, y + h/2 - 0.5), side = min(w, h), scale = 1.05 side / 200; "
    "crop matrix M = [[s, 0, (S-1)/2 - s cx], [0, s, (S-1)/2 - s cy]] with s = S / (200 scale); "
    "cv2.warpAffine(image, M, (S, S), INTER_LINEAR, border constant 0); original px = M^-1 [p, 1] "
    "(method.md 1.2, 1.4, 8.1)"
)
OUTPUT_CONVENTION = "float32 (B, N, 2) landmarks (x, y) in crop pixels, pixel centres at integers (method.md 1.4)"


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install 'flare-landmarks[onnx]'") from None
    return onnx


class LandmarkGraph(nn.Module):
    """Network + decoder: crops (B, 3, S, S) in [-1, 1] -> landmarks (B, N, 2) in crop px, float32."""

    def __init__(self, model: nn.Module, input_size: int, decoder: str, temperature: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.input_size = int(input_size)
        self.decoder = check_decoder(decoder)
        self.temperature = float(temperature)

    @classmethod
    def from_predictor(cls, predictor: Any, decoder: str | None = None) -> LandmarkGraph:
        """A CPU copy of ``predictor``'s model in eval mode with its decoder (or ``decoder``)."""
        model = copy.deepcopy(predictor.model).cpu().eval()
        return cls(model, predictor.input_size, decoder or predictor.decoder, predictor.temperature).eval()

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        heat = self.model(crops)[-1].fused.float()
        return label_to_crop(decode_heatmaps(heat, self.decoder, self.temperature), self.input_size)


def onnx_metadata(predictor: Any, decoder: str) -> dict[str, str]:
    """The ``metadata_props`` written into the exported model (all strings); ``flare.crop_prior`` (JSON) when
    the model has one: the re-crop map of two-pass prediction (platform/refine.py)."""
    prior = getattr(predictor, "crop_prior", None)
    return {
        "flare.format_version": FORMAT_VERSION,
        "flare.layout": predictor.layout.name,
        "flare.num_landmarks": str(predictor.layout.num_points),
        "flare.input_size": str(predictor.input_size),
        "flare.decoder": decoder,
        "flare.temperature": repr(float(predictor.temperature)),
        "flare.input": INPUT_CONVENTION,
        "flare.crop_rule": CROP_RULE,
        "flare.output": OUTPUT_CONVENTION,
        "flare.info": ", ".join(f"{k}={v}" for k, v in sorted(predictor.info.items())),
        **({"flare.crop_prior": json.dumps(prior.to_json())} if prior is not None else {}),
    }


def export_onnx_bytes(predictor: Any, opset: int = DEFAULT_OPSET, decoder: str | None = None) -> bytes:
    """The serialized ONNX model (dynamic batch, metadata attached) for ``predictor``."""
    onnx = _require_onnx()
    graph = LandmarkGraph.from_predictor(predictor, decoder)
    size = predictor.input_size
    example = torch.zeros(2, 3, size, size)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # deprecation of the TorchScript exporter, instance_norm train-mode note
        torch.onnx.export(graph, (example,), buf, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=opset, dynamo=False, do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    proto.doc_string = f"flare landmarks: {INPUT_CONVENTION} -> {OUTPUT_CONVENTION}"
    for key, value in onnx_metadata(predictor, graph.decoder).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def export_onnx(predictor: Any, path: Path, opset: int = DEFAULT_OPSET, decoder: str | None = None,
                int8_crops: np.ndarray | None = None, int8_source: str = "") -> Path:
    """Write ``predictor`` as ONNX to ``path`` atomically (temp file + rename); returns ``path``. With
    ``int8_crops`` (F, 3, S, S), its convolutions are quantized to int8, calibrated on those crops
    (:func:`flare.platform.quantize.quantize_int8`)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory; give the .onnx file to write")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: no such directory")
    model = export_onnx_bytes(predictor, opset, decoder)
    if int8_crops is not None:
        from flare.platform.quantize import quantize_int8

        model = quantize_int8(model, int8_crops, int8_source)
    atomic_write_bytes(path, model)
    return path
