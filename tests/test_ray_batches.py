"""Training batches on Ray (platform/ray_batches.py): built in the worker or streamed from Ray Data actors,
they are exactly the batches of the single-process path for the same seed and epoch; ranks split them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flare.datasets.ingest import BatchBuilder, load_manifest
from flare.platform.local_loader import LocalLoader
from flare.platform.ray_batches import RankBatches, rank_keys

BATCH, LIMIT, SEED = 8, 36, 7


def test_rank_keys_split_an_epoch_evenly_and_disjointly() -> None:
    assert rank_keys(5, 3, 0, 1) == [(3, i) for i in range(5)]
    parts = [rank_keys(7, 0, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [2, 2, 2]  # DDP needs equal steps: batch 6 is dropped
    flat = [k for p in parts for k in p]
    assert len(set(flat)) == 6 and {i for _, i in flat} == set(range(6))


def _local(manifest, builder, epochs: list[int]) -> list[dict[str, torch.Tensor]]:
    with LocalLoader(manifest, "train", BATCH, builder, workers=0, limit=LIMIT, shuffle_base=SEED * 100003) as loader:
        return [b for e in epochs for b in loader.epoch(e)]


def _equal(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b) == 2 * 5  # 36 faces in batches of 8: 5 per epoch, the last one of 4
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("actors", [0, 1])
def test_one_worker_gets_the_single_process_batches(small_300w: Path, ray_cluster, actors: int) -> None:
    manifest = load_manifest(small_300w)
    builder = BatchBuilder(manifest.layout, 64, augment=True, seed=SEED, compact=True)
    ray_side = RankBatches(manifest, "train", BATCH, builder, 0, 1, limit=LIMIT, shuffle_base=SEED * 100003,
                           actors=actors, last_epoch=1)
    got = [b for e in (0, 1) for b in ray_side.epoch(e)]
    ray_side.close()
    _equal(got, _local(manifest, builder, [0, 1]))
    assert not torch.equal(got[0]["image"], got[5]["image"])  # another order and augmentation each epoch


def test_a_stream_refuses_a_skipped_epoch(small_300w: Path, ray_cluster) -> None:
    manifest = load_manifest(small_300w)
    builder = BatchBuilder(manifest.layout, 64, augment=True, seed=SEED, compact=True)
    side = RankBatches(manifest, "train", BATCH, builder, 0, 1, limit=LIMIT, shuffle_base=0, actors=1, last_epoch=2)
    assert len(list(side.epoch(0))) == 5
    with pytest.raises(RuntimeError, match=r"expected \(2, 0\), got \(1, 0\)"):
        next(side.epoch(2))
    side.close()


@pytest.mark.parametrize("world_size", [1, 2])
def test_drop_last_ranks_train_full_batches_of_the_single_process_path(small_300w: Path, world_size: int) -> None:
    manifest = load_manifest(small_300w)
    builder = BatchBuilder(manifest.layout, 64, augment=True, seed=SEED, compact=True)
    with LocalLoader(manifest, "train", BATCH, builder, workers=0, limit=LIMIT, shuffle_base=SEED * 100003,
                     drop_last=True) as loader:
        single = list(loader.epoch(1))
    assert len(single) == LIMIT // BATCH  # 4 full batches; the 4 faces left over are not trained on
    ranks = [list(RankBatches(manifest, "train", BATCH, builder, r, world_size, limit=LIMIT,
                              shuffle_base=SEED * 100003, actors=0, last_epoch=1, drop_last=True).epoch(1))
             for r in range(world_size)]
    assert [len(r) for r in ranks] == [LIMIT // BATCH // world_size] * world_size
    for r, batches in enumerate(ranks):
        assert all(len(b["image"]) == BATCH for b in batches)
        for b, want in zip(batches, single[r::world_size], strict=True):
            assert all(torch.equal(b[k], want[k]) for k in b)
