"""Landmark layouts as data (method.md section 2): point count, boundary groups, flip pairs,
NME normalisers and the FR/AUC threshold for WFLW-98, 300W-68 and COFW-29.

Nothing in flare branches on a dataset name; everything reads a :class:`Layout`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class BoundaryGroup:
    """One boundary curve (method.md 2): landmark indices in drawing order, closed or open."""

    name: str
    indices: tuple[int, ...]
    closed: bool


@dataclass(frozen=True)
class Layout:
    """A landmark layout. Index lists are 0-based; ``normalisers`` map a name to two index
    lists whose means give the two reference points (a single index is a 1-element list)."""

    name: str
    num_points: int
    groups: tuple[BoundaryGroup, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    normalisers: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(hash=False)
    default_normaliser: str = "inter_ocular"
    threshold: float = 0.10

    @property
    def num_edges(self) -> int:
        """E, the number of boundary groups (edge-map channels)."""
        return len(self.groups)

    def flip_permutation(self) -> np.ndarray:
        """perm[i] = index that landmark i becomes after a horizontal flip (an involution)."""
        perm = np.arange(self.num_points)
        for a, b in self.flip_pairs:
            perm[a], perm[b] = b, a
        return perm

    def e2h_routing(self) -> tuple[np.ndarray, np.ndarray]:
        """E2H routing (method.md 3.6): R (N, E) with R[n, e] = 1 iff n is in group e, and
        bias b (N,) = 1 iff n is in no group."""
        r = np.zeros((self.num_points, self.num_edges), dtype=np.float32)
        for e, g in enumerate(self.groups):
            r[list(g.indices), e] = 1.0
        bias = (r.sum(axis=1) == 0).astype(np.float32)
        return r, bias

    def normaliser_indices(self, name: str | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The two index lists of normaliser ``name`` (default: the layout's default)."""
        key = name or self.default_normaliser
        if key not in self.normalisers:
            raise KeyError(f"layout {self.name!r} has no normaliser {key!r}; known: {sorted(self.normalisers)}")
        return self.normalisers[key]


def _range(a: int, b: int) -> tuple[int, ...]:
    return tuple(range(a, b + 1))


WFLW98 = Layout(
    name="wflw98",
    num_points=98,
    groups=(
        BoundaryGroup("FaceContour", _range(0, 32), False),
        BoundaryGroup("RightEyebrow", _range(33, 41), True),
        BoundaryGroup("LeftEyebrow", _range(42, 50), True),
        BoundaryGroup("NoseLine", _range(51, 54), False),
        BoundaryGroup("Nose", _range(55, 59), False),
        BoundaryGroup("RightEye", _range(60, 67), True),
        BoundaryGroup("LeftEye", _range(68, 75), True),
        BoundaryGroup("OuterLip", _range(76, 87), True),
        BoundaryGroup("InnerLip", _range(88, 95), True),
    ),
    flip_pairs=(
        *((i, 32 - i) for i in range(16)),
        (33, 46), (34, 45), (35, 44), (36, 43), (37, 42), (38, 50), (39, 49), (40, 48), (41, 47),
        (60, 72), (61, 71), (62, 70), (63, 69), (64, 68), (65, 75), (66, 74), (67, 73),
        (55, 59), (56, 58),
        (76, 82), (77, 81), (78, 80), (87, 83), (86, 84),
        (88, 92), (89, 91), (95, 93),
        (96, 97),
    ),
    normalisers={"inter_ocular": ((60,), (72,)), "inter_pupil": ((96,), (97,))},
    default_normaliser="inter_ocular",
    threshold=0.10,
)

W300_68 = Layout(
    name="300w68",
    num_points=68,
    groups=(
        BoundaryGroup("FaceContour", _range(0, 16), False),
        BoundaryGroup("RightEyebrow", _range(17, 21), False),
        BoundaryGroup("LeftEyebrow", _range(22, 26), False),
        BoundaryGroup("NoseLine", _range(27, 30), False),
        BoundaryGroup("Nose", _range(31, 35), False),
        BoundaryGroup("RightEye", _range(36, 41), True),
        BoundaryGroup("LeftEye", _range(42, 47), True),
        BoundaryGroup("OuterLip", _range(48, 59), True),
        BoundaryGroup("InnerLip", _range(60, 67), True),
    ),
    flip_pairs=(
        *((i, 16 - i) for i in range(8)),
        (17, 26), (18, 25), (19, 24), (20, 23), (21, 22),
        (31, 35), (32, 34),
        (36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46),
        (48, 54), (49, 53), (50, 52), (61, 63), (60, 64), (67, 65), (58, 56), (59, 55),
    ),
    normalisers={"inter_ocular": ((36,), (45,)), "inter_pupil": (_range(36, 41), _range(42, 47))},
    default_normaliser="inter_ocular",
    threshold=0.05,
)


def cofw29(left_eye_closed: bool = False) -> Layout:
    """COFW-29. ``left_eye_closed=False`` keeps the official code's open LeftEye group
    (``layout.cofw_left_eye_closed``, method.md 2.3) for parity."""
    return Layout(
        name="cofw29",
        num_points=29,
        groups=(
            BoundaryGroup("RightEyebrow", (0, 4, 2, 5), True),
            BoundaryGroup("LeftEyebrow", (1, 6, 3, 7), True),
            BoundaryGroup("RightEye", (8, 12, 10, 13), True),
            BoundaryGroup("LeftEye", (9, 14, 11, 15), left_eye_closed),
            BoundaryGroup("Nose", (18, 20, 19, 21), True),
            BoundaryGroup("LowerLip", (22, 26, 23, 27), True),
            BoundaryGroup("UpperLip", (22, 24, 23, 25), True),
        ),
        flip_pairs=(
            (0, 1), (4, 6), (2, 3), (5, 7), (8, 9), (10, 11), (12, 14), (16, 17), (13, 15), (18, 19), (22, 23),
        ),
        normalisers={"inter_pupil": ((16,), (17,)), "inter_ocular": ((8,), (9,))},
        default_normaliser="inter_pupil",
        threshold=0.10,
    )


COFW29 = cofw29()

LAYOUTS: dict[str, Layout] = {lay.name: lay for lay in (WFLW98, W300_68, COFW29)}


def get_layout(name_or_points: str | int) -> Layout:
    """Look a layout up by name (``wflw98``, ``300w68``, ``cofw29``) or by point count."""
    if isinstance(name_or_points, int) or str(name_or_points).isdigit():
        n = int(name_or_points)
        for lay in LAYOUTS.values():
            if lay.num_points == n:
                return lay
        raise KeyError(f"no layout with {n} points; known: {[lay.num_points for lay in LAYOUTS.values()]}")
    if name_or_points not in LAYOUTS:
        raise KeyError(f"unknown layout {name_or_points!r}; known: {sorted(LAYOUTS)}")
    return LAYOUTS[name_or_points]
