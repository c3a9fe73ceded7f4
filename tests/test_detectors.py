"""Face detectors (platform/detectors.py) and the dlib peer (platform/peers.py) on real 300W training faces.
dlib tests skip with the install hint when the ``peers`` extra is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flare.datasets.read_300w import read_300w
from flare.datasets.records import crop_center_scale, read_image_bgr
from flare.models.layouts import get_layout
from flare.models.metrics import nme_per_face
from flare.platform.detectors import (
    PEERS_HINT,
    detect,
    detector_crops,
    extent_boxes,
    match_detection,
)
from flare.platform.predictor import boxes_to_crops

ROOT = Path(__file__).resolve().parents[1]


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


needs_dlib = pytest.mark.skipif(not (_has("dlib") and _has("face_recognition_models")),
                                reason=f"dlib is not installed: {PEERS_HINT}")


@pytest.fixture(scope="module")
def faces(test_data: Path) -> list:
    """Eight real 300W training faces (afw) with their images: gains were measured on training faces."""
    recs = read_300w(test_data / "300W", "train").records[:8]
    return [(r, read_image_bgr(r.image.path)) for r in recs]


def test_match_detection_needs_the_face_centre_and_a_face_sized_box() -> None:
    pts = np.array([[100.0, 100.0], [200.0, 100.0], [150.0, 220.0]])  # extent 100 x 120, centre (150, 160)
    boxes = np.array([[400.0, 400.0, 100.0, 100.0],   # elsewhere
                      [0.0, 0.0, 400.0, 400.0],       # covers the face but 4x its size
                      [95.0, 105.0, 110.0, 110.0],    # the face
                      [110.0, 110.0, 100.0, 100.0]])  # on the face, centre further off
    assert match_detection(boxes, pts) == 2
    assert match_detection(boxes[[0, 1]], pts) is None
    assert match_detection(np.zeros((0, 4)), pts) is None


def test_haar_boxes_map_like_the_predictor(faces) -> None:
    boxes = np.array([[10.0, 20.0, 100.0, 100.0], [50.0, 60.0, 80.0, 90.0]])
    c, s = detector_crops(boxes, "haar")
    c0, s0 = boxes_to_crops(boxes, haar=True)
    assert np.allclose(c, c0) and np.allclose(s, s0)
    _check_crops_near_training_crops(faces, "haar", min_found=6)


def _check_crops_near_training_crops(faces, detector: str, min_found: int) -> None:
    """The detector finds the faces and its mapped crops are near the training crops: median centre error
    under 15% of the crop side and median side error under 12% (each face: under 30%). On these afw faces the
    medians are 8-12% and 3-8%; a flipped shift or a gain off by 30% fails."""
    shifts, sizes = [], []
    for rec, image in faces:
        boxes = detect(image, detector)
        assert boxes.shape[1:] == (4,) and (np.diff(boxes[:, 2] * boxes[:, 3]) <= 0).all()  # largest first
        k = match_detection(boxes, rec.landmarks)
        if k is None:
            continue
        c, s = detector_crops(boxes[[k]], detector)
        center, scale = crop_center_scale(rec)
        shifts.append(np.linalg.norm(c[0] - center) / (200 * scale))
        sizes.append(abs(s[0] / scale - 1))
    assert len(shifts) >= min_found
    assert np.median(shifts) < 0.15 and np.median(sizes) < 0.12, (shifts, sizes)
    assert max(shifts) < 0.3 and max(sizes) < 0.3, (shifts, sizes)


@needs_dlib
@pytest.mark.parametrize("detector", ["dlib", "dlib_cnn"])
def test_dlib_detectors_find_training_faces_and_map_to_the_training_crop(faces, detector: str) -> None:
    _check_crops_near_training_crops(faces, detector, min_found=7)
    centers, sides = extent_boxes(np.array([[10.0, 20.0, 100.0, 120.0]]), detector)
    assert centers.shape == (1, 2) and 80 < sides[0] < 120


@needs_dlib
def test_dlib_shape_predictor_on_real_faces(faces) -> None:
    """dlib's 68 points in flare's frame and order: a low inter-ocular NME against the 300W annotation with its
    own detector's box, and the left/right eye corners where 300W has them."""
    from flare.platform.peers import DlibLandmarks

    peer = DlibLandmarks()
    preds, gts = [], []
    for rec, image in faces:
        boxes = detect(image, "dlib")
        k = match_detection(boxes, rec.landmarks)
        if k is None:
            continue
        preds.append(peer.predict(image, boxes[[k]])[0])
        gts.append(rec.landmarks)
    assert len(preds) >= 7
    nme = nme_per_face(np.stack(preds), np.stack(gts), get_layout("300w68"))
    assert nme.mean() < 0.08, nme  # a mirrored or shifted order would be far above 10%


def test_peers_bench_without_dlib_says_how_to_install(tmp_path: Path) -> None:
    """``bench/peers.py`` with dlib unimportable (a module that raises ImportError first on the path): the
    install hint and exit 0."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "dlib.py").write_text("raise ImportError('blocked for the test')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "peers.py"), "--limit", "1"], env=env, check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'flare-landmarks[peers]'" in proc.stdout


@needs_dlib
def test_predict_cli_with_the_dlib_detector(faces, tmp_path: Path) -> None:
    """``flare predict --detector dlib`` finds the face on a real photo and predicts from dlib's mapped box."""
    import json

    import torch
    from typer.testing import CliRunner

    from flare.platform.builders import build_model
    from flare.platform.cli import app
    from flare.platform.config import load_job
    from flare.platform.predictor import Predictor
    from flare.platform.refine import predict_faces

    job = load_job(ROOT / "jobs" / "tiny.yaml", ["data.manifest=/nonexistent/manifest.json"])
    torch.manual_seed(0)
    d = tmp_path / "model"
    d.mkdir()
    torch.save(build_model(job, get_layout("300w68")).state_dict(), d / "state.pt")
    (d / "job.json").write_text(json.dumps({"job": job.model_dump(mode="json"), "layout": "300w68",
                                            "info": {"decoder": "softargmax"}}))
    rec, image = faces[1]
    img = Path(rec.image.path)
    res = CliRunner().invoke(app, ["predict", str(img), "--model", str(d), "--out", str(tmp_path / "o"),
                                   "--detector", "dlib", "--no-refine"])
    assert res.exit_code == 0, res.output
    got = np.asarray(json.loads((tmp_path / "o" / f"{img.stem}.json").read_text())["faces"])
    expected = predict_faces(Predictor.from_dir(d, device="cpu"), image, detector="dlib", passes=1)
    assert got.shape == (len(expected), 68, 2) and len(expected) >= 1
    assert np.abs(got - np.stack(expected)).max() < 1e-3
