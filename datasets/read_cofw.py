"""COFW (method.md 11.3): the ``COFW_{train,test}[_color].mat`` files and the ``cofw_samples.csv`` layout."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from flare.datasets.reader_common import (
    SPLITS,
    Errors,
    ReadResult,
    check_box,
    check_inside,
    image_under,
    parse_float,
    read_text_lines,
    rel_path,
    sample_id,
    wanted_splits,
)
from flare.datasets.records import ArrayImage, DataError, FaceRecord, FileImage, image_size

COFW_POINTS = 29


def read_cofw(
    root: str | Path, split: str | None = None, on_error: str = "fail", one_based: bool = True
) -> ReadResult:
    """Read ``COFW_{train,test}_color.mat`` (or the grey ``COFW_{train,test}.mat``).

    MATLAB v7.3 (HDF5) files are read with h5py (arrays transposed, images dereferenced from the
    cell array, transposed back to H×W(×C), RGB → BGR); older files with scipy.io.loadmat. phis
    columns: 29 x, 29 y, 29 occlusion flags; bboxes [x, y, w, h] become x0, y0, x1, y1. With
    ``one_based`` 1 is subtracted from the landmarks and the box corner. Images stay in memory.
    """
    root = Path(root).resolve()
    found = []
    for s in wanted_splits(split):
        cands = [root / f"COFW_{s}_color.mat", root / f"COFW_{s}.mat"]
        path = next((p for p in cands if p.is_file()), None)
        if path is None and split is not None:
            raise DataError(cands[0], "COFW .mat file not found")
        if path is not None:
            found.append((s, path))
    if not found:
        raise DataError(root, "no COFW_{train,test}[_color].mat file found")
    errors = Errors(on_error)
    records: list[FaceRecord] = []
    offset = 1.0 if one_based else 0.0
    for fsplit, path in found:
        images, phis, bboxes = _load_cofw_mat(path, fsplit)
        for i in range(len(images)):
            try:
                records.append(_cofw_face(path, i, images[i], phis[i], bboxes[i], fsplit, offset))
            except DataError as err:
                errors.report(err)
    return ReadResult(records, errors.skipped)


def _cofw_face(
    path: Path, i: int, raw: np.ndarray, phis: np.ndarray, bbox: np.ndarray, split: str, offset: float
) -> FaceRecord:
    where = f"{path}#{i}"
    pixels = _cofw_bgr(raw, where)
    if not (np.all(np.isfinite(phis)) and np.all(np.isfinite(bbox))):
        raise DataError(where, "non-finite value in phis or bboxes")
    points = np.stack([phis[:COFW_POINTS], phis[COFW_POINTS : 2 * COFW_POINTS]], axis=1) - offset
    if not np.all(np.isfinite(points)):
        raise DataError(where, "non-finite landmark")
    size = (pixels.shape[1], pixels.shape[0])
    check_inside(points, size, where, None)
    x, y, w, h = (float(v) for v in bbox)
    box = np.array([x - offset, y - offset, x - offset + w, y - offset + h])
    check_box(box, size, where, None)
    source = f"{path.name}#{i}"
    return FaceRecord(
        sample_id=sample_id("cofw", path.name, i),
        dataset="cofw",
        split=split,
        subsets=(),
        source=source,
        group=source,
        landmarks=points,
        box=box,
        occlusion=(phis[2 * COFW_POINTS : 3 * COFW_POINTS] > 0).astype(np.uint8),
        image=ArrayImage(pixels, source),
        image_size=size,
    )


def _cofw_bgr(raw: np.ndarray, where: str) -> np.ndarray:
    img = np.asarray(raw)
    if img.dtype != np.uint8:
        if not np.issubdtype(img.dtype, np.number) or img.size == 0:
            raise DataError(where, f"image has dtype {img.dtype}")
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.ndim != 3 or img.shape[2] not in (1, 3):
        raise DataError(where, f"image has shape {img.shape}, expected HxW or HxWx3")
    elif img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    else:
        img = img[:, :, ::-1]  # RGB -> BGR
    return np.ascontiguousarray(img)


def _pick_key(keys: Iterable[str], prefix: str, preferred: str, path: Path) -> str:
    keys = [k for k in keys if not k.startswith(("#", "__"))]
    if preferred in keys:
        return preferred
    cands = [k for k in keys if k.startswith(prefix)]
    if len(cands) != 1:
        raise DataError(path, f"cannot find the {prefix}* variable (variables: {sorted(keys)})")
    return cands[0]


def _load_cofw_mat(path: Path, split: str) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """(images as stored H×W(×3) RGB, phis (M, 87), bboxes (M, 4))."""
    import h5py

    suffix = "Tr" if split == "train" else "T"
    try:
        if h5py.is_hdf5(str(path)):
            with h5py.File(path, "r") as f:
                keys = list(f.keys())
                ik = _pick_key(keys, "Is", "Is" + suffix, path)
                pk = _pick_key(keys, "phis", "phis" + suffix, path)
                bk = _pick_key(keys, "bboxes", "bboxes" + suffix, path)
                phis = np.asarray(f[pk], dtype=np.float64).T
                bboxes = np.asarray(f[bk], dtype=np.float64).T
                images = [np.asarray(f[ref]).T for ref in np.asarray(f[ik]).ravel()]
        else:
            from scipy.io import loadmat

            mat = loadmat(str(path))
            ik = _pick_key(mat, "Is", "Is" + suffix, path)
            pk = _pick_key(mat, "phis", "phis" + suffix, path)
            bk = _pick_key(mat, "bboxes", "bboxes" + suffix, path)
            phis = _rows(np.asarray(mat[pk], dtype=np.float64), 3 * COFW_POINTS)
            bboxes = _rows(np.asarray(mat[bk], dtype=np.float64), 4)
            images = [np.asarray(im) for im in np.asarray(mat[ik], dtype=object).ravel()]
    except DataError:
        raise
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as exc:
        raise DataError(path, f"cannot read MAT file ({exc})") from exc
    if phis.ndim != 2 or phis.shape[1] != 3 * COFW_POINTS:
        raise DataError(path, f"phis has shape {phis.shape}, expected (M, {3 * COFW_POINTS})")
    if bboxes.ndim != 2 or bboxes.shape[1] != 4:
        raise DataError(path, f"bboxes has shape {bboxes.shape}, expected (M, 4)")
    if not len(images) == len(phis) == len(bboxes):
        raise DataError(path, f"{len(images)} images, {len(phis)} phis rows, {len(bboxes)} boxes")
    return images, phis, bboxes


def _rows(arr: np.ndarray, width: int) -> np.ndarray:
    """Classic MAT arrays are M×width; accept the transposed form too."""
    if arr.ndim == 2 and arr.shape[1] != width and arr.shape[0] == width:
        return arr.T
    return arr


def read_cofw_csv(
    root: str | Path, split: str | None = None, on_error: str = "fail", csv_name: str = "cofw_samples.csv"
) -> ReadResult:
    """Read the COFW sample layout: ``cofw_samples.csv`` (image, x0..x28, y0..y28, occluded0..28,
    x_min, y_min, x_max, y_max; already 0-based) next to the images. The faces are test faces
    unless a ``split`` column says otherwise."""
    root = Path(root).resolve()
    wanted = wanted_splits(split)
    path = root / csv_name
    lines = read_text_lines(path) if path.is_file() else None
    if lines is None:
        raise DataError(path, "CSV file not found")
    reader = csv.DictReader(lines)
    cols = reader.fieldnames or []
    n = sum(1 for c in cols if re.fullmatch(r"x\d+", c))
    need = ["image", *(f"{a}{k}" for a in ("x", "y") for k in range(n)), "x_min", "y_min", "x_max", "y_max"]
    missing = [c for c in need if c not in cols]
    if n == 0 or missing:
        raise DataError(path, 1, f"missing columns {missing or ['x0']}")
    errors = Errors(on_error)
    records: list[FaceRecord] = []
    seen: dict[str, int] = {}
    for row in reader:
        no = reader.line_num
        try:
            rec = _cofw_csv_face(root, path, no, row, n, seen)
        except DataError as err:
            errors.report(err)
            continue
        if rec.split in wanted:
            records.append(rec)
    return ReadResult(records, errors.skipped)


def _cofw_csv_face(root: Path, path: Path, no: int, row: dict, n: int, seen: dict[str, int]) -> FaceRecord:
    def num(col: str) -> float:
        return parse_float(row.get(col) or "", path, no, f"column {col}")

    points = np.array([[num(f"x{k}"), num(f"y{k}")] for k in range(n)])
    occ = None
    if all(f"occluded{k}" in row for k in range(n)):
        occ = np.array([num(f"occluded{k}") > 0 for k in range(n)], dtype=np.uint8)
    box = np.array([num(c) for c in ("x_min", "y_min", "x_max", "y_max")])
    split = (row.get("split") or "test").strip()
    if split not in SPLITS:
        raise DataError(path, no, f"unknown split {split!r}")
    img = image_under(root, (row.get("image") or "").strip(), path, no)
    size = image_size(img)
    check_inside(points, size, path, no)
    check_box(box, size, path, no)
    source = rel_path(img, root)
    index = seen.get(source, 0)
    seen[source] = index + 1
    return FaceRecord(
        sample_id=sample_id("cofw", source, index),
        dataset="cofw",
        split=split,
        subsets=(),
        source=source,
        group=source,
        landmarks=points,
        box=box,
        occlusion=occ,
        image=FileImage(str(img)),
        image_size=size,
    )

