"""Side-by-side figures for several finished runs (RESULTS.md): validation NME against epoch
from MLflow, the CED of their ``flare eval`` outputs, and the convergence count "epochs to reach within
``margin`` of a reference run's final validation NME"."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from flare.models.metrics import ced_curve


def val_histories(run_ids: list[str], tracking_uri: str | None = None) -> dict[str, list[tuple[int, float]]]:
    """``{run name: [(epoch, val NME)]}`` from MLflow, one point per epoch."""
    from mlflow.tracking import MlflowClient

    from flare.platform.tracking import default_tracking_uri

    client = MlflowClient(tracking_uri or default_tracking_uri())
    out = {}
    for rid in run_ids:
        run = client.get_run(rid)
        hist = {int(m.step): float(m.value) for m in client.get_metric_history(rid, "val_nme")}
        if not hist:
            raise ValueError(f"run {rid}: no val_nme recorded")
        out[run.data.tags.get("mlflow.runName", rid)] = sorted(hist.items())
    return out


def epochs_to_reach(history: list[tuple[int, float]], target: float) -> int | None:
    """Epochs trained (1-based) until val NME first falls to ``target`` or below; None if never."""
    return next((e + 1 for e, v in history if v <= target), None)


def convergence(histories: dict[str, list[tuple[int, float]]], reference: str, margin: float) -> dict[str, Any]:
    """For each run, epochs to within ``margin`` of the reference run's final val NME."""
    if reference not in histories:
        raise ValueError(f"--reference {reference!r} is not one of {sorted(histories)}")
    target = histories[reference][-1][1] + margin
    return {"target": target, "epochs": {k: epochs_to_reach(h, target) for k, h in histories.items()}}


def val_plot(histories: dict[str, list[tuple[int, float]]], path: Path, title: str = "") -> Path:
    """Validation NME (%) against epoch, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flare.platform.plots import save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, hist in histories.items():
        e, v = zip(*hist)
        ax.plot(np.array(e) + 1, np.array(v) * 100, marker="o", ms=3, label=name)
    ax.set(xlabel="epoch", ylabel="val NME (%)", title=title or "validation NME")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def ced_compare(eval_dirs: dict[str, Path], threshold: float, path: Path, title: str = "") -> Path:
    """CED of several ``flare eval --out`` directories (their per-face ``nme.json``)."""
    from flare.platform.plots import ced_plot

    curves = {}
    for label, d in eval_dirs.items():
        per_face = json.loads((Path(d) / "nme.json").read_text())
        if not per_face:
            raise ValueError(f"{d}/nme.json: no faces")
        curves[label] = ced_curve(np.array(list(per_face.values())), threshold)
    return ced_plot(curves, threshold, path, title=title)
