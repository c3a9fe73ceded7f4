"""WFLW annotation lists (method.md 11.1): 98 points, detection box and six attribute flags per line."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flare.datasets.reader_common import (
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
from flare.datasets.records import DataError, FaceRecord, FileImage, image_size

WFLW_ATTRIBUTES = ("pose", "expression", "illumination", "makeup", "occlusion", "blur")
_WFLW_LIST_DIR = "WFLW_annotations/list_98pt_rect_attr_train_test"
_WFLW_TOKENS = 207


def read_wflw(root: str | Path, split: str | None = None, on_error: str = "fail") -> ReadResult:
    """Read ``list_98pt_rect_attr_{train,test}.txt`` with images under ``WFLW_images/``.

    With ``split=None`` every list present is read (at least one must exist). The box is the
    detection rectangle; the six attribute flags become ``attributes`` and ``subsets``.
    """
    root = Path(root).resolve()
    lists = [(s, root / _WFLW_LIST_DIR / f"list_98pt_rect_attr_{s}.txt") for s in wanted_splits(split)]
    if split is None:
        lists = [(s, p) for s, p in lists if p.is_file()]
        if not lists:
            raise DataError(root / _WFLW_LIST_DIR, "no WFLW annotation list found")
    errors = Errors(on_error)
    records: list[FaceRecord] = []
    sizes: dict[Path, tuple[int, int]] = {}
    for fsplit, list_path in lists:
        if not list_path.is_file():
            raise DataError(list_path, "annotation list not found")
        faces_per_image: dict[str, int] = {}
        for no, text in enumerate(read_text_lines(list_path), start=1):
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
    values = [parse_float(t, list_path, no, f"token {i + 1}") for i, t in enumerate(tokens[:206])]
    points = np.asarray(values[:196]).reshape(98, 2)
    box = np.asarray(values[196:200])
    flags = values[200:206]
    if any(f not in (0.0, 1.0) for f in flags):
        raise DataError(list_path, no, f"attribute flags must be 0 or 1, found {tokens[200:206]}")
    attributes = {name: int(f) for name, f in zip(WFLW_ATTRIBUTES, flags)}
    img_path = image_under(root / "WFLW_images", tokens[206], list_path, no)
    if img_path not in sizes:
        sizes[img_path] = image_size(img_path)
    check_inside(points, sizes[img_path], list_path, no)
    check_box(box, sizes[img_path], list_path, no)
    source = rel_path(img_path, root)
    index = faces_per_image.get(source, 0)
    faces_per_image[source] = index + 1
    return FaceRecord(
        sample_id=sample_id("wflw", source, index),
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

