"""How long an epoch's checkpoint holds the training loop: written inline vs in the background.

The state is what ``flare.platform.train_loop.train_worker`` saves each epoch for the paper configuration
(``jobs/300w_star.yaml``: 4 stacks, 256 channels, AAM; model, EMA, Adam moments, scheduler), after one Adam
step so that the moments exist. Inline (Ray Train, and ``--no-ray`` before 2026-11-27) the loop waits for
``save_checkpoint``; in the background (``--no-ray``) it waits only for ``host_copy`` while
``CheckpointWriter`` writes. Both are timed side by side in this run, into the same directory.

Usage: ``python bench/checkpoint.py [--device cpu|cuda] [--repeats N] [--dir DIR]`` (DIR: where checkpoints
go; default a temporary directory, i.e. ``/tmp``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flare.models.layouts import get_layout
from flare.platform.builders import build_model
from flare.platform.checkpoints import CheckpointWriter, host_copy, save_checkpoint
from flare.platform.config import load_job
from flare.platform.ema import Ema
from flare.platform.train_loop import make_optimizer

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def paper_state(device: torch.device) -> dict:
    """The per-epoch checkpoint state of ``jobs/300w_star.yaml`` after one Adam step (random gradients)."""
    job = load_job(JOBS / "300w_star.yaml", [])
    torch.manual_seed(0)
    model = build_model(job, get_layout("300w68")).to(device)
    ema = Ema(model, job.ema.decay)
    opt = make_optimizer(model, job.optimizer, device)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, job.optimizer.milestones, gamma=job.optimizer.gamma)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    ema.update_parameters(model)
    return {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "epoch": 0, "best": 0.05, "val_nme": 0.05, "weights": "raw",
            "decoder": "softargmax", "planned_epochs": 500}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    state = paper_state(device)
    size_mb = sum(t.numel() * t.element_size() for part in ("model", "ema") for t in state[part].values()) / 2**20
    inline, held, written = [], [], []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        writer = CheckpointWriter(background=True)
        for i in range(args.repeats):
            t = time.perf_counter()
            save_checkpoint(Path(tmp) / f"inline_{i}", state, {})
            inline.append(time.perf_counter() - t)
            t = time.perf_counter()
            writer.wait()
            copy = host_copy(state)
            held.append(time.perf_counter() - t)

            def write(i: int = i, copy: dict = copy, t0: float = time.perf_counter()) -> None:
                save_checkpoint(Path(tmp) / f"background_{i}", copy, {})
                written.append(time.perf_counter() - t0)

            writer.submit(write)
            writer.wait()  # each repeat alone: the next inline save must not share the disk with this one
        writer.close()
        files = sum(f.stat().st_size for f in Path(tmp, "inline_0").iterdir()) / 2**20
    med = statistics.median
    print(f"300w_star checkpoint state on {device}: {files:.0f} MiB on disk (model + EMA {size_mb:.0f} MiB, "
          f"plus Adam moments), median of {args.repeats}")
    print(f"  inline:     the loop waits {med(inline) * 1000:7.1f} ms (the whole save)")
    print(f"  background: the loop waits {med(held) * 1000:7.1f} ms (host copy); the write takes "
          f"{med(written) * 1000:.1f} ms in the writer's thread")
    print(f"  ratio: the loop is held {med(inline) / med(held):.1f}x shorter")


if __name__ == "__main__":
    main()
