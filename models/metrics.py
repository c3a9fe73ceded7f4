"""Evaluation metrics (method.md 9.1-9.2): per-face NME, CED curve, failure rate and AUC.

All values are fractions (multiply by 100 for %). Inputs are numpy arrays or torch tensors (converted to
float64 numpy on the host; metrics are computed once per evaluation, not in a training hot path).
Simpson's rule is implemented here, reproducing old SciPy's ``simps(..., even='avg')`` used by the official
code, because ``scipy.integrate.simps`` no longer exists and modern ``simpson`` treats even counts differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from flare.models.layouts import Layout

AUC_MODES = ("parity", "clean")
EVEN_RULES = ("avg", "cartwright")
CED_STEP = 1e-4


def _to_numpy(x: Any) -> np.ndarray:
    """numpy or torch -> float64 numpy (host copy for tensors)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


# --------------------------------------------------------------------------------------------------------------
# NME (9.1)
# --------------------------------------------------------------------------------------------------------------


def nme_per_face(pred: Any, gt: Any, layout: Layout, normaliser: str | None = None) -> np.ndarray:
    """NME_i = (1/N) Σ_n ‖P̂_n − P_n‖₂ / d_i for each face (M,), as a fraction (9.1).

    d_i = ‖mean(gt[L]) − mean(gt[R])‖₂ on the GT, with (L, R) = ``layout.normaliser_indices(normaliser)``
    (layout default when ``None``). ``pred`` and ``gt`` are (M, N, 2) in one frame (default: original px).
    """
    p, g = _to_numpy(pred), _to_numpy(gt)
    if p.shape != g.shape or p.ndim != 3 or p.shape[-1] != 2:
        raise ValueError(f"pred and gt must both be (M, N, 2); got {p.shape} and {g.shape}")
    if p.shape[1] != layout.num_points:
        raise ValueError(f"layout {layout.name!r} has {layout.num_points} points, arrays have {p.shape[1]}")
    left, right = layout.normaliser_indices(normaliser)
    d = np.linalg.norm(g[:, list(left)].mean(axis=1) - g[:, list(right)].mean(axis=1), axis=-1)
    if np.any(~(d > 0)):
        raise ValueError(f"non-positive or NaN normalising distance for faces {np.flatnonzero(~(d > 0)).tolist()}")
    return np.linalg.norm(p - g, axis=-1).mean(axis=-1) / d


# --------------------------------------------------------------------------------------------------------------
# Simpson's rule (old SciPy semantics)
# --------------------------------------------------------------------------------------------------------------


def _basic_simpson(y: np.ndarray, x: np.ndarray, start: int, stop: int) -> float:
    """Composite Simpson on panels starting at start, start+2, ... < stop, irregular spacing (old SciPy)."""
    h = np.diff(x)
    sl0, sl1, sl2 = slice(start, stop, 2), slice(start + 1, stop + 1, 2), slice(start + 2, stop + 2, 2)
    h0, h1 = h[sl0], h[sl1]
    hsum = h0 + h1
    tmp = hsum / 6.0 * (y[sl0] * (2.0 - h1 / h0) + y[sl1] * hsum * hsum / (h0 * h1) + y[sl2] * (2.0 - h0 / h1))
    return float(np.sum(tmp))


def simpson(y: Any, x: Any, even: str = "avg") -> float:
    """∫ y dx over 1-D samples by the composite Simpson rule; exact for cubics on odd sample counts.

    For an even count, ``"avg"`` (old SciPy ``simps`` default, used by the official metric code) averages
    [Simpson on the first N−2 intervals + trapezoid on the last] and [trapezoid on the first + Simpson on the
    rest]; ``"cartwright"`` (SciPy >= 1.11 ``simpson``) corrects the last interval with a parabola through the
    last three points. Two samples give the trapezoid; fewer than two give 0.
    """
    if even not in EVEN_RULES:
        raise ValueError(f"unknown even-count rule {even!r}; known: {EVEN_RULES}")
    y, x = _to_numpy(y), _to_numpy(x)
    if y.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"y and x must be 1-D of equal length; got {y.shape} and {x.shape}")
    n = y.shape[0]
    if n < 2:
        return 0.0
    if n % 2 == 1:
        return _basic_simpson(y, x, 0, n - 2)
    if n == 2:
        return float(0.5 * (x[1] - x[0]) * (y[0] + y[1]))
    if even == "avg":
        first = _basic_simpson(y, x, 0, n - 3) + 0.5 * (x[-1] - x[-2]) * (y[-1] + y[-2])
        last = _basic_simpson(y, x, 1, n - 2) + 0.5 * (x[1] - x[0]) * (y[1] + y[0])
        return float((first + last) / 2.0)
    hm2, hm1 = x[-2] - x[-3], x[-1] - x[-2]
    alpha = (2 * hm1**2 + 3 * hm2 * hm1) / (6 * (hm1 + hm2))
    beta = (hm1**2 + 3 * hm2 * hm1) / (6 * hm2)
    eta = hm1**3 / (6 * hm2 * (hm2 + hm1))
    return float(_basic_simpson(y, x, 0, n - 3) + alpha * y[-1] + beta * y[-2] - eta * y[-3])


# --------------------------------------------------------------------------------------------------------------
# CED, FR, AUC (9.2)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CedResult:
    """CED curve on the grid ``xs`` and the derived failure rate and AUC (fractions, rounded as in 9.2)."""

    xs: np.ndarray
    ced: np.ndarray
    fr: float
    auc: float


def ced_grid(threshold: float, mode: str = "parity", step: float = CED_STEP) -> np.ndarray:
    """CED abscissae (9.2). ``"parity"``: the official ``arange(0, t + step, step)`` (502 points ending at
    0.0501 for t = 0.05); ``"clean"``: round(t/step) + 1 points ending exactly at t."""
    if mode not in AUC_MODES:
        raise ValueError(f"unknown AUC mode {mode!r}; known: {AUC_MODES}")
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold!r}")
    if mode == "parity":
        return np.arange(0, threshold + step, step)
    return np.linspace(0.0, threshold, int(np.rint(threshold / step)) + 1)


def ced_values(nmes: Any, xs: np.ndarray) -> np.ndarray:
    """CED(x) = fraction of faces with NME_i <= x, for each x in ``xs`` (NaN NMEs count as failures)."""
    e = np.sort(_to_numpy(nmes).reshape(-1))
    if e.size == 0:
        raise ValueError("no NME values")
    return np.searchsorted(e, xs, side="right") / float(e.size)


def ced_fr_auc(nmes: Any, threshold: float, mode: str = "parity", step: float = CED_STEP) -> CedResult:
    """CED, FR_t = 1 − CED(x_last) (4 dp) and AUC_t = Simpson(CED, xs)/t (6 dp) (9.2).

    ``"parity"`` uses the official grid and old SciPy's 'avg' rule for even counts; ``"clean"`` uses the grid
    ending exactly at t and, should the count be even, the Cartwright rule.
    """
    xs = ced_grid(threshold, mode, step)
    ced = ced_values(nmes, xs)
    area = simpson(ced, xs, even="avg" if mode == "parity" else "cartwright")
    return CedResult(xs=xs, ced=ced, fr=round(float(1.0 - ced[-1]), 4), auc=round(area / threshold, 6))


def ced_curve(nmes: Any, threshold: float, mode: str = "clean") -> tuple[np.ndarray, np.ndarray]:
    """(xs, CED(xs)) for plots; by default over exactly [0, t] (9.2)."""
    xs = ced_grid(threshold, mode)
    return xs, ced_values(nmes, xs)


def _summary(nmes: np.ndarray, threshold: float, mode: str) -> dict[str, float | int]:
    if nmes.size == 0:
        return {"nme": float("nan"), "fr": float("nan"), "auc": float("nan"), "count": 0}
    res = ced_fr_auc(nmes, threshold, mode)
    return {"nme": float(np.mean(nmes)), "fr": res.fr, "auc": res.auc, "count": int(nmes.size)}


def evaluate(
    pred: Any,
    gt: Any,
    layout: Layout,
    normaliser: str | None = None,
    threshold: float | None = None,
    mode: str = "parity",
    subsets: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """NME, FR_t and AUC_t (fractions) over all faces and per subset (9.1-9.3).

    ``threshold`` defaults to ``layout.threshold``; ``subsets`` maps a name to a boolean mask (M,). Returns
    ``{"nme", "fr", "auc", "count", "threshold", "nme_per_face", "subsets": {name: {"nme", "fr", "auc",
    "count"}}}``; an empty subset reports NaN with count 0.
    """
    t = layout.threshold if threshold is None else float(threshold)
    nmes = nme_per_face(pred, gt, layout, normaliser)
    out: dict[str, Any] = {**_summary(nmes, t, mode), "threshold": t, "nme_per_face": nmes, "subsets": {}}
    for name, mask in (subsets or {}).items():
        m = np.asarray(mask.detach().cpu().numpy() if hasattr(mask, "detach") else mask)
        if m.dtype != np.bool_ or m.shape != nmes.shape:
            raise ValueError(f"subset {name!r} must be a boolean mask of shape {nmes.shape}, got {m.dtype} {m.shape}")
        out["subsets"][name] = _summary(nmes[m], t, mode)
    return out
