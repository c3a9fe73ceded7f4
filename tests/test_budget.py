"""``optimizer.time_budget_s``: epochs and MultiStep milestones fitted to a wall-clock budget
(platform/budget.py), driven by a stepped clock and a real ``MultiStepLR``."""

from __future__ import annotations

import torch

from flare.platform.budget import BudgetPlan


class SteppedClock:
    """A clock that moves only when an epoch is "run"."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(plan: BudgetPlan, clock: SteppedClock, epoch_seconds: list[float]) -> tuple[int, list[float]]:
    """The train loop's use of the plan: epochs run, and the lr each epoch ran at."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, plan.milestones, gamma=0.1)
    lrs, epoch, going = [], 0, True
    while going:
        lrs.append(opt.param_groups[0]["lr"])
        clock.now += epoch_seconds[min(epoch, len(epoch_seconds) - 1)]
        opt.step()
        sched.step()
        going = plan.epoch_done(epoch, epoch_seconds[min(epoch, len(epoch_seconds) - 1)])
        plan.apply(sched)
        epoch += 1
    return epoch, lrs


def test_no_budget_keeps_the_recipe() -> None:
    clock = SteppedClock()
    plan = BudgetPlan(12, [4, 8], None, clock)
    epochs, lrs = run(plan, clock, [5.0])
    assert epochs == 12 and plan.milestones == [4, 8]
    assert [round(x, 6) for x in lrs] == [1.0] * 4 + [0.1] * 4 + [0.01] * 4


def test_budget_compresses_epochs_and_milestones() -> None:
    clock = SteppedClock()
    plan = BudgetPlan(500, [200, 350, 450], 100.0, clock)
    epochs, lrs = run(plan, clock, [9.0, 2.0])  # a slow first epoch (warm-up), then 2 s each
    assert clock.now <= 100.0
    assert epochs == plan.epochs == 1 + int(91.0 // 2.0)  # 46 epochs fit
    assert plan.milestones == [round(m * 46 / 500) for m in (200, 350, 450)]
    decays = [i for i in range(1, len(lrs)) if lrs[i] < lrs[i - 1] * 0.5]
    assert decays == plan.milestones  # each fitted milestone fires exactly once
    assert abs(lrs[-1] - 1e-3) < 1e-9


def test_passed_milestones_do_not_fire_twice_when_epochs_speed_up() -> None:
    clock = SteppedClock()
    plan = BudgetPlan(40, [10, 20], 60.0, clock)
    times = [3.0] * 8 + [1.0]  # faster after 8 epochs: the plan grows, the fired milestone stays
    epochs, lrs = run(plan, clock, times)
    assert clock.now <= 60.0 and epochs == plan.epochs
    decays = [i for i in range(1, len(lrs)) if lrs[i] < lrs[i - 1] * 0.5]
    assert len(decays) == 2 and decays == plan.milestones
    assert abs(lrs[-1] - 0.01) < 1e-9


def test_the_epoch_that_would_overrun_does_not_start() -> None:
    clock = SteppedClock()
    plan = BudgetPlan(100, [], 10.0, clock)
    epochs, _ = run(plan, clock, [4.0])
    assert epochs == 2 and clock.now == 8.0  # a third 4 s epoch would end at 12 s
