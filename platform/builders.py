"""The model and the objective of a job spec, each built from its own config section."""

from __future__ import annotations

from torch import nn

from flare.losses.objectives import (
    SOFTARGMAX_DISTANCES,
    LabelSmoothing,
    RwsaObjective,
    RwsaObjectiveWeights,
    SoftArgmaxObjective,
    StarObjective,
    StarObjectiveWeights,
)
from flare.models.hourglass import StackedHourglass, stacked_hourglass
from flare.models.layouts import Layout
from flare.platform.config import JobConfig, ModelConfig, ObjectiveConfig


def model_from_config(cfg: ModelConfig, layout: Layout, input_size: int, heatmap_activation: str) -> StackedHourglass:
    """The stacked hourglass with AAM of ``cfg`` for ``layout`` (method.md 3)."""
    return stacked_hourglass(layout, num_stacks=cfg.stacks, channels=cfg.channels, depth=cfg.depth,
                             input_size=input_size, aam=cfg.aam, heatmap_activation=heatmap_activation,
                             fusion=cfg.fusion)


def build_model(job: JobConfig, layout: Layout) -> StackedHourglass:
    """:func:`model_from_config` with the job's input size and effective heatmap activation (3.5)."""
    return model_from_config(job.model, layout, job.data.input_size, job.heatmap_activation)


def objective_from_config(cfg: ObjectiveConfig) -> nn.Module:
    """The objective named by ``cfg.name`` with all its weights: STAR (method.md 4.8), RwSA with image-aware
    label smoothing (5.8, 6.3), or a soft-argmax baseline (``l2`` / ``smoothl1``, 4.1-4.2)."""
    if cfg.name == "star":
        st = cfg.star
        weights = StarObjectiveWeights(point=cfg.awing_point_weight, edge=cfg.awing_edge_weight, dr=cfg.dr_weight)
        return StarObjective(weights, w=st.w, distance=st.distance, restriction=st.restriction,
                             value_form=st.value_form, variant=st.variant, **st.distance_kwargs)
    if cfg.name == "rwsa":
        rw, sm = cfg.rwsa, cfg.smoothing
        weights = RwsaObjectiveWeights(lam=rw.lam, point=cfg.awing_point_weight, edge=cfg.awing_edge_weight)
        smoothing = LabelSmoothing(gamma=sm.gamma, samples=sm.samples) if sm.enabled else None
        return RwsaObjective(weights, smoothing, alpha=rw.alpha, epsilon=rw.epsilon, margin=rw.margin,
                             reduction=rw.reduction, target=rw.target)
    if cfg.name in SOFTARGMAX_DISTANCES:
        weights = StarObjectiveWeights(point=cfg.awing_point_weight, edge=cfg.awing_edge_weight, dr=cfg.dr_weight)
        return SoftArgmaxObjective(cfg.name, weights)
    raise ValueError(f"objective.name: unknown objective {cfg.name!r}")
