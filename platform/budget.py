"""A wall-clock training budget (``optimizer.time_budget_s``): the epoch count and the learning-rate
milestones are fitted to the epochs that fit, so a run stopped at its deadline still ends its schedule.

The recipes (method.md 4.11, 5.10) fix E epochs and MultiStep milestones m_i; under a budget of T s, after
every epoch the plan becomes P = min(E, done + floor(left / t)) epochs, with t the mean epoch time so far
(the first epoch, with its warm-up, dropped once there are two), and the milestones not yet passed become
round(m_i * P / E): the schedule keeps its shape, compressed. The next epoch starts only if the last
epoch's time still fits before the deadline.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable


class BudgetPlan:
    """Planned epochs and milestones of one process; ``None`` budget: the recipe unchanged."""

    def __init__(self, epochs: int, milestones: list[int], budget_s: float | None,
                 clock: Callable[[], float] = time.perf_counter, current: list[int] | None = None) -> None:
        """``epochs``/``milestones``: the recipe's; ``current``: a resumed scheduler's milestones (the
        decays that already happened are read from them)."""
        self.recipe_epochs, self.recipe_milestones = epochs, sorted(milestones)
        self.budget_s, self.clock = budget_s, clock
        self.epochs, self.milestones = epochs, sorted(milestones if current is None else current)
        self.t0 = clock()
        self.times: list[float] = []

    def left(self) -> float:
        """Seconds left before the deadline (inf without a budget)."""
        return math.inf if self.budget_s is None else self.budget_s - (self.clock() - self.t0)

    def epoch_done(self, epoch: int, seconds: float) -> bool:
        """Record epoch ``epoch`` (0-based) that took ``seconds``; refit; True when training goes on."""
        self.times.append(seconds)
        if self.budget_s is not None:
            steady = self.times[1:] or self.times
            fit = epoch + 1 + int(max(self.left(), 0.0) // (sum(steady) / len(steady)))
            self.epochs = max(epoch + 1, min(self.recipe_epochs, fit))
            scale = self.epochs / self.recipe_epochs
            # a MultiStepLR decays when its step count (epoch + 1 after this epoch) equals a milestone: the
            # ones reached stay, the others move with the plan but stay ahead of this step
            fired = [m for m in self.milestones if m <= epoch + 1]
            ahead = [max(epoch + 2, round(m * scale)) for m in self.recipe_milestones[len(fired):]]
            self.milestones = fired + ahead
        if epoch + 1 >= self.epochs:
            return False
        return self.left() >= self.times[-1]

    def share(self, going: bool, device: object) -> bool:
        """Rank 0's decision and plan for every rank (the ranks' clocks differ; they must stop together)."""
        import torch
        import torch.distributed as dist

        if self.budget_s is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return going
        t = torch.tensor([float(going), self.epochs, *self.milestones], dtype=torch.float64, device=device)
        dist.broadcast(t, src=0)
        self.epochs, self.milestones = int(t[1]), [int(x) for x in t[2:]]
        return bool(t[0])

    def apply(self, scheduler: object) -> None:
        """Give a ``MultiStepLR`` the fitted milestones (milestones already passed stay passed)."""
        scheduler.milestones = Counter(self.milestones)  # type: ignore[attr-defined]
