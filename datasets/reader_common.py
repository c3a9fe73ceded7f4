"""Helpers shared by the format readers: the result type, the error policy and checked number parsing.

Every check raises :class:`DataError` naming the file (and line) where the value was read.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from flare.datasets.records import DataError, FaceRecord, open_regular

SPLITS = ("train", "test")
FAR_OUTSIDE = 0.5  # a landmark more than this fraction of the image size beyond the border is an error
IMAGE_EXTS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG", ".bmp")


class ReadResult(NamedTuple):
    """Records read, and ``(location, reason)`` for each face left out in skip mode."""

    records: list[FaceRecord]
    skipped: list[tuple[str, str]]


class Errors:
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


def wanted_splits(split: str | None) -> tuple[str, ...]:
    """``(split,)`` or every split for None; anything else is a ValueError."""
    if split is None:
        return SPLITS
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    return (split,)


def sample_id(dataset: str, rel: str, index: int) -> str:
    return f"{dataset}:{rel}#{index}"


def rel_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (posix), or as given when it lies elsewhere."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def parse_float(token: str, path: Path | str, line: int | None, what: str) -> float:
    """A finite float, else DataError naming ``what`` at ``path:line``."""
    try:
        value = float(token)
    except ValueError:
        raise DataError(path, line, f"cannot parse {what} {token!r} as a number") from None
    if not np.isfinite(value):
        raise DataError(path, line, f"{what} {token!r} is not finite")
    return value


def check_inside(points: np.ndarray, size: tuple[int, int], path: Path | str, line: int | None,
                 what: str = "landmark") -> None:
    """Reject non-finite points and points more than FAR_OUTSIDE·(image size) beyond the border."""
    w, h = size
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    lo = -FAR_OUTSIDE * np.array([w, h])
    hi = np.array([w, h]) * (1.0 + FAR_OUTSIDE)
    bad = np.nonzero(~((pts >= lo) & (pts <= hi)).all(axis=1))[0]  # NaN fails both comparisons
    if bad.size:
        k = int(bad[0])
        x, y = (f"{v:.1f}" if abs(v) < 1e6 else f"{v:.3g}" for v in pts[k])
        raise DataError(path, line, f"{what} {k} at ({x}, {y}) lies far outside the {w}x{h} image")


def check_box(box: np.ndarray, size: tuple[int, int], path: Path | str, line: int | None) -> None:
    """A face box x0, y0, x1, y1: finite, x0 <= x1, y0 <= y1, corners near the image."""
    b = np.asarray(box, dtype=np.float64).reshape(4)
    check_inside(b.reshape(2, 2), size, path, line, what="box corner")
    if b[2] < b[0] or b[3] < b[1]:
        raise DataError(path, line, f"box ({b[0]:g}, {b[1]:g}, {b[2]:g}, {b[3]:g}) has a negative width or height")


def check_center_scale(center: np.ndarray, scale: float, size: tuple[int, int], path: Path | str,
                       line: int | None) -> None:
    """Metadata crop: the centre near the image and the box side (200·scale px) between 1 px and
    ten times the larger image side."""
    check_inside(np.asarray(center).reshape(1, 2), size, path, line, what="center")
    side = 200.0 * scale
    if not (np.isfinite(side) and 1.0 <= side <= 10.0 * max(size)):
        raise DataError(path, line, f"scale {scale:g} gives a {side:g} px face box on a {size[0]}x{size[1]} image "
                        f"(allowed 1 to {10 * max(size)} px)")


def read_text_lines(path: Path) -> list[str]:
    """UTF-8 (BOM tolerated) lines of a text file; DataError naming it when unreadable."""
    try:
        with open_regular(path) as fh:
            text = fh.read().decode("utf-8-sig")
    except OSError as exc:
        raise DataError(path, f"cannot read file ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text ({exc.reason})") from exc
    return text.splitlines()


def find_image(stem_path: Path) -> Path | None:
    """The image next to ``stem_path`` with one of IMAGE_EXTS, if any (FIFOs and the like are returned
    too, so that reading them fails with a reason)."""
    for ext in IMAGE_EXTS:
        cand = stem_path.with_suffix(ext)
        if cand.exists():
            return cand
    return None


def image_under(base: Path, rel: str, ref_path: Path, line: int | None) -> Path:
    """``base/rel`` when it exists, else DataError naming the referring file and line."""
    img = base / rel
    if not rel or not img.exists():
        raise DataError(ref_path, line, f"image not found: {img}")
    return img
