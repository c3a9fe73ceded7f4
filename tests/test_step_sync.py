"""The GPU step never waits for the device by itself: nothing in a training step builds a tensor from host data
(a Python list or a NumPy array), which on CUDA is a blocking host-to-device copy that drains the queue of
launched kernels, and the EMA update keeps its counter off the device (``platform/ema.py``). Checked on CPU with
a dispatch mode that sees every tensor made from host data (``aten.lift_fresh``) and every value read back
(``aten._local_scalar_dense``, ``aten.nonzero``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils._python_dispatch import TorchDispatchMode

from flare.datasets.ingest import load_manifest
from flare.models.layouts import get_layout
from flare.platform.builders import build_model, objective_from_config
from flare.platform.config import load_job
from flare.platform.ema import Ema
from flare.platform.local_loader import LocalLoader
from flare.platform.train_loop import TrainStep, train_builder

JOBS = Path(__file__).resolve().parents[1] / "jobs"
HOST_DATA = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}  # host -> device
HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}  # device -> host


class HostData(TorchDispatchMode):
    """Records the ops that make a tensor from host data or read a value back to the host (``.item()``,
    ``bool(t)``, data-dependent shapes): on CUDA each one waits for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_DATA or func in HOST_READS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("overrides", [[], ["objective.name=rwsa", "model.fusion=none"],
                                       ["objective.name=rwsa", "model.fusion=none", "objective.smoothing.enabled=false"]],
                         ids=["star", "rwsa", "rwsa_unsmoothed"])
def test_a_training_step_builds_no_tensor_from_host_data(small_300w: Path, overrides: list[str]) -> None:
    job = load_job(JOBS / "tiny.yaml", [f"data.manifest={small_300w / 'manifest.json'}", *overrides])
    manifest = load_manifest(job.data.manifest)
    builder = train_builder(job, manifest.layout)  # what train_worker hands the step
    with LocalLoader(manifest, "train", 4, builder, workers=0, limit=8, shuffle_base=0) as loader:
        batches = list(loader.epoch(0))
    torch.manual_seed(0)
    # channels_last as on CUDA (the 1x1 convolutions then run as matrix products)
    model = build_model(job, manifest.layout).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=job.optimizer.lr, fused=True)  # as make_optimizer on CUDA
    step = TrainStep(model, model, objective_from_config(job.objective), opt,
                     Ema(model, job.ema.decay), torch.Generator().manual_seed(0), job.data.input_size,
                     job.optimizer.grad_clip, channels_last=True)
    step(batches[0])  # the first step may set up constants
    with HostData() as mode:
        terms = step(batches[1])
    assert torch.isfinite(terms["total"])
    assert mode.seen == []


def test_the_ema_equals_averaged_model_and_keeps_its_counter_on_the_host() -> None:
    torch.manual_seed(0)
    model = build_model(load_job(JOBS / "tiny.yaml", []), get_layout("300w68"))
    ours, theirs = Ema(model, 0.9), AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())  # checkpoints stay interchangeable
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.add_(1.0)
                    m.num_batches_tracked.add_(1)
        with HostData() as mode:
            ours.update_parameters(model)
        theirs.update_parameters(model)
        # only the host counter may be read (once, at the first update); nothing goes to the model's device
        assert all("local_scalar_dense" in op for op in mode.seen) and len(mode.seen) <= 1
        assert ours.n_averaged.device.type == "cpu"
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert int(ours.n_averaged) == 3
    # a loaded state continues where it was (the host mirror of the counter is re-read)
    again = Ema(model, 0.9)
    again.load_state_dict(theirs.state_dict())
    again.update_parameters(model)
    theirs.update_parameters(model)
    for a, b in zip(again.state_dict().values(), theirs.state_dict().values(), strict=True):
        assert torch.equal(a, b)
