"""ADNet/STAR metadata ``.tsv`` (method.md 11.4): path, 5 reference points, 2N landmarks, scale, centre, tags."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from flare.datasets.read_300w import W300_FOLDERS, photo_group
from flare.datasets.read_wflw import WFLW_ATTRIBUTES
from flare.datasets.reader_common import (
    SPLITS,
    Errors,
    ReadResult,
    check_center_scale,
    check_inside,
    parse_float,
    read_text_lines,
    rel_path,
    sample_id,
    wanted_splits,
)
from flare.datasets.records import DataError, FaceRecord, FileImage, image_size, landmark_box

_POINTS_TO_DATASET = {98: "wflw", 68: "300w", 29: "cofw"}
_DATASET_IMAGE_DIRS = {"wflw": ("WFLW/WFLW_images", "WFLW_images"), "300w": ("300W",), "cofw": ("COFW",)}
_LEGACY_PREFIX = re.compile(r"^.*?rawImages/", re.IGNORECASE)


def clean_legacy_path(path: str) -> str:
    """Backslashes → '/', strip a legacy prefix ending in ``rawImages/`` (UNC share or
    ``./rawImages/``) and a leading ``./`` (method.md 11.4)."""
    p = _LEGACY_PREFIX.sub("", path.strip().replace("\\", "/"))
    while p.startswith("./"):
        p = p[2:]
    return p.lstrip("/")


def _floats_csv(text: str, path: Path, line: int, what: str) -> np.ndarray:
    parts = [t for t in text.split(",") if t.strip()]
    if not parts:
        raise DataError(path, line, f"empty {what}")
    return np.array([parse_float(t.strip(), path, line, what) for t in parts])


def _tsv_numeric_row(cols: list[str]) -> bool:
    """Header detection: a line is data if columns 2-6 parse as numbers."""
    if len(cols) < 6:
        return False
    try:
        for c in cols[1:3]:
            [float(t) for t in c.split(",") if t.strip()]
        [float(c) for c in cols[3:6]]
    except ValueError:
        return False
    return True


def read_adnet(
    root: str | Path,
    tsv_path: str | Path | None = None,
    split: str | None = None,
    on_error: str = "fail",
    dataset: str | None = None,
) -> ReadResult:
    """Read an ADNet/STAR metadata file (method.md 11.4): path, 5 points (unused), 2N landmarks,
    scale, center_w, center_h, optional tags. Centre/scale are used as given (no 0/1-base shift).

    ``tsv_path`` defaults to ``<root>/<split>.tsv`` (both when ``split`` is None). The split is the
    ``split`` argument, else the file stem (``train``/``test``). ``dataset`` defaults to the one
    implied by N (98 wflw, 68 300w, 29 cofw). Images resolve under ``<root>/WFLW/WFLW_images``,
    ``<root>/300W`` or ``<root>/COFW``, falling back to ``<root>`` itself.
    """
    root = Path(root).resolve()
    if tsv_path is None:
        jobs = [(s, root / f"{s}.tsv") for s in wanted_splits(split)]
        if split is None:
            jobs = [(s, p) for s, p in jobs if p.is_file()] or jobs[:1]
    else:
        tsv_path = Path(tsv_path)
        fsplit = split or tsv_path.stem.lower()
        if fsplit not in SPLITS:
            raise ValueError(f"cannot infer the split from {tsv_path.name!r}; pass split='train' or 'test'")
        jobs = [(fsplit, tsv_path)]
    errors = Errors(on_error)
    records: list[FaceRecord] = []
    for fsplit, path in jobs:
        if not path.is_file():
            raise DataError(path, "metadata file not found")
        _read_tsv(root, path, fsplit, dataset, errors, records)
    return ReadResult(records, errors.skipped)


def _read_tsv(
    root: Path, path: Path, split: str, dataset: str | None, errors: Errors, out: list[FaceRecord]
) -> None:
    seen: dict[str, int] = {}
    sizes: dict[Path, tuple[int, int]] = {}
    for no, text in enumerate(read_text_lines(path), start=1):
        if not text.strip():
            continue
        cols = text.split("\t")
        if no == 1 and not _tsv_numeric_row(cols):
            continue  # header row
        try:
            out.append(_tsv_face(root, path, no, cols, split, dataset, seen, sizes))
        except DataError as err:
            errors.report(err)


def _tsv_face(
    root: Path,
    path: Path,
    no: int,
    cols: list[str],
    split: str,
    dataset: str | None,
    seen: dict[str, int],
    sizes: dict[Path, tuple[int, int]],
) -> FaceRecord:
    if len(cols) < 6:
        raise DataError(path, no, f"expected at least 6 tab-separated columns, found {len(cols)}")
    _floats_csv(cols[1], path, no, "reference points")
    flat = _floats_csv(cols[2], path, no, "landmarks")
    if len(flat) % 2:
        raise DataError(path, no, f"odd number of landmark values ({len(flat)})")
    points = flat.reshape(-1, 2)
    ds = dataset or _POINTS_TO_DATASET.get(len(points))
    if ds is None:
        raise DataError(path, no, f"{len(points)} landmarks match no known dataset; pass dataset=")
    scale = parse_float(cols[3].strip(), path, no, "scale")
    center = np.array([parse_float(c.strip(), path, no, "center") for c in cols[4:6]])
    tags = [_tag(t, path, no) for t in cols[6].split(",") if t.strip()] if len(cols) > 6 else []
    rel = clean_legacy_path(cols[0])
    img = _resolve_image(root, ds, rel)
    if img is None:
        raise DataError(path, no, f"image not found: {rel} (under {root})")
    if img not in sizes:
        sizes[img] = image_size(img)
    check_inside(points, sizes[img], path, no)
    check_center_scale(center, scale, sizes[img], path, no)
    attributes, subsets = _tsv_tags(ds, rel, tags)
    source = rel_path(img, root)
    index = seen.get(source, 0)
    seen[source] = index + 1
    return FaceRecord(
        sample_id=sample_id(ds, source, index),
        dataset=ds,
        split=split,
        subsets=subsets,
        source=source,
        group=photo_group(str(Path(rel).parent), Path(rel).stem) if ds == "300w" else source,
        landmarks=points,
        box=landmark_box(points),
        center=center,
        scale=scale,
        attributes=attributes,
        image=FileImage(str(img)),
        image_size=sizes[img],
    )


def _tag(token: str, path: Path, no: int) -> int:
    """A tag: an integer in the int32 range."""
    value = parse_float(token, path, no, "tag")
    if value != int(value) or abs(value) >= 2**31:
        raise DataError(path, no, f"tag {token!r} is not an integer in the int32 range")
    return int(value)


def _resolve_image(root: Path, dataset: str, rel: str) -> Path | None:
    for sub in (*_DATASET_IMAGE_DIRS.get(dataset, ()), ""):
        cand = root / sub / rel if sub else root / rel
        if cand.is_file():
            return cand
    return None


def _tsv_tags(dataset: str, rel: str, tags: list[int]) -> tuple[dict[str, int], tuple[str, ...]]:
    """WFLW tags are the six attribute flags; 300W subsets come from the image folder."""
    if dataset == "wflw" and len(tags) == len(WFLW_ATTRIBUTES):
        attrs = dict(zip(WFLW_ATTRIBUTES, tags))
        return attrs, tuple(k for k, v in attrs.items() if v)
    attrs = {f"tag{i}": v for i, v in enumerate(tags)}
    if dataset == "300w":
        for folder, _, subsets in W300_FOLDERS:
            if rel.startswith(folder + "/"):
                return attrs, subsets
    return attrs, ()

