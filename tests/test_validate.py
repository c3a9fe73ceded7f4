"""Validation in the training precision (``train_loop.validate(..., bf16=True)``, the CUDA fast path): the same
metrics as the fp32 validation of the same weights, within bf16 rounding, on real 300W crops."""

from __future__ import annotations

from pathlib import Path

import torch

from flare.datasets.ingest import BatchBuilder, iter_local_rows, load_manifest
from flare.platform.builders import build_model
from flare.platform.config import load_job
from flare.platform.train_loop import ValCrops, validate

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def test_bf16_validation_matches_fp32_within_rounding(small_300w: Path) -> None:
    job = load_job(JOBS / "tiny.yaml", [f"data.manifest={small_300w / 'manifest.json'}"])
    manifest = load_manifest(job.data.manifest)
    builder = BatchBuilder(manifest.layout, job.data.input_size, augment=False, compact=True)
    crops = [{k: v for k, v in builder(rows).items() if k in ValCrops.KEYS}
             for rows in iter_local_rows(manifest, "val", 8)]
    torch.manual_seed(0)
    model = build_model(job, manifest.layout)
    for p in model.parameters():  # away from the all-uniform maps of a fresh init: distinct peaks to decode
        p.data.add_(torch.randn_like(p), alpha=0.05)
    models = {"val_raw": model}
    fp32 = validate(models, crops, job, manifest.layout, torch.device("cpu"))
    bf16 = validate(models, crops, job, manifest.layout, torch.device("cpu"), bf16=True)
    assert fp32.keys() == bf16.keys() and model.training  # the model is back in training mode
    nme = "val_raw_softargmax_nme"
    assert 0 < fp32[nme] and abs(bf16[nme] - fp32[nme]) <= 1e-3 * fp32[nme], (fp32[nme], bf16[nme])
    assert bf16 != fp32  # bf16 did run: the rounding shows in the metrics
