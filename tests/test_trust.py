"""check_trusted_tree on real files: owner, group/world-writable modes and symlinks leaving the tree."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from flare.platform.trust import check_trusted_tree


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """A search folder like Ray's: nested dirs, a pickled state file, a link inside the tree."""
    root = tmp_path / "search"
    (root / "trial_0" / "checkpoint_000").mkdir(parents=True)
    (root / "tuner.pkl").write_bytes(b"\x80\x05N.")
    (root / "trial_0" / "result.json").write_text("{}\n")
    (root / "trial_0" / "checkpoint_000" / "state.pt").write_bytes(b"weights")
    (root / "latest").symlink_to(root / "trial_0" / "checkpoint_000")
    for folder, dirs, files in os.walk(root):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(Path(folder) / name, 0o644)
    return root


def refused(path: Path) -> str:
    with pytest.raises(ValueError) as err:
        check_trusted_tree(path)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_own_tree_only_you_can_write_is_trusted(tree: Path) -> None:
    check_trusted_tree(tree)
    check_trusted_tree(tree / "tuner.pkl")  # a single file
    os.chmod(tree / "trial_0", 0o700)
    check_trusted_tree(tree)


@pytest.mark.parametrize(("mode", "who"), [(0o664, "group"), (0o646, "others"), (0o666, "group and others")])
def test_writable_file_is_refused(tree: Path, mode: int, who: str) -> None:
    target = tree / "trial_0" / "checkpoint_000" / "state.pt"
    os.chmod(target, mode)
    assert refused(tree).startswith(f"{target}: writable by {who} (mode {mode:04o}); ")


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o1777])
def test_writable_folder_is_refused(tree: Path, mode: int) -> None:
    os.chmod(tree / "trial_0", mode)
    assert refused(tree).startswith(f"{tree / 'trial_0'}: writable by ")
    os.chmod(tree / "trial_0", 0o755)
    os.chmod(tree, mode)  # the top folder itself
    assert refused(tree).startswith(f"{tree}: writable by ")


def test_symlink_out_of_the_tree_is_refused(tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.pkl"
    outside.write_bytes(b"\x80\x05N.")
    link = tree / "trial_0" / "params.pkl"
    link.symlink_to(outside)
    assert refused(tree) == f"{link}: a symlink to {outside}, outside {tree}; " \
        "only a tree that you own and that no one else can write is unpickled"
    link.unlink()
    link.symlink_to("../../missing-outside")  # dangling, relative, still outside
    assert refused(tree).startswith(f"{link}: a symlink to {tmp_path / 'missing-outside'}, outside {tree}")
    link.unlink()
    link.symlink_to(tmp_path)  # a folder above the tree
    assert refused(tree).startswith(f"{link}: a symlink to {tmp_path}, outside ")


def test_tree_given_as_symlink_is_checked_where_it_points(tree: Path, tmp_path: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(tree)
    check_trusted_tree(alias)
    os.chmod(tree / "tuner.pkl", 0o666)
    assert refused(alias).startswith(f"{tree / 'tuner.pkl'}: writable by group and others")


def test_tree_of_another_user_is_refused(tree: Path) -> None:
    if os.geteuid() == 0:  # root can hand a file to another user
        os.chown(tree / "trial_0" / "result.json", 65534, 65534)
        assert re.match(rf"{re.escape(str(tree / 'trial_0' / 'result.json'))}: owned by uid 65534, not by you "
                        r"\(uid 0\); ", refused(tree))
    else:  # a folder of root's
        assert re.match(rf"/: owned by uid 0, not by you \(uid {os.geteuid()}\); ", refused(Path("/")))


def test_missing_path_is_refused(tmp_path: Path) -> None:
    assert refused(tmp_path / "nope") == f"{tmp_path / 'nope'}: does not exist"
