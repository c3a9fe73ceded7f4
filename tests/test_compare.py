"""``flare runs compare`` pieces: convergence counts and the figures."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest

from flare.platform.compare import ced_compare, convergence, epochs_to_reach, val_plot

HIST = {
    "star": [(0, 0.20), (1, 0.10), (2, 0.06), (3, 0.050)],
    "rwsa": [(0, 0.15), (1, 0.0504), (2, 0.049), (3, 0.048)],
    "base": [(0, 0.30), (1, 0.20), (2, 0.12), (3, 0.09)],
}


def test_epochs_to_reach_counts_epochs_from_one() -> None:
    assert epochs_to_reach(HIST["star"], 0.06) == 3
    assert epochs_to_reach(HIST["star"], 0.2) == 1
    assert epochs_to_reach(HIST["star"], 0.01) is None


def test_convergence_against_the_reference_final_value() -> None:
    res = convergence(HIST, "star", margin=0.0005)
    assert res["target"] == pytest.approx(0.0505)
    assert res["epochs"] == {"star": 4, "rwsa": 2, "base": None}
    with pytest.raises(ValueError, match="nope"):
        convergence(HIST, "nope", 0.0005)


def test_figures_are_pngs(tmp_path: Path) -> None:
    img = cv2.imread(str(val_plot(HIST, tmp_path / "v.png")))
    assert img is not None and img.shape[0] > 100
    for name, vals in (("a", [0.01, 0.02, 0.2]), ("b", [0.03])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "nme.json").write_text(json.dumps({f"f{i}": v for i, v in enumerate(vals)}))
    assert cv2.imread(str(ced_compare({"a": tmp_path / "a", "b": tmp_path / "b"}, 0.05, tmp_path / "c.png"))) is not None
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "nme.json").write_text("{}")
    with pytest.raises(ValueError, match="no faces"):
        ced_compare({"e": tmp_path / "e"}, 0.05, tmp_path / "d.png")
