"""Readers for the original benchmark file formats (method.md 11), one module per format.

Every reader returns a :class:`ReadResult` ``(records, skipped)`` of :class:`FaceRecord` in 0-based
original-image pixels. Bad input raises :class:`DataError` naming the file (and line) with
``on_error="fail"``; with ``on_error="skip"`` the face is left out and ``(location, reason)`` is
appended to ``skipped``. Problems with the dataset root itself (nothing to read) always raise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flare.datasets.read_300w import W300_FOLDERS, parse_pts, read_300w, write_pts
from flare.datasets.read_adnet import clean_legacy_path, read_adnet
from flare.datasets.read_cofw import COFW_POINTS, read_cofw, read_cofw_csv
from flare.datasets.read_wflw import WFLW_ATTRIBUTES, read_wflw
from flare.datasets.reader_common import FAR_OUTSIDE, SPLITS, ReadResult

__all__ = [
    "COFW_POINTS",
    "FAR_OUTSIDE",
    "FORMATS",
    "SPLITS",
    "W300_FOLDERS",
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
