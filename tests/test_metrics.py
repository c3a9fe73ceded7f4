"""NME, Simpson, CED/FR/AUC and evaluate() (method.md 9.1-9.2) against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flare.models.layouts import COFW29, W300_68, WFLW98
from flare.models.metrics import ced_curve, ced_fr_auc, evaluate, nme_per_face, simpson


def faces_300w(m: int, iod: float) -> np.ndarray:
    """m faces of 68 random points with outer eye corners 36/45 exactly ``iod`` apart (a 3-4-5 direction)."""
    rng = np.random.default_rng(0)
    gt = rng.uniform(0, 200, size=(m, 68, 2))
    gt[:, 36] = (100.0, 100.0)
    gt[:, 45] = (100.0 + 0.6 * iod, 100.0 + 0.8 * iod)
    return gt


def simpson_weights(n: int, h: float) -> np.ndarray:
    """Uniform composite Simpson weights h/3·[1, 4, 2, 4, ..., 4, 1] for an odd count n."""
    w = np.full(n, 2.0)
    w[1::2] = 4.0
    w[0] = w[-1] = 1.0
    return w * h / 3.0


def ref_fr_auc_clean(nmes: list[float], t: float) -> tuple[float, float]:
    """Plain reference for the clean grid (t/1e-4 even, so an odd count)."""
    n = round(t / 1e-4) + 1
    xs = [t * k / (n - 1) for k in range(n)]
    ced = np.array([sum(1 for e in nmes if e <= x) / len(nmes) for x in xs])
    return 1.0 - ced[-1], float(np.dot(simpson_weights(n, t / (n - 1)), ced)) / t


# ---------------------------------------------------------------------------------------------------------------
# NME
# ---------------------------------------------------------------------------------------------------------------


def test_nme_constant_offset_inter_ocular() -> None:
    gt = faces_300w(3, iod=50.0)
    pred = gt + np.array([3.0, 4.0])  # every point 5 px off; 5/50 = 0.1
    np.testing.assert_allclose(nme_per_face(pred, gt, W300_68), [0.1, 0.1, 0.1], rtol=1e-12)
    # torch input, float32
    out = nme_per_face(torch.tensor(pred, dtype=torch.float32), torch.tensor(gt, dtype=torch.float32), W300_68)
    assert isinstance(out, np.ndarray) and out.shape == (3,)
    np.testing.assert_allclose(out, 0.1, rtol=1e-5)


def test_nme_inter_pupil_uses_means_of_index_lists() -> None:
    gt = np.zeros((1, 68, 2))
    gt[0, 36:42] = [[-1, 0], [1, 0], [0, 1], [0, -1], [2, 2], [-2, -2]]  # mean (0, 0)
    gt[0, 42:48] = [[60, 80]] * 6 + np.array([[1, 0], [-1, 0], [0, 3], [0, -3], [0, 0], [0, 0]])  # mean (60, 80)
    pred = gt.copy()
    pred[0, 0] += (6.8, 0.0)  # one point off by 6.8 px: NME = 6.8 / 68 / 100
    assert nme_per_face(pred, gt, W300_68, "inter_pupil")[0] == pytest.approx(0.001, rel=1e-12)
    # the default (inter-ocular) uses the single points gt[36] = (-1, 0) and gt[45] = (60, 77)
    assert nme_per_face(pred, gt, W300_68)[0] == pytest.approx(6.8 / 68 / np.hypot(61, 77), rel=1e-12)


def test_nme_layout_defaults_and_errors() -> None:
    gt = np.zeros((1, 98, 2))
    gt[0, 60] = (10, 10)
    gt[0, 72] = (50, 40)  # 50 apart
    gt[0, 96] = (20, 10)
    gt[0, 97] = (45, 10)  # 25 apart
    pred = gt + (0.0, 1.0)
    assert nme_per_face(pred, gt, WFLW98)[0] == pytest.approx(1 / 50)
    assert nme_per_face(pred, gt, WFLW98, "inter_pupil")[0] == pytest.approx(1 / 25)
    cofw = np.zeros((1, 29, 2))
    cofw[0, 16] = (0, 0)
    cofw[0, 17] = (0, 40)  # COFW default: inter-pupil 16/17
    assert nme_per_face(cofw + (2.0, 0.0), cofw, COFW29)[0] == pytest.approx(2 / 40)
    with pytest.raises(ValueError):
        nme_per_face(pred, gt, W300_68)  # 98 points vs a 68-point layout
    with pytest.raises(ValueError):
        nme_per_face(np.zeros((1, 29, 2)), np.zeros((1, 29, 2)), COFW29)  # zero normaliser
    with pytest.raises(KeyError):
        nme_per_face(pred, gt, WFLW98, "inter_canthal")


# ---------------------------------------------------------------------------------------------------------------
# Simpson
# ---------------------------------------------------------------------------------------------------------------


def test_simpson_exact_for_odd_counts() -> None:
    x = np.linspace(0, 2, 5)
    assert simpson(x**2, x) == pytest.approx(8 / 3, abs=1e-14)
    x = np.linspace(0, 1, 11)
    assert simpson(x**3, x) == pytest.approx(0.25, abs=1e-14)
    xi = np.array([0.0, 0.3, 1.0, 1.1, 2.0])  # irregular spacing: still exact for quadratics
    assert simpson(3 * xi**2 - xi + 2, xi) == pytest.approx(8 - 2 + 4, abs=1e-12)


def test_simpson_even_count_rules_by_hand() -> None:
    x = np.arange(4.0)
    # avg: [Simpson(0..2) + trap(2..3)] = 4 + 17.5 and [trap(0..1) + Simpson(1..3)] = 0.5 + 20 -> 21
    assert simpson(x**3, x, even="avg") == pytest.approx(21.0, abs=1e-12)
    # x^2: (8/3 + 6.5) and (0.5 + 26/3) -> 55/6
    assert simpson(x**2, x, even="avg") == pytest.approx(55 / 6, abs=1e-12)
    # Cartwright (h = 1): Simpson(0..2) + 5/12·y3 + 2/3·y2 − 1/12·y1; exact for quadratics
    assert simpson(x**3, x, even="cartwright") == pytest.approx(4 + 27 * 5 / 12 + 8 * 2 / 3 - 1 / 12, abs=1e-12)
    assert simpson(x**2, x, even="cartwright") == pytest.approx(9.0, abs=1e-12)
    assert simpson([1.0, 3.0], [0.0, 2.0]) == pytest.approx(4.0)  # two points: trapezoid
    with pytest.raises(ValueError):
        simpson(x, x, even="first")


def test_simpson_cartwright_matches_modern_scipy() -> None:
    integrate = pytest.importorskip("scipy.integrate")
    rng = np.random.default_rng(4)
    for n in (4, 6, 9, 30):
        x = np.sort(rng.uniform(0, 3, n))
        y = rng.normal(size=n)
        assert simpson(y, x, even="cartwright") == pytest.approx(integrate.simpson(y, x=x), abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# CED, FR, AUC
# ---------------------------------------------------------------------------------------------------------------


def test_parity_grid_lengths() -> None:
    r10 = ced_fr_auc(np.zeros(3), 0.1, mode="parity")
    assert len(r10.xs) == 1001 and r10.xs[-1] == pytest.approx(0.1, abs=1e-15)
    r05 = ced_fr_auc(np.zeros(3), 0.05, mode="parity")
    assert len(r05.xs) == 502 and r05.xs[-1] == pytest.approx(0.0501, abs=1e-12)
    c05 = ced_fr_auc(np.zeros(3), 0.05, mode="clean")
    assert len(c05.xs) == 501 and c05.xs[-1] == 0.05


def test_perfect_predictions() -> None:
    for t in (0.1, 0.05):
        r = ced_fr_auc(np.zeros(10), t, mode="clean")
        assert r.fr == 0.0 and r.auc == pytest.approx(1.0, abs=1e-6)
    # parity at 0.05: the integral runs to 0.0501 but is divided by 0.05 -> 1.002
    r = ced_fr_auc(np.zeros(10), 0.05, mode="parity")
    assert r.fr == 0.0 and r.auc == pytest.approx(1.002, abs=1e-6)
    assert ced_fr_auc(np.zeros(10), 0.1, mode="parity").auc == pytest.approx(1.0, abs=1e-6)


def test_failures_above_threshold() -> None:
    r = ced_fr_auc([0.0, 0.05, 0.1, 0.15, 0.1000001, float("nan")], 0.1, mode="clean")
    assert r.fr == pytest.approx(0.5)  # 0.1 itself is a success (<=); 0.15, 0.1000001 and NaN fail
    all_fail = ced_fr_auc([0.3, 0.5], 0.1, mode="parity")
    assert all_fail.fr == 1.0 and all_fail.auc == 0.0
    # FR is read at 0.0501 in parity mode, at 0.05 in clean mode
    assert ced_fr_auc([0.05005, 0.0], 0.05, mode="parity").fr == 0.0
    assert ced_fr_auc([0.05005, 0.0], 0.05, mode="clean").fr == 0.5


def test_fr_auc_hand_values_and_rounding() -> None:
    # one face at 0.02005 (between grid points 200 and 201), one failure:
    # AUC = 0.5·h/3·(4 [k=201] + 798 [k=202..999] + 1 [k=1000]) / t = 0.5·1e-4·(799 + 2/3)/0.1
    r = ced_fr_auc([0.02005, 0.2], 0.1, mode="clean")
    assert r.fr == 0.5
    assert r.auc == round(0.5 * 1e-4 * (799 + 2 / 3) / 0.1, 6) == 0.399833
    nmes = [0.01234, 0.0456, 0.0789, 0.11]
    fr, auc = ref_fr_auc_clean(nmes, 0.1)
    r = ced_fr_auc(nmes, 0.1, mode="clean")
    assert r.fr == round(fr, 4) == 0.25 and r.auc == pytest.approx(auc, abs=5e-7)
    # parity t = 0.1 uses the same 1001-point grid
    assert ced_fr_auc(nmes, 0.1, mode="parity").auc == pytest.approx(auc, abs=1e-6)
    r3 = ced_fr_auc([0.0, 0.0, 0.5], 0.1)
    assert r3.fr == 0.3333 and r3.auc == pytest.approx(2 / 3, abs=1e-6)
    assert r3.auc == round(r3.auc, 6)


def test_parity_even_count_uses_avg_rule() -> None:
    # 502-point grid, one face at 0.02505 (CED steps from 0 to 1 between grid points 250 and 251).
    # 'avg' = mean of [Simpson on 0..500 + trapezoid 500..501] and [trapezoid 0..1 + Simpson on 1..501].
    h = 1e-4
    xs = np.arange(0, 0.05 + h, h)
    ced = (xs >= 0.02505).astype(float)
    first = np.dot(simpson_weights(501, h), ced[:501]) + 0.5 * h * (ced[500] + ced[501])
    last = 0.5 * h * (ced[0] + ced[1]) + np.dot(simpson_weights(501, h), ced[1:])
    expected = round((first + last) / 2 / 0.05, 6)
    assert ced_fr_auc([0.02505], 0.05, mode="parity").auc == pytest.approx(expected, abs=1e-9)
    # sanity: close to the exact area of the step, (0.0501 − 0.02505)/0.05
    assert expected == pytest.approx((0.0501 - 0.02505) / 0.05, abs=2e-3)
    # and different from the Cartwright rule that modern SciPy would apply
    cart = np.dot(simpson_weights(501, h), ced[:501]) + h * (5 / 12 * ced[501] + 2 / 3 * ced[500] - ced[499] / 12)
    assert round(cart / 0.05, 6) != expected


def test_ced_curve() -> None:
    xs, ced = ced_curve([0.0, 0.03, 0.2], 0.1)
    assert len(xs) == 1001 and xs[-1] == 0.1
    assert ced[0] == pytest.approx(1 / 3) and ced[-1] == pytest.approx(2 / 3)
    assert ced[int(0.0299 / 1e-4)] == pytest.approx(1 / 3) and ced[int(0.0301 / 1e-4)] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------------------


def test_evaluate_overall_and_subsets() -> None:
    gt = faces_300w(4, iod=50.0)
    shift = np.array([0.0, 1.0025, 2.5, 10.0])  # NME = shift/50 = 0, 0.02005, 0.05, 0.2
    pred = gt + shift[:, None, None] * np.array([0.6, 0.8])
    masks = {"pose": np.array([True, False, False, True]), "none": np.zeros(4, bool)}
    res = evaluate(pred, gt, W300_68, threshold=0.1, mode="clean", subsets=masks)
    np.testing.assert_allclose(res["nme_per_face"], [0.0, 0.02005, 0.05, 0.2], atol=1e-12)
    assert res["nme"] == pytest.approx((0.02005 + 0.05 + 0.2) / 4)
    fr, auc = ref_fr_auc_clean([0.0, 0.02005, 0.05, 0.2], 0.1)
    assert res["fr"] == 0.25 == round(fr, 4) and res["auc"] == pytest.approx(auc, abs=5e-7)
    assert res["count"] == 4 and res["threshold"] == 0.1
    pose = res["subsets"]["pose"]
    assert pose["count"] == 2 and pose["nme"] == pytest.approx(0.1)
    assert pose["fr"] == 0.5 and pose["auc"] == pytest.approx(0.5, abs=1e-6)  # CED = 1/2 on all of [0, t]
    assert res["subsets"]["none"]["count"] == 0 and np.isnan(res["subsets"]["none"]["nme"])
    # default threshold comes from the layout (300W: 0.05, parity grid)
    assert evaluate(pred, gt, W300_68)["threshold"] == 0.05
    with pytest.raises(ValueError):
        evaluate(pred, gt, W300_68, subsets={"bad": np.array([1, 0, 0, 1])})
