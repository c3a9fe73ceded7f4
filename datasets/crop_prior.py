"""The training crop of a face estimated from its whole shape, for re-cropping from predicted landmarks.

The training crop rule (method.md 8.1, :func:`flare.datasets.records.crop_center_scale`) reads the landmark
extent, so it rests on the few extreme points (jaw ends, chin, brows), the noisiest ones a model predicts. A
:class:`CropPrior` predicts the same crop from all points: the shape is normalised by its centroid ``m`` and
RMS radius ``r`` (q = (p - m) / r), projected on its first ``k`` principal components ``z = V (q - q_mean)``,
and a linear map gives the crop centre and side in that frame,

    centre = m + r (a_xy + W_xy z),    side = 200 scale = r exp(a_s + W_s z),

fitted by least squares on the training split's annotated shapes and their training crops (whatever rule made
them: the extent rule or a dataset's metadata crop). Similarity-invariant, so it is fitted in the prepared
loose-crop frame, where every training crop is the central ``size / LOOSE_FACTOR`` px.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from flare.datasets.shards import LOOSE_FACTOR

if TYPE_CHECKING:
    from flare.datasets.ingest import Manifest

# Chosen on the 300W validation faces (Haar boxes, 14-epoch reduced RwSA model; RESULTS.md): components 2, 3,
# 4, 5, 6, 8, 10 -> gap of the refined detector path to the ground-truth box 0.008, 0.006, 0.005, 0.011,
# 0.025, 0.041, 0.053 NME points (the extent rule: 0.124).
COMPONENTS = 4


def normalise(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centroids (F, 2), RMS radii (F,) and normalised shapes (F, N, 2) of shapes (F, N, 2)."""
    pts = np.asarray(points, np.float64)
    m = pts.mean(axis=1)
    r = np.sqrt(((pts - m[:, None]) ** 2).sum(axis=2).mean(axis=1))
    return m, r, (pts - m[:, None]) / np.maximum(r, 1e-12)[:, None, None]


@dataclass(frozen=True)
class CropPrior:
    """Shape -> training crop (module docstring); ``faces``: how many training shapes it was fitted on."""

    mean: np.ndarray  # (2N,) mean normalised shape
    components: np.ndarray  # (k, 2N) principal directions
    weights: np.ndarray  # (k, 3) -> centre x, centre y (in radii), log(side / radius)
    offset: np.ndarray  # (3,)
    faces: int

    @property
    def num_points(self) -> int:
        return len(self.mean) // 2

    def crops(self, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Crop centres (F, 2) and scales (F,) (side = 200 scale px) for shapes (F, N, 2) in source px."""
        pts = np.asarray(landmarks, np.float64).reshape(-1, self.num_points, 2)
        m, r, q = normalise(pts)
        y = self.offset + ((q.reshape(len(q), -1) - self.mean) @ self.components.T) @ self.weights
        return m + r[:, None] * y[:, :2], r * np.exp(y[:, 2]) / 200.0

    def to_json(self) -> dict[str, Any]:
        return {"faces": self.faces, "mean": self.mean.tolist(), "components": self.components.tolist(),
                "weights": self.weights.tolist(), "offset": self.offset.tolist()}

    @classmethod
    def from_json(cls, data: dict[str, Any], num_points: int, source: str) -> CropPrior:
        """Read :meth:`to_json`'s dict; ValueError naming ``source`` and the key for a malformed one."""
        try:
            mean, components, weights, offset = (np.asarray(data[k], np.float64)
                                                 for k in ("mean", "components", "weights", "offset"))
            faces = int(data["faces"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{source}: crop_prior is malformed ({type(err).__name__}: {err})") from None
        k = len(components)
        shapes = [(mean.shape, (2 * num_points,)), (components.shape, (k, 2 * num_points)),
                  (weights.shape, (k, 3)), (offset.shape, (3,))]
        if any(got != want for got, want in shapes) or not all(np.all(np.isfinite(a)) for a in (mean, components,
                                                                                                 weights, offset)):
            raise ValueError(f"{source}: crop_prior does not fit {num_points} finite points")
        return cls(mean, components, weights, offset, faces)


def fit_crop_prior(landmarks: np.ndarray, centers: np.ndarray, sides: np.ndarray,
                   components: int = COMPONENTS) -> CropPrior:
    """Least-squares :class:`CropPrior` from shapes (F, N, 2) and their training crops (centres (F, 2), sides
    (F,) = 200 scale, same px). ValueError with fewer shapes than ``components`` + 2."""
    pts = np.asarray(landmarks, np.float64)
    if pts.ndim != 3 or len(pts) < components + 2:
        raise ValueError(f"a crop prior needs at least {components + 2} shapes, got {len(pts)}")
    m, r, q = normalise(pts)
    y = np.column_stack([(np.asarray(centers, np.float64) - m) / r[:, None],
                         np.log(np.asarray(sides, np.float64) / r)])
    x = q.reshape(len(q), -1)
    mean = x.mean(axis=0)
    v = np.linalg.svd(x - mean, full_matrices=False)[2][:components]
    z = (x - mean) @ v.T
    offset = y.mean(axis=0)
    weights = np.linalg.lstsq(z, y - offset, rcond=None)[0]
    return CropPrior(mean, v, weights, offset, len(pts))


def manifest_crop_prior(manifest: Manifest, split: str, components: int = COMPONENTS) -> CropPrior | None:
    """The prior of a prepared split: its shapes in loose-crop px, each training crop the central
    ``size / LOOSE_FACTOR`` px (:func:`flare.datasets.prepare.loose_crop_matrix`). None for a split of fewer
    than ``components`` + 2 faces (too few to fit; re-crops then use the extent rule)."""
    import pyarrow.parquet as pq

    table = pq.read_table(manifest.shard_paths(split), columns=["landmarks", "image_size"])
    n = manifest.layout.num_points
    pts = np.asarray(table["landmarks"].to_pylist(), np.float64).reshape(-1, n, 2)
    size = np.asarray(table["image_size"].to_pylist(), np.float64)
    if len(pts) < components + 2:
        return None
    centers = np.repeat(((size - 1) / 2)[:, None], 2, axis=1)
    return fit_crop_prior(pts, centers, size / LOOSE_FACTOR, components)
