"""Package layout and landmark layouts (method.md 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flare.models.layouts import COFW29, W300_68, WFLW98, cofw29, get_layout

ROOT = Path(__file__).resolve().parents[1]


def test_stdlib_platform_and_flare_platform_both_import_from_repo_root() -> None:
    code = (
        "import platform, sys; s = platform.system(); assert isinstance(s, str) and s, s;"
        "import flare.platform, flare.datasets, flare.models, flare.losses, flare.jobs;"
        "assert 'site-packages' not in platform.__file__ or True;"
        "assert not platform.__file__.startswith(sys.path[0] + '/platform'), platform.__file__;"
        "print(platform.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "/platform/" not in out.stdout  # the stdlib module file, not our folder
    for d in ("platform", "datasets", "models", "losses", "jobs"):
        assert not (ROOT / d / "__init__.py").exists(), f"{d}/__init__.py would shadow a module of that name"
    assert not (ROOT / "conftest.py").exists()


@pytest.mark.parametrize(
    "layout,n,e,pairs,self_mapped,norm",
    [(WFLW98, 98, 9, 44, 10, (60, 72)), (W300_68, 68, 9, 29, 10, (36, 45)), (COFW29, 29, 7, 11, 7, (16, 17))],
)
def test_layout_tables(layout, n, e, pairs, self_mapped, norm) -> None:
    assert layout.num_points == n and layout.num_edges == e
    perm = layout.flip_permutation()
    assert np.array_equal(perm[perm], np.arange(n)), "flip table must be an involution"
    flat = [i for p in layout.flip_pairs for i in p]
    assert len(flat) == len(set(flat)) == 2 * pairs, "no duplicates"
    assert int((perm == np.arange(n)).sum()) == self_mapped
    a, b = layout.normaliser_indices()
    assert (a[0], b[0]) == norm


def test_e2h_routing() -> None:
    r, bias = WFLW98.e2h_routing()
    assert r.shape == (98, 9)
    assert set(np.flatnonzero(bias)) == {96, 97}
    r, bias = COFW29.e2h_routing()
    assert set(np.flatnonzero(bias)) == {16, 17, 28}
    assert r[22].sum() == 2 and r[23].sum() == 2  # lips share 22 and 23
    assert W300_68.e2h_routing()[1].sum() == 0
    assert not cofw29().groups[3].closed and cofw29(left_eye_closed=True).groups[3].closed


def test_get_layout() -> None:
    assert get_layout(68) is W300_68 and get_layout("wflw98") is WFLW98
    with pytest.raises(KeyError, match="no layout with 5 points"):
        get_layout(5)
