"""The crop prior (datasets/crop_prior.py): the training crop estimated from the whole shape, fitted on real 300W
training shapes, similarity-invariant, robust to noisy points, fitted in the prepared loose-crop frame, carried in
job.json and read back in one-line errors when malformed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flare.datasets.crop_prior import CropPrior, fit_crop_prior, manifest_crop_prior
from flare.datasets.ingest import load_manifest
from flare.datasets.read_300w import read_300w
from flare.datasets.records import crop_center_scale
from flare.platform.refine import landmark_crops


def _shapes_and_crops(records: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Landmarks (F, 68, 2), training crop centres (F, 2) and scales (F,) of 300W records (method.md 8.1)."""
    crops = [crop_center_scale(r) for r in records]
    return np.stack([r.landmarks for r in records]), np.stack([c for c, _ in crops]), np.array([s for _, s in crops])


@pytest.fixture(scope="module")
def fitted(test_data: Path) -> tuple[CropPrior, tuple]:
    """A prior fitted on the real 300W training shapes; the 554 test faces' shapes and training crops."""
    pts, centers, scales = _shapes_and_crops(read_300w(test_data / "300W", "train").records)
    return fit_crop_prior(pts, centers, 200 * scales), _shapes_and_crops(read_300w(test_data / "300W", "test").records)


def _crop_errors(got: tuple[np.ndarray, np.ndarray], centers: np.ndarray, scales: np.ndarray) -> tuple[float, float]:
    """RMS centre error in crop sides and RMS log-scale error of crops ``got`` against the training crops."""
    c, s = got
    centre = np.sqrt((((c - centers) / (200 * scales)[:, None]) ** 2).sum(axis=1).mean())
    return float(centre), float(np.sqrt((np.log(s / scales) ** 2).mean()))


def test_prior_gives_the_training_crop_and_noisy_points_barely_move_it(fitted) -> None:
    """On held-out annotated shapes the prior's crop is within a few % of the training crop; noise on the points
    (everywhere, or on the jaw contour as in predicted shapes) moves it far less than the extent rule's crop."""
    prior, (pts, centers, scales) = fitted
    assert prior.faces == 2012 and prior.components.shape == (4, 136)
    exact = _crop_errors(prior.crops(pts), centers, scales)
    assert exact[0] < 0.04 and exact[1] < 0.05
    rng = np.random.default_rng(0)
    for contour, inner in ((0.03, 0.03), (0.05, 0.01)):  # noise s.d. in crop sides
        sigma = np.full(68, inner)
        sigma[:17] = contour
        noisy = pts + rng.normal(size=pts.shape) * sigma[None, :, None] * 200 * scales[:, None, None]
        moved = np.subtract(_crop_errors(prior.crops(noisy), centers, scales), exact)
        extent = _crop_errors(landmark_crops(noisy), centers, scales)  # the extent rule is exact without noise
        assert np.all(moved < 0.25 * np.array(extent)), (contour, moved, extent)


def test_prior_is_similarity_invariant(fitted) -> None:
    prior, (pts, _, _) = fitted
    c, s = prior.crops(pts[:20])
    c2, s2 = prior.crops(pts[:20] * 2.5 + np.array([-40.0, 300.0]))
    assert np.abs(c2 - (c * 2.5 + np.array([-40.0, 300.0]))).max() < 1e-9
    assert np.abs(s2 / s - 2.5).max() < 1e-12


def test_prior_round_trips_through_json_and_refuses_malformed(fitted) -> None:
    prior, (pts, _, _) = fitted
    back = CropPrior.from_json(json.loads(json.dumps(prior.to_json())), 68, "job.json")
    assert back.faces == prior.faces
    assert all(np.array_equal(a, b) for a, b in zip(back.crops(pts[:5]), prior.crops(pts[:5]), strict=True))
    data = prior.to_json()
    with pytest.raises(ValueError, match=r"^m/job\.json: crop_prior is malformed \(KeyError: 'weights'\)$"):
        CropPrior.from_json({k: v for k, v in data.items() if k != "weights"}, 68, "m/job.json")
    with pytest.raises(ValueError, match=r"^m/job\.json: crop_prior does not fit 98 finite points$"):
        CropPrior.from_json(data, 98, "m/job.json")
    with pytest.raises(ValueError, match="does not fit 68 finite points"):
        CropPrior.from_json({**data, "offset": [0.0, float("nan"), 1.0]}, 68, "m/job.json")
    with pytest.raises(ValueError, match="at least 6 shapes, got 5"):
        fit_crop_prior(pts[:5], pts[:5, 0], np.ones(5))


def test_manifest_prior_is_fitted_in_the_loose_crop_frame(small_300w: Path, test_data: Path, fitted) -> None:
    """Fitted from the prepared shards (loose-crop px, every training crop the central size/2 px), the prior is
    the one fitted on the same faces in original px: same crops on the test shapes."""
    manifest = load_manifest(small_300w)
    from_shards = manifest_crop_prior(manifest, "train")
    assert from_shards is not None and from_shards.faces == manifest.count("train")
    import pyarrow.parquet as pq

    ids = set(pq.read_table(manifest.shard_paths("train"), columns=["sample_id"])["sample_id"].to_pylist())
    records = [r for r in read_300w(test_data / "300W", "train").records if r.sample_id in ids]
    assert len(records) == from_shards.faces
    pts, centers, scales = _shapes_and_crops(records)
    original = fit_crop_prior(pts, centers, 200 * scales)
    test_pts = fitted[1][0]
    (c1, s1), (c2, s2) = from_shards.crops(test_pts), original.crops(test_pts)
    assert np.abs(c1 - c2).max() < 1e-3 * (200 * s2).min() and np.abs(s1 / s2 - 1).max() < 1e-4
    assert manifest_crop_prior(manifest, "train", components=manifest.count("train")) is None  # too few faces
