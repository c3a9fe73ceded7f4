"""``flare data prepare``: original benchmark formats -> Parquet shards + ``manifest.json``.

Per face: a loose crop (JPEG), landmarks in crop pixels, the crop -> source matrix, the boundary
heatmaps (method.md 7.1) and the label-smoothing covariance Sigma_M (method.md 6.3), computed once.
Row order, shard bytes and the manifest depend only on the inputs and the seed, never on the
parallelism (Ray Data with ``preserve_order``), so two prepares give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from flare.datasets.records import (
    DEFAULT_MAX_PIXELS,
    DataError,
    FaceRecord,
    FileImage,
    check_pixels,
    crop_center_scale,
    read_image_bgr,
)
from flare.datasets.shards import IMAGE_SIZE, LOOSE_FACTOR, SCHEMA_VERSION, row_schema
from flare.datasets.targets import edge_heatmaps
from flare.files import check_replaceable, new_temp_dir, replace_dir
from flare.losses.smoothing import landmark_covariance
from flare.models.layouts import Layout, get_layout

ROWS_PER_SHARD = 512
JPEG_QUALITY = 95
SPLITS = ("train", "val", "test")
CROP_REACH = 4.0  # crop landmarks beyond this many crop sides outside the crop mean centre/scale do not fit
TASK_RETRIES = 2  # a Ray data task whose worker dies is retried this often, then the prepare fails
WRITTEN_BY = "flare data prepare"


class PrepareError(RuntimeError):
    """A face failed with ``--on-error fail``; the message is the one-line reason naming its file."""


@dataclass(frozen=True)
class PrepareOptions:
    """Options of one prepare run (recorded in the manifest)."""

    val_fraction: float = 0.1
    seed: int = 0
    on_error: str = "fail"  # "fail" | "skip"
    smoothing_k: int = 7
    rows_per_shard: int = ROWS_PER_SHARD
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # images over this many pixels are refused from the header
    image_size: int = IMAGE_SIZE  # loose crop side (px); the canonical crop is its centre image_size/LOOSE_FACTOR
    jpeg_quality: int = JPEG_QUALITY  # of the stored crops (1-100)

    def check(self) -> None:
        """ValueError naming the first option out of range."""
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"max_pixels must be at least 1, got {self.max_pixels}")
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {self.on_error!r}")
        if self.image_size % 8 or not 64 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be a multiple of 8 in [64, 1024], got {self.image_size}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")


def assign_validation(records: Sequence[FaceRecord], fraction: float, seed: int) -> list[str]:
    """Split labels with a validation split carved from train, grouped by source image
    (method.md 9.6): faces of one image never straddle train/val. Deterministic in ``seed``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    groups = sorted({r.group for r in records if r.split == "train"})
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(groups))
    n_val = round(fraction * len(groups))
    if fraction > 0 and len(groups) > 1:
        n_val = min(max(n_val, 1), len(groups) - 1)
    val_groups = {groups[i] for i in order[:n_val]}
    return ["val" if (r.split == "train" and r.group in val_groups) else r.split for r in records]


def loose_crop_matrix(center: np.ndarray, scale: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Source px -> loose-crop px (3x3): the canonical box (side 200*scale, method.md 1.2) maps to the
    central size/LOOSE_FACTOR px of a ``size`` px crop, so the crop holds LOOSE_FACTOR x the face box."""
    s = size / (200.0 * scale * LOOSE_FACTOR)
    c = (size - 1) / 2.0
    return np.array([[s, 0.0, c - s * center[0]], [0.0, s, c - s * center[1]], [0.0, 0.0, 1.0]])


def warp_loose_crop(image: np.ndarray, m: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Resample ``image`` with the similarity ``m`` to size^2 (bilinear, border 0). Strong
    downscales are first area-reduced by an integer factor so the crop does not alias."""
    factor = int(np.floor(1.0 / m[0, 0])) if m[0, 0] < 0.5 else 1
    if factor > 1:
        h, w = image.shape[:2]
        image = cv2.resize(image, (max(1, w // factor), max(1, h // factor)), interpolation=cv2.INTER_AREA)
        # P' = (P + 0.5)/f - 0.5 in pixel-centre coordinates
        shrink = np.array([[1 / factor, 0, 0.5 / factor - 0.5], [0, 1 / factor, 0.5 / factor - 0.5], [0, 0, 1]])
        m = m @ np.linalg.inv(shrink)
    return cv2.warpAffine(
        image, m[:2], (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )


def smoothing_covariance(edges: np.ndarray, points: np.ndarray, k: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Sigma_M per landmark (method.md 6.3) in loose-crop px^2 (crop side ``size``), from the single-channel
    edge map (max over groups) at size/4. Heatmap px follow the STAR grid j = (2p+1)(W-1)/(2S) (1.3)."""
    w = edges.shape[-1]
    to_hm = (w - 1) / size
    e = torch.from_numpy(edges.max(axis=0).astype(np.float32)[None])
    pts_hm = torch.from_numpy(((2 * points + 1) * (w - 1) / (2 * size)).astype(np.float32)[None])
    cov_hm = landmark_covariance(e, pts_hm, k=k)[0].numpy()
    return (cov_hm / to_hm**2).astype(np.float32)


def load_capped(record: FaceRecord, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The record's image; a file over ``max_pixels`` is refused from its header, before decoding."""
    if isinstance(record.image, FileImage):
        return read_image_bgr(record.image.path, max_pixels)
    image = record.load_image()
    check_pixels(record.source, image.shape[1], image.shape[0], max_pixels)
    return image


def process_record(
    record: FaceRecord, split: str, layout: Layout, options: PrepareOptions = PrepareOptions()
) -> dict[str, Any]:
    """One face -> one shard row (the dict of :func:`row_schema` columns). Raises DataError."""
    size = options.image_size
    image = load_capped(record, options.max_pixels)
    center, scale = crop_center_scale(record)
    side, limit = 200.0 * scale, 10.0 * max(image.shape[:2])
    if not (np.all(np.isfinite(center)) and np.isfinite(side) and 1.0 <= side <= limit):
        raise DataError(record.source, None, f"degenerate face box (scale={scale:g}: a {side:g} px box, "
                        f"allowed 1 to {limit:g} px)")
    m = loose_crop_matrix(np.asarray(center, dtype=np.float64), float(scale), size)
    pts = record.landmarks @ m[:2, :2].T + m[:2, 2]
    if pts.shape != (layout.num_points, 2) or not np.all(np.isfinite(pts)):
        raise DataError(record.source, None, f"expected {layout.num_points} finite points, got {pts.shape}")
    reach = CROP_REACH * size
    if np.any(pts < -reach) or np.any(pts > size + reach):
        far = pts[np.argmax(np.abs(pts - size / 2).max(axis=1))]
        raise DataError(record.source, None, f"a landmark maps to ({far[0]:.3g}, {far[1]:.3g}) in the {size} px "
                        "crop: the face centre/scale do not fit the landmarks")
    crop = warp_loose_crop(image, m, size)
    edges = edge_heatmaps(pts, layout, size=size, out=size // 4)
    edges_u8 = np.clip(np.rint(edges * 255.0), 0, 255).astype(np.uint8)
    cov = smoothing_covariance(edges_u8.astype(np.float32) / 255.0, pts, options.smoothing_k, size)
    ok, jpeg = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, options.jpeg_quality])
    if not ok:
        raise DataError(record.source, None, "JPEG encoding of the crop failed")
    occ = record.occlusion if record.occlusion is not None else np.zeros(0, np.uint8)
    return {
        "sample_id": record.sample_id,
        "dataset": record.dataset,
        "split": split,
        "subsets": list(record.subsets),
        "source": record.source,
        "group": record.group,
        "image": jpeg.tobytes(),
        "image_size": size,
        "landmarks": pts.astype(np.float32).ravel().tolist(),
        "matrix": np.linalg.inv(m).ravel().tolist(),
        "box": _float32(record.box),
        "attributes": json.dumps({k2: int(v) for k2, v in sorted(record.attributes.items())}),
        "occlusion": np.asarray(occ, np.uint8).ravel().tolist(),
        "edges": edges_u8.tobytes(),
        "cov": cov.ravel().tolist(),
    }


def _float32(values: np.ndarray) -> list[float]:
    """float32 values as a list; an overflow becomes inf (quietly), which the shard writer refuses."""
    with np.errstate(over="ignore"):
        return np.asarray(values, np.float32).ravel().tolist()


def _process_batch(
    records: Sequence[FaceRecord], splits: Sequence[str], layout: Layout, options: PrepareOptions
) -> list[dict]:
    """Rows for a batch; a failing face becomes a row whose ``error`` names its file, so the driver
    decides between fail and skip. Good rows have ``error = None``."""
    out = []
    for rec, split in zip(records, splits):
        try:
            row = process_record(rec, split, layout, options)
            row["error"] = None
        except DataError as err:
            row = {"sample_id": rec.sample_id, "error": str(err)}
        except Exception as err:  # noqa: BLE001 - any per-image failure is reported with its file
            row = {"sample_id": rec.sample_id, "error": f"{rec.source}: {type(err).__name__}: {err}"}
        out.append(row)
    return out


def _batch_schema() -> pa.Schema:
    return row_schema().append(pa.field("error", pa.string()))


def _rows_local(
    records: Sequence[FaceRecord], splits: Sequence[str], layout: Layout, options: PrepareOptions
) -> Iterator[dict]:
    for i in range(0, len(records), 16):
        yield from _process_batch(records[i : i + 16], splits[i : i + 16], layout, options)


def _rows_ray(
    records: Sequence[FaceRecord], splits: Sequence[str], layout: Layout, options: PrepareOptions
) -> Iterator[dict]:
    """Parallel over images with Ray Data, yielded in input order (``preserve_order``). A task whose worker
    dies is retried TASK_RETRIES times, then the prepare fails with one line."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    recs_ref = ray.put(list(records))
    schema = _batch_schema()

    def fn(batch: dict[str, np.ndarray]) -> pa.Table:
        recs = ray.get(recs_ref)
        idx = [int(i) for i in batch["idx"]]
        rows = _process_batch([recs[i] for i in idx], [splits[i] for i in idx], layout, options)
        return pa.Table.from_pylist(rows, schema=schema)

    with warnings.catch_warnings():  # Ray 2.60 names no replacement for the task's max_retries yet
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ray.data.from_items([{"idx": i} for i in range(len(records))]).map_batches(
            fn, batch_size=8, max_retries=TASK_RETRIES)
    try:
        for batch in ds.iter_batches(batch_size=64, batch_format="pyarrow"):
            yield from batch.to_pylist()
    except ray.exceptions.RayError as err:  # per-face errors are rows; this is a crashed or lost worker
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        raise PrepareError(f"a data task failed {TASK_RETRIES + 1} times ({type(err).__name__}: {first})") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _ShardWriter:
    """Writes rows of one split into rolling shards ``<split>-NNNNN.parquet`` in order."""

    def __init__(self, out: Path, split: str, rows_per_shard: int) -> None:
        self.out, self.split, self.rows_per_shard = out, split, rows_per_shard
        self.buffer: list[dict] = []
        self.shards: list[dict] = []

    def add(self, row: dict) -> None:
        """Buffer ``row``; a non-finite landmark, covariance, matrix or box is refused (DataError naming
        the sample id), whatever produced the row."""
        for col in ("landmarks", "cov", "matrix", "box"):
            if not np.all(np.isfinite(np.asarray(row[col], dtype=np.float32 if col != "matrix" else np.float64))):
                raise DataError(row["sample_id"], None, f"non-finite {col} in the shard row; not written")
        self.buffer.append(row)
        if len(self.buffer) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"{self.split}-{len(self.shards):05d}.parquet"
        table = pa.Table.from_pylist(self.buffer, schema=row_schema())
        pq.write_table(table, self.out / name, compression="zstd", write_statistics=False)
        self.shards.append({"path": name, "split": self.split, "rows": len(self.buffer), "sha256": ""})
        self.buffer = []


def write_dataset(
    records: Sequence[FaceRecord],
    out: Path,
    layout: Layout,
    options: PrepareOptions,
    source: dict[str, Any],
    skipped: Iterable[tuple[str, str]] = (),
    engine: str = "ray",
    overwrite: bool = False,
    log: Callable[[str], None] = lambda s: None,
    inputs: Sequence[Path] = (),
) -> dict[str, Any]:
    """Process ``records`` and write shards + manifest atomically into ``out`` (temp dir, then a swap).

    An existing ``out`` is replaced only with ``overwrite``, and only when flare wrote it or it is empty,
    never when it is or holds one of ``inputs`` (:func:`flare.files.check_replaceable`). On failure the
    old ``out`` is kept and nothing that looks like a dataset is left.
    """
    out = Path(out)
    check_replaceable(out, inputs, overwrite, is_flare_dataset)
    options.check()
    skipped_list = [{"item": str(a), "reason": str(b)} for a, b in skipped]
    if skipped_list and options.on_error == "fail":
        raise DataError(skipped_list[0]["item"], None, skipped_list[0]["reason"])
    splits = assign_validation(records, options.val_fraction, options.seed)
    tmp = new_temp_dir(out)
    try:
        writers = {s: _ShardWriter(tmp, s, options.rows_per_shard) for s in SPLITS}
        rows = (_rows_ray if engine == "ray" else _rows_local)(records, splits, layout, options)
        counts: dict[str, Counter] = {s: Counter() for s in SPLITS}
        for row in rows:
            error = row.pop("error", None)
            if error is None:
                try:
                    writers[row["split"]].add(row)
                except DataError as err:
                    if options.on_error == "fail":
                        raise
                    error = str(err)
            if error is not None:
                if options.on_error == "fail":
                    raise PrepareError(error)
                skipped_list.append({"item": row["sample_id"], "reason": error})
                continue
            counts[row["split"]]["all"] += 1
            for sub in row["subsets"]:
                counts[row["split"]][sub] += 1
        shards = []
        for w in writers.values():
            w.flush()
            for shard in w.shards:
                shard["sha256"] = _sha256(tmp / shard["path"])
            shards.extend(w.shards)
        if not shards:
            raise DataError(str(source.get("root", "?")), None, "no faces were prepared")
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "layout": layout.name,
            "num_points": layout.num_points,
            "num_edges": layout.num_edges,
            "image_size": options.image_size,
            "canonical_size": round(options.image_size / LOOSE_FACTOR),
            "edge_size": options.image_size // 4,
            "source": source,
            "options": {"val_fraction": options.val_fraction, "seed": options.seed, "on_error": options.on_error,
                        "smoothing_k": options.smoothing_k, "image_size": options.image_size,
                        "jpeg_quality": options.jpeg_quality},
            "counts": {s: dict(sorted(c.items())) for s, c in counts.items() if c},
            "shards": shards,
            "skipped": skipped_list,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        replace_dir(tmp, out, overwrite, inputs, WRITTEN_BY, is_flare_dataset)
        log(f"wrote {sum(s['rows'] for s in shards)} faces in {len(shards)} shards to {out}")
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_flare_dataset(directory: Path) -> bool:
    """A prepared dataset from before the ``.flare-output`` marker: its manifest.json is flare's."""
    try:
        data = json.loads((Path(directory) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and {"schema_version", "layout", "shards", "source"} <= data.keys()


def prepare(
    fmt: str,
    root: Path,
    out: Path,
    options: PrepareOptions = PrepareOptions(),
    engine: str = "ray",
    overwrite: bool = False,
    synthetic_count: int = 600,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Read a benchmark in its original format (or generate synthetic faces) and write the shards."""
    from flare.datasets.readers import read_dataset
    from flare.datasets.synthetic import generate_synthetic

    inputs = [] if fmt == "synthetic" else [Path(root)]
    check_replaceable(Path(out), inputs, overwrite, is_flare_dataset)
    if fmt == "synthetic":
        n_test = max(1, synthetic_count // 5)
        records = generate_synthetic(synthetic_count, layout_points=68, seed=options.seed, split="train") + \
            generate_synthetic(n_test, layout_points=68, seed=options.seed, split="test", start=synthetic_count)
        skipped: list[tuple[str, str]] = []
    else:
        result = read_dataset(fmt, Path(root), on_error=options.on_error)
        records, skipped = list(result.records), list(result.skipped)
    if not records:
        raise DataError(str(root), None, "no faces found")
    n_points = {r.landmarks.shape[0] for r in records}
    if len(n_points) != 1:
        raise DataError(str(root), None, f"mixed landmark counts {sorted(n_points)}")
    layout = get_layout(n_points.pop())
    source = {"format": fmt, "root": str(root) if fmt != "synthetic" else "synthetic", "synthetic": fmt == "synthetic"}
    if fmt == "synthetic":
        source["count"] = synthetic_count
    return write_dataset(records, Path(out), layout, options, source, skipped, engine, overwrite, log, inputs)
