"""File helpers shared by every layer: atomic writes (temp file in the same directory, then rename) and
output directories that are replaced only when flare wrote them (marker file ``.flare-output``)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

MARKER = ".flare-output"


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the process umask (``mkstemp``'s own is 0o600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and a rename; the file gets the mode a
    plain ``open()`` would give it (an exported model must be readable by whoever serves it)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_marker(directory: Path, written_by: str) -> None:
    """Mark ``directory`` as flare output (``.flare-output``: JSON naming the command that wrote it)."""
    atomic_write_bytes(Path(directory) / MARKER, (json.dumps({"written_by": written_by}) + "\n").encode())


def has_marker(directory: Path) -> bool:
    """True when ``directory`` holds a regular ``.flare-output`` file that names what wrote it."""
    path = Path(directory) / MARKER
    if path.is_symlink() or not path.is_file():
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and str(data.get("written_by", "")).startswith("flare")


def _within(path: Path, ancestor: Path) -> bool:
    return path == ancestor or ancestor in path.parents


def check_replaceable(
    out: Path, inputs: Iterable[Path] = (), overwrite: bool = False,
    owned: Callable[[Path], bool] | None = None,
) -> None:
    """Raise unless ``out`` may be (re)written: absent, or ``overwrite`` and it is a directory flare wrote
    (marker, or ``owned(out)``) or an empty one, and it is neither, nor lies above, an input, the working
    directory, the home directory or ``/``. Errors are one line naming ``out`` and the reason."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it whole")
    if out.is_symlink() or not out.is_dir():
        raise FileExistsError(f"{out} is not a directory flare wrote (a file or link); refusing to replace it")
    real = out.resolve()
    guarded = [(Path("/"), "the file-system root")] + [(Path(p).resolve(), f"the input {p}") for p in inputs]
    guarded += [(Path.cwd().resolve(), "the working directory"), (Path.home().resolve(), "the home directory")]
    for path, what in guarded:
        if _within(path, real):
            where = "is" if path == real else "contains"
            raise ValueError(f"{out} {where} {what}; refusing to replace it with --overwrite")
    if not (has_marker(out) or (owned is not None and owned(out)) or not any(out.iterdir())):
        raise FileExistsError(f"{out} was not written by flare (no {MARKER}) and is not empty; "
                              "refusing to replace it (remove it yourself or choose another --out)")


def new_temp_dir(out: Path) -> Path:
    """A fresh hidden directory beside ``out`` (same file system, so the final rename is atomic)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def replace_dir(
    tmp: Path, out: Path, overwrite: bool, inputs: Iterable[Path] = (), written_by: str = "flare",
    owned: Callable[[Path], bool] | None = None,
) -> None:
    """Mark the finished ``tmp`` as flare output and swap it in for ``out``: the old directory is renamed
    aside, ``tmp`` renamed into place, and only then the old one removed, so a failure keeps the old data.
    ``out`` must pass :func:`check_replaceable`; ``tmp`` is left to the caller on error."""
    tmp, out = Path(tmp), Path(out)
    inputs = list(inputs)
    check_replaceable(out, inputs, overwrite, owned)
    write_marker(tmp, written_by)
    if not out.exists():
        os.rename(tmp, out)  # an empty directory created meanwhile is replaced; a non-empty one raises
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, trash / out.name)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(trash / out.name, out)
        trash.rmdir()
        raise
    shutil.rmtree(trash, ignore_errors=True)  # the new output is in place; a leftover is only hidden clutter


def move_dir(src: Path, dest: Path) -> None:
    """Rename ``src`` to ``dest`` (absent); across file systems (a tmpfs ``/tmp``, a ``TMPDIR`` elsewhere),
    where a rename fails with EXDEV, copy into a hidden sibling of ``dest``, rename that, then remove ``src``:
    ``dest`` never appears half-written."""
    src, dest = Path(src), Path(dest)
    try:
        os.rename(src, dest)
        return
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
    part = new_temp_dir(dest)
    try:
        shutil.copytree(src, part, dirs_exist_ok=True)
        os.rename(part, dest)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    shutil.rmtree(src)
