"""Checkpoints written while the next epoch trains (``--no-ray``): a host copy that training cannot change,
jobs in order in one background thread, errors surfaced, nothing lost at the end."""

from __future__ import annotations

import collections
import copy
import threading
from pathlib import Path

import pytest
import torch

from flare.platform.checkpoints import CheckpointWriter, host_copy, load_weights


def _trained_state() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.MultiStepLR]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2, 4], gamma=0.1)
    for _ in range(2):
        model(torch.randn(2, 3, 8, 8)).square().mean().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def test_host_copy_is_untouched_by_later_steps_and_loads_weights_only(tmp_path: Path) -> None:
    model, opt, sched = _trained_state()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "epoch": 3, "weights": "raw"}
    reference = copy.deepcopy(state)
    copied = host_copy(state)
    assert isinstance(copied["scheduler"]["milestones"], collections.Counter)  # types kept
    model(torch.randn(2, 3, 8, 8)).square().mean().backward()
    opt.step()  # changes the live tensors (weights, BN statistics, Adam moments) in place
    assert not torch.equal(model.state_dict()["0.weight"], reference["model"]["0.weight"])
    for key in ("0.weight", "1.running_mean", "1.num_batches_tracked"):
        assert torch.equal(copied["model"][key], reference["model"][key]), key
    moments = copied["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(moments, reference["optimizer"]["state"][0]["exp_avg"])
    torch.save(copied, tmp_path / "state.pt")
    loaded = load_weights(tmp_path / "state.pt")
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["0.weight"], reference["model"]["0.weight"])


def test_writer_runs_jobs_in_order_off_the_caller_thread_and_waits_at_close() -> None:
    writer = CheckpointWriter(background=True)
    release, done, threads = threading.Event(), [], []

    def job(i: int) -> None:
        if i == 0:
            assert release.wait(timeout=30)  # held until the caller has moved on
        threads.append(threading.get_ident())
        done.append(i)

    writer.submit(lambda: job(0))
    assert done == []  # submit returned while job 0 is still blocked: the caller trains on
    release.set()
    writer.submit(lambda: job(1))  # waits for job 0 first: at most one write in flight
    assert done[0] == 0
    writer.close()
    assert done == [0, 1] and threading.get_ident() not in threads


def test_writer_raises_a_failed_write_at_the_next_submit_and_at_close() -> None:
    writer = CheckpointWriter(background=True)

    def fail() -> None:
        raise OSError("disk full")

    writer.submit(fail)
    with pytest.raises(OSError, match="disk full"):
        writer.submit(lambda: None)
    writer.submit(fail)
    with pytest.raises(OSError, match="disk full"):
        writer.close()


def test_inline_writer_runs_the_job_before_returning() -> None:
    writer = CheckpointWriter(background=False)
    done: list[int] = []
    writer.submit(lambda: done.append(threading.get_ident()))
    assert done == [threading.get_ident()] and not writer.background
    writer.close()
