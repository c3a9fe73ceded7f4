"""The ``flare`` command line (Typer). Each command is a thin shell over a library function; expected
failures (bad spec, bad data, missing model) end in one line on stderr and exit code 2."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

import flare
from flare.platform import cli_cluster, cli_export, cli_specs, cli_tune
from flare.platform.cli_errors import one_line_errors

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train and tune facial-landmark detectors.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare and inspect datasets.")
models_app = typer.Typer(no_args_is_help=True, help="Registered models: list, pull, promote.")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
runs_app = typer.Typer(no_args_is_help=True, help="Runs trained without Ray: log them into MLflow.")
app.add_typer(runs_app, name="runs")


@app.callback()
def _options(
    verbose: Annotated[bool, typer.Option("--verbose", help="show Ray's worker/controller/data logs and library "
                                          "warnings")] = False,
) -> None:
    """Train and tune facial-landmark detectors."""
    from flare.platform.ray_connect import VERBOSE_ENV, quiet_warnings

    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    quiet_warnings()


@app.command()
def version() -> None:
    """Print the flare version."""
    typer.echo(flare.__version__)


# ---------------------------------------------------------------------------------------------- data


@data_app.command("prepare")
@one_line_errors
def data_prepare(
    fmt: Annotated[str, typer.Option("--format", help="wflw|300w|cofw|adnet|synthetic")],
    out: Annotated[Path, typer.Option("--out", help="output directory (created atomically)")],
    root: Annotated[Path | None, typer.Option("--root", help="dataset root in its original layout")] = None,
    val_fraction: Annotated[float, typer.Option("--val-fraction")] = 0.1,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    on_error: Annotated[str, typer.Option("--on-error", help="fail|skip")] = "fail",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing dataset whole (only a "
                         "folder flare wrote, or an empty one)")] = False,
    max_pixels: Annotated[int, typer.Option("--max-pixels", min=1, help="refuse images with more pixels "
                          "(checked from the header, before decoding)")] = 50_000_000,
    count: Annotated[int, typer.Option("--count", help="synthetic faces to generate")] = 600,
    smoothing_k: Annotated[int, typer.Option("--smoothing-k", min=1, help="label-smoothing patch half-size "
                                             "k (method.md 6; RwSA default 7)")] = 7,
    image_size: Annotated[int, typer.Option("--image-size", help="stored loose-crop side in px (multiple of 8; "
                                            "the face box is its centre half). 384 with --jpeg-quality 75 packs "
                                            "all of 300W into 38.5 MiB")] = 512,
    jpeg_quality: Annotated[int, typer.Option("--jpeg-quality", min=1, max=100, help="JPEG quality of the "
                                              "stored crops")] = 95,
    no_ray: Annotated[bool, typer.Option("--no-ray", help="process in this process, without Ray")] = False,
    address: Annotated[str | None, typer.Option("--address", help="Ray address (default: local)")] = None,
) -> None:
    """Convert a benchmark (or synthetic faces) into Parquet shards + manifest.json."""
    from flare.datasets.prepare import PrepareOptions, prepare

    if fmt != "synthetic" and root is None:
        raise ValueError("--root is required for --format " + fmt)
    if on_error not in ("fail", "skip"):
        raise ValueError(f"--on-error must be fail or skip, got {on_error!r}")
    if not no_ray:
        from flare.platform.ray_connect import ensure_ray

        ensure_ray(address)
    options = PrepareOptions(val_fraction=val_fraction, seed=seed, on_error=on_error, smoothing_k=smoothing_k,
                             max_pixels=max_pixels, image_size=image_size, jpeg_quality=jpeg_quality)
    options.check()
    manifest = prepare(fmt, root or Path("."), out, options, engine="local" if no_ray else "ray", overwrite=overwrite,
                       synthetic_count=count, log=typer.echo)
    typer.echo(json.dumps(manifest["counts"], sort_keys=True))
    if manifest["skipped"]:
        typer.echo(f"skipped {len(manifest['skipped'])} items (listed in {out / 'manifest.json'})")


@data_app.command("inspect")
@one_line_errors
def data_inspect(
    directory: Annotated[Path, typer.Argument(help="a prepared dataset directory")],
    png: Annotated[Path | None, typer.Option("--png", help="grid image path")] = None,
    n: Annotated[int, typer.Option("--n", help="samples in the grid")] = 16,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Print counts and write a PNG grid of random samples with landmarks and edge heatmaps."""
    from flare.platform.data_inspect import inspect_dataset

    counts, path = inspect_dataset(directory, png, n, seed)
    typer.echo(json.dumps(counts, sort_keys=True, indent=1))
    typer.echo(f"grid: {path}")


# ---------------------------------------------------------------------------------------------- train


@app.command()
@one_line_errors
def train(
    job_file: Annotated[Path, typer.Argument(help="job spec YAML, or a shipped spec's name (flare specs ls)")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a.b=value (repeatable)")] = None,
    address: Annotated[str | None, typer.Option("--address", help="auto | ray://HOST:10001")] = None,
    resume: Annotated[str | None, typer.Option(
        "--resume", help="MLflow run id to continue; with --no-ray: `last` (the run dir's last checkpoint)")] = None,
    no_ray: Annotated[bool, typer.Option("--no-ray", help="single process without Ray or MLflow")] = False,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="--no-ray output directory")] = None,
    device: Annotated[str | None, typer.Option("--device", help="--no-ray device (cpu, cuda)")] = None,
    storage: Annotated[str | None, typer.Option("--storage", help="Ray Train storage: a path shared by the nodes "
                                                "(default ./runs) or a URI (s3://bucket/runs)")] = None,
    allow_change: Annotated[list[str] | None, typer.Option("--allow-change", help="with --resume: a spec key (or "
                                                           "section) you mean to change (repeatable)")] = None,
) -> None:
    """Train a job spec on Ray Train (or in one process with --no-ray)."""
    from flare.datasets.ingest import load_manifest
    from flare.platform.config import load_job
    from flare.platform.progress import EpochPrinter
    from flare.platform.specs import resolve_spec

    job = load_job(resolve_spec(job_file), set_ or [])
    if no_ray:
        from flare.platform.checkpoints import check_resume, latest_checkpoint
        from flare.platform.ray_train import check_job
        from flare.platform.train_loop import train_local

        if resume not in (None, "last"):
            raise ValueError(f"--resume {resume}: with --no-ray, use --resume last (the run dir's last checkpoint)")
        manifest = check_job(job)
        out = run_dir or Path("runs") / f"{job.name}-local"
        last = latest_checkpoint(out / "checkpoints") if resume else None
        if last is not None:
            check_resume(last, job, allow_change or [])
        norm = manifest.layout.default_normaliser.replace("_", "-")
        session = train_local(job, out, device=device, resume=resume is not None,
                              on_report=EpochPrinter(job.optimizer.epochs, norm, typer.echo))
        best = min(session.reports, key=lambda m: m["val_nme"], default=None)
        typer.echo(f"done: {len(session.reports)} epochs"
                   + (f", best val NME ({norm}) {100 * best['val_nme']:.2f}% at epoch {best['epoch'] + 1}"
                      if best else "") + f"; metrics in {out / 'metrics.jsonl'}")
        return
    from flare.platform.ray_train import train as ray_train

    outcome = ray_train(job, address=address, storage=storage, resume=resume, log=typer.echo,
                        allow_changes=allow_change or [])
    norm = load_manifest(job.data.manifest).layout.default_normaliser.replace("_", "-")
    typer.echo(f"done: run {outcome.run_id}, best val NME ({norm}) {100 * outcome.best_metrics['val_nme']:.2f}% "
               f"at epoch {outcome.best_metrics['epoch'] + 1}"
               + (f", registered {job.mlflow.registered_model} v{outcome.registered_version}"
                  if outcome.registered_version else ""))


@runs_app.command("import")
@one_line_errors
def runs_import(
    run_dir: Annotated[Path, typer.Argument(help="a `flare train --no-ray` run directory")],
    registered_model: Annotated[str | None, typer.Option("--registered-model", help="register under this name "
                                                         "(default: the job's mlflow.registered_model)")] = None,
    champion: Annotated[bool, typer.Option("--champion", help="move `champion` if better on the same val split")]
    = False,
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help="default: the job's, else "
                                                     "MLFLOW_TRACKING_URI, else ./mlruns")] = None,
) -> None:
    """Log a single-process run (metrics per epoch, val-selected model) into MLflow and register it."""
    from flare.platform.local_runs import import_local_run

    record = import_local_run(run_dir, tracking_uri, registered_model, champion, log=typer.echo)
    typer.echo(json.dumps(record, sort_keys=True))


@runs_app.command("compare")
@one_line_errors
def runs_compare(
    run_ids: Annotated[list[str], typer.Argument(help="MLflow run ids")],
    out: Annotated[Path, typer.Option("--out", help="writes val_nme.png, ced.png (with --eval), compare.json")],
    evals: Annotated[list[str] | None, typer.Option("--eval", help="LABEL=DIR of a `flare eval --out` (repeatable)")]
    = None,
    reference: Annotated[str | None, typer.Option("--reference", help="run name whose final val NME sets the "
                                                  "convergence target")] = None,
    margin: Annotated[float, typer.Option("--margin", help="convergence margin in NME (0.0005 = 0.05%)")] = 0.0005,
    threshold: Annotated[float, typer.Option("--threshold", help="CED threshold")] = 0.05,
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri")] = None,
) -> None:
    """Validation NME against epoch for several runs, their CED, and epochs-to-target convergence."""
    from flare.files import atomic_write_bytes
    from flare.platform.compare import ced_compare, convergence, val_histories, val_plot

    pairs = [e.split("=", 1) for e in evals or []]
    if any(len(p) != 2 for p in pairs):
        raise ValueError("--eval takes LABEL=DIR")
    histories = val_histories(run_ids, tracking_uri)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"val_nme": {k: [[e, v] for e, v in h] for k, h in histories.items()},
                     "plot": str(val_plot(histories, out / "val_nme.png"))}
    if reference:
        summary["convergence"] = convergence(histories, reference, margin)
    if pairs:
        summary["ced"] = str(ced_compare({k: Path(v) for k, v in pairs}, threshold, out / "ced.png"))
    atomic_write_bytes(out / "compare.json", (json.dumps(summary, indent=1) + "\n").encode())
    typer.echo(json.dumps({k: summary[k] for k in summary if k != "val_nme"}, sort_keys=True))


# ---------------------------------------------------------------------------------------------- models


@app.command("eval")
@one_line_errors
def eval_(
    model: Annotated[str, typer.Argument(help="models:/name@alias, models:/name/version, a run id or a directory")],
    data: Annotated[Path, typer.Option("--data", help="prepared dataset directory")],
    split: Annotated[str, typer.Option("--split")] = "test",
    out: Annotated[Path | None, typer.Option("--out", help="write metrics.json, nme.json, ced.png here")] = None,
    decoder: Annotated[str | None, typer.Option("--decoder", help="override: softargmax|argmax|argmax_refine")] = None,
    normaliser: Annotated[str | None, typer.Option("--normaliser", help="inter_ocular|inter_pupil")] = None,
    threshold: Annotated[float | None, typer.Option("--threshold", help="FR/AUC threshold (default: the "
                                                    "layout's, 0.05 for 300W)")] = None,
    extremes: Annotated[int, typer.Option("--extremes", min=0, help="with --out: overlay the best and worst N "
                                          "faces by NME (extremes.png)")] = 0,
    backend: Annotated[str, typer.Option("--backend", help="torch, or onnx (MODEL: an exported .onnx file, "
                                         "int8 included, or a model exported in memory)")] = "torch",
) -> None:
    """NME, FR and AUC overall and per subset, as JSON (and a CED plot with --out)."""
    from flare.platform.evaluate import evaluate_model
    from flare.platform.onnx_backend import load_landmarks

    predictor = load_landmarks(model, backend)
    summary = evaluate_model(predictor, data, split, out, decoder, normaliser, threshold, extremes)
    typer.echo(json.dumps(summary, indent=2, sort_keys=True))


@models_app.command("list")
@one_line_errors
def models_list() -> None:
    """Registered models with their versions, aliases and validation NME."""
    from flare.platform.registry import dump, list_models

    typer.echo(dump(list_models()))


@models_app.command("pull")
@one_line_errors
def models_pull(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@alias or NAME/version")],
    out: Annotated[Path, typer.Option("--out")],
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
) -> None:
    """Download weights, config, layout and a model card."""
    from flare.platform.registry import pull

    typer.echo(f"pulled to {pull(ref, out, overwrite=overwrite)}")


@models_app.command("promote")
@one_line_errors
def models_promote(
    name: Annotated[str, typer.Argument()],
    version: Annotated[str, typer.Argument()],
    alias: Annotated[str, typer.Option("--alias")] = "champion",
) -> None:
    """Point an alias (default: champion) at a version."""
    from flare.platform.registry import promote

    promote(name, version, alias)
    typer.echo(f"{name}@{alias} -> version {version}")


@app.command()
@one_line_errors
def predict(
    images: Annotated[list[Path], typer.Argument(help="image files or folders (walked; outputs mirror their "
                                                 "relative paths)")],
    model: Annotated[str, typer.Option("--model", help="models:/name@alias, a run id or a directory")],
    out: Annotated[Path, typer.Option("--out", help="output directory for JSON and overlay PNGs")],
    box: Annotated[str | None, typer.Option("--box", help="x,y,w,h face box (instead of detection)")] = None,
    no_detect: Annotated[bool, typer.Option("--no-detect", help="use the whole image as the face")] = False,
    backend: Annotated[str, typer.Option("--backend", help="torch | onnx (onnxruntime; MODEL may be an "
                                         "exported .onnx file)")] = "torch",
    ellipses: Annotated[bool, typer.Option("--ellipses", help="draw each landmark's 2-sigma covariance "
                                           "ellipse on the overlays (torch backend)")] = False,
    refine: Annotated[bool | None, typer.Option("--refine/--no-refine", help="predict twice: from a detector, "
                                                "first from a 1.4x wider crop, then from the training crop those "
                                                "landmarks imply (the model's crop prior; the result); from --box, the "
                                                "mean of the box's and the re-crop's (2x the model time; RESULTS.md). "
                                                "Default: on for detected faces, off for --box and --no-detect")] = None,
    passes: Annotated[int | None, typer.Option("--passes", help="predictions per face (overrides --refine): 3 adds "
                                               "one more re-crop and, from a detector, averages passes 2 and 3 "
                                               "(300W validation, Haar: 0.07 NME points better than 2, at 1.5x the "
                                               "time)")] = None,
    detector: Annotated[str, typer.Option("--detector", help="haar (OpenCV, default) | dlib (HOG) | dlib_cnn "
                                          "(MMOD); the dlib ones need the peers extra: dlib-bin, face-recognition-models")] = "haar",
    on_ray: Annotated[bool, typer.Option("--ray", help="Ray Data batch inference: --actors actors, each loading "
                                         "the model once (what `flare submit predict` runs)")] = False,
    address: Annotated[str | None, typer.Option("--address", help="with --ray: auto | ray://HOST:10001")] = None,
    actors: Annotated[int, typer.Option("--actors", help="with --ray: model replicas (1 CPU each)")] = 2,
    batch_size: Annotated[int, typer.Option("--batch-size", help="with --ray: images per actor call")] = 16,
) -> None:
    """Landmarks per image (original pixels) as JSON plus an overlay PNG, and predictions.jsonl of all.
    The torch backend adds per-landmark covariances (px²) and confidences to the JSON.
    Bad images are reported and the others still processed; the exit code is 1 if any image failed."""
    from flare.platform.onnx_backend import load_landmarks
    from flare.platform.predict_files import predict_files

    if ellipses and backend == "onnx":
        raise ValueError("--ellipses: the onnx backend outputs landmarks only (no heatmaps); use --backend torch")
    boxes = None
    if box is not None:
        import math

        try:
            values = [float(v) for v in box.split(",")]
        except ValueError:
            values = []
        if len(values) != 4:
            raise ValueError(f"--box {box!r}: expected four numbers x,y,w,h")
        if not all(math.isfinite(v) for v in values) or values[2] <= 0 or values[3] <= 0:
            raise ValueError(f"--box {box!r}: x,y,w,h must be finite with w and h > 0")
        boxes = [values]
    from flare.platform.refine import check_options

    if passes is None:
        passes = 2 if (refine if refine is not None else box is None and not no_detect) else 1
    check_options(detector, passes, load=not no_detect and box is None)
    if on_ray:
        from flare.platform.predict_ray import PredictJob, predict_on_ray
        from flare.platform.tracking import default_tracking_uri

        local = Path(model).exists()  # a directory or .onnx file every node sees, else a registry/run URI
        job = PredictJob(str(Path(model).resolve()) if local else model, backend,
                         None if local else default_tracking_uri(), boxes, not no_detect, ellipses, detector, passes)
        failures = predict_on_ray(job, images, out, actors, batch_size, address, typer.echo)
    else:
        predictor = load_landmarks(model, backend)
        failures = predict_files(predictor, images, out, boxes, detect=not no_detect, log=typer.echo,
                                 ellipses=ellipses, detector=detector, passes=passes)
    for path, reason in failures:
        typer.echo(f"error: {path}: {reason}", err=True)
    if failures:
        raise typer.Exit(1)


@app.command()
@one_line_errors
def demo(
    out: Annotated[Path, typer.Option("--out", help="demo output directory")] = Path("out/demo"),
    quick: Annotated[bool, typer.Option("--quick", help="the same path at toy size (what CI runs)")] = False,
    images: Annotated[list[Path] | None, typer.Option("--images", help="your photos to predict on")] = None,
) -> None:
    """The whole platform on synthetic faces: prepare, train on local Ray, register, evaluate, predict."""
    from flare.platform.demo import run_demo, summary_table

    summary = run_demo(out, quick=quick, images=images, log=typer.echo)
    typer.echo("")
    typer.echo(summary_table(summary))


app.add_typer(cli_cluster.cluster_app, name="cluster")
app.add_typer(cli_cluster.jobs_app, name="jobs")
app.add_typer(cli_specs.specs_app, name="specs")
app.add_typer(cli_export.export_app, name="export")
app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(cli_cluster.submit)
app.command()(cli_tune.tune)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
