"""Side-by-side forward + backward time of the hourglass with one implementation detail swapped.

Each variant is the same function with the same weights (the bench checks the outputs agree): today's
code (``current``) against the implementation it replaced, e.g. ``coordconv_concat`` (one convolution over
the concatenation [x, coordinate channels], method.md 3.4 as written) against the split CoordConv, whose
coordinate share is computed once per forward, and (CUDA only) ``pointwise_cudnn`` (every 1x1 convolution as
cudnn's Conv2d plus a separate bias pass, against one matrix product with the bias in its epilogue),
``fp32_eager`` (the same model in fp32 and NCHW against the bf16 + channels_last fast path; PyTorch's default
fp32, cudnn convolutions in TF32) and ``fp32_strict`` (the same with TF32 off). Rounds interleave the
variants (A B, B A, ...) so that a drifting clock (a GPU's first minutes, a busy CPU) biases neither, and the figure is the ratio of medians.

Only the model's forward and backward are timed (a fixed random input and a fixed weighting of every
stack's outputs), not the data path, the objective or the optimiser: the step's model part, where these
variants differ. On CUDA: bf16 autocast + channels_last (the fast path of ``train_worker``), CUDA events;
on CPU: fp32, wall clock (ratios only; absolute times come from a GPU).

Usage: ``python bench/model_variants.py [--spec 300w_star] [--batch B] [--rounds R] [--steps S]
[--variants current coordconv_concat]``; ``--dry-run``: ``jobs/tiny.yaml``, batch 2, a few steps.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from flare.bench.step_timing import sync
from flare.models.hourglass import ConvBlock, CoordConv
from flare.models.layouts import get_layout
from flare.platform.builders import build_model
from flare.platform.config import JobConfig, load_job

JOBS = Path(__file__).resolve().parents[1] / "jobs"


@contextlib.contextmanager
def current(step: ModelStep | None) -> Iterator[None]:
    """Today's code."""
    yield


@contextlib.contextmanager
def forward_as_reference(cls: type[torch.nn.Module]) -> Iterator[None]:
    """``cls.forward`` replaced by ``cls.reference`` (the implementation it replaced) while inside."""
    forward = cls.forward
    cls.forward = cls.reference  # type: ignore[method-assign, attr-defined]
    try:
        yield
    finally:
        cls.forward = forward  # type: ignore[method-assign]


def coordconv_concat(step: ModelStep | None) -> contextlib.AbstractContextManager[None]:
    """CoordConv as one convolution over the concatenation (before 2026-11-27 in training too)."""
    return forward_as_reference(CoordConv)


def pointwise_cudnn(step: ModelStep | None) -> contextlib.AbstractContextManager[None]:
    """Every 1x1 convolution as cudnn's Conv2d with its separate bias pass (before session 13),
    instead of one matrix product with the bias in its epilogue (``hourglass.pointwise_conv``; channels_last
    only, so CUDA)."""
    return forward_as_reference(ConvBlock)


@contextlib.contextmanager
def fp32_eager(step: ModelStep | None) -> Iterator[None]:
    """The same model in fp32 and the default (NCHW) layout, the issue's baseline for "bf16 at least 2x fp32"
    (CUDA only). Interleaved with the bf16 rounds, the ratio does not depend on when each ran."""
    if step is None:  # the float64 agreement check: the same function
        yield
        return
    bf16, x = step.bf16, step.x
    step.bf16, step.x = False, x.contiguous()
    step.model.to(memory_format=torch.contiguous_format)
    try:
        yield
    finally:
        step.bf16, step.x = bf16, x
        step.model.to(memory_format=torch.channels_last)


@contextlib.contextmanager
def fp32_strict(step: ModelStep | None) -> Iterator[None]:
    """``fp32_eager`` with TF32 off: PyTorch's default fp32 runs cudnn convolutions in TF32 on Ampere and later
    (``torch.backends.cudnn.allow_tf32``), so ``fp32_eager`` already uses tensor cores for them; this is IEEE
    fp32 throughout, the other reading of the issue's fp32 baseline (CUDA only)."""
    if step is None:
        yield
        return
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with fp32_eager(step):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


VARIANTS: dict[str, Callable[[ModelStep | None], contextlib.AbstractContextManager[None]]] = {
    "current": current, "coordconv_concat": coordconv_concat, "pointwise_cudnn": pointwise_cudnn,
    "fp32_eager": fp32_eager, "fp32_strict": fp32_strict}
# on CPU the step is fp32 NCHW already (the pointwise path needs channels_last)
CUDA_ONLY = ("pointwise_cudnn", "fp32_eager", "fp32_strict")


class ModelStep:
    """Forward + backward of ``job``'s model on a fixed random batch (the fast path's precision and layout)."""

    def __init__(self, job: JobConfig, batch: int, device: torch.device) -> None:
        torch.manual_seed(0)
        self.device, fast = device, device.type == "cuda"
        fmt = torch.channels_last if fast else torch.preserve_format
        self.model = build_model(job, get_layout(job.model.layout)).to(device, memory_format=fmt).train()
        s = job.data.input_size
        self.x = torch.randn(batch, 3, s, s, device=device).contiguous(memory_format=fmt)
        self.bf16 = fast
        with torch.no_grad(), self.autocast():
            outs = self.model(self.x)
        self.weights = [torch.randn_like(o.fused, dtype=torch.float32) for o in outs]

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def __call__(self) -> None:
        with self.autocast():
            outs = self.model(self.x)
        loss = sum((o.fused.float() * w).mean() + o.heatmaps.float().mean() for o, w in zip(outs, self.weights,
                                                                                           strict=True))
        self.model.zero_grad(set_to_none=True)
        loss.backward()


def timed(step: ModelStep, n: int) -> float:
    """Mean seconds per step over ``n`` steps: CUDA events around them, else the wall clock."""
    if step.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            step()
        end.record()
        sync(step.device)
        return start.elapsed_time(end) / 1000 / n
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def differences(job: JobConfig, names: list[str]) -> tuple[dict[str, float], float]:
    """Largest difference of each variant's training-mode outputs (every stack's fused maps) from the first
    variant's, in float64 on CPU (batch 2; in fp32 or bf16 a rounding difference can flip a boundary-mask
    pixel of method.md 3.4 and show a large difference), and the outputs' largest magnitude."""
    torch.manual_seed(0)
    cl = torch.channels_last  # the fast path's layout, which the pointwise variant needs
    model = build_model(job, get_layout(job.model.layout)).double().train().to(memory_format=cl)
    s = job.data.input_size
    x = torch.randn(2, 3, s, s, dtype=torch.float64).contiguous(memory_format=cl)
    outs: dict[str, torch.Tensor] = {}
    for name in names:
        with VARIANTS[name](None), torch.no_grad():
            outs[name] = torch.stack([o.fused for o in model(x)])
    ref = outs[names[0]]
    return {n: float((o - ref).abs().max()) for n, o in outs.items()}, float(ref.abs().max())


def compare(job: JobConfig, names: list[str], batch: int, rounds: int, steps: int, warmup: int,
            device: torch.device) -> list[dict[str, Any]]:
    """One row per variant: median seconds per step over ``rounds`` interleaved rounds of ``steps`` steps, the
    ratio to the first variant's median, and the largest output difference from the first variant."""
    names = [n for n in names if device.type == "cuda" or n not in CUDA_ONLY]
    diffs, scale = differences(job, names)
    step = ModelStep(job, batch, device)
    for name in names:
        with VARIANTS[name](step):
            for _ in range(warmup):  # cudnn autotuning for this variant's shapes
                step()
            sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            with VARIANTS[name](step):
                times[name].append(timed(step, steps))
    base = statistics.median(times[names[0]])
    return [{"variant": n, "batch": batch, "device": str(device), "s_per_step": statistics.median(t),
             "min_s": min(t), "max_s": max(t), "ratio_to_first": statistics.median(t) / base,
             "max_abs_diff": diffs[n], "output_scale": scale} for n, t in times.items()]


def table(rows: list[dict[str, Any]], title: str) -> str:
    """The rows as Markdown (absolute times are meaningful on a GPU only)."""
    lines = [f"{title}\n", "| variant | batch | median s/step (min-max) | x first variant | float64 output diff / scale |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['batch']} | {r['s_per_step']:.4f} ({r['min_s']:.4f}-{r['max_s']:.4f}) | "
                     f"{r['ratio_to_first']:.3f} | {r['max_abs_diff']:.2e} / {r['output_scale']:.2e} |")
    return "\n".join(lines) + "\n"


def measure(job: JobConfig, device: torch.device, names: list[str] | None = None, batch: int | None = None,
            rounds: int = 6, steps: int | None = None, warmup: int | None = None) -> tuple[list[dict[str, Any]], str]:
    """:func:`compare` with this device's defaults (CUDA: the spec's batch, 10 steps a round after 5 warm-up
    steps; CPU: batch 4, one step after one); returns the rows and their Markdown table."""
    cuda = device.type == "cuda"
    names = names or list(VARIANTS)
    batch = batch or (job.optimizer.batch_size if cuda else 4)
    steps = steps or (10 if cuda else 1)
    warmup = warmup if warmup is not None else (5 if cuda else 1)
    if cuda:
        torch.backends.cudnn.benchmark = True  # as train_worker
    rows = compare(job, names, batch, rounds, steps, warmup, device)
    name = torch.cuda.get_device_name(device) if cuda else "CPU (ratios only)"
    text = table(rows, f"model forward+backward, {job.name}, {name}, {'bf16+channels_last' if cuda else 'fp32'}, "
                       f"{rounds} interleaved rounds of {steps} steps")
    return rows, text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="300w_star")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--batch", type=int, default=None, help="default: the spec's batch on CUDA, 4 on CPU")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=None, help="steps per round (default 10 on CUDA, 1 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per variant (default 5 / 1)")
    ap.add_argument("--device", default=None, help="default: cuda when available")
    ap.add_argument("--dry-run", action="store_true", help="jobs/tiny.yaml, batch 2, two rounds of one step")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    job = load_job(JOBS / f"{'tiny' if args.dry_run else args.spec}.yaml", [])
    _, text = measure(job, device, args.variants, 2 if args.dry_run else args.batch, 2 if args.dry_run else args.rounds,
                      args.steps, args.warmup)
    print(text, flush=True)


if __name__ == "__main__":
    main()
