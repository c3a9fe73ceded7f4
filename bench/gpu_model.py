"""Bring a GPU window's trained model back in files of at most 16 MiB, and put it together again here.

A GPU window returns at most 8 files of 16 MiB; the paper-size model is 53 MiB in fp32. :func:`split` writes
the validation-selected weights of a checkpoint (raw or EMA, method.md 9.6) in fp16 (a tensor whose values
do not fit fp16 stays fp32; integer buffers stay as they are) over as few ``model_partK.pt`` files as fit
under the limit; part 0 also carries the checkpoint's ``job.json`` (spec, layout, crop prior) and what
was selected. :func:`join` checks that the parts belong together and writes a model directory that
``flare eval``, ``flare predict`` and ``Predictor.from_dir`` load: ``state.pt`` (fp32 weights) and
``job.json``. Every file is plain tensors and primitives (``torch.load(weights_only=True)``).

Usage here: ``python bench/gpu_model.py join OUT/model_part*.pt --out models/300w_star_h200``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from flare.files import atomic_write_bytes
from flare.platform.checkpoints import (
    checkpoint_info,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    selected_weights,
)

PART = "model_part{}.pt"
MAX_PART_BYTES = 15 * 2**20  # under the 16 MiB a file may have, with room for the pickle's own bytes
FP16_MAX = float(torch.finfo(torch.float16).max)


def compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp16 when it is floating point and every value fits; else unchanged."""
    if t.is_floating_point() and (t.numel() == 0 or t.detach().abs().max().item() <= FP16_MAX):
        return t.detach().to(torch.float16)
    return t.detach()


def split(checkpoint: Path, out: Path, max_bytes: int = MAX_PART_BYTES) -> list[Path]:
    """Write the selected weights of ``checkpoint`` (a checkpoint directory) as ``model_partK.pt`` files of at
    most ``max_bytes`` each into ``out``; returns their paths. ValueError when one tensor alone is larger."""
    state, meta = load_checkpoint(checkpoint)
    info = checkpoint_info(state)
    weights = {k: compact(v) for k, v in selected_weights(state).items()}
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in weights.items():
        nbytes = t.numel() * t.element_size()
        if nbytes > max_bytes:
            raise ValueError(f"{checkpoint}: tensor {name} alone is {nbytes} bytes, over {max_bytes}")
        if size + nbytes > max_bytes and groups[-1]:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += nbytes
    meta_text = json.dumps({**meta, "info": {**info, "weights": "raw"}, "selected_weights": info["weights"]},
                           sort_keys=True)
    run = hashlib.sha256(meta_text.encode()).hexdigest()[:16]
    paths = []
    for i, group in enumerate(groups):
        payload: dict[str, Any] = {"tensors": group, "part": i, "parts": len(groups), "run": run}
        if i == 0:
            payload["meta"] = meta_text
        buf = io.BytesIO()
        torch.save(payload, buf)
        paths.append(out / PART.format(i))
        atomic_write_bytes(paths[-1], buf.getvalue())
    return paths


def join(parts: list[Path], out: Path) -> Path:
    """Put :func:`split`'s parts together into the model directory ``out`` (new, or empty); returns it.
    ValueError (one line naming the file) when a part is missing, repeated, or from another model."""
    loaded = {}
    for path in parts:
        payload = load_weights(path)
        if not isinstance(payload, dict) or not {"tensors", "part", "parts", "run"} <= payload.keys():
            raise ValueError(f"{path}: not a part written by bench/gpu_model.py split")
        if payload["part"] in loaded:
            raise ValueError(f"{path}: part {payload['part']} given twice")
        loaded[payload["part"]] = (path, payload)
    first = loaded.get(0)
    if first is None:
        raise ValueError(f"{parts[0] if parts else out}: part 0 (with the model's job.json) is missing")
    expected = first[1]["parts"]
    for path, payload in loaded.values():
        if payload["run"] != first[1]["run"] or payload["parts"] != expected:
            raise ValueError(f"{path}: belongs to another model than {first[0]}")
    if sorted(loaded) != list(range(expected)):
        missing = sorted(set(range(expected)) - set(loaded))
        raise ValueError(f"{first[0]}: parts {missing} of {expected} are missing")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not empty; choose a new directory")
    weights = {}
    for i in range(expected):
        for name, t in loaded[i][1]["tensors"].items():
            weights[name] = t.float() if t.is_floating_point() else t
    return save_checkpoint(out, weights, json.loads(first[1]["meta"]))  # state.pt + job.json, each atomic


def keep(checkpoint: Path, out: Path, max_files: int = 8) -> dict[str, Any]:
    """The selected weights as ``model_partK.pt`` files in ``out`` (``bench/gpu_model.py``: fp16, at most
    15 MiB each; ``python bench/gpu_model.py join`` makes a model directory of them here) when they fit in the
    ``max_files`` a window returns next to the files already in ``out`` (the shell wrapper's log included)."""
    with tempfile.TemporaryDirectory() as tmp:
        parts = split(checkpoint, Path(tmp))
        room = max_files - len({p.name for p in out.iterdir()} | {"gpu_run.log", "summary.json"})
        if len(parts) > room:
            return {"error": f"{len(parts)} parts do not fit the {room} files left of {max_files}: run with "
                             "--train-only"}
        for part in parts:
            shutil.move(part, out / part.name)
    return {"files": [p.name for p in parts], "bytes": sum((out / p.name).stat().st_size for p in parts)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    j = sub.add_parser("join", help="model_partK.pt files -> a model directory")
    j.add_argument("parts", nargs="+", type=Path)
    j.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("split", help="a checkpoint directory -> model_partK.pt files")
    s.add_argument("checkpoint", type=Path)
    s.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        if args.command == "join":
            print(join(args.parts, args.out))
        else:
            args.out.mkdir(parents=True, exist_ok=True)
            print("\n".join(str(x) for x in split(args.checkpoint, args.out)))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
