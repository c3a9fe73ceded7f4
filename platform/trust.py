"""Whether a folder may be unpickled from: the rule ssh applies to keys, for a whole tree.

``flare tune --resume`` restores Ray's search state, which Ray loads with cloudpickle: whoever can write
that folder can run code as the user who resumes. :func:`check_trusted_tree` is called before it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["check_trusted_tree"]

_RULE = "only a tree that you own and that no one else can write is unpickled"


def _check_entry(entry: Path, root: Path, uid: int) -> None:
    st = entry.lstat()
    if st.st_uid != uid:
        raise ValueError(f"{entry}: owned by uid {st.st_uid}, not by you (uid {uid}); {_RULE}")
    if stat.S_ISLNK(st.st_mode):
        target = entry.resolve()
        if target != root and root not in target.parents:
            raise ValueError(f"{entry}: a symlink to {target}, outside {root}; {_RULE}")
        return
    writable = [who for who, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if st.st_mode & bit]
    if writable:
        raise ValueError(f"{entry}: writable by {' and '.join(writable)} (mode {stat.S_IMODE(st.st_mode):04o}); "
                         f"{_RULE}")


def check_trusted_tree(path: Path) -> None:
    """Raise ValueError (one line: which path, why) unless ``path`` and everything below it is owned by the
    current user, no directory or file in it is group- or world-writable, and no symlink in it points
    outside it. A ``path`` that is itself a symlink is checked where it points."""
    root = Path(path).expanduser().resolve()
    if not root.exists():
        raise ValueError(f"{path}: does not exist")
    uid = os.geteuid()
    _check_entry(root, root, uid)
    if not root.is_dir():
        return

    def unreadable(err: OSError) -> None:
        raise ValueError(f"{err.filename}: cannot be read ({err.strerror}); {_RULE}")

    for folder, dirs, files in os.walk(root, onerror=unreadable):
        for name in sorted(dirs + files):
            _check_entry(Path(folder) / name, root, uid)
