"""The exponential moving average of the weights and buffers (recipes method.md 4.11 / 5.10), updated every
step without waiting for the device.

``torch.optim.swa_utils.AveragedModel.update_parameters`` copies its ``n_averaged`` counter (a CPU tensor)
to the device on every call, only to hand it to the EMA function, which ignores it; a blocking host-to-device
copy drains the whole queue of launched kernels each step. :class:`Ema` is the same module (same state-dict
keys, same arithmetic: ``get_ema_multi_avg_fn``'s ``lerp`` per device and dtype) with that copy left out.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class Ema(AveragedModel):
    """``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)`` whose update makes no
    host-device round trip: the first update copies, later ones interpolate with weight ``1 - decay``."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self._updates: int | None = None  # a host mirror of n_averaged, read once after init or load

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        self._updates = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """One EMA step towards ``model`` (its parameters, then its buffers, in module order)."""
        mine = [t.detach() for t in itertools.chain(self.module.parameters(), self.module.buffers())]
        theirs = [t.detach() for t in itertools.chain(model.parameters(), model.buffers())]
        if len(mine) != len(theirs):
            raise ValueError(f"EMA holds {len(mine)} tensors, the model {len(theirs)}")
        if self._updates is None:
            self._updates = int(self.n_averaged)
        if self._updates == 0:
            for a, b in zip(mine, theirs, strict=True):
                a.copy_(b)
        else:
            groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = defaultdict(
                lambda: ([], []))
            for a, b in zip(mine, theirs, strict=True):
                groups[a.device, a.dtype][0].append(a)
                groups[a.device, a.dtype][1].append(b.to(a.device))
            for a_list, b_list in groups.values():
                self.multi_avg_fn(a_list, b_list, self.n_averaged)  # the EMA function ignores the count
        self.n_averaged += 1  # in place, where it lives (the CPU): no transfer
        self._updates += 1
