"""Per-landmark uncertainty (losses/uncertainty.py): STAR's covariance (Eq. 1, 3-4) recovered from synthetic
anisotropic Gaussian maps, the RwSA softmax(F/epsilon) path on signed scores, the heatmap -> crop -> original
mapping against an independent point-cloud covariance, the confidence, the ellipse drawing and `flare predict`
end to end on a real 300W image."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flare.datasets.augment import crop_matrix
from flare.losses.uncertainty import covariance_to_original, distribution_for, heatmap_uncertainty
from flare.models.decode import apply_affine, grid_index_to_label, label_to_crop, soft_argmax
from flare.models.layouts import get_layout
from flare.platform.builders import build_model
from flare.platform.config import load_job
from flare.platform.plots import draw_ellipses
from flare.platform.predict_files import predict_files
from flare.platform.predictor import Predictor, crop_batch, face_crops

ROOT = Path(__file__).resolve().parents[1]


def rotated(s1: float, s2: float, degrees: float) -> np.ndarray:
    """R diag(s1², s2²) Rᵀ."""
    t = np.radians(degrees)
    r = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return r @ np.diag([s1 * s1, s2 * s2]) @ r.T


def gaussian(mean: tuple[float, float], cov: np.ndarray, h: int = 64, w: int = 64) -> np.ndarray:
    """exp(-dᵀΣ⁻¹d/2) sampled at the cell centres (x = column j, y = row i), peak 1."""
    jj, ii = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    d = np.stack((jj - mean[0], ii - mean[1]), axis=-1)
    return np.exp(-0.5 * np.einsum("...i,ij,...j->...", d, np.linalg.inv(cov), d))


def star_expected(cov: np.ndarray) -> np.ndarray:
    """Σ_ub of a Gaussian density (Eq. 4): Σ/(1 − ΣP²) with ΣP² = 1/(4π sqrt(det Σ)) in closed form."""
    return cov / (1.0 - 1.0 / (4.0 * np.pi * np.sqrt(np.linalg.det(cov))))


def weighted_cov(points: np.ndarray, p: np.ndarray) -> np.ndarray:
    """STAR's unbiased weighted covariance (method.md 4.3, its epsilons included) of points (K, 2), weights p (K,)."""
    p = p / p.sum()
    d = points - p @ points
    v1 = p.sum() + 1e-5
    return (p[:, None] * d).T @ d / (v1 - (np.sum(p * p) + 1e-5) / v1)


CASES = [((30.3, 25.7), (2.5, 1.2, 30.0), 64, 64), ((20.0, 40.5), (1.0, 3.0, -55.0), 64, 64),
         ((11.2, 30.0), (1.8, 1.1, 75.0), 48, 64)]


@pytest.mark.parametrize(("mean", "shape", "h", "w"), CASES)
def test_recovers_rotated_anisotropic_covariance(mean, shape, h: int, w: int) -> None:
    cov = rotated(*shape)
    maps = torch.from_numpy(np.stack([gaussian(mean, cov, h, w), 37.0 * gaussian(mean, cov, h, w)]))[:, None]
    u = heatmap_uncertainty(maps, "normalised")
    assert u.mean.shape == (2, 1, 2) and u.cov.shape == (2, 1, 2, 2) and u.confidence.shape == (2, 1)
    np.testing.assert_allclose(u.mean.numpy()[:, 0], [mean, mean], atol=1e-6)
    expected = star_expected(cov)
    np.testing.assert_allclose(u.cov.numpy()[:, 0], [expected, expected], rtol=1e-4)
    # the rotation survives: the major eigenvector is at the generating angle
    _, vec = np.linalg.eigh(u.cov.numpy()[0, 0])
    major = vec[:, 1] if shape[0] > shape[1] else vec[:, 0]
    assert abs(major @ [np.cos(np.radians(shape[2])), np.sin(np.radians(shape[2]))]) > 1 - 1e-6


def test_rwsa_softmax_of_signed_scores() -> None:
    """Scores F = ε·log G + c (signed, shifted) are G under softmax(F/ε): the covariance of G comes back; the sum
    normalisation on the same scores gives something else (it is not a distribution of signed scores)."""
    cov, eps = rotated(2.2, 1.4, 20.0), 0.25
    g = gaussian((33.0, 28.0), cov)
    scores = eps * np.log(g) - 2.0 + 0.05 * g  # mostly negative, a bump of +0.05 at the peak
    g_tilted = np.exp(np.log(g) + 0.05 * g / eps)  # what softmax(F/ε) is proportional to
    jj, ii = np.meshgrid(np.arange(64.0), np.arange(64.0))
    pts = np.stack((jj.ravel(), ii.ravel()), axis=1)
    u = heatmap_uncertainty(torch.from_numpy(scores)[None, None], "softmax", epsilon=eps)
    np.testing.assert_allclose(u.cov.numpy()[0, 0], weighted_cov(pts, g_tilted.ravel()), rtol=1e-6)
    plain = heatmap_uncertainty(torch.from_numpy(np.log(g) * eps)[None, None], "softmax", epsilon=eps)
    np.testing.assert_allclose(plain.cov.numpy()[0, 0], star_expected(cov), rtol=1e-4)
    wrong = heatmap_uncertainty(torch.from_numpy(scores)[None, None], "normalised").cov.numpy()[0, 0]
    assert not np.allclose(wrong, u.cov.numpy()[0, 0], rtol=0.1)
    assert distribution_for("rwsa", "argmax_refine") == "softmax"
    assert distribution_for("star", "softargmax") == distribution_for("l2", "argmax") == "normalised"
    assert distribution_for(None, "argmax") == "softmax" and distribution_for(None, "softargmax") == "normalised"


def test_image_covariance_through_scaled_rotated_crops() -> None:
    """Heatmap cells mapped one by one to original px with the decoders' own functions (grid -> label -> crop px,
    then M⁻¹): their weighted covariance equals the one mapped by A Σ Aᵀ, and the mean maps like a landmark."""
    size, h, w = 256, 64, 64
    maps = np.stack([gaussian((30.3, 25.7), rotated(2.5, 1.2, 30.0)), gaussian((40.0, 20.0), rotated(1.5, 3.0, -40.0))])
    rot = np.eye(3)
    rot[:2, :2] = [[np.cos(0.6), -np.sin(0.6)], [np.sin(0.6), np.cos(0.6)]]
    mats = np.stack([np.linalg.inv(rot @ crop_matrix(np.array([210.0, 160.0]), 1.7, size)),
                     np.linalg.inv(crop_matrix(np.array([90.0, 300.0]), 0.6, size))])
    u = heatmap_uncertainty(torch.from_numpy(maps)[:, None], "normalised")
    got = covariance_to_original(u.cov.numpy(), h, w, size, mats)
    jj, ii = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    crop_px = np.stack((label_to_crop(grid_index_to_label(jj, w, "corners"), size),
                        label_to_crop(grid_index_to_label(ii, h, "corners"), size)), axis=-1).reshape(-1, 2)
    for b in range(2):
        pts = apply_affine(crop_px, mats[b])
        np.testing.assert_allclose(got[b, 0], weighted_cov(pts, maps[b].ravel()), rtol=1e-9)
        a = mats[b][:2, :2] * (size / (w - 1))  # the composed linear map, built independently
        np.testing.assert_allclose(got[b, 0], a @ u.cov.numpy()[b, 0] @ a.T, rtol=1e-9)
    # the heatmap -> crop scale is the decoders': the soft-argmax landmark is the mean mapped by it
    decoded = label_to_crop(soft_argmax(torch.from_numpy(maps)[:, None]).numpy(), size)
    np.testing.assert_allclose(decoded, u.mean.numpy() * size / (w - 1) - 0.5, atol=1e-6)


def test_confidence_orders_sharp_above_broad() -> None:
    radius = 3.0
    sharp, broad = gaussian((31.0, 31.0), rotated(1.0, 1.0, 0)), gaussian((31.0, 31.0), rotated(4.0, 4.0, 0))
    maps = torch.from_numpy(np.stack([sharp, broad, np.ones((64, 64))]))[:, None]
    conf = heatmap_uncertainty(maps, "normalised", radius=radius).confidence.numpy()[:, 0]
    for c, sigma in zip(conf[:2], (1.0, 4.0)):  # continuous Gaussian mass within r, up to the disc's cells
        assert abs(c - (1 - np.exp(-radius**2 / (2 * sigma**2)))) < 0.03, (c, sigma)
    assert conf[0] > 0.98 and 0.3 > conf[1] > conf[2]
    jj, ii = np.meshgrid(np.arange(64.0), np.arange(64.0))  # uniform: cells in the disc / all cells
    assert conf[2] == pytest.approx(np.sum((jj - 31.5) ** 2 + (ii - 31.5) ** 2 <= radius**2) / 64**2, rel=1e-9)


def test_ellipse_axes_and_orientation() -> None:
    cov, centre = rotated(9.0, 4.0, 35.0), np.array([64.3, 60.7])
    img = draw_ellipses(np.zeros((128, 128, 3), np.uint8), centre[None], cov[None], (255, 255, 255), sigmas=2.0)
    ys, xs = np.nonzero(img[..., 0] > 127)
    d = np.stack((xs, ys), axis=1) - centre
    r = np.linalg.norm(d, axis=1)
    assert abs(r.max() - 18.0) < 1.0 and abs(r.min() - 8.0) < 1.0  # 2·9 and 2·4 px
    far = d[np.argmax(r)] / r.max()
    assert abs(far @ [np.cos(np.radians(35.0)), np.sin(np.radians(35.0))]) > 0.99


def save_tiny(d: Path, overrides: list[str], decoder: str) -> Path:
    """A seeded, untrained tiny model saved as flare saves a pulled model (state.pt + job.json)."""
    job = load_job(ROOT / "jobs" / "tiny.yaml", ["data.manifest=/nonexistent/manifest.json", *overrides])
    torch.manual_seed(0)
    model = build_model(job, get_layout("300w68"))
    torch.save(model.state_dict(), d / "state.pt")
    (d / "job.json").write_text(json.dumps({"job": job.model_dump(mode="json"), "layout": "300w68",
                                            "info": {"decoder": decoder}}))
    return d


def face_image(test_data: Path) -> tuple[Path, list[float]]:
    """A 300W test image and its landmarks' bounding box x, y, w, h."""
    img = test_data / "300W" / "lfpw" / "testset" / "image_0001.jpg"
    lines = img.with_suffix(".pts").read_text().split("{")[1].split("}")[0].split()
    pts = np.asarray(lines, np.float64).reshape(-1, 2) - 1.0
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    return img, [*lo, *(hi - lo)]


def test_rwsa_predictor_uses_softmax_with_its_epsilon(tmp_path: Path, test_data: Path) -> None:
    """A random-weight RwSA model (ε = 0.25): covariances from the Predictor equal a numpy softmax(F/ε) moment
    computation on its own maps; the landmarks are exactly those of predict(), also in predict_files' JSON."""
    (tmp_path / "model").mkdir()
    model = save_tiny(tmp_path / "model", ["objective.name=rwsa", "objective.rwsa.epsilon=0.25"], "argmax_refine")
    predictor = Predictor.from_dir(model, device="cpu")
    assert predictor.distribution == "softmax" and predictor.temperature == 0.25
    img, box = face_image(test_data)
    image = cv2.imread(str(img))
    faces = predictor.predict_with_uncertainty(image, boxes=np.array([box]))
    np.testing.assert_array_equal(faces[0].landmarks, predictor.predict(image, boxes=np.array([box]))[0])
    crops, mats = crop_batch(*face_crops(image, np.array([box]), True), predictor.input_size)
    f = predictor.heatmaps(crops).double().numpy()[0]  # (N, h, w)
    n, h, w = f.shape
    z = np.exp(f.reshape(n, -1) / 0.25 - (f.reshape(n, -1) / 0.25).max(axis=1, keepdims=True))
    jj, ii = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    crop_px = np.stack((jj * predictor.input_size / (w - 1) - 0.5, ii * predictor.input_size / (h - 1) - 0.5),
                       axis=-1).reshape(-1, 2)
    pts = apply_affine(crop_px, mats[0])
    expected = np.stack([weighted_cov(pts, z[k]) for k in range(n)])
    np.testing.assert_allclose(faces[0].covariance, expected, rtol=1e-6)
    rec = tmp_path / "out"
    assert predict_files(predictor, [img], rec, [box], log=lambda s: None) == []
    record = json.loads((rec / "image_0001.json").read_text())
    assert record["uncertainty"]["distribution"] == "softmax" and "epsilon = 0.25" in record["uncertainty"]["formula"]
    np.testing.assert_array_equal(record["faces"][0], faces[0].landmarks.round(4))  # the one-pass file output
    np.testing.assert_array_equal(record["covariance"][0], faces[0].covariance.round(6))


def test_flare_predict_ellipses_end_to_end(tmp_path: Path, test_data: Path) -> None:
    from flare.platform.cli import app

    (tmp_path / "model").mkdir()
    model = save_tiny(tmp_path / "model", [], "softargmax")
    img, box = face_image(test_data)
    args = ["predict", str(img), "--model", str(model), "--box", ",".join(f"{v:.3f}" for v in box)]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "plain")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "ell"), "--ellipses"])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "ell" / "image_0001.json").read_text())
    cov, conf = np.asarray(rec["covariance"]), np.asarray(rec["confidence"])
    assert np.asarray(rec["faces"]).shape == (1, 68, 2) and cov.shape == (1, 68, 2, 2) and conf.shape == (1, 68)
    np.testing.assert_array_equal(cov, np.swapaxes(cov, -1, -2))
    assert np.linalg.eigvalsh(cov).min() > 0 and ((conf >= 0) & (conf <= 1)).all()
    assert rec["uncertainty"]["distribution"] == "normalised"
    assert rec == json.loads((tmp_path / "plain" / "image_0001.json").read_text())  # --ellipses: drawing only
    plain = cv2.imread(str(tmp_path / "plain" / "image_0001_overlay.png"))
    drawn = cv2.imread(str(tmp_path / "ell" / "image_0001_overlay.png"))
    assert (np.abs(drawn.astype(int) - plain).sum(axis=2) > 0).sum() > 500  # ellipse pixels were drawn
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "onnx"), "--ellipses", "--backend", "onnx"])
    assert res.exit_code == 2 and res.output.strip() == ("error: --ellipses: the onnx backend outputs landmarks "
                                                         "only (no heatmaps); use --backend torch"), res.output
    assert not (tmp_path / "onnx").exists()
