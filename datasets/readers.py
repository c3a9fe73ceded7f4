"""Readers for the original benchmark file formats (method.md 11).

Every reader returns a :class:`ReadResult` ``(records, skipped)`` of :class:`FaceRecord` in 0-based
original-image pixels. Bad input raises :class:`DataError` naming the file (and line) with
``on_error="fail"``; with ``on_error="skip"`` the face is left out and ``(location, reason)`` is
appended to ``skipped``. Problems with the dataset root itself (nothing to read) always raise.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from flare.datasets.records import (
    ArrayImage,
    DataError,
    FaceRecord,
    FileImage,
    image_size,
    landmark_box,
)

__all__ = [
    "FORMATS",
    "SPLITS",
    "WFLW_ATTRIBUTES",
    "ReadResult",
    "clean_legacy_path",
    "parse_pts",
    "read_300w",
    "read_adnet",
    "read_cofw",
    "read_cofw_csv",
    "read_dataset",
    "read_wflw",
    "write_pts",
]

SPLITS = ("train", "test")
WFLW_ATTRIBUTES = ("pose", "expression", "illumination", "makeup", "occlusion", "blur")
FAR_OUTSIDE = 0.5  # a landmark more than this fraction of the image size beyond the border is an error
_IMAGE_EXTS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG", ".bmp")

# 300W folders (relative to the root): split and subsets (method.md 9.4, 11.2).
W300_FOLDERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("afw", "train", ("afw",)),
    ("helen/trainset", "train", ("helen",)),
    ("lfpw/trainset", "train", ("lfpw",)),
    ("helen/testset", "test", ("helen", "common", "full")),
    ("lfpw/testset", "test", ("lfpw", "common", "full")),
    ("ibug", "test", ("ibug", "challenge", "full")),
    ("300W/01_Indoor", "test", ("indoor",)),
    ("300W/02_Outdoor", "test", ("outdoor",)),
    ("01_Indoor", "test", ("indoor",)),
    ("02_Outdoor", "test", ("outdoor",)),
    ("indoor", "test", ("indoor",)),
    ("outdoor", "test", ("outdoor",)),
    ("synthetic/trainset", "train", ("synthetic",)),
    ("synthetic/testset", "test", ("synthetic",)),
)


class ReadResult(NamedTuple):
    """Records read, and ``(location, reason)`` for each face left out in skip mode."""

    records: list[FaceRecord]
    skipped: list[tuple[str, str]]


class _Errors:
    """Per-call error policy: raise (``"fail"``) or collect (``"skip"``)."""

    def __init__(self, on_error: str) -> None:
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
        self.fail = on_error == "fail"
        self.skipped: list[tuple[str, str]] = []

    def report(self, err: DataError) -> None:
        if self.fail:
            raise err
        self.skipped.append((err.location, err.reason))


def _splits(split: str | None) -> tuple[str, ...]:
    if split is None:
        return SPLITS
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    return (split,)


def _sample_id(dataset: str, rel: str, index: int) -> str:
    return f"{dataset}:{rel}#{index}"


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _float(token: str, path: Path | str, line: int | None, what: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise DataError(path, line, f"cannot parse {what} {token!r} as a number") from None
    if not np.isfinite(value):
        raise DataError(path, line, f"{what} {token!r} is not finite")
    return value


def _check_inside(points: np.ndarray, size: tuple[int, int], path: Path | str, line: int | None) -> None:
    """Reject landmarks more than FAR_OUTSIDE·(image size) beyond the image border."""
    w, h = size
    lo = -FAR_OUTSIDE * np.array([w, h])
    hi = np.array([w, h]) * (1.0 + FAR_OUTSIDE)
    bad = np.nonzero(((points < lo) | (points > hi)).any(axis=1))[0]
    if bad.size:
        k = int(bad[0])
        x, y = points[k]
        raise DataError(path, line, f"landmark {k} at ({x:.1f}, {y:.1f}) lies far outside the {w}x{h} image")


def _read_text_lines(path: Path) -> list[str]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise DataError(path, f"cannot read file ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text ({exc.reason})") from exc
    return text.splitlines()


# ----------------------------------------------------------------------------------------------
# 300W .pts (method.md 11.2)
# ----------------------------------------------------------------------------------------------


def parse_pts(path: str | Path, expected_points: int | None = 68, one_based: bool = True) -> np.ndarray:
    """Parse a .pts file, with or without the ``version/n_points/{ }`` header (LF or CRLF, blank
    lines and extra whitespace tolerated). Returns (N, 2) float64, 0-based when ``one_based``."""
    path = Path(path)
    lines = [(i + 1, s.strip()) for i, s in enumerate(_read_text_lines(path))]
    lines = [(i, s) for i, s in lines if s]
    if not lines:
        raise DataError(path, "empty .pts file")
    declared: int | None = None
    body = lines
    end_line = lines[-1][0]
    if not _looks_numeric(lines[0][1]):
        body, declared, end_line = _pts_header(path, lines)
    pts = _parse_xy_lines(path, body)
    if declared is not None and declared != len(pts):
        raise DataError(path, end_line, f"n_points is {declared} but {len(pts)} points follow")
    if expected_points is not None and len(pts) != expected_points:
        raise DataError(path, end_line, f"expected {expected_points} points, found {len(pts)}")
    return pts - 1.0 if one_based else pts


def _parse_xy_lines(path: Path, body: list[tuple[int, str]]) -> np.ndarray:
    """(N, 2) floats from ``x y`` lines; a bad line is reported with its number."""
    rows = [text.split() for _, text in body]
    try:
        if all(len(r) == 2 for r in rows):
            pts = np.array(rows, dtype=np.float64).reshape(-1, 2)
            if np.all(np.isfinite(pts)):
                return pts
    except ValueError:
        pass
    for (no, _), tokens in zip(body, rows):  # slow path: locate the offending line
        if len(tokens) != 2:
            raise DataError(path, no, f"expected 'x y', found {len(tokens)} values")
        for t in tokens:
            _float(t, path, no, "coordinate")
    raise AssertionError("unreachable")  # pragma: no cover


def _looks_numeric(text: str) -> bool:
    try:
        [float(t) for t in text.split()]
    except ValueError:
        return False
    return True


def _pts_header(path: Path, lines: list[tuple[int, str]]) -> tuple[list[tuple[int, str]], int, int]:
    """Split a headed .pts into its point lines, the declared count and the closing-brace line."""
    declared = None
    open_pos = next((k for k, (_, text) in enumerate(lines) if text == "{"), None)
    if open_pos is None:
        raise DataError(path, lines[-1][0], "missing '{' after the header")
    for no, text in lines[:open_pos]:
        key, sep, value = text.partition(":")
        key = key.strip().lower()
        if key == "n_points" and sep:
            try:
                declared = int(value.strip())
            except ValueError:
                raise DataError(path, no, f"cannot parse n_points from {text!r}") from None
        elif key != "version" or not sep:
            raise DataError(path, no, f"unexpected header line {text!r}")
    if declared is None:
        raise DataError(path, lines[open_pos][0], "header has no n_points")
    rest = lines[open_pos + 1 :]
    close = next((k for k, (_, text) in enumerate(rest) if text == "}"), None)
    if close is None:
        raise DataError(path, lines[-1][0], "missing closing '}'")
    body, trailer = rest[:close], rest[close + 1 :]
    if trailer:
        raise DataError(path, trailer[0][0], f"unexpected text after '}}': {trailer[0][1]!r}")
    return body, declared, rest[close][0]


def write_pts(path: str | Path, points: np.ndarray, one_based: bool = True) -> None:
    """Write (N, 2) 0-based points as a headed .pts file (1-based values when ``one_based``)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2) + (1.0 if one_based else 0.0)
    rows = "\n".join(f"{x:.3f} {y:.3f}" for x, y in pts)
    Path(path).write_text(f"version: 1\nn_points:  {len(pts)}\n{{\n{rows}\n}}\n")


def _find_image(stem_path: Path) -> Path | None:
    for ext in _IMAGE_EXTS:
        cand = stem_path.with_suffix(ext)
        if cand.is_file():
            return cand
    return None


_FACE_SUFFIX = re.compile(r"^(.+)_(\d{1,2})$")


def _photo_group(folder: str, stem: str) -> str:
    """Source-photo id: 300W names faces of one photo ``<photo>_<k>`` (AFW, HELEN, IBUG)."""
    m = _FACE_SUFFIX.match(stem)
    return f"{folder}/{m.group(1) if m else stem}"


def read_300w(
    root: str | Path, split: str | None = None, on_error: str = "fail", one_based: bool = True
) -> ReadResult:
    """Read the 300W folders (method.md 11.2) in sorted order. Splits and subsets follow
    :data:`W300_FOLDERS` (AFW + HELEN/LFPW train = train; HELEN/LFPW test = test "common";
    IBUG = test "challenge"; the official indoor/outdoor test folders = test)."""
    root = Path(root).resolve()
    wanted = _splits(split)
    present = [(rel, s, subs) for rel, s, subs in W300_FOLDERS if (root / rel).is_dir()]
    if not present:
        names = ", ".join(rel + "/" for rel, _, _ in W300_FOLDERS[:6])
        raise DataError(root, f"no 300W folders found (expected some of {names})")
    errors = _Errors(on_error)
    records: list[FaceRecord] = []
    for rel, fsplit, subsets in present:
        if fsplit not in wanted:
            continue
        for pts_path in sorted((root / rel).glob("*.pts")):
            try:
                records.append(_read_300w_face(root, rel, fsplit, subsets, pts_path, one_based))
            except DataError as err:
                errors.report(err)
    return ReadResult(records, errors.skipped)


def _read_300w_face(
    root: Path, rel: str, split: str, subsets: tuple[str, ...], pts_path: Path, one_based: bool
) -> FaceRecord:
    img = _find_image(pts_path)
    if img is None:
        raise DataError(pts_path, f"no image for {pts_path}")
    points = parse_pts(pts_path, 68, one_based)
    size = image_size(img)
    _check_inside(points, size, pts_path, None)
    source = _rel(img, root)
    return FaceRecord(
        sample_id=_sample_id("300w", source, 0),
        dataset="300w",
        split=split,
        subsets=subsets,
        source=source,
        group=_photo_group(rel, pts_path.stem),
        landmarks=points,
        box=landmark_box(points),
        image=FileImage(str(img)),
        image_size=size,
    )


# ----------------------------------------------------------------------------------------------
# WFLW (method.md 11.1)
# ----------------------------------------------------------------------------------------------

_WFLW_LIST_DIR = "WFLW_annotations/list_98pt_rect_attr_train_test"
_WFLW_TOKENS = 207


def read_wflw(root: str | Path, split: str | None = None, on_error: str = "fail") -> ReadResult:
    """Read ``list_98pt_rect_attr_{train,test}.txt`` with images under ``WFLW_images/``.

    With ``split=None`` every list present is read (at least one must exist). The box is the
    detection rectangle; the six attribute flags become ``attributes`` and ``subsets``.
    """
    root = Path(root).resolve()
    lists = [(s, root / _WFLW_LIST_DIR / f"list_98pt_rect_attr_{s}.txt") for s in _splits(split)]
    if split is None:
        lists = [(s, p) for s, p in lists if p.is_file()]
        if not lists:
            raise DataError(root / _WFLW_LIST_DIR, "no WFLW annotation list found")
    errors = _Errors(on_error)
    records: list[FaceRecord] = []
    sizes: dict[Path, tuple[int, int]] = {}
    for fsplit, list_path in lists:
        if not list_path.is_file():
            raise DataError(list_path, "annotation list not found")
        faces_per_image: dict[str, int] = {}
        for no, text in enumerate(_read_text_lines(list_path), start=1):
            tokens = text.split()
            if not tokens:
                continue
            try:
                rec = _wflw_face(root, list_path, no, tokens, fsplit, faces_per_image, sizes)
            except DataError as err:
                errors.report(err)
                continue
            records.append(rec)
    return ReadResult(records, errors.skipped)


def _wflw_face(
    root: Path,
    list_path: Path,
    no: int,
    tokens: list[str],
    split: str,
    faces_per_image: dict[str, int],
    sizes: dict[Path, tuple[int, int]],
) -> FaceRecord:
    if len(tokens) != _WFLW_TOKENS:
        raise DataError(list_path, no, f"expected {_WFLW_TOKENS} tokens, found {len(tokens)}")
    values = [_float(t, list_path, no, f"token {i + 1}") for i, t in enumerate(tokens[:206])]
    points = np.asarray(values[:196]).reshape(98, 2)
    box = np.asarray(values[196:200])
    flags = values[200:206]
    if any(f not in (0.0, 1.0) for f in flags):
        raise DataError(list_path, no, f"attribute flags must be 0 or 1, found {tokens[200:206]}")
    attributes = {name: int(f) for name, f in zip(WFLW_ATTRIBUTES, flags)}
    img_path = _image_under(root / "WFLW_images", tokens[206], list_path, no)
    if img_path not in sizes:
        sizes[img_path] = image_size(img_path)
    _check_inside(points, sizes[img_path], list_path, no)
    source = _rel(img_path, root)
    index = faces_per_image.get(source, 0)
    faces_per_image[source] = index + 1
    return FaceRecord(
        sample_id=_sample_id("wflw", source, index),
        dataset="wflw",
        split=split,
        subsets=tuple(name for name, v in attributes.items() if v),
        source=source,
        group=source,
        landmarks=points,
        box=box,
        attributes=attributes,
        image=FileImage(str(img_path)),
        image_size=sizes[img_path],
    )


def _image_under(base: Path, rel: str, ref_path: Path, line: int | None) -> Path:
    img = base / rel
    if not img.is_file():
        raise DataError(ref_path, line, f"image not found: {img}")
    return img


# ----------------------------------------------------------------------------------------------
# COFW (method.md 11.3)
# ----------------------------------------------------------------------------------------------

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
    for s in _splits(split):
        cands = [root / f"COFW_{s}_color.mat", root / f"COFW_{s}.mat"]
        path = next((p for p in cands if p.is_file()), None)
        if path is None and split is not None:
            raise DataError(cands[0], "COFW .mat file not found")
        if path is not None:
            found.append((s, path))
    if not found:
        raise DataError(root, "no COFW_{train,test}[_color].mat file found")
    errors = _Errors(on_error)
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
    points = np.stack([phis[:COFW_POINTS], phis[COFW_POINTS : 2 * COFW_POINTS]], axis=1) - offset
    if not np.all(np.isfinite(points)):
        raise DataError(where, "non-finite landmark")
    size = (pixels.shape[1], pixels.shape[0])
    _check_inside(points, size, where, None)
    x, y, w, h = (float(v) for v in bbox)
    source = f"{path.name}#{i}"
    return FaceRecord(
        sample_id=_sample_id("cofw", path.name, i),
        dataset="cofw",
        split=split,
        subsets=(),
        source=source,
        group=source,
        landmarks=points,
        box=np.array([x - offset, y - offset, x - offset + w, y - offset + h]),
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
    wanted = _splits(split)
    path = root / csv_name
    lines = _read_text_lines(path) if path.is_file() else None
    if lines is None:
        raise DataError(path, "CSV file not found")
    reader = csv.DictReader(lines)
    cols = reader.fieldnames or []
    n = sum(1 for c in cols if re.fullmatch(r"x\d+", c))
    need = ["image", *(f"{a}{k}" for a in ("x", "y") for k in range(n)), "x_min", "y_min", "x_max", "y_max"]
    missing = [c for c in need if c not in cols]
    if n == 0 or missing:
        raise DataError(path, 1, f"missing columns {missing or ['x0']}")
    errors = _Errors(on_error)
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
        return _float(row.get(col) or "", path, no, f"column {col}")

    points = np.array([[num(f"x{k}"), num(f"y{k}")] for k in range(n)])
    occ = None
    if all(f"occluded{k}" in row for k in range(n)):
        occ = np.array([num(f"occluded{k}") > 0 for k in range(n)], dtype=np.uint8)
    box = np.array([num(c) for c in ("x_min", "y_min", "x_max", "y_max")])
    split = (row.get("split") or "test").strip()
    if split not in SPLITS:
        raise DataError(path, no, f"unknown split {split!r}")
    img = _image_under(root, (row.get("image") or "").strip(), path, no)
    size = image_size(img)
    _check_inside(points, size, path, no)
    source = _rel(img, root)
    index = seen.get(source, 0)
    seen[source] = index + 1
    return FaceRecord(
        sample_id=_sample_id("cofw", source, index),
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


# ----------------------------------------------------------------------------------------------
# ADNet/STAR metadata .tsv (method.md 11.4)
# ----------------------------------------------------------------------------------------------

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
    return np.array([_float(t.strip(), path, line, what) for t in parts])


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
        jobs = [(s, root / f"{s}.tsv") for s in _splits(split)]
        if split is None:
            jobs = [(s, p) for s, p in jobs if p.is_file()] or jobs[:1]
    else:
        tsv_path = Path(tsv_path)
        fsplit = split or tsv_path.stem.lower()
        if fsplit not in SPLITS:
            raise ValueError(f"cannot infer the split from {tsv_path.name!r}; pass split='train' or 'test'")
        jobs = [(fsplit, tsv_path)]
    errors = _Errors(on_error)
    records: list[FaceRecord] = []
    for fsplit, path in jobs:
        if not path.is_file():
            raise DataError(path, "metadata file not found")
        _read_tsv(root, path, fsplit, dataset, errors, records)
    return ReadResult(records, errors.skipped)


def _read_tsv(
    root: Path, path: Path, split: str, dataset: str | None, errors: _Errors, out: list[FaceRecord]
) -> None:
    seen: dict[str, int] = {}
    sizes: dict[Path, tuple[int, int]] = {}
    for no, text in enumerate(_read_text_lines(path), start=1):
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
    scale = _float(cols[3].strip(), path, no, "scale")
    center = np.array([_float(c.strip(), path, no, "center") for c in cols[4:6]])
    tags = [int(_float(t, path, no, "tag")) for t in cols[6].split(",") if t.strip()] if len(cols) > 6 else []
    rel = clean_legacy_path(cols[0])
    img = _resolve_image(root, ds, rel)
    if img is None:
        raise DataError(path, no, f"image not found: {rel} (under {root})")
    if img not in sizes:
        sizes[img] = image_size(img)
    _check_inside(points, sizes[img], path, no)
    attributes, subsets = _tsv_tags(ds, rel, tags)
    source = _rel(img, root)
    index = seen.get(source, 0)
    seen[source] = index + 1
    return FaceRecord(
        sample_id=_sample_id(ds, source, index),
        dataset=ds,
        split=split,
        subsets=subsets,
        source=source,
        group=_photo_group(str(Path(rel).parent), Path(rel).stem) if ds == "300w" else source,
        landmarks=points,
        box=landmark_box(points),
        center=center,
        scale=scale,
        attributes=attributes,
        image=FileImage(str(img)),
        image_size=sizes[img],
    )


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


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------

FORMATS: dict[str, Callable[..., ReadResult]] = {
    "wflw": read_wflw,
    "300w": read_300w,
    "cofw": read_cofw,
    "cofw_csv": read_cofw_csv,
    "adnet": read_adnet,
}


def read_dataset(
    fmt: str, root: str | Path, split: str | None = None, on_error: str = "fail", **options
) -> ReadResult:
    """Read ``root`` with the reader for ``fmt`` (one of :data:`FORMATS`); ``options`` go to it
    (e.g. ``tsv_path=`` for ``adnet``, ``one_based=`` for ``300w``/``cofw``)."""
    key = fmt.lower()
    if key not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; known formats: {', '.join(sorted(FORMATS))}")
    return FORMATS[key](root, split=split, on_error=on_error, **options)
