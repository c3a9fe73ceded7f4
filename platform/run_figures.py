"""Figures logged with every training run: the validation CED plot, validation predictions
over the images (ground truth green, prediction red) and STAR's PCA ellipses of the heatmap
distributions (STAR paper Fig. 3)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from flare.datasets.ingest import BatchBuilder, iter_local_rows, load_manifest
from flare.losses.star import weighted_moments
from flare.losses.uncertainty import distribution_for, landmark_distribution
from flare.models.decode import label_to_crop
from flare.platform.config import JobConfig
from flare.platform.evaluate import evaluate_model, to_uint8_images
from flare.platform.plots import ellipse_grid, overlay_grid
from flare.platform.predictor import Predictor

N_FACES = 8


def write_run_figures(predictor: Predictor, job: JobConfig, out: Path) -> list[Path]:
    """Write ``val_ced.png`` (+ metrics), ``val_predictions.png`` and ``val_ellipses.png`` into ``out``."""
    data = Path(job.data.manifest)
    evaluate_model(predictor, data, job.data.val_split, out / "val_eval")
    manifest = load_manifest(data)
    builder = BatchBuilder(manifest.layout, job.data.input_size, augment=False)
    rows = next(iter_local_rows(manifest, job.data.val_split, N_FACES))
    batch = builder(rows)
    heat = predictor.heatmaps(batch["image"]).cpu()
    size = job.data.input_size
    pred = predictor.decode(heat)
    images = to_uint8_images(batch["image"])
    gts = list(batch["landmarks_crop"].numpy())
    kind = distribution_for(job.objective.name, predictor.decoder)  # softmax(H / epsilon) for RwSA's scores
    mu, cov = weighted_moments(landmark_distribution(heat.double(), kind, job.objective.rwsa.epsilon))
    mu_px = label_to_crop(mu, size).numpy()
    cov_px = (cov * (size / 2) ** 2).numpy()  # normalised units -> crop px^2
    return [out / "val_eval" / "ced.png",
            overlay_grid(images, list(pred), gts, out / "val_predictions.png"),
            ellipse_grid(images, list(mu_px), list(cov_px), out / "val_ellipses.png")]


def log_run_figures(run_id: str, predictor: Predictor, job: JobConfig) -> None:
    """Write the figures and log them (and the val metrics) as artifacts of ``run_id``."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        write_run_figures(predictor, job, Path(tmp))
        mlflow.MlflowClient().log_artifacts(run_id, tmp, "figures")
