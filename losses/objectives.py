"""Training objectives of the recipes: STAR (method.md 4.8, 4.11), RwSA (5.8) and the plain soft-argmax
baselines (STAR Table 10.4 "without STAR"). Each sums, over the K stacks with weights 2^(i-K+1), a landmark
term on the fused map and the AAM auxiliaries 10*AWing(point) + 10*AWing(edge).

All objectives are called as ``objective(outputs, batch) -> (total, terms)``: ``outputs`` is the model's
``list[StackOutput]``; ``batch`` holds "landmarks" (B, N, 2) normalised labels, "point_targets" (B, N, h, w),
"edge_targets" (B, E, h, w) and optionally "smoothing_samples" (B, N, S, 2) in heatmap px. ``terms`` holds the
stack-weighted sums of each term (detached, for logging; no host sync) and "total".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from flare.losses.awing import awing_loss, js_gaussian_regulariser
from flare.losses.rwsa import RWSALoss
from flare.losses.star import STARLoss
from flare.models.hourglass import StackOutput

SOFTARGMAX_DISTANCES = ("smoothl1", "l2")
SUM_EPS = 1e-6  # method.md 4.1
NORM_FLOOR = 1e-6  # sqrt(max(d^2, 1e-6)) on the linear smooth-L1 branch [SC]


def stack_weights(num_stacks: int) -> tuple[float, ...]:
    """2^(i - K + 1) for i = 0..K-1: 0.125, 0.25, 0.5, 1 for K = 4 (method.md 4.8); the last stack weighs 1."""
    if num_stacks < 1:
        raise ValueError(f"num_stacks must be >= 1, got {num_stacks}")
    return tuple(2.0 ** (i - num_stacks + 1) for i in range(num_stacks))


@dataclass(frozen=True)
class StarObjectiveWeights:
    """Per-term weights of the STAR / soft-argmax objectives: [landmark, point, edge] = [1, 10, 10] [SC],
    plus the distribution regulariser (off by default, 4.11). ``stacks`` None means 2^(i - K + 1)."""

    landmark: float = 1.0
    point: float = 10.0
    edge: float = 10.0
    dr: float = 0.0
    stacks: tuple[float, ...] | None = None


@dataclass(frozen=True)
class RwsaObjectiveWeights:
    """Weights of L_AWing + lam * L_ours (method.md 5.8): lam = 5000, AWing 10/10, STAR stack weights."""

    lam: float = 5000.0
    point: float = 10.0
    edge: float = 10.0
    stacks: tuple[float, ...] | None = None


def _resolve_stack_weights(stacks: Sequence[float] | None, num_stacks: int) -> tuple[float, ...]:
    if stacks is None:
        return stack_weights(num_stacks)
    if len(stacks) != num_stacks:
        raise ValueError(f"got {len(stacks)} stack weights for {num_stacks} stacks")
    return tuple(float(s) for s in stacks)


def soft_argmax(heatmaps: Tensor) -> Tensor:
    """Soft-argmax mean (method.md 4.1-4.2, Eq. 1): P = F / max(sum F, 1e-6) on the align-corners grid;
    (B, N, h, w) with F >= 0 -> (B, N, 2) as (x from the column, y from the row), fp32."""
    f = heatmaps.float()
    h, w = f.shape[-2:]
    gx = torch.linspace(-1.0, 1.0, w, device=f.device, dtype=f.dtype)
    gy = torch.linspace(-1.0, 1.0, h, device=f.device, dtype=f.dtype)
    inv = 1.0 / f.sum(dim=(-2, -1)).clamp_min(SUM_EPS)
    mu_x = (f.sum(dim=-2) @ gx) * inv
    mu_y = (f.sum(dim=-1) @ gy) * inv
    return torch.stack((mu_x, mu_y), dim=-1)


def point_distance(pred: Tensor, target: Tensor, distance: str, scale: float = 0.01) -> Tensor:
    """Baseline coordinate loss [SC], a scalar. "smoothl1": smooth-L1 (threshold ``scale``) of the Euclidean
    error norm, mean over (B, N); "l2": mean over (B, N, 2) of the squared error (``F.mse_loss``)."""
    diff = pred.float() - target.float()
    if distance == "l2":
        return (diff * diff).mean()
    d2 = (diff * diff).sum(-1)
    lin = torch.sqrt(d2.clamp_min(NORM_FLOOR)) - 0.5 * scale
    return torch.where(d2 < scale * scale, d2 / (2.0 * scale), lin).mean()


class _StackedObjective(nn.Module):
    """Shared part: stack weighting and the AAM AWing auxiliaries (method.md 4.8, 5.8)."""

    def __init__(self, point_weight: float, edge_weight: float, stacks: tuple[float, ...] | None) -> None:
        super().__init__()
        self.point_weight, self.edge_weight, self.stacks = float(point_weight), float(edge_weight), stacks

    def _weights(self, outputs: Sequence[StackOutput]) -> tuple[float, ...]:
        if not outputs:
            raise ValueError("outputs is empty")
        return _resolve_stack_weights(self.stacks, len(outputs))

    def _awing_terms(self, out: StackOutput, batch: Mapping[str, Tensor]) -> tuple[Tensor | None, Tensor | None]:
        """AWing(point_i, T_pt) and AWing(edge_i, T_edge); None where the model has no AAM heads."""
        point = None if out.points is None else awing_loss(out.points, batch["point_targets"])
        edge = None if out.edges is None else awing_loss(out.edges, batch["edge_targets"])
        return point, edge

    @staticmethod
    def _finish(parts: dict[str, list[Tensor]], weighted: dict[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
        """Sum each term's stack-weighted values, apply the term weights, return (total, detached terms)."""
        terms = {name: torch.stack(vals).sum() for name, vals in parts.items() if vals}
        total = sum(weighted[name] * value for name, value in terms.items())
        logged = {name: value.detach() for name, value in terms.items()}
        logged["total"] = total.detach()
        return total, logged


class StarObjective(_StackedObjective):
    """L = sum_i s_i [ w_lm L_STAR(fused_i) + 10 AWing(point_i) + 10 AWing(edge_i) + w_dr DR(fused_i) ]
    (method.md 4.8; DR = JS-to-Gaussian regulariser, 4.11, weight 0 by default).

    ``star_kwargs`` go to ``STARLoss`` (w, distance, restriction, value_form, eig_clamp, variant, ...).
    """

    def __init__(self, weights: StarObjectiveWeights | None = None, dr_sigma: float = 1.0,
                 **star_kwargs: Any) -> None:
        weights = weights or StarObjectiveWeights()
        super().__init__(weights.point, weights.edge, weights.stacks)
        self.weights, self.dr_sigma = weights, float(dr_sigma)
        self.star = STARLoss(**star_kwargs)

    def forward(self, outputs: Sequence[StackOutput], batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        target = batch["landmarks"]
        parts: dict[str, list[Tensor]] = {"landmark": [], "awing_point": [], "awing_edge": [], "dr": []}
        for s, out in zip(self._weights(outputs), outputs):
            parts["landmark"].append(s * self.star(out.fused, target))
            point, edge = self._awing_terms(out, batch)
            if point is not None:
                parts["awing_point"].append(s * point)
            if edge is not None:
                parts["awing_edge"].append(s * edge)
            if self.weights.dr:
                parts["dr"].append(s * js_gaussian_regulariser(out.fused, target, self.dr_sigma))
        w = self.weights
        return self._finish(parts, {"landmark": w.landmark, "awing_point": w.point, "awing_edge": w.edge,
                                    "dr": w.dr})


class SoftArgmaxObjective(_StackedObjective):
    """Baseline: soft-argmax of the fused map (4.1-4.2) against the label with ``distance`` ("smoothl1",
    threshold ``scale`` = 0.01 on the error norm, or "l2"), in place of L_STAR; same AWing auxiliaries,
    stack weights and optional DR term as :class:`StarObjective`."""

    def __init__(self, distance: str = "smoothl1", weights: StarObjectiveWeights | None = None,
                 scale: float = 0.01, dr_sigma: float = 1.0) -> None:
        if distance not in SOFTARGMAX_DISTANCES:
            raise ValueError(f"distance must be one of {SOFTARGMAX_DISTANCES}, got {distance!r}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        weights = weights or StarObjectiveWeights()
        super().__init__(weights.point, weights.edge, weights.stacks)
        self.weights, self.distance, self.scale, self.dr_sigma = weights, distance, float(scale), float(dr_sigma)

    def forward(self, outputs: Sequence[StackOutput], batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        target = batch["landmarks"]
        parts: dict[str, list[Tensor]] = {"landmark": [], "awing_point": [], "awing_edge": [], "dr": []}
        for s, out in zip(self._weights(outputs), outputs):
            pred = soft_argmax(out.fused)
            parts["landmark"].append(s * point_distance(pred, target, self.distance, self.scale))
            point, edge = self._awing_terms(out, batch)
            if point is not None:
                parts["awing_point"].append(s * point)
            if edge is not None:
                parts["awing_edge"].append(s * edge)
            if self.weights.dr:
                parts["dr"].append(s * js_gaussian_regulariser(out.fused, target, self.dr_sigma))
        w = self.weights
        return self._finish(parts, {"landmark": w.landmark, "awing_point": w.point, "awing_edge": w.edge,
                                    "dr": w.dr})


class RwsaObjective(_StackedObjective):
    """L_total = L_AWing + lam * L_ours (method.md 5.8, Eq. A14): L_AWing = sum_i s_i [10 AWing(point_i) +
    10 AWing(edge_i)], L_ours = sum_i s_i RWSALoss(fused_i, labels, smoothing samples).

    ``rwsa_kwargs`` go to ``RWSALoss`` (alpha, epsilon, margin, margin_units, reduction, target).
    """

    def __init__(self, weights: RwsaObjectiveWeights | None = None, **rwsa_kwargs: Any) -> None:
        weights = weights or RwsaObjectiveWeights()
        super().__init__(weights.point, weights.edge, weights.stacks)
        self.weights = weights
        self.rwsa = RWSALoss(**rwsa_kwargs)

    def forward(self, outputs: Sequence[StackOutput], batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        target, samples = batch["landmarks"], batch.get("smoothing_samples")
        parts: dict[str, list[Tensor]] = {"landmark": [], "awing_point": [], "awing_edge": []}
        for s, out in zip(self._weights(outputs), outputs):
            parts["landmark"].append(s * self.rwsa(out.fused, target, samples))
            point, edge = self._awing_terms(out, batch)
            if point is not None:
                parts["awing_point"].append(s * point)
            if edge is not None:
                parts["awing_edge"].append(s * edge)
        w = self.weights
        return self._finish(parts, {"landmark": w.lam, "awing_point": w.point, "awing_edge": w.edge})


OBJECTIVES = ("star", "rwsa", "l2", "smoothl1")


def _split(kwargs: dict[str, Any], weights_type: type) -> tuple[Any, dict[str, Any]]:
    """Split keyword arguments into a weights dataclass (its field names) and the remaining options."""
    names = {f.name for f in fields(weights_type)}
    chosen = {k: v for k, v in kwargs.items() if k in names}
    if chosen.get("stacks") is not None:
        chosen["stacks"] = tuple(float(s) for s in chosen["stacks"])
    return weights_type(**chosen), {k: v for k, v in kwargs.items() if k not in names}


def build_objective(name: str, **weights: Any) -> nn.Module:
    """Objective by recipe name: "star", "rwsa", or the soft-argmax baselines "l2" / "smoothl1".

    Keyword arguments named like fields of the weights dataclass (landmark/point/edge/dr/stacks for
    STAR and the baselines; lam/point/edge/stacks for RwSA) set the weights; the rest go to the objective
    (e.g. ``w``, ``distance``, ``restriction`` for STAR; ``alpha``, ``epsilon``, ``reduction`` for RwSA).
    """
    if name == "star":
        w, rest = _split(weights, StarObjectiveWeights)
        return StarObjective(w, **rest)
    if name == "rwsa":
        w, rest = _split(weights, RwsaObjectiveWeights)
        return RwsaObjective(w, **rest)
    if name in SOFTARGMAX_DISTANCES:
        w, rest = _split(weights, StarObjectiveWeights)
        return SoftArgmaxObjective(name, w, **rest)
    raise ValueError(f"unknown objective {name!r}; expected one of {OBJECTIVES}")
