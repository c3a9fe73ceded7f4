"""Checkpoint files: plain tensors and primitives only, so they load with ``weights_only=True``.

A checkpoint directory holds ``state.pt`` (model, EMA, optimiser, scheduler, epoch, metrics) and
``job.json`` (the job config and the layout name), enough to rebuild and continue the run.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from flare.files import atomic_write_bytes

STATE_FILE = "state.pt"
JOB_FILE = "job.json"


def save_checkpoint(directory: Path, state: dict[str, Any], job: dict[str, Any]) -> Path:
    """Write ``state`` and ``job`` into ``directory`` (created), each file atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, directory / STATE_FILE)
    atomic_write_bytes(directory / JOB_FILE, (json.dumps(job, indent=2, sort_keys=True) + "\n").encode())
    return directory


def host_copy(obj: Any) -> Any:
    """``obj`` (a state dict: nested dicts, lists, tuples, tensors, primitives) with every tensor copied to
    host memory, so training can go on changing the originals while the copy is written."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):  # keeps the mapping's type (the scheduler's milestones are a Counter)
        out = copy.copy(obj)
        out.update((k, host_copy(v)) for k, v in obj.items())
        return out
    if type(obj) in (list, tuple):
        return type(obj)(host_copy(v) for v in obj)
    return obj


class CheckpointWriter:
    """Runs each epoch's save-and-report job, in order, inline or in one background thread.

    In the background the next epoch trains while the last one is written (a paper-size state is ~216 MB);
    at most one job is in flight: :meth:`submit` first waits for the previous one, and re-raises its error.
    :meth:`close` waits for the last job (so a finished or interrupted run leaves every epoch it reported).
    """

    def __init__(self, background: bool) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flare-checkpoint") if background else None
        self._pending: Future | None = None

    @property
    def background(self) -> bool:
        return self._pool is not None

    def submit(self, job: Callable[[], None]) -> None:
        if self._pool is None:
            job()
            return
        self.wait()
        self._pending = self._pool.submit(job)

    def wait(self) -> None:
        """Block until the job in flight (if any) is done; re-raise its exception."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)


def load_checkpoint(directory: Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict]:
    """Load ``(state, job)`` from a checkpoint directory. Never unpickles arbitrary objects."""
    directory = Path(directory)
    state_path = directory / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{directory}: not a flare checkpoint (no {STATE_FILE})")
    state = load_weights(state_path, map_location)
    job = json.loads((directory / JOB_FILE).read_text())
    return state, job


def load_weights(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)``; a file holding anything but tensors and primitives is refused
    in one line (ValueError), never unpickled."""
    import pickle

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"{path}: refused, not plain weights (weights-only load: {first[:160]})") from None


def selected_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Model weights chosen on validation (method.md 9.6): raw or EMA (``AveragedModel`` keys stripped)."""
    if state.get("weights") == "ema":
        return {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    return state["model"]


def checkpoint_info(state: dict[str, Any]) -> dict[str, Any]:
    """What a model card and the registry record of a checkpoint: epoch, val NME, weights, decoder."""
    return {"epoch": int(state["epoch"]), "val_nme": float(state["val_nme"]), "weights": state["weights"],
            "decoder": state["decoder"]}


def _scan(run_dir: Path, key: Callable[[dict[str, Any]], float]) -> Path | None:
    """The ``checkpoint_*``/``epoch_*`` directory of ``run_dir`` whose state minimises ``key``."""
    best, best_key = None, math.inf
    for d in sorted([*Path(run_dir).glob("checkpoint_*"), *Path(run_dir).glob("epoch_*")]):
        if (d / STATE_FILE).is_file():
            k = key(load_checkpoint(d)[0])
            if k < best_key:
                best, best_key = d, k
    return best


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of a run directory (by the epoch stored in it)."""
    return _scan(run_dir, lambda state: -int(state["epoch"]))


def best_checkpoint_dir(run_dir: Path) -> Path | None:
    """The checkpoint of a run directory with the smallest val NME (never the test set, method.md 9.6)."""
    return _scan(run_dir, lambda state: float(state["val_nme"]))


def spec_changes(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two job-spec dicts (added or removed keys included)."""
    from flare.platform.config import flatten

    a, b = flatten(saved), flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def check_resume(checkpoint: Path, job: Any, allow: Sequence[str] = ()) -> None:
    """Refuse to resume ``checkpoint`` with a spec that differs from the one it was trained with, except in
    the keys (or key prefixes, ``optimizer``) named in ``allow``; ValueError lists the other changes."""
    saved = json.loads((Path(checkpoint) / JOB_FILE).read_text())["job"]
    changed = [k for k in spec_changes(saved, job.model_dump(mode="json"))
               if not any(k == a or k.startswith(a + ".") for a in allow)]
    if changed:
        shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise ValueError(f"--resume: the spec differs from the checkpoint's ({checkpoint}) in {shown}; "
                         "resume with the same spec, or name each key you mean to change with --allow-change KEY")
