"""Checkpoint files: plain tensors and primitives only, so they load with ``weights_only=True``.

A checkpoint directory holds ``state.pt`` (model, EMA, optimiser, scheduler, epoch, metrics) and
``job.json`` (the job config and the layout name), enough to rebuild and continue the run.
"""

from __future__ import annotations

import json
import os
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


def load_checkpoint(directory: Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict]:
    """Load ``(state, job)`` from a checkpoint directory. Never unpickles arbitrary objects."""
    directory = Path(directory)
    state_path = directory / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{directory}: not a flare checkpoint (no {STATE_FILE})")
    state = torch.load(state_path, map_location=map_location, weights_only=True)
    job = json.loads((directory / JOB_FILE).read_text())
    return state, job
