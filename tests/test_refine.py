"""Two-pass prediction (platform/refine.py, method.md 8.1): the re-crop from landmarks is exactly the crop the
training/evaluation pipeline makes from those landmarks, and ``passes`` composes real model predictions."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flare.datasets.augment import crop_matrix
from flare.datasets.crop_prior import fit_crop_prior
from flare.datasets.ingest import BatchBuilder, load_manifest
from flare.datasets.prepare import PrepareOptions, process_record
from flare.datasets.read_300w import read_300w
from flare.datasets.records import crop_center_scale, read_image_bgr
from flare.models.layouts import get_layout
from flare.platform.builders import build_model
from flare.platform.config import load_job
from flare.platform.detectors import detect, detector_crops
from flare.platform.predictor import Predictor, boxes_to_crops
from flare.platform.refine import (
    COMBINE,
    DETECTOR_FIRST_LOOK,
    crops_to_boxes,
    face_boxes,
    fit_missing_prior,
    landmark_crops,
    plausible,
    predict_faces,
    refine_crops,
    refine_detected,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def face(test_data: Path):
    """One real 300W test face (record) and its image."""
    rec = read_300w(test_data / "300W", "test").records[0]
    return rec, read_image_bgr(rec.image.path)


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    """A real (seeded, untrained) tiny model with the plain argmax decoder: its landmarks spread over the crop,
    so the re-crop from them is a plausible face-sized crop and the refinement path really runs."""
    job = load_job(ROOT / "jobs" / "tiny.yaml", ["data.manifest=/nonexistent/manifest.json"])
    layout = get_layout("300w68")
    torch.manual_seed(0)
    return Predictor.from_job(build_model(job, layout).eval(), job, layout, "argmax")


def test_landmark_crop_is_the_training_and_eval_crop(face) -> None:
    """Ground-truth landmarks as the 'first pass' give exactly the crop prepare + BatchBuilder make for that
    face: same centre and scale as crop_center_scale, and the same crop -> original matrix to 1e-9 px."""
    rec, _ = face
    centers, scales = landmark_crops(rec.landmarks[None])
    center, scale = crop_center_scale(rec)
    assert np.array_equal(centers[0], center) and scales[0] == scale
    size = 128
    row = process_record(rec, "test", get_layout("300w68"), PrepareOptions())
    batch = BatchBuilder(get_layout("300w68"), size, augment=False)([row])
    expected = np.linalg.inv(crop_matrix(centers[0], scales[0], size))
    assert np.abs(batch["to_original"][0].numpy() - expected).max() < 1e-9
    # the crop holds the face as in training: landmark extent = 1/1.05 of the crop side on its short axis
    pts = rec.landmarks @ np.linalg.inv(expected)[:2, :2].T + np.linalg.inv(expected)[:2, 2]
    extent = pts.max(axis=0) - pts.min(axis=0)
    assert extent.min() == pytest.approx(size / 1.05, rel=1e-9)


def test_boxes_for_the_last_pass_map_back_to_the_crops() -> None:
    rng = np.random.default_rng(0)
    centers, scales = rng.uniform(20, 300, (5, 2)), rng.uniform(0.3, 2.0, 5)
    c, s = boxes_to_crops(crops_to_boxes(centers, scales), haar=False)
    assert np.abs(c - centers).max() < 1e-12 and np.abs(s - scales).max() < 1e-12


def test_implausible_recrops_are_refused() -> None:
    ok = plausible(np.array([1.0, 1.9, 2.1, 0.51, 0.49, np.nan, np.inf]), np.ones(7))
    assert ok.tolist() == [True, True, False, True, False, False, False]


def test_second_pass_predicts_from_the_first_pass_training_crop(face, predictor: Predictor) -> None:
    _, image = face
    gt_box = np.array([[100.0, 90.0, 180.0, 190.0]])
    c1, s1 = boxes_to_crops(gt_box, haar=False)
    first = predictor.predict_crops(image, c1, s1)
    c2, s2 = landmark_crops(first)
    assert plausible(s2, s1).all() and abs(s2[0] - s1[0]) > 0.01  # the refinement path really runs
    c, s, history = refine_crops(predictor, image, c1, s1, recrops=1)
    assert np.array_equal(c, c2) and np.array_equal(s, s2) and np.array_equal(history[0], first)
    second = predictor.predict_crops(image, c2, s2)
    got = predict_faces(predictor, image, boxes=gt_box, passes=2, combine="last")
    assert len(got) == 1 and np.abs(got[0] - second[0]).max() < 1e-6
    mean = predict_faces(predictor, image, boxes=gt_box, passes=2, combine="mean")
    assert np.abs(mean[0] - (first[0] + second[0]) / 2).max() < 1e-6
    one = predict_faces(predictor, image, boxes=gt_box, passes=1)
    assert np.abs(one[0] - first[0]).max() < 1e-6 and np.abs(one[0] - got[0]).max() > 1.0
    third = predictor.predict_crops(image, *landmark_crops(second))
    assert np.abs(predict_faces(predictor, image, boxes=gt_box, passes=3, combine="last")[0] - third[0]).max() < 1e-6
    three = predict_faces(predictor, image, boxes=gt_box, passes=3, combine="mean")[0]
    assert np.abs(three - (first[0] + second[0] + third[0]) / 3).max() < 1e-6
    with pytest.raises(ValueError, match="unknown combine 'median'"):
        predict_faces(predictor, image, boxes=gt_box, combine="median")


def test_detector_path_looks_wide_first_and_the_wide_look_does_not_vote(face, predictor: Predictor) -> None:
    """From Haar's box: pass 1 crops DETECTOR_FIRST_LOOK times wider, pass 2 crops from its landmarks, and the
    result is pass 2 for both combines (3 passes, mean: passes 2 and 3); one pass uses the box's own crop."""
    _, image = face
    c, s = detector_crops(detect(image, "haar"), "haar")
    assert len(c) == 1
    look = predictor.predict_crops(image, c, s * DETECTOR_FIRST_LOOK)
    c2, s2, _ = refine_crops(predictor, image, c, s * DETECTOR_FIRST_LOOK, 1, first=look)
    assert plausible(s2, s * DETECTOR_FIRST_LOOK).all()  # the re-crop is taken, so pass 2 sees a new crop
    second = predictor.predict_crops(image, c2, s2)
    c_last, s_last, voting = refine_detected(predictor, image, c, s, 2)
    assert np.array_equal(c_last, c2) and np.array_equal(s_last, s2) and voting == []  # the wide look never votes
    for combine in COMBINE:
        assert np.abs(np.stack(predict_faces(predictor, image, passes=2, combine=combine)) - second).max() < 1e-6
    third = predictor.predict_crops(image, *landmark_crops(second))
    three = np.stack(predict_faces(predictor, image, passes=3, combine="mean"))
    assert np.abs(three - (second + third) / 2).max() < 1e-6
    one = np.stack(predict_faces(predictor, image, passes=1))
    assert np.abs(one - predictor.predict_crops(image, c, s)).max() < 1e-6
    assert np.abs(one - predictor.predict_crops(image, c, s * DETECTOR_FIRST_LOOK)).max() > 1.0


def test_predict_files_writes_the_refined_faces(face, predictor: Predictor, tmp_path: Path) -> None:
    """predict_files with passes=2: the JSON holds predict_faces' landmarks and the last pass's covariances."""
    import json

    from flare.platform.predict_files import predict_files

    rec, image = face
    box = [100.0, 90.0, 180.0, 190.0]
    assert predict_files(predictor, [Path(rec.image.path)], tmp_path, [box], passes=2, log=lambda s: None) == []
    out = json.loads((tmp_path / f"{Path(rec.image.path).stem}.json").read_text())
    expected = predict_faces(predictor, image, boxes=np.array([box]), passes=2)
    assert np.abs(np.asarray(out["faces"]) - np.stack(expected)).max() < 1e-3
    assert np.asarray(out["covariance"]).shape == (1, 68, 2, 2)


def test_passes_and_detection_paths(face, predictor: Predictor) -> None:
    _, image = face
    with pytest.raises(ValueError, match="passes must be at least 1"):
        face_boxes(predictor, image, passes=0)
    with pytest.raises(ValueError, match="unknown detector 'bogus'"):
        face_boxes(predictor, image, detector="bogus")
    # a blank image: Haar finds nothing, so no face and no prediction
    assert predict_faces(predictor, np.zeros((200, 200, 3), np.uint8), passes=2) == []
    # detection off: the whole image is the first crop, then the re-crop
    whole = face_boxes(predictor, image, detect=False, passes=1)
    h, w = image.shape[:2]
    side = min(w, h)
    assert np.allclose(whole, [[(w - side) / 2, (h - side) / 2, side, side]])
    assert face_boxes(predictor, image, detect=False, passes=2).shape == (1, 4)


def test_cli_refine_and_detector_options(face, tmp_path: Path) -> None:
    """``flare predict --refine`` vs ``--no-refine`` vs neither (on for detected faces, off for ``--box``) on a
    real image with a saved model; an unknown detector is one line, exit 2, before anything runs."""
    import json

    from flare.platform.cli import app

    rec, _ = face
    job = load_job(ROOT / "jobs" / "tiny.yaml", ["data.manifest=/nonexistent/manifest.json"])
    torch.manual_seed(0)
    model = build_model(job, get_layout("300w68"))
    d = tmp_path / "model"
    d.mkdir()
    torch.save(model.state_dict(), d / "state.pt")
    (d / "job.json").write_text(json.dumps({"job": job.model_dump(mode="json"), "layout": "300w68",
                                            "info": {"decoder": "argmax"}}))
    img = Path(rec.image.path)
    runner = CliRunner()
    faces = {}
    runs = {"--refine": ["--box", "100,90,180,190", "--refine"], "--no-refine": ["--box", "100,90,180,190",
            "--no-refine"], "box": ["--box", "100,90,180,190"], "detected": [], "detected1": ["--no-refine"],
            "detected3": ["--passes", "3"]}
    for name, flags in runs.items():
        res = runner.invoke(app, ["predict", str(img), "--model", str(d), "--out", str(tmp_path / name), *flags])
        assert res.exit_code == 0, res.output
        faces[name] = np.asarray(json.loads((tmp_path / name / f"{img.stem}.json").read_text())["faces"])
    loaded = Predictor.from_dir(d, device="cpu")
    image = read_image_bgr(img)
    box = np.array([[100.0, 90.0, 180.0, 190.0]])
    assert np.abs(faces["--refine"] - predict_faces(loaded, image, boxes=box, passes=2)[0]).max() < 1e-3
    assert np.abs(faces["--no-refine"] - predict_faces(loaded, image, boxes=box, passes=1)[0]).max() < 1e-3
    assert np.array_equal(faces["box"], faces["--no-refine"])  # an explicit box stays as given by default
    assert np.abs(faces["detected"] - np.stack(predict_faces(loaded, image, passes=2))).max() < 1e-3
    assert np.abs(faces["detected1"] - np.stack(predict_faces(loaded, image, passes=1))).max() < 1e-3
    assert np.abs(faces["detected"] - faces["detected1"]).max() > 1.0  # detected faces are refined by default
    assert np.abs(faces["detected3"] - np.stack(predict_faces(loaded, image, passes=3))).max() < 1e-3
    res = runner.invoke(app, ["predict", str(img), "--model", str(d), "--out", str(tmp_path / "p0"), "--passes", "0"])
    assert res.exit_code == 2 and "passes must be at least 1, got 0" in res.output and not (tmp_path / "p0").exists()
    res = runner.invoke(app, ["predict", str(img), "--model", str(d), "--out", str(tmp_path / "bad"),
                              "--detector", "bogus"])
    assert res.exit_code == 2 and "unknown detector 'bogus'; known: haar, dlib, dlib_cnn" in res.output
    assert not (tmp_path / "bad").exists()


def test_recrops_use_the_models_crop_prior(face, predictor: Predictor) -> None:
    """A predictor with a crop prior re-crops with it (datasets/crop_prior.py), on every path; without one, the
    extent rule (the tests above)."""
    rec, image = face
    rng = np.random.default_rng(0)
    shapes = rec.landmarks[None] * rng.uniform(0.7, 1.3, (60, 1, 1)) + rng.normal(0, 4.0, (60, 68, 2))
    centers, scales = landmark_crops(shapes)
    with_prior = dataclasses.replace(predictor, crop_prior=fit_crop_prior(shapes, centers, 200 * scales))
    gt_box = np.array([[100.0, 90.0, 180.0, 190.0]])
    c1, s1 = boxes_to_crops(gt_box, haar=False)
    first = with_prior.predict_crops(image, c1, s1)
    c, s, _ = refine_crops(with_prior, image, c1, s1, recrops=1)
    c_prior, s_prior = with_prior.crop_prior.crops(first)
    assert np.array_equal(c, c_prior) and np.array_equal(s, s_prior)
    c_extent, s_extent = landmark_crops(first)
    assert np.abs(c - c_extent).max() + abs(s[0] - s_extent[0]) * 200 > 0.5  # the prior's crop is another crop
    second = with_prior.predict_crops(image, c_prior, s_prior)
    got = predict_faces(with_prior, image, boxes=gt_box, passes=2, combine="last")[0]
    assert np.abs(got - second[0]).max() < 1e-6
    c_det, s_det = detector_crops(detect(image, "haar"), "haar")
    look = with_prior.predict_crops(image, c_det, s_det * DETECTOR_FIRST_LOOK)
    c_last, s_last, _ = refine_detected(with_prior, image, c_det, s_det, 2)
    want_c, want_s = with_prior.crop_prior.crops(look)
    assert np.array_equal(c_last, want_c) and np.array_equal(s_last, want_s)


def test_the_refined_path_is_public_api() -> None:
    import flare

    assert flare.predict_faces is predict_faces and "predict_faces" in flare.__all__


def test_a_model_without_a_prior_gets_its_training_splits(predictor: Predictor, small_300w: Path) -> None:
    """``fit_missing_prior``: a model saved without a prior takes the train split's; one with a prior keeps it."""
    bare = dataclasses.replace(predictor, crop_prior=None)
    assert fit_missing_prior(bare, None) == "the landmark-extent rule" and bare.crop_prior is None
    assert fit_missing_prior(bare, small_300w / "manifest.json").startswith("a crop prior fitted on")
    fitted = bare.crop_prior
    assert fitted is not None and fitted.faces == load_manifest(small_300w).count("train")
    assert fit_missing_prior(bare, small_300w / "manifest.json") == "the model's crop prior"
    assert bare.crop_prior is fitted
