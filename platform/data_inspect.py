"""``flare data inspect``: counts of a prepared dataset and a PNG grid of random samples with their
landmarks (green) and edge heatmaps (red overlay), because people would rather look than read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow.parquet as pq

from flare.datasets.ingest import decode_row, load_manifest
from flare.platform.plots import tile_grid, write_png

TILE = 256


def render_sample(row: dict, layout: Any) -> np.ndarray:
    """One tile: the loose crop resized to TILE px with edges overlaid and landmarks drawn."""
    arr = decode_row(row, layout)
    size = arr["size"]
    img = cv2.resize(arr["image"], (TILE, TILE), interpolation=cv2.INTER_AREA)
    edges = arr["edges"].max(axis=0).astype(np.float32) / 255.0
    edges = cv2.resize(edges, (TILE, TILE), interpolation=cv2.INTER_LINEAR)
    img = img.astype(np.float32)
    img[..., 2] = np.clip(img[..., 2] + 200.0 * edges, 0, 255)
    img = img.astype(np.uint8)
    k = TILE / size
    for x, y in arr["landmarks"]:
        cv2.circle(img, (round((x + 0.5) * k - 0.5), round((y + 0.5) * k - 0.5)), 2, (0, 255, 0), -1,
                   cv2.LINE_AA)
    label = f"{row['split']} {row['dataset']}"
    cv2.putText(img, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return img


def inspect_dataset(directory: Path, png: Path | None = None, n: int = 16, seed: int = 0) -> tuple[dict, Path]:
    """Return the manifest counts and write a grid of ``n`` random rows to ``png``."""
    manifest = load_manifest(directory)
    paths = [manifest.root / s["path"] for s in manifest.data["shards"]]
    table = pq.read_table(paths)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(table.num_rows, size=min(n, table.num_rows), replace=False))
    tiles = [render_sample(r, manifest.layout) for r in table.take(idx).to_pylist()]
    out = write_png(Path(png or manifest.root / "inspect.png"), tile_grid(tiles, TILE))
    return {"counts": manifest.data["counts"], "skipped": len(manifest.data["skipped"]),
            "layout": manifest.data["layout"]}, out
