"""Figures people look at: CED curves, prediction overlays, STAR's PCA ellipses (paper Fig. 3)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from flare.files import atomic_write_bytes


def save_figure(fig, path: Path) -> Path:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def ced_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], threshold: float, path: Path, title: str = "") -> Path:
    """CED(x) over [0, threshold] for each named curve (method.md 9.2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for name, (xs, ced) in curves.items():
        ax.plot(xs * 100, ced * 100, label=name)
    ax.set_xlim(0, threshold * 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel("NME (%)")
    ax.set_ylabel("faces (%)")
    ax.set_title(title or f"CED up to {threshold:g}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return save_figure(fig, path)


def draw_landmarks(image: np.ndarray, points: np.ndarray, color: tuple[int, int, int], radius: int = 2) -> np.ndarray:
    """Draw (N, 2) pixel-centre points onto a copy of a BGR image."""
    out = image.copy()
    r = max(1, round(radius * max(image.shape[:2]) / 256))
    for x, y in np.asarray(points):
        if np.isfinite(x) and np.isfinite(y):
            cv2.circle(out, (round(x), round(y)), r, color, -1, cv2.LINE_AA)
    return out


def draw_ellipses(image: np.ndarray, points: np.ndarray, covs: np.ndarray, color: tuple[int, int, int],
                  sigmas: float = 2.0) -> np.ndarray:
    """Draw each point's ``sigmas``-sigma covariance ellipse (axes sigmas·sqrt(λ) along the eigenvectors of
    its (2, 2) px² covariance, STAR Fig. 3/7) onto a copy of a BGR image; sub-pixel, 1 px anti-aliased."""
    out = image.copy()
    shift = 4  # cv2's fixed-point bits: centre and axes in 1/16 px
    cap = 4.0 * max(image.shape[:2])  # keeps a near-uniform map's ellipse within int range
    for p, c in zip(np.asarray(points, np.float64), np.asarray(covs, np.float64)):
        if not (np.isfinite(p).all() and np.isfinite(c).all()):
            continue
        lam, vec = np.linalg.eigh(c)  # ascending: vec[:, 1] is the major axis
        half = np.minimum(sigmas * np.sqrt(np.clip(lam, 0.0, None)), cap) * (1 << shift)
        angle = float(np.degrees(np.arctan2(vec[1, 1], vec[0, 1])))
        center = (round(p[0] * (1 << shift)), round(p[1] * (1 << shift)))
        cv2.ellipse(out, center, (round(half[1]), round(half[0])), angle, 0, 360, color, 1, cv2.LINE_AA, shift)
    return out


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) that ``n`` tiles fill without a gap: the squarest factorisation of ``n`` (one row up to 8
    tiles, else at most 2 x rows + 1 wide), or of the largest smaller count that has one."""
    for m in range(n, 0, -1):
        rows = max(r for r in range(1, math.isqrt(m) + 1) if m % r == 0)
        if m // rows <= (8 if rows == 1 else 2 * rows + 1):
            return rows, m // rows
    return 0, 0


def tile_grid(tiles: list[np.ndarray], tile: int, gapless: bool = False) -> np.ndarray:
    """Square-ish grid of equally sized BGR tiles (black where the grid has no tile); ``gapless``: shaped by
    :func:`grid_shape`, with no empty cell (tiles beyond it are left out)."""
    if gapless:
        rows, cols = grid_shape(len(tiles))
        tiles = tiles[: rows * cols]
    else:
        cols = int(np.ceil(np.sqrt(len(tiles))))
        rows = int(np.ceil(len(tiles) / cols))
    grid = np.zeros((rows * tile, cols * tile, 3), np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = t
    return grid


KEY_HEIGHT = 28  # px of the colour key below a figure grid


def with_key(grid: np.ndarray, entries: list[tuple[str, tuple[int, int, int], str]]) -> np.ndarray:
    """``grid`` with a colour key below it: per entry a marker ("dot" or "ellipse") in its BGR colour and
    its label, on dark grey."""
    strip = np.full((KEY_HEIGHT, grid.shape[1], 3), 40, np.uint8)
    x, mid, font = 8, KEY_HEIGHT // 2, cv2.FONT_HERSHEY_SIMPLEX
    for label, color, marker in entries:
        if marker == "dot":
            cv2.circle(strip, (x + 6, mid), 5, color, -1, cv2.LINE_AA)
        else:
            cv2.ellipse(strip, (x + 7, mid), (7, 4), 0, 0, 360, color, 2, cv2.LINE_AA)
        cv2.putText(strip, label, (x + 18, mid + 5), font, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        x += 34 + cv2.getTextSize(label, font, 0.45, 1)[0][0]
    return np.concatenate([grid, strip])


def write_png(path: Path, image: np.ndarray) -> Path:
    """Encode a BGR image as PNG and write it atomically."""
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"{path}: PNG encoding failed")
    atomic_write_bytes(Path(path), buf.tobytes())
    return Path(path)


GT_COLOR, PRED_COLOR = (0, 255, 0), (0, 0, 255)  # BGR: ground truth green, prediction red
ELLIPSE_COLOR = (0, 200, 255)  # BGR amber: covariance ellipses


def overlay_grid(images: list[np.ndarray], preds: list[np.ndarray], gts: list[np.ndarray] | None, path: Path,
                 tile: int = 256, titles: list[str] | None = None) -> Path:
    """A grid of images with predictions (red) and ground truth (green) and a colour key, written as PNG."""
    tiles = []
    for i, img in enumerate(images):
        t = draw_landmarks(img, gts[i], GT_COLOR) if gts is not None else img
        t = draw_landmarks(t, preds[i], PRED_COLOR)
        t = cv2.resize(t, (tile, tile), interpolation=cv2.INTER_AREA)
        if titles:
            cv2.putText(t, titles[i], (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(t)
    key = [("ground truth", GT_COLOR, "dot")] if gts is not None else []
    key.append(("prediction", PRED_COLOR, "dot"))
    return write_png(path, with_key(tile_grid(tiles, tile, gapless=True), key))


def ellipse_grid(images: list[np.ndarray], means: list[np.ndarray], covs: list[np.ndarray], path: Path,
                 tile: int = 256, scale: float = 1.0) -> Path:
    """STAR's PCA view (paper Fig. 3): per landmark an ellipse of the heatmap covariance (axes =
    ``scale`` x sqrt(eigenvalues), in crop px), over the input crops."""
    tiles = []
    for img, mu, cov in zip(images, means, covs):
        t = cv2.resize(img, (tile, tile), interpolation=cv2.INTER_LINEAR)
        k = tile / img.shape[0]
        for m, c in zip(mu, cov):
            lam, vec = np.linalg.eigh(c)
            lam = np.clip(lam, 0, None)
            angle = float(np.degrees(np.arctan2(vec[1, 1], vec[0, 1])))
            axes = (max(1, round(scale * np.sqrt(lam[1]) * k)), max(1, round(scale * np.sqrt(lam[0]) * k)))
            center = (round((m[0] + 0.5) * k - 0.5), round((m[1] + 0.5) * k - 0.5))
            cv2.ellipse(t, center, axes, angle, 0, 360, ELLIPSE_COLOR, 1, cv2.LINE_AA)
        tiles.append(t)
    key = [(f"{scale:g} sd of each landmark's heatmap distribution", ELLIPSE_COLOR, "ellipse")]
    return write_png(path, with_key(tile_grid(tiles, tile, gapless=True), key))


# ---------------------------------------------------------------------------------------------- tune


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_values(values: dict[str, Any]) -> str:
    """``a=1, b=0.001`` for a trial's sampled values."""
    return ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())


def trial_table(trials: Sequence[Any], max_epochs: int) -> str:
    """A plain-text table: trial, sampled values, epochs run, best val NME, stopped early (at which rung)."""
    keys = sorted({k for t in trials for k in t.values})
    head = ["trial", *keys, "epochs", "best val NME (%)", "stopped early"]
    rows = []
    for t in trials:
        if t.status == "ERROR":
            stop = f"error: {t.error}"[:60]
        else:
            stop = f"yes (rung {t.epochs})" if t.stopped_early(max_epochs) else "no"
        best = f"{100 * t.best_val_nme:.3f}" if t.history else "-"
        rows.append([t.trial_id, *[_fmt(t.values.get(k, "")) for k in keys], str(t.epochs), best, stop])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def plot_trials(trials: Sequence[Any], rungs: list[int], max_epochs: int, path: Path, title: str) -> Path:
    """val NME against epochs for every trial; ASHA's rungs as dashed lines, early stops as crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in rungs:
        ax.axvline(r, color="0.6", ls="--", lw=1)
        ax.annotate(f"rung {r}", (r, 1.0), xycoords=("data", "axes fraction"), ha="left", va="top",
                    fontsize=8, color="0.4", xytext=(2, -2), textcoords="offset points")
    for t in trials:
        if not t.history:
            continue
        xs, ys = zip(*t.history)
        (ln,) = ax.plot(xs, ys, marker="o", ms=3, lw=1.2, label=t.trial_id)
        if t.stopped_early(max_epochs):
            ax.plot([xs[-1]], [ys[-1]], marker="x", ms=9, mew=2, color=ln.get_color())
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epochs completed")
    ax.set_ylabel("val NME")
    ax.set_xlim(0.5, max_epochs + 0.5)
    ax.set_title(f"{title} (x = stopped by ASHA)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path)
