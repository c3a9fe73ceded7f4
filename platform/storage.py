"""Where Ray Train keeps a run's checkpoints: a local or shared filesystem path, or a URI that pyarrow
opens (``s3://bucket/runs``, ``gs://…``, ``file:///…``). Ray Train writes and restores checkpoints there
itself; these functions are the few places where flare reads that storage from the driver.

A path is made absolute on the driver (the workers run in another directory); a URI is kept as written.
S3 endpoints and credentials come from the usual environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
...), on every node.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from flare.platform.config import ConfigError, is_uri

DEFAULT = "runs"


SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")  # what pyarrow.fs opens


def resolve_storage(value: str | Path | None, option: str = "--storage") -> str:
    """``value`` (default ``./runs``) as an absolute local path, or a URI as written after a syntax check
    (pyarrow's scheme, a bucket, no query string); :func:`check_storage` then reaches it."""
    text = str(value) if value not in (None, "") else DEFAULT
    if not is_uri(text):
        return str(Path(text).expanduser().resolve())
    parts = urlsplit(text)
    if parts.scheme not in SCHEMES:
        raise ConfigError(f"{option} {text}: unknown scheme {parts.scheme!r}; pyarrow opens {', '.join(SCHEMES)}")
    if parts.query:
        raise ConfigError(f"{option} {text}: no query string; set the endpoint and credentials in the "
                          "environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) of every node")
    if parts.scheme != "file" and not parts.netloc:
        raise ConfigError(f"{option} {text}: name a bucket and a folder ({parts.scheme}://bucket/runs)")
    return text.rstrip("/")


def check_storage(storage: str, option: str = "--storage") -> None:
    """Reach a URI storage before training starts (endpoint, credentials, bucket), creating its folder;
    a failure is one line. Local paths are left to Ray Train, which creates them."""
    if not is_uri(storage):
        return
    try:
        fs, path = filesystem(storage)
        fs.create_dir(path, recursive=True)
    except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"{option} {storage}: {str(err).splitlines()[0]}") from None


def local_storage(value: str | Path | None) -> str:
    """:func:`resolve_storage` for a search: its state file, trials and checkpoints live on a filesystem
    path (shared by the nodes on a cluster); a URI is refused in one line."""
    path = resolve_storage(value)
    if is_uri(path):
        raise ConfigError(f"--storage {path}: a search keeps its state on a filesystem path (shared by the "
                          "nodes on a cluster); URIs are for flare train")
    return path


def join(storage: str, *parts: str) -> str:
    """``storage/part/...`` for a path or a URI."""
    return "/".join([storage.rstrip("/"), *parts])


def filesystem(uri: str):
    """The pyarrow filesystem and the path inside it of a path or URI."""
    import pyarrow.fs

    if not is_uri(uri):
        return pyarrow.fs.LocalFileSystem(), str(Path(uri).resolve())
    return pyarrow.fs.FileSystem.from_uri(uri)


def exists(uri: str) -> bool:
    """A file or directory at ``uri``."""
    import pyarrow.fs

    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def checkpoint_dirs(run: str) -> list[str]:
    """The ``checkpoint_*`` directories of a Ray Train run folder, oldest first (Ray names them by time)."""
    import pyarrow.fs

    fs, path = filesystem(run)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    except FileNotFoundError:
        return []
    names = sorted(i.base_name for i in infos
                   if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    return [join(run, n) for n in names]


def newest_checkpoint(run: str) -> str | None:
    """The newest complete checkpoint (one holding its state file) of a Ray Train run folder."""
    from flare.platform.checkpoints import STATE_FILE

    return next((d for d in reversed(checkpoint_dirs(run)) if exists(join(d, STATE_FILE))), None)


@contextlib.contextmanager
def local_dir(uri: str) -> Iterator[Path]:
    """A local directory holding what ``uri`` holds: a local path as it is, a remote one downloaded into a
    temporary directory that is removed afterwards."""
    if not is_uri(uri) or uri.startswith("file://"):
        yield Path(uri.removeprefix("file://"))
        return
    import pyarrow.fs

    fs, path = filesystem(uri)
    tmp = Path(tempfile.mkdtemp(prefix="flare-fetch-"))
    try:
        pyarrow.fs.copy_files(path, str(tmp), source_filesystem=fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
