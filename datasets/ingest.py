"""Streaming prepared shards into training: manifests, split readers and the batch builder.

The same :class:`BatchBuilder` turns shard rows into model-ready tensors inside a Ray Train worker
(rows from ``ray.train.get_dataset_shard``) and in a plain process (rows from :func:`iter_local_rows`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow.parquet as pq
import torch

from flare.datasets.augment import AugmentConfig, augment_sample, to_tensor_image
from flare.datasets.shards import LOOSE_FACTOR, SCHEMA_VERSION
from flare.datasets.targets import point_heatmaps, point_heatmaps_torch
from flare.models.decode import apply_affine, crop_to_label
from flare.models.layouts import Layout, get_layout


class ManifestError(ValueError):
    """A missing or inconsistent prepared dataset; ``str()`` names the file."""


@dataclass(frozen=True)
class Manifest:
    """A prepared dataset: ``manifest.json`` and the shards next to it."""

    path: Path
    data: dict[str, Any]

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def layout(self) -> Layout:
        return get_layout(self.data["layout"])

    def shard_paths(self, split: str) -> list[Path]:
        """Shard files of ``split`` in order; raises ManifestError for an unknown or empty split."""
        paths = [self.root / s["path"] for s in self.data["shards"] if s["split"] == split]
        if not paths:
            known = sorted({s["split"] for s in self.data["shards"]})
            raise ManifestError(f"{self.path}: no shards for split {split!r} (splits: {known})")
        return paths

    def count(self, split: str) -> int:
        return int(self.data.get("counts", {}).get(split, {}).get("all", 0))


def load_manifest(path: str | Path, layout: str | None = None) -> Manifest:
    """Read and check a manifest (schema version, shard files present and, given ``layout``, the model's
    layout). One-line errors name the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest (run `flare data prepare` first)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    for key in ("schema_version", "layout", "shards", "image_size"):
        if key not in data:
            raise ManifestError(f"{path}: missing key {key!r}")
    if data["schema_version"] != SCHEMA_VERSION:
        raise ManifestError(f"{path}: schema_version {data['schema_version']} != supported {SCHEMA_VERSION}")
    for shard in data["shards"]:
        if not (path.parent / shard["path"]).is_file():
            raise ManifestError(f"{path}: shard {shard['path']} is missing")
    manifest = Manifest(path, data)
    if layout is not None and manifest.layout.name != layout:
        raise ManifestError(f"{path}: layout {manifest.layout.name} does not match the model's {layout}")
    return manifest


def iter_local_rows(
    manifest: Manifest,
    split: str,
    batch_size: int,
    limit: int | None = None,
    shuffle_seed: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[list[dict]]:
    """Batches of rows (dicts) of ``split`` without Ray: optionally shuffled by ``shuffle_seed``,
    the first ``limit`` rows only, and the ``rank``-th of ``world_size`` interleaved shards."""
    table = pq.read_table(manifest.shard_paths(split))
    n = table.num_rows if limit is None else min(limit, table.num_rows)
    order = np.arange(n)
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(n)
    order = order[rank::world_size]
    for i in range(0, len(order), batch_size):
        yield table.take(order[i : i + batch_size]).to_pylist()


def ray_dataset(manifest: Manifest, split: str, limit: int | None = None):  # -> ray.data.Dataset
    """A Ray Dataset over the shards of ``split`` (first ``limit`` rows if given)."""
    import ray

    ds = ray.data.read_parquet([str(p) for p in manifest.shard_paths(split)], shuffle=None)
    return ds.limit(limit) if limit is not None else ds


def decode_row(row: dict, layout: Layout) -> dict[str, Any]:
    """Arrays of one shard row: image (BGR uint8), landmarks (N, 2), edges (E, h, w) float, cov, matrix."""
    image = cv2.imdecode(np.frombuffer(row["image"], np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ManifestError(f"row {row['sample_id']}: undecodable JPEG")
    size = int(row["image_size"])
    edge_side = size // 4
    return {
        "image": image,
        "landmarks": np.asarray(row["landmarks"], np.float64).reshape(-1, 2),
        "edges": np.frombuffer(row["edges"], np.uint8).reshape(layout.num_edges, edge_side, edge_side),
        "cov": np.asarray(row["cov"], np.float64).reshape(-1, 2, 2),
        "matrix": np.asarray(row["matrix"], np.float64).reshape(3, 3),
        "size": size,
    }


# what a training step reads (TrainStep, expand_batch, the objectives); validation also needs to_original and
# landmarks_original
TRAIN_KEYS = ("image", "landmarks", "landmarks_crop", "edge_targets", "cov")


class BatchBuilder:
    """Rows -> tensors for the model and the objectives.

    Output (B = len(rows), S = input_size, h = S/4):
    ``image`` (B,3,S,S) in [-1,1] BGR; ``landmarks`` (B,N,2) normalised and clamped (method.md 1.3);
    ``landmarks_crop`` (B,N,2) unclamped crop px; ``point_targets`` (B,N,h,h); ``edge_targets`` (B,E,h,h);
    ``cov`` (B,N,2,2) label-smoothing covariance in heatmap px (STAR grid, 6.4); ``to_original`` (B,3,3)
    crop px -> original px; ``landmarks_original`` (B,N,2) ground truth in original px (unclamped).
    """

    def __init__(self, layout: Layout, input_size: int, augment: bool, seed: int = 0,
                 config: AugmentConfig | None = None, compact: bool = False,
                 keys: Sequence[str] | None = None) -> None:
        """``compact``: what a loader process hands over is ~10x smaller: ``image`` uint8 (B,3,S,S) BGR,
        ``edge_targets`` uint8 (value x 255, rounded) and no ``point_targets``; :func:`expand_batch` turns
        it into the full batch on the training device (the point maps are drawn there). ``keys``: only these
        outputs (training batches: :data:`TRAIN_KEYS`, fewer tensors between processes and to the device)."""
        self.layout, self.size, self.seed, self.compact = layout, input_size, seed, compact
        self.keys = None if keys is None else tuple(keys)
        self.augment = augment
        self.config = (config or AugmentConfig()) if augment else AugmentConfig.off()

    def rng(self, sample_id: str, epoch: int) -> np.random.Generator:
        """A generator keyed on (seed, epoch, sample): reproducible whatever the worker or order."""
        key = hash_id(sample_id)
        return np.random.default_rng([self.seed, epoch, key & 0xFFFFFFFF, key >> 32 & 0xFFFFFFFF])

    def __call__(self, rows: Sequence[dict], epoch: int = 0) -> dict[str, torch.Tensor]:
        out: dict[str, list] = {k: [] for k in ("image", "landmarks", "landmarks_crop", "point_targets",
                                                "edge_targets", "cov", "to_original", "landmarks_original")}
        h = self.size // 4
        to_hm = (h - 1) / self.size  # crop px -> heatmap px (STAR grid, method.md 6.4)
        for row in rows:
            arr = decode_row(row, self.layout)
            size = arr["size"]
            center = np.array([(size - 1) / 2.0, (size - 1) / 2.0])
            scale = size / LOOSE_FACTOR / 200.0  # the canonical box is the loose crop's centre (shards.py)
            sample = augment_sample(
                arr["image"], arr["landmarks"], arr["edges"].astype(np.float32) / 255.0, arr["cov"],
                center, scale, self.layout, self.rng(row["sample_id"], epoch) if self.augment else None,
                self.config, size=self.size,
            )
            pts = sample["landmarks"]
            m = sample["matrix"]  # loose crop -> training crop
            out["landmarks_crop"].append(pts)
            out["landmarks"].append(np.clip(crop_to_label(pts, self.size), -1, 1))
            if self.compact:
                out["image"].append(np.ascontiguousarray(sample["image"].transpose(2, 0, 1)))
                out["edge_targets"].append(np.clip(np.rint(sample["edges"] * 255.0), 0, 255).astype(np.uint8))
            else:
                out["image"].append(to_tensor_image(sample["image"]))
                out["point_targets"].append(point_heatmaps(pts, size=self.size, out=h))
                out["edge_targets"].append(sample["edges"])
            out["cov"].append(sample["cov"] * to_hm**2)
            to_orig = arr["matrix"] @ np.linalg.inv(m)
            out["to_original"].append(to_orig)
            out["landmarks_original"].append(apply_affine(arr["landmarks"], arr["matrix"]))
        if self.compact:
            del out["point_targets"]
        if self.keys is not None:
            out = {k: v for k, v in out.items() if k in self.keys}
        if self.compact:
            return {k: torch.from_numpy(np.stack(v)) if k in ("image", "edge_targets") else
                    torch.as_tensor(np.stack(v), dtype=torch.float64 if k == "to_original" else torch.float32)
                    for k, v in out.items()}
        return {k: torch.as_tensor(np.stack(v), dtype=torch.float64 if k in ("to_original",) else torch.float32)
                for k, v in out.items()}


def image_from_uint8(image: torch.Tensor) -> torch.Tensor:
    """uint8 crops (B, 3, S, S) as the network's input: x = (v - 127.5) / 127.5 in [-1, 1] (method.md 1.5)."""
    return (image.float() - 127.5) / 127.5


def expand_batch(batch: dict[str, torch.Tensor], input_size: int) -> dict[str, torch.Tensor]:
    """A compact batch (:class:`BatchBuilder` with ``compact=True``), already on its device, as the full one:
    the image in [-1, 1] (x = (v - 127.5) / 127.5, method.md 1.5), edges / 255 and the point heatmaps
    (7.2) drawn from ``landmarks_crop`` on the device. A full batch is returned unchanged."""
    if "point_targets" in batch:
        return batch
    out = dict(batch)
    out["image"] = image_from_uint8(batch["image"])
    out["edge_targets"] = batch["edge_targets"].float() / 255.0
    out["point_targets"] = point_heatmaps_torch(batch["landmarks_crop"], size=input_size, out=input_size // 4)
    return out


def hash_id(text: str) -> int:
    """A stable 64-bit hash of a string (Python's ``hash`` is salted per process)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
