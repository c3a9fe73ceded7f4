"""Parallel batches for the single-process training path (``flare train --no-ray``).

:class:`LocalLoader` wraps a ``torch.utils.data.DataLoader`` whose items are whole batches: worker
processes read the shards once, then each builds the batches it is given with the same
:class:`~flare.datasets.ingest.BatchBuilder` the in-process path uses. A batch is keyed on
``(epoch, index)``: its rows are the ``index``-th slice of the epoch's permutation (the order of
:func:`~flare.datasets.ingest.iter_local_rows`) and every sample's augmentation is keyed on
``(seed, epoch, sample)``, so the tensors do not depend on the number of workers. Workers persist
across epochs and prefetch ahead of the step across the epoch boundary (one stream of batches for epoch
after epoch: the next epoch's first batches are built while the step validates), and on CUDA hand over
pinned memory. They start from a
``forkserver`` (not ``fork``): a fork of a process whose OpenCV/pyarrow/OpenMP pools hold locks hangs.

Imports only PyTorch, NumPy, OpenCV and pyarrow (no Ray, no MLflow).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any, Self

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from flare.datasets.ingest import BatchBuilder, Manifest

BatchKey = tuple[int, int]  # (epoch, batch index)


def epoch_order(n: int, shuffle_seed: int | None) -> np.ndarray:
    """Row order of one epoch, exactly as :func:`~flare.datasets.ingest.iter_local_rows` draws it."""
    return np.random.default_rng(shuffle_seed).permutation(n) if shuffle_seed is not None else np.arange(n)


def split_rows(manifest: Manifest, split: str, limit: int | None) -> int:
    """Rows used from ``split`` (the first ``limit``), from the parquet footers only."""
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in manifest.shard_paths(split))
    return total if limit is None else min(limit, total)


def batch_count(rows: int, batch_size: int, drop_last: bool) -> int:
    """Batches in one epoch of ``rows``: the full ``batch_size`` slices, plus the smaller remainder unless
    ``drop_last`` (``data.drop_last``)."""
    return rows // batch_size if drop_last else math.ceil(rows / batch_size)


class ShardBatches(Dataset):
    """Map-style dataset of whole batches: ``dataset[(epoch, i)]`` is the builder's output for the
    ``i``-th ``batch_size`` slice of epoch ``epoch``'s row order (full slices only with ``drop_last``). The
    table is read lazily, once per process, and never pickled."""

    def __init__(self, manifest: Manifest, split: str, batch_size: int, builder: BatchBuilder,
                 limit: int | None = None, shuffle_base: int | None = None, drop_last: bool = False) -> None:
        self.paths = [str(p) for p in manifest.shard_paths(split)]
        self.batch_size, self.builder, self.shuffle_base = batch_size, builder, shuffle_base
        self.n = split_rows(manifest, split, limit)
        self.drop_last = drop_last
        if drop_last and self.n < batch_size:
            raise ValueError(f"data.drop_last: split {split!r} of {manifest.path} has {self.n} rows, fewer than "
                             f"one batch of {batch_size}")
        self._table: pa.Table | None = None
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return batch_count(self.n, self.batch_size, self.drop_last)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_table": None, "_order": None}

    def order(self, epoch: int) -> np.ndarray:
        """This epoch's row order (cached for the current epoch)."""
        if self._order is None or self._order[0] != epoch:
            seed = None if self.shuffle_base is None else self.shuffle_base + epoch
            self._order = (epoch, epoch_order(self.n, seed))
        return self._order[1]

    def rows(self, key: BatchKey) -> list[dict]:
        """The shard rows of batch ``key``."""
        if self._table is None:
            self._table = pq.read_table(self.paths)
        epoch, i = key
        return self._table.take(self.order(epoch)[i * self.batch_size : (i + 1) * self.batch_size]).to_pylist()

    def __getitem__(self, key: BatchKey) -> dict[str, torch.Tensor]:
        return self.builder(self.rows(key), key[0])


class EpochSampler(Sampler[BatchKey]):
    """Yields ``(epoch, i)`` for every batch of epoch ``start``, then of ``start + 1``, ... without end (runs in
    the main process; :class:`LocalLoader` takes one epoch's worth at a time)."""

    def __init__(self, batches: int) -> None:
        self.batches, self.start = batches, 0

    def __iter__(self) -> Iterator[BatchKey]:
        epoch = self.start
        while True:
            yield from ((epoch, i) for i in range(self.batches))
            epoch += 1


def _init_worker(_: int) -> None:
    """One thread per worker process: the parallelism comes from the processes."""
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


class LocalLoader:
    """Batches of one split for every epoch, built by ``workers`` persistent processes (0: in this
    process). Iterate :meth:`epoch`; call :meth:`close` to stop the workers. Epochs taken in order, each to
    its end, come from one stream (``restarts`` stays 1); any other request restarts it at that epoch."""

    def __init__(self, manifest: Manifest, split: str, batch_size: int, builder: BatchBuilder, *,
                 workers: int = 0, limit: int | None = None, shuffle_base: int | None = None,
                 pin_memory: bool = False, prefetch: int = 2, context: str = "forkserver",
                 drop_last: bool = False) -> None:
        self.dataset = ShardBatches(manifest, split, batch_size, builder, limit, shuffle_base, drop_last)
        self.sampler = EpochSampler(len(self.dataset))
        self.workers = workers
        self.loader: DataLoader | None = DataLoader(
            self.dataset, batch_size=None, sampler=self.sampler, num_workers=workers,
            persistent_workers=workers > 0, prefetch_factor=prefetch if workers > 0 else None,
            pin_memory=pin_memory, worker_init_fn=_init_worker if workers > 0 else None,
            multiprocessing_context=context if workers > 0 else None,
            # its own generator: starting the workers (their base seed) never draws from torch's global one, so
            # the model's initial weights do not depend on when, or whether, the loader starts
            generator=torch.Generator().manual_seed(0),
        )
        self.stream: Iterator[dict[str, torch.Tensor]] | None = None
        self.next_key: BatchKey | None = None  # the key of the batch the stream yields next
        self.restarts = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of ``epoch`` in order."""
        if self.loader is None:
            raise RuntimeError("LocalLoader is closed")
        if self.stream is None or self.next_key != (epoch, 0):
            self.sampler.start = epoch
            self.stream, self.next_key = iter(self.loader), (epoch, 0)
            self.restarts += 1
        return self._take(epoch)

    def _take(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        n = len(self.dataset)
        for i in range(n):
            if self.stream is None:
                raise RuntimeError("LocalLoader is closed")
            if self.next_key != (epoch, i):  # another epoch() call moved the stream meanwhile
                raise RuntimeError(f"LocalLoader: epoch {epoch} was abandoned at batch {i}")
            batch = next(self.stream)
            self.next_key = (epoch, i + 1) if i + 1 < n else (epoch + 1, 0)
            yield batch

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        loader, self.loader, self.stream = self.loader, None, None
        it = getattr(loader, "_iterator", None) if loader is not None else None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()



class WaitClock:
    """Iterates ``items`` and sums the wall seconds spent in ``next()`` (the step waiting for data);
    ``first`` is the wait for the first item alone (loader start-up in a run's first epoch)."""

    def __init__(self, items: Iterator[Any]) -> None:
        self.items, self.seconds, self.first = iter(items), 0.0, None

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        try:
            return next(self.items)
        finally:
            waited = time.perf_counter() - t0
            self.seconds += waited
            self.first = waited if self.first is None else self.first
