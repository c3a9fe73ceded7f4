"""Synthetic faces: determinism, layouts, labels on the drawn structure, 300W round trip."""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest

from flare.datasets.readers import read_300w
from flare.datasets.synthetic import canonical_landmarks, generate_synthetic, write_synthetic_folder
from flare.models.layouts import W300_68, WFLW98

SIZE = 256


@pytest.fixture(scope="module", params=[68, 98])
def faces(request):
    recs = generate_synthetic(8, layout_points=request.param, size=SIZE, seed=3)
    return request.param, recs, [r.load_image() for r in recs]


def test_deterministic_and_seed_dependent():
    a = generate_synthetic(3, 68, SIZE, seed=11)
    b = generate_synthetic(3, 68, SIZE, seed=11)
    c = generate_synthetic(3, 68, SIZE, seed=12)
    for ra, rb, rc in zip(a, b, c):
        assert np.array_equal(ra.landmarks, rb.landmarks) and ra.sample_id == rb.sample_id
        assert ra.load_image().tobytes() == rb.load_image().tobytes() == ra.load_image().tobytes()
        assert not np.allclose(ra.landmarks, rc.landmarks)
    moved = pickle.loads(pickle.dumps(a[1]))
    assert moved.load_image().tobytes() == a[1].load_image().tobytes()
    assert len({r.sample_id for r in a + c}) == 6


def test_point_counts_and_inside_image(faces):
    n, recs, images = faces
    for rec, img in zip(recs, images):
        assert rec.landmarks.shape == (n, 2) and rec.dataset == "synthetic" and "synthetic" in rec.subsets
        assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
        assert rec.landmarks.min() >= 0 and rec.landmarks.max() <= SIZE - 1
        assert rec.occlusion.shape == (n,)
        assert ("occlusion" in rec.subsets) == bool(rec.occlusion.any())
    with pytest.raises(ValueError, match="68 or 98"):
        generate_synthetic(1, layout_points=29)


def test_template_is_mirror_consistent_with_the_layouts():
    """Mirroring the neutral template and permuting by the layout's flip pairs gives it back, so
    every point carries the semantics (left/right, order) of method.md 2.1/2.2."""
    for layout in (W300_68, WFLW98):
        pts = canonical_landmarks(layout.num_points)[:, :2]
        mirrored = pts * np.array([-1.0, 1.0])
        np.testing.assert_allclose(mirrored[layout.flip_permutation()], pts, atol=1e-12)
        # image-left eye corner is the subject's right eye: outer corner left of inner corner
        a, b = layout.normaliser_indices("inter_ocular")
        assert pts[a[0], 0] < pts[b[0], 0]


def _local_std(img: np.ndarray, k: int = 5) -> np.ndarray:
    """Contrast of the k×k neighbourhood of each pixel (high on edges and on thin lines alike)."""
    g = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(np.float64)
    mean, mean_sq = cv2.blur(g, (k, k)), cv2.blur(g * g, (k, k))
    return np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))


def test_landmarks_sit_on_drawn_structure(faces):
    """Local contrast at the visible landmark pixels vs random pixels of the face box, and vs the
    same landmarks displaced by N(0, 4²) px: drawn structure is at the labels, not near them."""
    _, recs, images = faces
    rng = np.random.default_rng(0)
    vs_random, vs_shifted = [], []
    for rec, img in zip(recs, images):
        contrast = _local_std(img)
        vis = rec.landmarks[rec.occlusion == 0]
        ij = np.round(vis).astype(int)
        at = contrast[ij[:, 1], ij[:, 0]].mean()
        x0, y0, x1, y1 = rec.box
        rnd = np.stack([rng.uniform(x0, x1, 400), rng.uniform(y0, y1, 400)], 1).round().astype(int)
        vs_random.append(at / contrast[rnd[:, 1], rnd[:, 0]].mean())
        sh = np.clip(np.round(vis + rng.normal(0, 4, vis.shape)), 0, SIZE - 1).astype(int)
        vs_shifted.append(at / contrast[sh[:, 1], sh[:, 0]].mean())
    assert np.mean(vs_random) > 2.0 and min(vs_random) > 1.4, vs_random
    assert np.mean(vs_shifted) > 1.25 and min(vs_shifted) > 0.95, vs_shifted


def test_pupils_are_dark():
    """WFLW points 96/97 are pupil centres: darker than the median of the face box."""
    recs = [r for r in generate_synthetic(10, 98, 256, seed=5) if not r.occlusion[96:].any()]
    assert len(recs) >= 5
    for rec in recs:
        grey = cv2.cvtColor(rec.load_image(), cv2.COLOR_BGR2GRAY).astype(float)
        x0, y0, x1, y1 = np.round(rec.box).astype(int)
        median = np.median(grey[y0 : y1 + 1, x0 : x1 + 1])
        for x, y in np.round(rec.landmarks[96:]).astype(int):
            assert grey[y, x] < median


def test_write_folder_round_trip(tmp_path):
    written = write_synthetic_folder(tmp_path, 5, size=96, seed=2, test_fraction=0.4)
    assert len(written) == 5 and all(p.is_file() and p.with_suffix(".png").is_file() for p in written)
    records, skipped = read_300w(tmp_path)
    assert skipped == [] and len(records) == 5
    assert [r.split for r in records].count("test") == 2
    assert all("synthetic" in r.subsets for r in records)
    truth = {r.source: r for r in generate_synthetic(5, 68, 96, seed=2)}
    for k, rec in enumerate(sorted(records, key=lambda r: r.source.rsplit("_", 1)[1])):
        ref = truth[f"seed2#{k}"]
        np.testing.assert_allclose(rec.landmarks, ref.landmarks, atol=6e-4)  # 3 decimals in .pts
        assert np.array_equal(rec.load_image(), ref.load_image())  # PNG is lossless
