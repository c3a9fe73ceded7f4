"""Every landmark loss stays finite, in value and gradient, for huge finite heatmaps (peaks of 1e19 and
1e30, maps of -1e30): what a diverging network produces before anything else goes wrong."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch

from flare.losses.awing import awing_loss, js_gaussian_regulariser
from flare.losses.distances import DISTANCES
from flare.losses.rwsa import RWSALoss
from flare.losses.star import STARLoss

MAGNITUDES = [1e19, 1e30, -1e30]
B, N, H, W = 2, 3, 16, 16


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    heat = torch.rand(B, N, H, W, generator=gen) ** 4  # one peak-ish map per landmark, values in [0, 1]
    targets = torch.rand(B, N, 2, generator=gen) * 1.6 - 0.8
    return heat, targets


def _assert_finite(loss: Callable[[torch.Tensor], torch.Tensor], heat: torch.Tensor) -> None:
    x = heat.clone().requires_grad_(True)
    value = loss(x)
    (grad,) = torch.autograd.grad(value, x)
    assert torch.isfinite(value).all(), value
    assert torch.isfinite(grad).all(), grad[~torch.isfinite(grad)][:5]


STAR_CASES = [{"distance": d, "variant": v} for d, v in itertools.product(sorted(DISTANCES), ("v1", "v2"))] + [
    {"restriction": "detach"}, {"restriction": "none"}, {"value_form": "half_sum"}, {"eig_clamp": None}]


# eig_clamp=None takes sqrt(λ + 1e-5) of the raw eigenvalues: NaN for any negative map (its covariance is not
# positive semi-definite) whatever the magnitude, so that case is checked on F >= 0 only
STAR_RUNS = [(c, m) for c in STAR_CASES for m in MAGNITUDES if m > 0 or c.get("eig_clamp", ()) is not None]


@pytest.mark.parametrize(("cfg", "magnitude"), STAR_RUNS, ids=lambda v: "-".join(map(str, v.values()))
                         if isinstance(v, dict) else f"{v:g}")
def test_star_is_finite(cfg: dict, magnitude: float) -> None:
    heat, targets = _inputs()
    _assert_finite(lambda x: STARLoss(**cfg)(x, targets), heat * magnitude)


RWSA_CASES = [{}, {"reduction": "landmark_mean", "margin": "l2", "margin_units": "heatmap_px"},
              {"target": "nearest", "margin": "l1", "epsilon": 0.1}]


@pytest.mark.parametrize("magnitude", MAGNITUDES)
@pytest.mark.parametrize("cfg", RWSA_CASES, ids=["default", "l2-px", "nearest-l1-eps0.1"])
def test_rwsa_is_finite(cfg: dict, magnitude: float) -> None:
    heat, targets = _inputs()
    _assert_finite(lambda x: RWSALoss(**cfg)(x, targets), heat * magnitude)


@pytest.mark.parametrize("magnitude", MAGNITUDES)
def test_awing_and_distribution_regulariser_are_finite(magnitude: float) -> None:
    heat, targets = _inputs()
    _assert_finite(lambda x: awing_loss(x, heat), heat * magnitude)  # AAM heads against [0, 1] targets
    _assert_finite(lambda x: js_gaussian_regulariser(x, targets), heat * magnitude)


@pytest.mark.parametrize("name", ["smoothl1", "l2"])
@pytest.mark.parametrize("magnitude", MAGNITUDES)
def test_softargmax_baselines_stay_finite(name: str, magnitude: float) -> None:
    """The soft-argmax baselines (l2 gave NaN gradients, -1e30 an infinite value) and the decoder itself."""
    from flare.losses.objectives import point_distance
    from flare.models.decode import soft_argmax

    heat, targets = _inputs()
    _assert_finite(lambda x: point_distance(soft_argmax(x), targets, name), heat * magnitude)


def test_softargmax_unchanged_at_ordinary_scale() -> None:
    """Dividing by the largest magnitude changes nothing where values stay within [0, 1] or are scaled."""
    from flare.models.decode import soft_argmax

    heat, _ = _inputs()
    g = torch.linspace(-1, 1, W, dtype=torch.float64)
    p = heat.double() / heat.double().sum(dim=(-2, -1), keepdim=True)
    want = torch.stack(((p.sum(-2) * g).sum(-1), (p.sum(-1) * g).sum(-1)), -1)
    for scale in (1.0, 37.0, 1e6):
        torch.testing.assert_close(soft_argmax(heat.double() * scale), want, rtol=1e-9, atol=1e-12)
