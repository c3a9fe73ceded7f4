"""One-dimensional elementwise distances d(x) for the STAR loss (method.md §4.6).

Every function maps a tensor of signed errors ``x`` (normalised units) to a tensor of the same shape.
All distances are even in ``x``, so the sign of an eigenvector never matters (§4.4).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import torch
from torch import Tensor

Distance = Callable[[Tensor], Tensor]

__all__ = ["DISTANCES", "Distance", "awing_distance", "get_distance", "l1", "l2", "smoothl1", "wing"]


def l1(x: Tensor) -> Tensor:
    """d(x) = |x| (§4.6 ``l1``)."""
    return x.abs()


def l2(x: Tensor) -> Tensor:
    """d(x) = x² (§4.6 ``l2``)."""
    return x * x


def smoothl1(x: Tensor, s: float = 0.01) -> Tensor:
    """STAR Eq. 8: x²/(2s) if |x| < s, else |x| − s/2 (§4.6 ``smoothl1``, s = 0.01).

    The linear branch uses |x| = sqrt(max(x², 1e-6)), a NaN guard for the unselected branch only.
    """
    x2 = x * x
    quad = x2 / (2.0 * s)
    lin = torch.sqrt(torch.clamp(x2, min=1e-6)) - 0.5 * s
    return torch.where(x2 < s * s, quad, lin)


def wing(x: Tensor, omega: float = 0.01, epsilon: float = 2.0) -> Tensor:
    """Wing loss: ω·ln(1 + |x|/ε) if |x| < ω, else |x| − C, C = ω − ω·ln(1 + ω/ε) (§4.6 ``wing``)."""
    ax = x.abs()
    c = omega - omega * math.log1p(omega / epsilon)
    return torch.where(ax < omega, omega * torch.log1p(ax / epsilon), ax - c)


def awing_distance(
    x: Tensor,
    heatmap_width: int = 64,
    omega: float = 14.0,
    theta: float = 0.5,
    epsilon: float = 1.0,
    alpha: float = 2.1,
) -> Tensor:
    """Experimental [D] adaptive-wing distance with target y ≡ 0 (§4.6 ``awing``, constants of §4.8).

    The error is first converted to heatmap pixels, x' = |x|·(W − 1)/2, then
    ω·ln(1 + (x'/ε)^α) if x' < θ, else A·x' − C.
    """
    xp = x.abs() * ((heatmap_width - 1) / 2.0)
    r = theta / epsilon
    a = omega * alpha * r ** (alpha - 1.0) / (epsilon * (1.0 + r**alpha))
    c = theta * a - omega * math.log1p(r**alpha)
    inner = omega * torch.log1p((xp / epsilon) ** alpha)
    return torch.where(xp < theta, inner, a * xp - c)


DISTANCES: dict[str, Callable[..., Tensor]] = {
    "l1": l1,
    "l2": l2,
    "smoothl1": smoothl1,
    "wing": wing,
    "awing": awing_distance,
}


def get_distance(name: str, **kw: float) -> Distance:
    """Return the distance ``name`` (§4.6) with its keyword parameters bound.

    Raises ``ValueError`` for an unknown name or a keyword the distance does not take.
    """
    try:
        fn = DISTANCES[name]
    except KeyError:
        raise ValueError(f"unknown distance {name!r}; expected one of {sorted(DISTANCES)}") from None
    try:
        inspect.signature(fn).bind(None, **kw)
    except TypeError as err:
        raise ValueError(f"bad parameters for distance {name!r}: {err}") from None
    return functools.partial(fn, **kw) if kw else fn
