"""``flare export``: write a trained model as a self-contained ONNX graph (network + decoder)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flare.platform.cli_errors import one_line_errors

export_app = typer.Typer(no_args_is_help=True, help="Export a trained model for serving (ONNX).")


@export_app.command("onnx")
@one_line_errors
def export_onnx_cmd(
    model: Annotated[str, typer.Argument(help="models:/name@alias, models:/name/version, a run id or a directory")],
    out: Annotated[Path, typer.Option("--out", help="the .onnx file to write (atomically)")] = Path("model.onnx"),
    opset: Annotated[int, typer.Option("--opset", min=13, help="ONNX opset")] = 17,
    decoder: Annotated[str | None, typer.Option(
        "--decoder", help="softargmax|argmax|argmax_refine (default: the model's selected decoder)")] = None,
    int8: Annotated[bool, typer.Option("--int8", help="int8 convolutions for fast CPU inference (needs "
                                       "--calibrate)")] = False,
    calibrate: Annotated[Path | None, typer.Option(
        "--calibrate", help="with --int8: a prepared dataset whose val split calibrates the int8 ranges")] = None,
    calibration_faces: Annotated[int, typer.Option("--calibration-faces", min=1,
                                                   help="val faces used to calibrate")] = 64,
) -> None:
    """Export MODEL as ONNX: crops (B, 3, S, S) BGR in [-1, 1] -> landmarks (B, N, 2) in crop px."""
    from flare.platform.export import export_onnx
    from flare.platform.predictor import Predictor

    if int8 != (calibrate is not None):
        raise ValueError("--int8 and --calibrate DATA go together: int8 ranges are calibrated on DATA's val split")
    predictor = Predictor.load(model, device="cpu")
    crops = None
    if calibrate is not None:
        from flare.platform.quantize import calibration_crops

        crops = calibration_crops(calibrate, predictor.layout.name, predictor.input_size, calibration_faces)
    try:
        path = export_onnx(predictor, out, opset=opset, decoder=decoder, int8_crops=crops,
                           int8_source=f"{calibrate} (val)")
    except ImportError as err:
        raise ValueError(str(err)) from None
    typer.echo(f"wrote {path} ({predictor.layout.name}, {predictor.input_size} px, "
               f"decoder {decoder or predictor.decoder}, dynamic batch"
               + (f", int8 convolutions calibrated on {len(crops)} val faces" if crops is not None else "") + ")")
