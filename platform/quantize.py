"""``flare export onnx --int8``: post-training static int8 quantization of an exported graph for CPU inference.

Only the convolutions are quantized (QDQ format: int8 weights per output channel, uint8 activations with
ranges from MinMax calibration); everything else (batch norm that onnxruntime did not fold, residual adds,
AAM, the decoder with its argmax and soft-argmax) stays fp32. Quantizing the decoder breaks it: its masks hold
infinities that no int8 range covers. Calibration crops are the un-augmented validation crops of a prepared
dataset (method.md 9.6: never the test split), cropped exactly as ``flare eval`` crops them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

QUANTIZED_OPS = ["Conv"]
DEFAULT_CALIBRATION_FACES = 64


def _require_quantization() -> Any:
    try:
        from onnxruntime import quantization
    except ImportError as err:
        raise ImportError("int8 export needs onnxruntime: pip install 'flare-landmarks[onnx]'") from err
    return quantization


def calibration_crops(data: Path, layout: str, input_size: int, faces: int = DEFAULT_CALIBRATION_FACES,
                      split: str = "val") -> np.ndarray:
    """The first ``faces`` crops (F, 3, S, S) float32 of ``split`` of the prepared dataset ``data``, built
    as ``flare eval`` builds them (no augmentation). ValueError: another layout, or no faces in ``split``."""
    from flare.datasets.ingest import BatchBuilder, iter_local_rows, load_manifest

    manifest = load_manifest(data, layout)
    builder = BatchBuilder(manifest.layout, input_size, augment=False)
    crops: list[np.ndarray] = []
    left = faces
    for rows in iter_local_rows(manifest, split, min(32, faces)):
        crops.append(builder(rows[:left])["image"].numpy())
        left -= len(crops[-1])
        if left <= 0:
            break
    if not crops:
        raise ValueError(f"--calibrate {manifest.path}: no faces in its {split!r} split")
    return np.ascontiguousarray(np.concatenate(crops), dtype=np.float32)


def quantize_int8(model: bytes, crops: np.ndarray, source: str = "") -> bytes:
    """``model`` (an exported flare graph) with int8 convolutions, calibrated on ``crops`` (F, 3, S, S);
    flare's metadata is kept and ``flare.quantization`` says what was done (``source``: where the crops
    came from)."""
    import onnx

    q = _require_quantization()
    from onnxruntime.quantization.shape_inference import quant_pre_process

    proto = onnx.load_from_string(model)
    input_name = proto.graph.input[0].name

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(crops[i : i + 1] for i in range(len(crops)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.items, None)
            return None if x is None else {input_name: x}

    with tempfile.TemporaryDirectory(prefix="flare-int8-") as tmp:
        fp32, prepared, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        fp32.write_bytes(model)
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        q.quantize_static(str(prepared), str(int8), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                          activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                          calibrate_method=q.CalibrationMethod.MinMax, op_types_to_quantize=QUANTIZED_OPS,
                          extra_options={"ActivationSymmetric": False})
        out = onnx.load(str(int8))
    del out.metadata_props[:]
    for entry in proto.metadata_props:
        out.metadata_props.add().CopyFrom(entry)
    note = out.metadata_props.add()
    note.key = "flare.quantization"
    note.value = (f"int8 {'+'.join(QUANTIZED_OPS)} (QDQ, per-channel int8 weights, uint8 activations, MinMax "
                  f"calibration on {len(crops)} crops{' of ' + source if source else ''})")
    out.doc_string = proto.doc_string
    onnx.checker.check_model(out)
    return out.SerializeToString()
