"""Training objectives of the recipes: STAR (method.md 4.8, 4.11), RwSA (5.8) and the plain soft-argmax
baselines (STAR Table 10.4 "without STAR"). Each sums, over the K stacks with weights 2^(i-K+1), a landmark
term on the fused map and the AAM auxiliaries 10*AWing(point) + 10*AWing(edge).

All objectives are called as ``objective(outputs, batch, generator=None) -> (total, terms)``: ``outputs`` is the model's
``list[StackOutput]``; ``batch`` holds "landmarks" (B, N, 2) normalised labels, "point_targets" (B, N, h, w),
"edge_targets" (B, E, h, w) and, for RwSA, "cov" (B, N, 2, 2) or "smoothing_samples" (B, N, S, 2) in heatmap px. ``terms`` holds the
stack-weighted sums of each term (detached, for logging; no host sync) and "total".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flare.losses.awing import awing_loss, js_gaussian_regulariser
from flare.losses.rwsa import RWSALoss
from flare.losses.smoothing import sample_smoothing
from flare.losses.star import STARLoss
from flare.models.decode import label_to_grid_index, soft_argmax
from flare.models.hourglass import StackOutput

SOFTARGMAX_DISTANCES = ("smoothl1", "l2")
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


def point_distance(pred: Tensor, target: Tensor, distance: str, scale: float = 0.01) -> Tensor:
    """Baseline coordinate loss [SC], a scalar. "smoothl1": smooth-L1 (threshold ``scale``) of the Euclidean
    error norm, mean over (B, N); "l2": mean over (B, N, 2) of the squared error (``F.mse_loss``)."""
    diff = pred.float() - target.float()
    if distance == "l2":
        return (diff * diff).mean()
    d2 = (diff * diff).sum(-1)
    lin = torch.sqrt(d2.clamp_min(NORM_FLOOR)) - 0.5 * scale
    return torch.where(d2 < scale * scale, d2 / (2.0 * scale), lin).mean()


@dataclass(frozen=True)
class LabelSmoothing:
    """Image-aware label smoothing of RwSA (method.md 6.3): y' ~ N(y, gamma Sigma), ``samples`` draws per
    landmark per iteration, from the batch's covariances "cov" (B, N, 2, 2) in heatmap px^2."""

    gamma: float = 0.01
    samples: int = 10


class _StackedObjective(nn.Module):
    """L = sum_i s_i [ w_lm landmark_term(fused_i) + w_pt AWing(point_i) + w_edge AWing(edge_i) (+ w_dr DR) ]
    (method.md 4.8, 5.8): the one ``forward`` of every objective; subclasses give the landmark term."""

    def __init__(self, term_weights: dict[str, float], stacks: tuple[float, ...] | None, dr_sigma: float = 1.0) -> None:
        super().__init__()
        self.term_weights, self.stacks, self.dr_sigma = term_weights, stacks, float(dr_sigma)

    def landmark_term(self, fused: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def prepare(self, batch: Mapping[str, Tensor], generator: torch.Generator | None) -> Mapping[str, Tensor]:
        """Per-iteration extras the landmark term needs (none by default)."""
        return batch

    def forward(self, outputs: Sequence[StackOutput], batch: Mapping[str, Tensor],
                generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if not outputs:
            raise ValueError("outputs is empty")
        batch = self.prepare(batch, generator)
        parts: dict[str, list[Tensor]] = {name: [] for name in self.term_weights}
        for s, out in zip(_resolve_stack_weights(self.stacks, len(outputs)), outputs):
            parts["landmark"].append(s * self.landmark_term(out.fused, batch))
            if out.points is not None:
                parts["awing_point"].append(s * awing_loss(out.points, batch["point_targets"]))
            if out.edges is not None:
                parts["awing_edge"].append(s * awing_loss(out.edges, batch["edge_targets"]))
            if self.term_weights.get("dr"):
                parts["dr"].append(s * js_gaussian_regulariser(out.fused, batch["landmarks"], self.dr_sigma))
        terms = {name: torch.stack(vals).sum() for name, vals in parts.items() if vals}
        total = sum(self.term_weights[name] * value for name, value in terms.items())
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
        super().__init__({"landmark": weights.landmark, "awing_point": weights.point, "awing_edge": weights.edge,
                          "dr": weights.dr}, weights.stacks, dr_sigma)
        self.weights = weights
        self.star = STARLoss(**star_kwargs)

    def landmark_term(self, fused: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        return self.star(fused, batch["landmarks"])


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
        super().__init__({"landmark": weights.landmark, "awing_point": weights.point, "awing_edge": weights.edge,
                          "dr": weights.dr}, weights.stacks, dr_sigma)
        self.weights, self.distance, self.scale = weights, distance, float(scale)

    def landmark_term(self, fused: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        return point_distance(soft_argmax(fused), batch["landmarks"], self.distance, self.scale)


class RwsaObjective(_StackedObjective):
    """L_total = L_AWing + lam * L_ours (method.md 5.8, Eq. A14): L_AWing = sum_i s_i [10 AWing(point_i) +
    10 AWing(edge_i)], L_ours = sum_i s_i RWSALoss(fused_i, labels, smoothing samples).

    Smoothing samples (6.3) are the batch's "smoothing_samples" (B, N, S, 2) heatmap px when given, else
    drawn here every iteration from its "cov" with ``smoothing``; without either, the annotated point.
    ``rwsa_kwargs`` go to ``RWSALoss`` (alpha, epsilon, margin, margin_units, reduction, target).
    """

    def __init__(self, weights: RwsaObjectiveWeights | None = None, smoothing: LabelSmoothing | None = None,
                 **rwsa_kwargs: Any) -> None:
        weights = weights or RwsaObjectiveWeights()
        super().__init__({"landmark": weights.lam, "awing_point": weights.point, "awing_edge": weights.edge},
                         weights.stacks)
        self.weights, self.smoothing = weights, smoothing
        self.rwsa = RWSALoss(**rwsa_kwargs)

    def prepare(self, batch: Mapping[str, Tensor], generator: torch.Generator | None) -> Mapping[str, Tensor]:
        """Draw this iteration's smoothing samples y' ~ N(y, gamma Sigma) in heatmap px (6.3)."""
        if "smoothing_samples" in batch or self.smoothing is None or "cov" not in batch:
            return batch
        h = batch["point_targets"].shape[-1]
        y = label_to_grid_index(batch["landmarks"], h, "corners")
        samples = sample_smoothing(y, batch["cov"], gamma=self.smoothing.gamma, num_samples=self.smoothing.samples,
                                   generator=generator, width=h)
        return {**batch, "smoothing_samples": samples}

    def landmark_term(self, fused: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        return self.rwsa(fused, batch["landmarks"], batch.get("smoothing_samples"))
