"""Parquet shard schema: one row per face, everything training needs precomputed.

Geometry stored per row (all float, x first):
- ``image``: a loose square face crop of side ``image_size`` px, JPEG, BGR order when decoded by OpenCV.
  The canonical training crop (method.md 1.2) is its centre ``CANONICAL`` px box, so augmentation
  (rotation, scale, shift; method.md 8.2) has real pixels around it.
- ``landmarks``: (N, 2) in loose-crop pixels (0-based pixel centres).
- ``matrix``: 3x3 crop -> source affine (maps loose-crop px back to original-image px).
- ``edges``: (E, image_size/4, image_size/4) uint8 boundary heatmaps of the loose crop (method.md 7.1).
- ``cov``: (N, 2, 2) label-smoothing covariance Sigma_M in loose-crop pixels (method.md 6.3-6.4).
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1
CANONICAL = 256  # side of the canonical training crop inside the loose crop (px)
LOOSE_FACTOR = 2.0  # loose crop side / canonical crop side
IMAGE_SIZE = int(CANONICAL * LOOSE_FACTOR)  # 512
EDGE_SIZE = IMAGE_SIZE // 4  # heatmap resolution: 4 crop px per cell, as at 256 -> 64


def row_schema() -> pa.Schema:
    """The Arrow schema of a shard row. Fixed-size arrays are flattened float/uint8 lists."""
    return pa.schema(
        [
            ("sample_id", pa.string()),
            ("dataset", pa.string()),
            ("split", pa.string()),
            ("subsets", pa.list_(pa.string())),
            ("source", pa.string()),
            ("group", pa.string()),
            ("image", pa.binary()),
            ("image_size", pa.int32()),
            ("landmarks", pa.list_(pa.float32())),
            ("matrix", pa.list_(pa.float64())),
            ("box", pa.list_(pa.float32())),
            ("attributes", pa.string()),  # JSON object name -> int
            ("occlusion", pa.list_(pa.uint8())),  # empty when the format has no flags
            ("edges", pa.binary()),  # uint8 (E, EDGE_SIZE, EDGE_SIZE), C order
            ("cov", pa.list_(pa.float32())),  # (N, 2, 2)
        ],
        metadata={"flare.schema_version": str(SCHEMA_VERSION)},
    )
