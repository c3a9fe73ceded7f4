"""300W ``.pts`` folders (method.md 11.2): the .pts parser/writer and the folder reader."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from flare.datasets.reader_common import (
    Errors,
    ReadResult,
    check_inside,
    find_image,
    parse_float,
    read_text_lines,
    rel_path,
    sample_id,
    wanted_splits,
)
from flare.datasets.records import DataError, FaceRecord, FileImage, image_size, landmark_box

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



def parse_pts(path: str | Path, expected_points: int | None = 68, one_based: bool = True) -> np.ndarray:
    """Parse a .pts file, with or without the ``version/n_points/{ }`` header (LF or CRLF, blank
    lines and extra whitespace tolerated). Returns (N, 2) float64, 0-based when ``one_based``."""
    path = Path(path)
    lines = [(i + 1, s.strip()) for i, s in enumerate(read_text_lines(path))]
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
            parse_float(t, path, no, "coordinate")
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



_FACE_SUFFIX = re.compile(r"^(.+)_(\d{1,2})$")


def photo_group(folder: str, stem: str) -> str:
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
    wanted = wanted_splits(split)
    present = [(rel, s, subs) for rel, s, subs in W300_FOLDERS if (root / rel).is_dir()]
    if not present:
        names = ", ".join(rel + "/" for rel, _, _ in W300_FOLDERS[:6])
        raise DataError(root, f"no 300W folders found (expected some of {names})")
    errors = Errors(on_error)
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
    img = find_image(pts_path)
    if img is None:
        raise DataError(pts_path, f"no image for {pts_path}")
    points = parse_pts(pts_path, 68, one_based)
    size = image_size(img)
    check_inside(points, size, pts_path, None)
    source = rel_path(img, root)
    return FaceRecord(
        sample_id=sample_id("300w", source, 0),
        dataset="300w",
        split=split,
        subsets=subsets,
        source=source,
        group=photo_group(rel, pts_path.stem),
        landmarks=points,
        box=landmark_box(points),
        image=FileImage(str(img)),
        image_size=size,
    )

