"""Face detectors on real 300W faces: misses, box -> landmark-extent gains and time per image, one thread.

Detectors: OpenCV Haar (flare's default), dlib HOG with 0 and 1 upsamplings, dlib's CNN (MMOD, weights from
``face-recognition-models``) with 0 upsamplings; the dlib ones need the ``peers`` extra and are left out
(with the install hint) without it. A face counts as found when a box's centre lies inside its 68-point
extent and the box's min side is within 2x the extent's (``flare.platform.detectors.match_detection``).

- ``train`` (afw + helen/trainset + lfpw/trainset, 2,012 faces): misses, and the gains that map each
  detector's box to the landmark extent (medians over the found faces: extent min side / box min side, and
  the centre offset in box sides, with IQRs). These are what ``GAINS`` / ``UPSAMPLE`` in
  ``platform/detectors.py`` hold; the test set is never used to choose them.
- ``test`` (300W common = helen/testset + lfpw/testset, 554 faces): misses only.

Usage: ``python bench/detectors.py [--data DIR/300W] [--only haar,dlib0,dlib1,cnn0] [--splits train,test]
[--limit N] [--stride K] [--out FILE]``. ``--data`` defaults to ``$FLARE_TEST_DATA/300W``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2
import numpy as np

from flare.datasets.read_300w import read_300w
from flare.datasets.records import landmark_box
from flare.platform.detectors import MissingExtraError, detect, match_detection

CONFIGS: dict[str, tuple[str, int | None]] = {"haar": ("haar", None), "dlib0": ("dlib", 0), "dlib1": ("dlib", 1),
                                              "cnn0": ("dlib_cnn", 0)}


def measure(records: list, name: str, upsample: int | None, log: Callable[[str], None]) -> dict:
    """Misses, per-image seconds and, for the found faces, side ratio and centre offsets (in box sides)."""
    misses, times, ratio, dx, dy = [], [], [], [], []
    for i, rec in enumerate(records):
        image = rec.load_image()
        t0 = time.perf_counter()
        boxes = detect(image, name, upsample)
        times.append(time.perf_counter() - t0)
        k = match_detection(boxes, rec.landmarks)
        if k is None:
            misses.append(rec.source)
            continue
        x, y, w, h = boxes[k]
        x0, y0, x1, y1 = landmark_box(rec.landmarks)
        side = min(w, h)
        ratio.append(min(x1 - x0, y1 - y0) / side)
        dx.append(((x0 + x1) / 2 - (x + w / 2 - 0.5)) / side)
        dy.append(((y0 + y1) / 2 - (y + h / 2 - 0.5)) / side)
        if (i + 1) % 500 == 0:
            log(f"    {name}: {i + 1}/{len(records)}")
    return {"faces": len(records), "misses": misses, "time": float(np.median(times)),
            "ratio": np.asarray(ratio), "dx": np.asarray(dx), "dy": np.asarray(dy)}


def _q(v: np.ndarray) -> str:
    if len(v) == 0:
        return "-"
    a, m, b = np.percentile(v, [25, 50, 75])
    return f"{m:+.3f} ({a:+.3f}..{b:+.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = os.environ.get("FLARE_TEST_DATA")
    parser.add_argument("--data", type=Path, default=Path(root) / "300W" if root else None,
                        help="the raw 300W folder (default $FLARE_TEST_DATA/300W)")
    parser.add_argument("--only", default=",".join(CONFIGS), help="comma list of " + ", ".join(CONFIGS))
    parser.add_argument("--splits", default="train,test")
    parser.add_argument("--limit", type=int, help="first N faces of each split (quick runs)")
    parser.add_argument("--stride", type=int, default=1, help="every K-th face of each split (slow detectors)")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    if args.data is None:
        parser.error("--data DIR (the raw 300W folder) or FLARE_TEST_DATA is needed")
    cv2.setNumThreads(1)
    every = f", every {args.stride}th face" if args.stride > 1 else ""
    lines = [f"Face detectors on 300W ({args.data}{every}), 1 thread, load average {os.getloadavg()[0]:.1f} at start",
             "  found = a box centre inside the 68-point extent, box min side within 2x the extent's",
             ("  gains (train only): side = extent min side / box min side; dx, dy = extent centre - box centre "
              "in box sides; median (IQR)")]
    print("\n".join(lines), flush=True)
    for split in args.splits.split(","):
        records = read_300w(args.data, split).records[:: args.stride][: args.limit]
        for key in args.only.split(","):
            name, upsample = CONFIGS[key]
            try:
                r = measure(records, name, upsample, lambda s: print(s, flush=True))
            except MissingExtraError as err:
                row = f"  {split:<5} {key:<6} skipped: {err}"
            else:
                row = (f"  {split:<5} {key:<6} misses {len(r['misses']):>3}/{r['faces']}  "
                       f"{1e3 * r['time']:7.1f} ms/image")
                if split == "train":
                    row += f"  side {_q(r['ratio'])}  dx {_q(r['dx'])}  dy {_q(r['dy'])}"
                elif r["misses"]:
                    row += "  missed: " + " ".join(Path(m).stem for m in r["misses"][:30])
            print(row, flush=True)
            lines.append(row)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
