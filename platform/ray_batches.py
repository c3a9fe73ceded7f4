"""Training batches of one Ray Train worker, the same as the single-process path's.

Batch ``(epoch, i)`` is the ``i``-th slice of epoch ``epoch``'s row order with every sample's augmentation
keyed on ``(seed, epoch, sample)`` (:class:`~flare.platform.local_loader.ShardBatches`), so a batch does
not depend on who builds it. Rank ``r`` of ``W`` trains on batches ``r, r + W, ...``; with ``W > 1`` each
rank gets the same number (the remainder is dropped, as DDP needs equal steps); with one worker these are
exactly the batches of ``flare train --no-ray``.

``data.loader_workers = 0``: the worker builds its batches itself. ``> 0``: that many Ray Data actors per
worker build them (``map_batches`` on CPU resources anywhere in the cluster, so building scales over CPU
nodes instead of the GPU workers' cores), streamed in order with prefetch; one stream spans all remaining
epochs, so the actors start once and read the shards once.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from flare.datasets.ingest import BatchBuilder, Manifest
from flare.platform.local_loader import BatchKey, ShardBatches

ACTOR_CPUS = 1.0  # CPUs each batch-building actor reserves (check_resources counts them)


def rank_keys(batches: int, epoch: int, rank: int, world_size: int) -> list[BatchKey]:
    """The ``(epoch, i)`` keys rank ``rank`` trains on in ``epoch``: every ``world_size``-th batch from
    ``rank``, the same count on every rank."""
    per_rank = batches if world_size == 1 else batches // world_size
    return [(epoch, rank + k * world_size) for k in range(per_rank)]


class BuildBatches:
    """A Ray Data actor: keys in, built batches out (one row per training batch, tensor columns)."""

    def __init__(self, batches: ShardBatches) -> None:
        self.batches = batches

    def __call__(self, keys: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        built = [self.batches[(int(e), int(i))] for e, i in zip(keys["epoch"], keys["index"])]
        out = {k: np.stack([b[k].numpy() for b in built]) for k in built[0]}
        return {"epoch": np.asarray(keys["epoch"]), "index": np.asarray(keys["index"]), **out}


def ray_stream(batches: ShardBatches, keys: list[BatchKey], actors: int, prefetch: int = 2
               ) -> Iterator[tuple[BatchKey, dict[str, torch.Tensor]]]:
    """``(key, batch)`` for ``keys`` in order, built by ``actors`` Ray Data actors (ACTOR_CPUS each)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # batches arrive in key order
    ds = ray.data.from_items([{"epoch": e, "index": i} for e, i in keys]).map_batches(
        BuildBatches, fn_constructor_args=(batches,), batch_size=1, concurrency=actors, num_cpus=ACTOR_CPUS,
        batch_format="numpy")
    for block in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=prefetch):
        for j in range(len(block["epoch"])):
            key = (int(block["epoch"][j]), int(block["index"][j]))
            yield key, {k: torch.from_numpy(np.array(v[j])) for k, v in block.items() if k not in ("epoch", "index")}


class RankBatches:
    """The training batches of one rank, epoch after epoch (built here, or streamed from Ray Data actors)."""

    def __init__(self, manifest: Manifest, split: str, batch_size: int, builder: BatchBuilder, rank: int,
                 world_size: int, *, limit: int | None, shuffle_base: int, actors: int, last_epoch: int,
                 drop_last: bool = False) -> None:
        self.batches = ShardBatches(manifest, split, batch_size, builder, limit, shuffle_base, drop_last)
        self.rank, self.world_size, self.actors, self.last_epoch = rank, world_size, actors, last_epoch
        self.stream: Iterator[tuple[BatchKey, dict[str, torch.Tensor]]] | None = None

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of ``epoch`` for this rank, in order."""
        keys = rank_keys(len(self.batches), epoch, self.rank, self.world_size)
        if self.actors == 0:
            return (self.batches[k] for k in keys)
        if self.stream is None:  # one stream from this epoch to the last: the actors start once
            ahead = [k for e in range(epoch, self.last_epoch + 1)
                     for k in rank_keys(len(self.batches), e, self.rank, self.world_size)]
            self.stream = ray_stream(self.batches, ahead, self.actors)
        return self._take(keys)

    def _take(self, keys: list[BatchKey]) -> Iterator[dict[str, torch.Tensor]]:
        assert self.stream is not None
        for want in keys:
            got, batch = next(self.stream)
            if got != want:  # an epoch skipped or repeated by the caller: the stream cannot rewind
                raise RuntimeError(f"batch stream out of step: expected {want}, got {got}")
            yield batch

    def close(self) -> None:
        """Drop the stream (its actors end with it)."""
        self.stream = None

