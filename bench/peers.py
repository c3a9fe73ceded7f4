"""flare vs dlib's 68-point shape predictor on the 300W common subset, side by side, one CPU thread.

Needs the optional ``peers`` extra (``pip install 'flare-landmarks[peers]'``: dlib-bin, face-recognition-models);
without it, it prints how to install it and exits 0. Both models see the same faces (300W common = helen/testset
+ lfpw/testset, 554 faces, read from the raw 300W folder) and are scored with flare's NME (method.md 9.1:
inter-ocular 36/45, original-image pixels, per face then averaged; dlib's points use the same iBUG 68 order).

Protocols:

- **own detector**: flare with OpenCV Haar (its default) and with dlib's HOG boxes (the ``--detector dlib``
  extra), each with 1 and 2 passes (``platform/refine.py``); dlib with its HOG detector. A face is missed when
  no box matches it (``match_detection``: box centre inside the 68-point extent, size within 2x). NME is over
  the faces each found, and again over the faces both defaults found (flare Haar and dlib HOG).
- **ground-truth box**: the box from the ground-truth landmarks. flare: the training crop rule (method.md 8.1);
  dlib: the landmark extent as its rectangle, and also the GT box in dlib's detector convention (the extent
  mapped back through the HOG gains measured on training images, ``platform/detectors.py``), which is what
  dlib's predictor was trained with.

Time per face: detection + landmarks (own detector) or landmarks only (GT box), the median over the faces,
flare and dlib timed face by face in alternating order so that load from other processes hits both alike.
Ratios are flare / dlib (NME: > 1 means flare is less accurate; time: > 1 means flare is slower).

Usage: ``python bench/peers.py [--model DIR] [--data DIR/300W] [--limit N] [--out FILE]``. ``--model``
defaults to the committed reduced model's run (``runs/300w_small_rwsa/checkpoints``), ``--data`` to
``$FLARE_TEST_DATA/300W``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2
import numpy as np
import torch

from flare.datasets.read_300w import read_300w
from flare.datasets.records import crop_center_scale
from flare.models.layouts import get_layout
from flare.models.metrics import nme_per_face
from flare.platform.detectors import (
    UPSAMPLE,
    MissingExtraError,
    detect,
    detector_crops,
    match_detection,
    require_dlib,
)
from flare.platform.predictor import Predictor
from flare.platform.refine import (
    DEFAULT_COMBINE,
    DETECTOR_FIRST_LOOK,
    combine_passes,
    fit_missing_prior,
    refine_crops,
    refine_detected,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "runs" / "300w_small_rwsa" / "checkpoints"


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def second_pass(predictor: Predictor, image: np.ndarray, c: np.ndarray, s: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """flare's default second pass (platform/refine.py): re-crop from ``p1``, predict, combine."""
    c2, s2, _ = refine_crops(predictor, image, c, s, 1, first=p1)
    return np.stack(combine_passes([p1], predictor.predict_crops(image, c2, s2), DEFAULT_COMBINE))


def flare_own(predictor: Predictor, image: np.ndarray, gt: np.ndarray, detector: str) -> dict:
    """1- and 2-pass landmarks from ``detector``'s matching box, with their times (detection included); two
    passes as ``flare predict`` runs them from a detector: a wide first look, then the re-crop's prediction."""
    boxes, t_det = timed(lambda: detect(image, detector))
    k = match_detection(boxes, gt)
    if k is None:
        return {}
    c, s = detector_crops(boxes[[k]], detector)
    p1, t1 = timed(lambda: predictor.predict_crops(image, c, s))

    p2, t2 = timed(lambda: predictor.predict_crops(image, *refine_detected(predictor, image, c, s, 2)[:2]))
    return {"1": (p1[0], t_det + t1), "2": (p2[0], t_det + t2)}


def flare_gt(predictor: Predictor, image: np.ndarray, rec) -> dict:
    center, scale = crop_center_scale(rec)
    c, s = center[None], np.array([scale])
    p1, t1 = timed(lambda: predictor.predict_crops(image, c, s))
    p2, t2 = timed(lambda: second_pass(predictor, image, c, s, p1))
    return {"1": (p1[0], t1), "2": (p2[0], t1 + t2)}


def dlib_runs(peer, image: np.ndarray, gt: np.ndarray) -> dict:
    from flare.platform.peers import detector_box_for, extent_box

    out = {}
    boxes, t_det = timed(lambda: detect(image, "dlib"))
    k = match_detection(boxes, gt)
    if k is not None:
        p, t = timed(lambda: peer.predict(image, boxes[[k]]))
        out["own"] = (p[0], t_det + t)
    p, t = timed(lambda: peer.predict(image, extent_box(gt)))
    out["gt"] = (p[0], t)
    p, t = timed(lambda: peer.predict(image, detector_box_for(gt, "dlib")))
    out["gt_conv"] = (p[0], t)
    return out


def run(predictor: Predictor, peer, records: list, log: Callable[[str], None]) -> dict[str, dict[int, tuple]]:
    """Per method: {face index: (landmarks, seconds)} for the faces it produced."""
    from flare.datasets.records import read_image_bgr

    res: dict[str, dict[int, tuple]] = {}

    def put(prefix: str, out: dict, i: int) -> None:
        for key, value in out.items():
            res.setdefault(f"{prefix}{key}", {})[i] = value

    warm = read_image_bgr(records[0].image.path)  # first calls (allocations, lazy loads) are not timed
    flare_own(predictor, warm, records[0].landmarks, "haar"), dlib_runs(peer, warm, records[0].landmarks)
    for i, rec in enumerate(records):
        image = read_image_bgr(rec.image.path)
        steps = [("flare_haar_", flare_own, (predictor, image, rec.landmarks, "haar")),
                 ("flare_dlib_", flare_own, (predictor, image, rec.landmarks, "dlib")),
                 ("flare_gt_", flare_gt, (predictor, image, rec)),
                 ("dlib_", dlib_runs, (peer, image, rec.landmarks))]
        for prefix, fn, fn_args in steps if i % 2 == 0 else steps[::-1]:
            put(prefix, fn(*fn_args), i)
        if (i + 1) % 100 == 0:
            log(f"  {i + 1}/{len(records)} faces")
    return res


def nme(res: dict[int, tuple], records: list, faces: set[int] | None = None) -> float:
    idx = sorted(res if faces is None else faces)
    pred = np.stack([res[i][0] for i in idx])
    gt = np.stack([records[i].landmarks for i in idx])
    return 100 * float(nme_per_face(pred, gt, get_layout("300w68")).mean())


def ms(res: dict[int, tuple]) -> float:
    return 1e3 * statistics.median(v[1] for v in res.values())


def table(res: dict[str, dict[int, tuple]], records: list) -> list[str]:
    n = len(records)
    row = "  {:<52} {:>7} {:>7} {:>9}"
    lines = [row.format("", "NME %", "misses", "ms/face")]

    def add(label: str, key: str, faces: set[int] | None = None, misses: bool = True) -> None:
        r = res.get(key, {})
        lines.append(row.format(label, f"{nme(r, records, faces):.2f}" if r else "-",
                                f"{n - len(r)}" if misses else "-", f"{ms(r):.1f}" if r else "-"))

    lines.append("own detector (NME over the faces each found)")
    add("flare, Haar, 1 pass", "flare_haar_1")
    add("flare, Haar, 2 passes", "flare_haar_2")
    add("flare, dlib HOG boxes, 1 pass", "flare_dlib_1")
    add("flare, dlib HOG boxes, 2 passes", "flare_dlib_2")
    add("dlib, HOG", "dlib_own")
    both = set(res.get("flare_haar_1", {})) & set(res.get("dlib_own", {}))
    lines.append(f"faces both found (flare Haar and dlib HOG): {len(both)}")
    if both:
        for label, key in (("flare, Haar, 1 pass", "flare_haar_1"), ("flare, Haar, 2 passes", "flare_haar_2"),
                           ("dlib, HOG", "dlib_own")):
            lines.append(row.format(label, f"{nme(res[key], records, both):.2f}", "-", "-"))
    lines.append("ground-truth box (all faces)")
    add("flare, training crop rule, 1 pass", "flare_gt_1", misses=False)
    add("flare, training crop rule, 2 passes", "flare_gt_2", misses=False)
    add("dlib, landmark extent as its rectangle", "dlib_gt", misses=False)
    add("dlib, GT box in its HOG convention (inverse gains)", "dlib_gt_conv", misses=False)
    lines.append("ratios flare / dlib (NME: > 1 = flare less accurate; time: > 1 = flare slower)")
    pairs = [("own detector, flare Haar 1 pass / dlib HOG", "flare_haar_1", "dlib_own", None),
             ("own detector, flare Haar 2 passes / dlib HOG", "flare_haar_2", "dlib_own", None),
             ("own detector, flare dlib-HOG 2 passes / dlib HOG", "flare_dlib_2", "dlib_own", None),
             ("faces both found, flare Haar 2 passes / dlib HOG", "flare_haar_2", "dlib_own", both),
             ("GT box, flare 1 pass / dlib extent box", "flare_gt_1", "dlib_gt", None),
             ("GT box, flare 1 pass / dlib HOG-convention box", "flare_gt_1", "dlib_gt_conv", None)]
    for label, a, b, faces in pairs:
        if res.get(a) and res.get(b) and (faces is None or faces):
            lines.append(f"  {label:<52} NME {nme(res[a], records, faces) / nme(res[b], records, faces):5.2f}"
                         f"   time {ms(res[a]) / ms(res[b]):6.1f}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = os.environ.get("FLARE_TEST_DATA")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="a flare model or checkpoint directory")
    parser.add_argument("--data", type=Path, default=Path(root) / "300W" if root else None,
                        help="the raw 300W folder (default $FLARE_TEST_DATA/300W)")
    parser.add_argument("--crop-prior", type=Path, metavar="MANIFEST",
                        help="fit the re-crop prior from this prepared manifest's train split (a model without one)")
    parser.add_argument("--limit", type=int, help="first N faces (quick runs)")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    try:
        dlib = require_dlib()
        from flare.platform.peers import SHAPE_MODEL, DlibLandmarks

        peer = DlibLandmarks()
    except MissingExtraError as err:
        print(f"bench/peers.py compares flare with dlib and needs the optional peers extra: {err}")
        return 0
    if args.data is None:
        parser.error("--data DIR (the raw 300W folder) or FLARE_TEST_DATA is needed")
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    if not Path(args.model).is_dir():
        parser.error(f"--model {args.model}: not a directory (a flare model or checkpoint directory)")
    predictor = Predictor.from_dir(Path(args.model), device="cpu")
    recrop = fit_missing_prior(predictor, args.crop_prior)
    records = [r for r in read_300w(args.data, "test").records if "common" in r.subsets][: args.limit]
    job = predictor.job
    what = (f"{job.name}: {predictor.input_size} px, {job.model.stacks} stacks, {job.model.channels} ch, "
            f"{job.objective.name}, decoder {predictor.decoder}" if job else str(args.model))
    cpu = platform.processor() or platform.machine()
    lines = [(f"flare vs dlib on 300W common ({len(records)} faces), CPU, 1 thread ({cpu}, {os.cpu_count()} "
              f"cores, load average {os.getloadavg()[0]:.1f} at start)"),
             f"  flare model {args.model} ({what}); torch {torch.__version__}",
             f"  dlib {dlib.__version__}: HOG detector (upsample {UPSAMPLE['dlib']}), {SHAPE_MODEL}",
             "  NME: inter-ocular (36/45), original px, flare's metric for both; misses: no matching box",
             (f"  flare 2 passes: re-crop from the first landmarks ({recrop}), result = {DEFAULT_COMBINE} "
              f"of the passes; from a detector's box the first crop is {DETECTOR_FIRST_LOOK}x larger and the result "
              "is the second pass (platform/refine.py)")]
    print("\n".join(lines), flush=True)
    res = run(predictor, peer, records, lambda s: print(s, file=sys.stderr, flush=True))
    rows = table(res, records)
    print("\n".join(rows), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines + rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
