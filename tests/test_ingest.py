"""Ingest of prepared shards: ``BatchBuilder`` tensors, the crop geometry they carry,
seeded augmentation, the rank split of ``iter_local_rows`` and the Ray Dataset over a split.

A 40-face synthetic dataset is prepared once (engine "local"); its exact labels come from the
generator, independently of the shards.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from flare.datasets.ingest import (
    BatchBuilder,
    Manifest,
    ManifestError,
    expand_batch,
    iter_local_rows,
    load_manifest,
    ray_dataset,
)
from flare.datasets.prepare import PrepareOptions, prepare
from flare.datasets.synthetic import generate_synthetic
from flare.datasets.targets import edge_heatmaps

N_FACES = 40
SEED = 5


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    out = tmp_path_factory.mktemp("ingest") / "synthetic"
    prepare("synthetic", Path("."), out, PrepareOptions(seed=SEED), engine="local", synthetic_count=N_FACES)
    return load_manifest(out)


@pytest.fixture(scope="module")
def truth() -> dict[str, np.ndarray]:
    """Generator labels (0-based source px) by sample id: train faces 0..39, test faces 40..47."""
    recs = generate_synthetic(N_FACES, 68, seed=SEED) + generate_synthetic(
        N_FACES // 5, 68, seed=SEED, split="test", start=N_FACES
    )
    return {r.sample_id: r.landmarks for r in recs}


@pytest.fixture(scope="module")
def train_rows(synth: Manifest) -> list[dict]:
    return [row for batch in iter_local_rows(synth, "train", 64) for row in batch]


def _map(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Plain reference: (..., 3, 3) affine applied to (..., N, 2) points."""
    return np.einsum("...ij,...nj->...ni", m[..., :2, :2], pts) + m[..., None, :2, 2]


@pytest.mark.parametrize("size", [128, 256])
def test_batch_shapes_dtypes_and_ranges(synth: Manifest, train_rows: list[dict], size: int) -> None:
    rows = train_rows[:6]
    b, n, e, h = len(rows), 68, synth.layout.num_edges, size // 4
    out = BatchBuilder(synth.layout, size, augment=True, seed=1)(rows, epoch=0)
    shapes = {
        "image": (b, 3, size, size), "landmarks": (b, n, 2), "landmarks_crop": (b, n, 2),
        "point_targets": (b, n, h, h), "edge_targets": (b, e, h, h), "cov": (b, n, 2, 2),
        "to_original": (b, 3, 3), "landmarks_original": (b, n, 2),
    }
    for key, shape in shapes.items():
        assert tuple(out[key].shape) == shape, key
        assert out[key].dtype == (torch.float64 if key == "to_original" else torch.float32), key
    img = out["image"]
    assert img.min() >= -1.0 and img.max() <= 1.0 and img.std() > 0.05
    # labels: u = (2p + 1)/S - 1 clamped to [-1, 1] (method.md 1.3)
    p = out["landmarks_crop"].double()
    u = ((2 * p + 1) / size - 1).clamp(-1, 1)
    assert torch.allclose(out["landmarks"].double(), u, atol=1e-6)
    assert out["landmarks"].abs().max() <= 1.0
    for key in ("point_targets", "edge_targets"):
        assert out[key].min() >= 0.0 and out[key].max() <= 1.0 + 1e-6, key
    assert out["edge_targets"].amax(dim=(2, 3)).mean() > 0.3  # curves are drawn in most channels
    cov = out["cov"].double()
    assert torch.allclose(cov, cov.transpose(-1, -2), atol=1e-6)
    eig = torch.linalg.eigvalsh(cov)
    assert eig.min() >= -1e-6 and (eig.sum(-1) > 0).all()
    assert torch.equal(out["to_original"][:, 2], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand(b, 3))


def test_point_target_peaks_sit_under_the_landmarks(synth: Manifest, train_rows: list[dict]) -> None:
    size = 256
    out = BatchBuilder(synth.layout, size, augment=False)(train_rows[:4])
    p = out["landmarks_crop"].numpy().reshape(-1, 2)
    maps = out["point_targets"].numpy().reshape(len(p), 64, 64)
    inside = np.all((p > 8) & (p < size - 8), axis=1)
    assert inside.sum() > 100
    flat = maps[inside].reshape(int(inside.sum()), -1).argmax(axis=1)
    peak = np.stack([flat % 64, flat // 64], axis=1)  # (x, y) cells
    expected = (p[inside] + 0.5) * 64 / size - 0.5  # pixel-centre map to 64 cells
    assert np.abs(peak - expected).max() <= 1.0


def test_plain_crop_maps_back_to_the_generator_labels(
    synth: Manifest, train_rows: list[dict], truth: dict[str, np.ndarray]
) -> None:
    out = BatchBuilder(synth.layout, 256, augment=False)(train_rows)
    back = _map(out["to_original"].numpy(), out["landmarks_crop"].double().numpy())
    exact = np.stack([truth[r["sample_id"]] for r in train_rows])
    assert np.abs(back - exact).max() < 1e-3
    assert np.abs(out["landmarks_original"].double().numpy() - exact).max() < 1e-3


def test_plain_edge_targets_equal_a_direct_render(synth: Manifest, train_rows: list[dict]) -> None:
    """The 128^2 edge maps of the 512 px loose crop, warped to the 256 px crop, equal the maps
    rendered directly at 256 -> 64 from the crop landmarks (up to the uint8 storage step)."""
    out = BatchBuilder(synth.layout, 256, augment=False)(train_rows)
    checked = 0
    for pts, edges in zip(out["landmarks_crop"].double().numpy(), out["edge_targets"].numpy()):
        if pts.min() < 0.5 or pts.max() > 254.5:  # a direct render clamps points to the crop
            continue
        direct = edge_heatmaps(pts, synth.layout, size=256, out=64)
        assert np.abs(direct - edges).max() <= 0.5 / 255 + 1e-5
        checked += 1
    assert checked >= 10


def test_augmented_geometry_and_covariance_follow_one_matrix(synth: Manifest, train_rows: list[dict]) -> None:
    """T = crop(plain) -> crop(augmented) from the returned matrices; landmarks move by T and the
    covariances become A Sigma A^T (method.md 6.4), both permuted by the flip pairs when flipped."""
    rows = train_rows[:12]
    plain = BatchBuilder(synth.layout, 256, augment=False)(rows)
    aug = BatchBuilder(synth.layout, 256, augment=True, seed=3)(rows, epoch=4)
    flip = synth.layout.flip_permutation()
    flips = 0
    for i in range(len(rows)):
        t = np.linalg.inv(aug["to_original"][i].numpy()) @ plain["to_original"][i].numpy()
        a = t[:2, :2]
        perm = flip if np.linalg.det(a) < 0 else np.arange(68)
        flips += int(np.linalg.det(a) < 0)
        p_plain = plain["landmarks_crop"][i].double().numpy()[perm]
        assert np.abs(_map(t, p_plain) - aug["landmarks_crop"][i].double().numpy()).max() < 1e-3
        c_plain = plain["cov"][i].double().numpy()[perm]
        expected = a @ c_plain @ a.T
        assert np.allclose(aug["cov"][i].double().numpy(), expected, rtol=1e-4, atol=1e-6)
    assert 0 < flips < len(rows)  # both branches were exercised


def test_augmentation_is_keyed_on_seed_epoch_and_sample(synth: Manifest, train_rows: list[dict]) -> None:
    rows = train_rows[:5]
    first = BatchBuilder(synth.layout, 128, augment=True, seed=11)(rows, epoch=2)
    again = BatchBuilder(synth.layout, 128, augment=True, seed=11)(rows, epoch=2)
    for key in first:
        assert torch.equal(first[key], again[key]), key
    reordered = BatchBuilder(synth.layout, 128, augment=True, seed=11)(rows[::-1], epoch=2)
    for key in first:
        assert torch.equal(first[key], reordered[key].flip(0)), key
    other = BatchBuilder(synth.layout, 128, augment=True, seed=11)(rows, epoch=3)
    for i in range(len(rows)):
        assert not torch.equal(first["image"][i], other["image"][i])
        assert not torch.equal(first["to_original"][i], other["to_original"][i])
    reseeded = BatchBuilder(synth.layout, 128, augment=True, seed=12)(rows, epoch=2)
    assert not torch.equal(first["to_original"], reseeded["to_original"])


def test_flip_happens_in_about_half_of_the_draws(synth: Manifest, train_rows: list[dict]) -> None:
    rows = train_rows[:4]
    builder = BatchBuilder(synth.layout, 64, augment=True, seed=0)
    dets = torch.cat([torch.linalg.det(builder(rows, epoch=k)["to_original"][:, :2, :2]) for k in range(25)])
    rate = float((dets < 0).double().mean())
    assert len(dets) == 100
    assert 0.3 <= rate <= 0.7


def test_iter_local_rows_partitions_ranks_disjointly(synth: Manifest) -> None:
    table = pq.read_table([synth.root / s["path"] for s in synth.data["shards"] if s["split"] == "train"])
    all_ids = table.column("sample_id").to_pylist()
    world = 3
    for shuffle in (None, 7):
        per_rank = [
            [r["sample_id"] for batch in iter_local_rows(synth, "train", 5, shuffle_seed=shuffle, rank=k,
                                                          world_size=world) for r in batch]
            for k in range(world)
        ]
        sets = [set(ids) for ids in per_rank]
        assert sum(len(s) for s in sets) == len(all_ids) == len(set().union(*sets))
        assert set().union(*sets) == set(all_ids)
        assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1
        if shuffle is None:
            assert per_rank[1] == all_ids[1::world]
    limited = [r["sample_id"] for b in iter_local_rows(synth, "train", 4, limit=10) for r in b]
    assert limited == all_ids[:10]


def test_manifest_errors_name_the_file(synth: Manifest, tmp_path: Path) -> None:
    shutil.copy(synth.path, tmp_path / "manifest.json")
    with pytest.raises(ManifestError, match="train-00000.parquet"):
        load_manifest(tmp_path)
    with pytest.raises(ManifestError, match="no such manifest"):
        load_manifest(tmp_path / "missing")
    with pytest.raises(ManifestError, match="no shards for split 'nope'"):
        synth.shard_paths("nope")


def test_ray_dataset_counts_match_the_manifest(ray_cluster, synth: Manifest) -> None:
    """A real local Ray (conftest's session fixture ``ray_cluster``)."""
    for split in ("train", "val", "test"):
        expected = pq.read_table(synth.shard_paths(split)).num_rows
        assert ray_dataset(synth, split).count() == synth.count(split) == expected
    assert ray_dataset(synth, "train", limit=3).count() == 3
    ids = {r["sample_id"] for r in ray_dataset(synth, "val").take_all()}
    assert ids == set(pq.read_table(synth.shard_paths("val")).column("sample_id").to_pylist())


def test_compact_batch_expands_to_the_full_batch(synth: Manifest, train_rows: list[dict]) -> None:
    """What loader processes hand over (uint8 image and edges, no point maps) is ~10x smaller, and
    :func:`expand_batch` on the device gives the full batch back: the image exactly, the point maps to
    float rounding, the edges to their uint8 step."""
    rows = train_rows[:6]
    full = BatchBuilder(synth.layout, 256, augment=True, seed=3)(rows, epoch=2)
    small = BatchBuilder(synth.layout, 256, augment=True, seed=3, compact=True)(rows, epoch=2)
    assert small["image"].dtype == torch.uint8 and small["edge_targets"].dtype == torch.uint8
    assert "point_targets" not in small
    size = lambda b: sum(v.numel() * v.element_size() for v in b.values())
    assert size(full) > 8 * size(small)
    out = expand_batch(small, 256)
    assert set(out) == set(full)
    assert torch.equal(out["image"], full["image"])
    assert (out["point_targets"] - full["point_targets"]).abs().max() < 1e-5
    assert (out["edge_targets"] - full["edge_targets"]).abs().max() <= 0.5 / 255 + 1e-6
    for key in ("landmarks", "landmarks_crop", "cov", "to_original", "landmarks_original"):
        assert torch.equal(out[key], full[key]), key
    assert expand_batch(full, 256) is full
