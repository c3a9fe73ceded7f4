"""``flare eval``: NME, FR and AUC of a model on a prepared split, overall and per subset.

Predictions are mapped to original-image pixels and compared with the unclamped ground truth
(method.md 9.1, ``eval.space = "original"``); FR/AUC use the layout's threshold with the official
grid (``parity``, 9.2). 300W subsets: common/challenge; WFLW: the six attributes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from flare.datasets.ingest import BatchBuilder, iter_local_rows, load_manifest
from flare.files import atomic_write_bytes
from flare.models.decode import check_decoder
from flare.models.metrics import ced_curve, evaluate
from flare.platform.predictor import Predictor

if TYPE_CHECKING:
    from flare.platform.onnx_backend import OnnxLandmarks

SUBSETS_SKIPPED = {"full", "synthetic"}


def predict_split(predictor: Predictor | OnnxLandmarks, data: Path, split: str, batch_size: int = 32,
                  decoder: str | None = None) -> dict[str, Any]:
    """Predictions and ground truth (original px) plus subset tags for every face of ``split``."""
    manifest = load_manifest(data, predictor.layout.name)
    builder = BatchBuilder(manifest.layout, predictor.input_size, augment=False)
    preds, gts, subsets, ids = [], [], [], []
    for rows in iter_local_rows(manifest, split, batch_size):
        batch = builder(rows)
        preds.append(predictor.predict_batch(batch["image"], batch["to_original"], decoder))
        gts.append(batch["landmarks_original"].double().numpy())
        subsets += [r["subsets"] for r in rows]
        ids += [r["sample_id"] for r in rows]
    return {"pred": np.concatenate(preds), "gt": np.concatenate(gts), "subsets": subsets, "ids": ids,
            "layout": manifest.layout}


def evaluate_model(predictor: Predictor | OnnxLandmarks, data: Path, split: str = "test", out: Path | None = None,
                   decoder: str | None = None, normaliser: str | None = None, threshold: float | None = None,
                   extremes: int = 0) -> dict[str, Any]:
    """Metrics overall and per subset (FR/AUC at ``threshold``, default the layout's); with ``out``, also
    ``metrics.json``, ``nme.json``, ``ced.png`` and, with ``extremes``, ``extremes.png``: the best and
    worst ``extremes`` faces by NME with prediction (red) and ground truth (green)."""
    if decoder is not None:
        check_decoder(decoder)
    if threshold is not None and not 0 < threshold <= 1:
        raise ValueError(f"--threshold must be in (0, 1] (a fraction of the normaliser), got {threshold}")
    res = predict_split(predictor, data, split, decoder=decoder)
    layout = res["layout"]
    names = sorted({s for tags in res["subsets"] for s in tags} - SUBSETS_SKIPPED)
    masks = {n: np.array([n in tags for tags in res["subsets"]]) for n in names}
    with torch.no_grad():
        metrics = evaluate(res["pred"], res["gt"], layout, normaliser=normaliser, threshold=threshold,
                           subsets=masks)
    per_face = metrics.pop("nme_per_face")
    summary = {"split": split, "faces": len(per_face), "decoder": decoder or predictor.decoder,
               "normaliser": normaliser or layout.default_normaliser, **_jsonable(metrics)}
    if out is not None:
        from flare.platform.plots import ced_plot

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "metrics.json", (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
        atomic_write_bytes(out / "nme.json", json.dumps(dict(zip(res["ids"], map(float, per_face)))).encode())
        t = summary["threshold"]
        curves = {"all": ced_curve(per_face, t)}
        curves.update({n: ced_curve(per_face[m], t) for n, m in masks.items() if m.any()})
        ced_plot(curves, t, out / "ced.png", title=f"CED on {split} (NME {summary['nme']*100:.2f}%)")
        if extremes > 0:
            order = np.argsort(per_face, kind="stable")
            picks = list(order[:extremes]) + list(order[::-1][:extremes])
            labels = {res["ids"][i]: f"{'best' if k < extremes else 'worst'} {per_face[i]*100:.2f}%"
                      for k, i in enumerate(picks)}
            extremes_png(predictor, data, split, labels, out / "extremes.png", decoder)
    return summary


def extremes_png(predictor: Predictor | OnnxLandmarks, data: Path, split: str, labels: dict[str, str], path: Path,
                 decoder: str | None = None) -> Path:
    """Overlay grid of the faces named in ``labels`` (in that order) on their input crops."""
    from flare.platform.plots import overlay_grid

    manifest = load_manifest(data)
    builder = BatchBuilder(manifest.layout, predictor.input_size, augment=False)
    found: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for rows in iter_local_rows(manifest, split, 32):
        rows = [r for r in rows if r["sample_id"] in labels]
        if not rows:
            continue
        batch = builder(rows)
        pred = predictor.predict_batch(batch["image"], decoder=decoder)
        for r, img, p, g in zip(rows, to_uint8_images(batch["image"]), pred, batch["landmarks_crop"].numpy()):
            found[r["sample_id"]] = (img, p, g)
    ids = [i for i in labels if i in found]
    return overlay_grid([found[i][0] for i in ids], [found[i][1] for i in ids], [found[i][2] for i in ids], path,
                        titles=[labels[i] for i in ids])


def to_uint8_images(images: torch.Tensor) -> list[np.ndarray]:
    """Input crops (B, 3, S, S) in [-1, 1] -> BGR uint8 images (S, S, 3) for figures."""
    return [((img.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8) for img in images.cpu()]


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x
