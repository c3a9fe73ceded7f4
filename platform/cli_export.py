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
) -> None:
    """Export MODEL as ONNX: crops (B, 3, S, S) BGR in [-1, 1] -> landmarks (B, N, 2) in crop px."""
    from flare.platform.export import export_onnx
    from flare.platform.predictor import Predictor

    predictor = Predictor.load(model, device="cpu")
    try:
        path = export_onnx(predictor, out, opset=opset, decoder=decoder)
    except ImportError as err:
        raise ValueError(str(err)) from None
    typer.echo(f"wrote {path} ({predictor.layout.name}, {predictor.input_size} px, "
               f"decoder {decoder or predictor.decoder}, dynamic batch)")
