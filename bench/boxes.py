"""Where the face box comes from, and what re-cropping from the predicted landmarks recovers (platform/refine.py).

On the 300W common subset (helen/testset + lfpw/testset, 554 faces, raw 300W folder) with one flare model: NME
(method.md 9.1, inter-ocular, original px) from

- the **ground-truth box**: the training crop rule on the annotated landmarks (method.md 8.1), 1 and 2 passes;
- each **detector's box** (Haar, and dlib HOG / CNN when the ``peers`` extra is installed) mapped with its gains,
  then 1, 2 and 3 passes (each further pass re-crops from the previous landmarks with the training rule), and
  the same with a wide first look (``wide``: the first crop ``DETECTOR_FIRST_LOOK`` times larger, not voting in
  the mean), which is what ``flare predict`` runs from a detector.

Each detector row is scored on the faces that detector found, next to the ground-truth-box NME on the same
faces: the gap is what the box costs. The target of the two-pass refinement is a gap of at most 0.15 NME
points. ``refused`` counts re-crops that :func:`flare.platform.refine.plausible` turned down.

Re-crops use the model's crop prior (datasets/crop_prior.py; ``--crop-prior MANIFEST`` fits one from a prepared
manifest's train split for a model saved without it); with a prior, the ``wide, extent`` rows re-crop with the
landmark-extent rule instead, side by side.

``--faces val`` scores the validation faces instead (the training-folder faces the prepared ``--manifest`` put in
its val split, held out from training): what any choice about refinement is made on.

Usage: ``python bench/boxes.py [--model DIR] [--data DIR/300W] [--faces common|val] [--manifest FILE]
[--detectors haar,dlib,dlib_cnn] [--passes 3] [--crop-prior MANIFEST] [--limit N] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2
import numpy as np
import torch

from flare.datasets.read_300w import read_300w
from flare.datasets.records import crop_center_scale, read_image_bgr
from flare.models.layouts import get_layout
from flare.models.metrics import nme_per_face
from flare.platform.detectors import (
    MissingExtraError,
    check_detector,
    detect,
    detector_crops,
    match_detection,
)
from flare.platform.predictor import Predictor
from flare.platform.refine import (
    DEFAULT_COMBINE,
    DEFAULT_PASSES,
    DETECTOR_FIRST_LOOK,
    first_look,
    fit_missing_prior,
    refine_crops,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "runs" / "300w_small_rwsa" / "checkpoints"
TARGET_GAP = 0.15  # NME points (the target for the detector path after refinement)


def passes(predictor: Predictor, image: np.ndarray, c: np.ndarray, s: np.ndarray, n: int) -> tuple[list, int]:
    """Landmarks (N, 2) of passes 1..n from the crop (c, s) (``refine_crops``: each further pass re-crops
    from the previous landmarks), and how many re-crops were refused as implausible."""
    pts = predictor.predict_crops(image, c, s)
    out, refused = [pts[0]], 0
    for _ in range(n - 1):
        c2, s2, _ = refine_crops(predictor, image, c, s, 1, first=pts)
        refused += int(np.array_equal(c2, c) and np.array_equal(s2, s))
        c, s = c2, s2
        pts = predictor.predict_crops(image, c, s)
        out.append(pts[0])
    return out, refused


def methods(n: int, wide: str = "") -> list[tuple[str, Callable[[list], np.ndarray]]]:
    """(label, landmarks from the per-pass list) for 1 pass and, for k = 2..n passes, the last and the mean;
    ``wide``: the label of passes after a wide first look, which does not vote (k = 2..n only)."""
    if wide:
        out: list[tuple[str, Callable[[list], np.ndarray]]] = []
        for k in range(2, n + 1):
            out.append((f"{wide}, {k}, last", lambda p, k=k: p[k - 1]))
            if k > 2:
                out.append((f"{wide}, {k}, mean", lambda p, k=k: np.mean(p[1:k], axis=0)))
        return out
    out = [("1 pass", lambda p: p[0])]
    for k in range(2, n + 1):
        out.append((f"{k} passes, last", lambda p, k=k: p[k - 1]))
        out.append((f"{k} passes, mean", lambda p, k=k: np.mean(p[:k], axis=0)))
    return out


def faces(data: Path, which: str, manifest: Path) -> list:
    """300W common (test) records, or the training-folder records in ``manifest``'s val split."""
    if which == "common":
        return [r for r in read_300w(data, "test").records if "common" in r.subsets]
    import json

    import pyarrow.parquet as pq

    shards = [s["path"] for s in json.loads(manifest.read_text())["shards"] if s["split"] == "val"]
    ids = {i for p in shards for i in pq.read_table(manifest.parent / p, columns=["sample_id"])["sample_id"].to_pylist()}
    return [r for r in read_300w(data, "train").records if r.sample_id in ids]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = os.environ.get("FLARE_TEST_DATA")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a flare model or checkpoint directory")
    parser.add_argument("--data", type=Path, default=Path(root) / "300W" if root else None,
                        help="the raw 300W folder (default $FLARE_TEST_DATA/300W)")
    parser.add_argument("--faces", choices=("common", "val"), default="common")
    parser.add_argument("--manifest", type=Path, default=ROOT / "data" / "300w_full" / "manifest.json",
                        help="the prepared 300W manifest whose val split --faces val uses")
    parser.add_argument("--detectors", default="haar,dlib", help="comma list of haar, dlib, dlib_cnn")
    parser.add_argument("--passes", type=int, default=3, help="most passes from a detector box")
    parser.add_argument("--crop-prior", type=Path, metavar="MANIFEST",
                        help="fit the re-crop prior from this prepared manifest's train split (a model without one)")
    parser.add_argument("--limit", type=int, help="first N faces (quick runs)")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    if args.data is None:
        parser.error("--data DIR (the raw 300W folder) or FLARE_TEST_DATA is needed")
    if not args.model.is_dir():
        parser.error(f"--model {args.model}: not a directory (a flare model or checkpoint directory)")
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    detectors, skipped = [], []
    for name in args.detectors.split(","):
        try:
            detectors.append(check_detector(name, load=True))
        except MissingExtraError as err:
            skipped.append(f"  {name}: skipped ({err})")
    predictor = Predictor.from_dir(args.model, device="cpu")
    prior_note = fit_missing_prior(predictor, args.crop_prior)
    # the same model re-cropping with the landmark-extent rule, for the side-by-side rows
    extent_rule = dataclasses.replace(predictor, crop_prior=None) if predictor.crop_prior is not None else None
    records = faces(args.data, args.faces, args.manifest)[: args.limit]
    gt_pred: list[list[np.ndarray]] = []
    det: dict[str, dict[int, list[np.ndarray]]] = {d: {} for d in detectors}
    wide: dict[str, dict[int, list[np.ndarray]]] = {d: {} for d in detectors}
    extent: dict[str, dict[int, list[np.ndarray]]] = {d: {} for d in detectors}
    refused = dict.fromkeys(detectors, 0)
    for i, rec in enumerate(records):
        image = read_image_bgr(rec.image.path)
        center, scale = crop_center_scale(rec)
        gt_pred.append(passes(predictor, image, center[None], np.array([scale]), args.passes)[0])
        for d in detectors:
            boxes = detect(image, d)
            k = match_detection(boxes, rec.landmarks)
            if k is not None:
                c, s = detector_crops(boxes[[k]], d)
                det[d][i], r = passes(predictor, image, c, s, args.passes)
                wide[d][i], r_wide = passes(predictor, image, c, first_look(s, args.passes), args.passes)
                refused[d] += r + r_wide
                if extent_rule is not None:
                    extent[d][i] = passes(extent_rule, image, c, first_look(s, args.passes), args.passes)[0]
        if (i + 1) % 100 == 0:
            print(f"  {i + 1}/{len(records)} faces", file=sys.stderr, flush=True)
    layout = get_layout("300w68")
    gts = np.stack([r.landmarks for r in records])

    def nme(preds: list[np.ndarray], idx: list[int]) -> float:
        return 100 * float(nme_per_face(np.stack(preds), gts[idx], layout).mean())

    job = predictor.job
    lines = [f"Face box vs NME on 300W {args.faces} ({len(records)} faces), model {args.model}"
             + (f" ({job.name}: {predictor.input_size} px, {job.model.stacks} stacks, decoder {predictor.decoder})"
                if job else ""),
             ("  gap = NME - NME from the ground-truth box (1 pass) on the same faces; default: "
             f"{DEFAULT_PASSES} passes, {DEFAULT_COMBINE} (a detector's: wide, {DEFAULT_PASSES}, the first crop "
             f"{DETECTOR_FIRST_LOOK}x larger and not voting); re-crops: {prior_note}"),
             f"  {'box':<8} {'faces':>5} {'misses':>6}  {'method':<22} {'NME %':>6} {'GT box':>7} {'gap':>6}"]
    for d in ["gt", *detectors]:
        idx = list(range(len(records))) if d == "gt" else sorted(det[d])
        preds = gt_pred if d == "gt" else det[d]
        if not idx:
            lines.append(f"  {d:<8} {0:>5} {len(records):>6}")
            continue
        gt_same = nme([gt_pred[i][0] for i in idx], idx)
        rows = [(label, pick, preds) for label, pick in methods(args.passes)]
        if d != "gt":
            rows += [(label, pick, wide[d]) for label, pick in methods(args.passes, wide="wide")]
            if extent_rule is not None:
                rows += [(label, pick, extent[d]) for label, pick in methods(args.passes, wide="wide, extent")]
        for j, (label, pick, source) in enumerate(rows):
            head = f"  {d:<8} {len(idx):>5} {len(records) - len(idx) if d != 'gt' else '-':>6}" if j == 0 else " " * 23
            v = nme([pick(source[i]) for i in idx], idx)
            lines.append(f"{head}  {label:<22} {v:6.2f} {gt_same:7.2f} {v - gt_same:+6.2f}")
        if d != "gt":
            lines.append(f"{'':23}  re-crops refused as implausible: {refused[d]}")
    lines += skipped
    lines.append(f"  target: gap of the default detector path <= {TARGET_GAP} NME points")
    print("\n".join(lines), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
