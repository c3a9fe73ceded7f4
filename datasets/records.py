"""Face records shared by all readers (method.md 11) and the generated-metadata crop rule (8.1).

A :class:`FaceRecord` holds one annotated face in **0-based original-image pixels** (method.md 1.1)
and knows how to produce its image as BGR uint8 (method.md 1.5). Records are plain picklable data,
so they can be shipped to Ray workers.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

import cv2
import numpy as np

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ArrayImage",
    "DataError",
    "FaceRecord",
    "FileImage",
    "ImageSource",
    "check_image_file",
    "check_pixels",
    "crop_center_scale",
    "image_size",
    "landmark_box",
    "open_regular",
    "read_image_bgr",
]

DEFAULT_MAX_PIXELS = 50_000_000  # 50 MP: a header claiming more is refused before decoding


class DataError(ValueError):
    """Bad input data: a file, an optional 1-based line number and the reason.

    Call as ``DataError(path, line, reason)`` (``line`` may be None) or ``DataError(path, reason)``.
    ``str(err)`` is one line: ``"<path>:<line>: <reason>"`` or ``"<path>: <reason>"``.
    """

    def __init__(self, path: str | Path, line: int | str | None = None, reason: str | None = None) -> None:
        if reason is None and isinstance(line, str):
            line, reason = None, line
        self.path = str(path)
        self.line = None if line is None else int(line)
        self.reason = " ".join(str(reason or "invalid data").split())
        super().__init__(self.location + ": " + self.reason)

    @property
    def location(self) -> str:
        """``"<path>:<line>"`` or ``"<path>"``."""
        return f"{self.path}:{self.line}" if self.line is not None else self.path

    def __reduce__(self):  # keeps the exception picklable (Ray re-raises it in the driver)
        return (DataError, (self.path, self.line, self.reason))


# ----------------------------------------------------------------------------------------------
# Image access
# ----------------------------------------------------------------------------------------------


def read_image_bgr(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file to BGR uint8 H×W×3 (grey is replicated to 3 channels, alpha dropped).

    The header is checked first (:func:`check_image_file`): a non-regular file or an image over
    ``max_pixels`` is refused before any pixel is decoded. Raises :class:`DataError` naming the file.
    """
    with open_regular(path) as fh:
        w, h = _header_size(fh, path)
        check_pixels(path, w, h, max_pixels)
        fh.seek(0)
        try:
            data = np.frombuffer(fh.read(), dtype=np.uint8)
        except OSError as exc:
            raise DataError(path, f"cannot read image file ({exc.strerror or exc})") from exc
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise DataError(path, "corrupt or unsupported image file")
    return _to_bgr_u8(img, path)


def _to_bgr_u8(img: np.ndarray, path: str | Path) -> np.ndarray:
    if img.dtype != np.uint8:
        if img.dtype == np.uint16:
            img = (img >> 8).astype(np.uint8)
        else:
            raise DataError(path, f"unsupported image dtype {img.dtype}")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.ndim == 3 and img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2BGR)
    if img.ndim == 3 and img.shape[2] == 4:
        return np.ascontiguousarray(img[:, :, :3])
    if img.ndim == 3 and img.shape[2] == 3:
        return np.ascontiguousarray(img)
    raise DataError(path, f"unsupported image shape {img.shape}")


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _file_kind(mode: int) -> str | None:
    """What a non-regular file is (None for a regular file)."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device file"),
                       (stat.S_ISBLK, "a device file"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "not a regular file"


def open_regular(path: str | Path) -> BinaryIO:
    """Open ``path`` for binary reading, refusing (DataError) anything but a regular file: FIFOs,
    directories and device files are checked with ``stat`` before opening and ``fstat`` after, and the
    open never blocks."""
    try:
        kind = _file_kind(os.stat(path).st_mode)
        if kind is None:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise DataError(path, f"cannot read file ({exc.strerror or exc})") from exc
    if kind is None:
        kind = _file_kind(os.fstat(fd).st_mode)  # swapped for something else since the stat
        if kind is None:
            return os.fdopen(fd, "rb")
        os.close(fd)
    raise DataError(path, f"is {kind}, not a regular file")


def check_pixels(path: str | Path, w: int, h: int, max_pixels: int | None) -> None:
    """DataError naming ``path`` when a ``w`` x ``h`` image exceeds ``max_pixels`` (None: no cap)."""
    if max_pixels is not None and w * h > max_pixels:
        raise DataError(path, f"image is {w}x{h} ({w * h / 1e6:.3g} MP), over the {max_pixels / 1e6:.3g} MP "
                        "cap (--max-pixels)")


def check_image_file(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Check an image file without decoding it and return its (width, height).

    Raises :class:`DataError` naming the file when it is not a regular file (FIFO, directory, device),
    has no readable PNG/JPEG/BMP/GIF/WebP header, or holds more than ``max_pixels`` pixels (None: no cap).
    """
    with open_regular(path) as fh:
        w, h = _header_size(fh, path)
    check_pixels(path, w, h, max_pixels)
    return w, h


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding and without a pixel cap."""
    return check_image_file(path, None)


def _header_size(fh: BinaryIO, path: str | Path) -> tuple[int, int]:
    """(width, height) from a PNG, BMP, JPEG, GIF or WebP header; DataError for anything else."""
    try:
        head = fh.read(32)
        if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
            w, h = struct.unpack(">II", head[16:24])
            return _checked_size(path, w, h)
        if head[:2] == b"BM" and len(head) >= 26:
            w, h = struct.unpack("<ii", head[18:26])
            return _checked_size(path, w, abs(h))
        if head[:2] == b"\xff\xd8":
            fh.seek(2)
            return _jpeg_size(fh, path)
        if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
            w, h = struct.unpack("<HH", head[6:10])
            return _checked_size(path, w, h)
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
            return _webp_size(head, path)
    except OSError as exc:
        raise DataError(path, f"cannot read image file ({exc.strerror or exc})") from exc
    raise DataError(path, "corrupt or unsupported image file (no PNG, JPEG, BMP, GIF or WebP header)")


def _webp_size(head: bytes, path: str | Path) -> tuple[int, int]:
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", head[26:30])
        return _checked_size(path, w & 0x3FFF, h & 0x3FFF)
    if chunk == b"VP8L" and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return _checked_size(path, (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":
        w = int.from_bytes(head[24:27], "little") + 1
        h = int.from_bytes(head[27:30], "little") + 1
        return _checked_size(path, w, h)
    raise DataError(path, "corrupt WebP header")


def _checked_size(path: str | Path, w: int, h: int) -> tuple[int, int]:
    if w <= 0 or h <= 0:
        raise DataError(path, f"corrupt image header (size {w}x{h})")
    return int(w), int(h)


def _jpeg_size(fh, path: str | Path) -> tuple[int, int]:
    """Walk the JPEG marker segments up to the first start-of-frame."""
    while True:
        byte = fh.read(1)
        if not byte:
            raise DataError(path, "corrupt JPEG: no frame header")
        if byte != b"\xff":
            raise DataError(path, "corrupt JPEG: bad marker")
        marker = fh.read(1)
        while marker == b"\xff":
            marker = fh.read(1)
        if not marker:
            raise DataError(path, "corrupt JPEG: truncated")
        code = marker[0]
        if code == 0x01 or 0xD0 <= code <= 0xD9:
            continue
        seg = fh.read(2)
        if len(seg) < 2:
            raise DataError(path, "corrupt JPEG: truncated")
        length = struct.unpack(">H", seg)[0]
        if code in _JPEG_SOF:
            body = fh.read(5)
            if len(body) < 5:
                raise DataError(path, "corrupt JPEG: truncated frame header")
            h, w = struct.unpack(">HH", body[1:5])
            return _checked_size(path, w, h)
        if length < 2:
            raise DataError(path, "corrupt JPEG: bad segment length")
        fh.seek(length - 2, 1)


@runtime_checkable
class ImageSource(Protocol):
    """Anything that can produce the face's image as BGR uint8 H×W×3."""

    def load(self) -> np.ndarray: ...


@dataclass(frozen=True)
class FileImage:
    """An image file on disk (absolute path)."""

    path: str

    def load(self) -> np.ndarray:
        return read_image_bgr(self.path)


@dataclass(frozen=True, eq=False)
class ArrayImage:
    """An image held in memory (COFW .mat entries), already BGR uint8 H×W×3."""

    pixels: np.ndarray
    name: str = "<array>"

    def load(self) -> np.ndarray:
        return self.pixels.copy()


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class FaceRecord:
    """One annotated face in 0-based original-image pixels (method.md 1.1, 11).

    ``sample_id`` is ``"<dataset>:<relative path>#<face index>"``; ``group`` names the source image
    (faces of one image share it, method.md 9.6); ``source`` is the image path relative to the
    dataset root (or ``"<mat file>#<index>"``); ``box`` is x0, y0, x1, y1 (the dataset's own box when
    it has one, else the landmark extent); ``center``/``scale`` come from ADNet/STAR metadata only.
    """

    sample_id: str
    dataset: str
    split: str
    subsets: tuple[str, ...]
    source: str
    group: str
    landmarks: np.ndarray
    box: np.ndarray
    center: np.ndarray | None = None
    scale: float | None = None
    attributes: dict[str, int] = field(default_factory=dict)
    occlusion: np.ndarray | None = None
    image: ImageSource | None = None
    image_size: tuple[int, int] | None = None  # (width, height) when known

    def __post_init__(self) -> None:
        self.landmarks = np.asarray(self.landmarks, dtype=np.float64).reshape(-1, 2)
        self.box = np.asarray(self.box, dtype=np.float64).reshape(4)
        self.subsets = tuple(self.subsets)
        if self.center is not None:
            self.center = np.asarray(self.center, dtype=np.float64).reshape(2)
        if self.scale is not None:
            self.scale = float(self.scale)
        if self.occlusion is not None:
            self.occlusion = np.asarray(self.occlusion, dtype=np.uint8).reshape(len(self.landmarks))

    @property
    def num_points(self) -> int:
        return int(self.landmarks.shape[0])

    def load_image(self) -> np.ndarray:
        """The face's image, BGR uint8 H×W×3. Raises :class:`DataError` naming the file."""
        if self.image is None:
            raise DataError(self.source, "record has no image source")
        return self.image.load()


def landmark_box(points: np.ndarray) -> np.ndarray:
    """Landmark extent x0, y0, x1, y1 of an (N, 2) array."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return np.concatenate([pts.min(axis=0), pts.max(axis=0)])


def crop_center_scale(
    record: FaceRecord,
    enlarge: float = 1.05,
    side_rule: str = "min",
    box_source: str = "landmarks",
    use_metadata: bool = True,
) -> tuple[np.ndarray, float]:
    """Crop centre (2,) and scale (box side = 200·scale px) of a face (method.md 8.1).

    Metadata centre/scale are returned when present (and ``use_metadata``). Otherwise: box = the
    landmark extent (``box_source="landmarks"``) or the record's own box (``"box"``, also spelled
    ``"rect"``/``"bbox"``), centre = box centre, scale = enlarge·side/200 with side = min (or max)
    of the box width and height.
    """
    if use_metadata and record.center is not None and record.scale is not None:
        return record.center.copy(), float(record.scale)
    if box_source == "landmarks":
        box = landmark_box(record.landmarks)
    elif box_source in ("box", "rect", "bbox"):
        box = record.box
    else:
        raise ValueError(f"box_source must be 'landmarks' or 'box', got {box_source!r}")
    w, h = box[2] - box[0], box[3] - box[1]
    if side_rule == "min":
        side = min(w, h)
    elif side_rule == "max":
        side = max(w, h)
    else:
        raise ValueError(f"side_rule must be 'min' or 'max', got {side_rule!r}")
    center = np.array([(box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0])
    return center, float(enlarge * side / 200.0)
