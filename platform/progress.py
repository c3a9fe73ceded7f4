"""What a person sees while training: one line per finished epoch, with units and the NME normaliser."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any


def duration(seconds: float) -> str:
    """``3h05m``, ``12m04s`` or ``9s``."""
    s = round(max(seconds, 0.0))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def epoch_line(metrics: Mapping[str, Any], epochs: int, normaliser: str = "inter-ocular",
               eta_s: float | None = None) -> str:
    """``epoch 3/14  train loss 0.0123  val NME (inter-ocular) 4.23%  412 img/s  data wait 3%  ETA 12m04s``."""
    parts = [f"epoch {int(metrics['epoch']) + 1}/{epochs}"]
    if "train_total" in metrics:
        parts.append(f"train loss {float(metrics['train_total']):.4g}")
    if "val_nme" in metrics:
        parts.append(f"val NME ({normaliser}) {100 * float(metrics['val_nme']):.2f}%")
    if "images_per_s" in metrics:
        parts.append(f"{float(metrics['images_per_s']):.0f} img/s")
    if "data_wait" in metrics:
        parts.append(f"data wait {100 * float(metrics['data_wait']):.0f}%")
    if eta_s is not None:
        parts.append(f"ETA {duration(eta_s)}")
    return "  ".join(parts)


class EpochPrinter:
    """Calls ``log`` with :func:`epoch_line` for each report, with an ETA from the epochs seen so far."""

    def __init__(self, epochs: int, normaliser: str = "inter-ocular", log: Callable[[str], None] = print) -> None:
        self.epochs, self.normaliser, self.log = epochs, normaliser, log
        self.t0, self.seen = time.monotonic(), 0

    def __call__(self, metrics: Mapping[str, Any]) -> None:
        self.seen += 1
        epochs = int(metrics.get("planned_epochs", self.epochs))  # fitted to a time budget (budget.py)
        left = epochs - int(metrics["epoch"]) - 1
        eta = (time.monotonic() - self.t0) / self.seen * left
        self.log(epoch_line(metrics, epochs, self.normaliser, eta))
