"""flare: train and tune stacked-hourglass facial-landmark detectors.

The repository root is this package; ``flare.models``, ``flare.losses``, ``flare.datasets``,
``flare.platform`` and ``flare.jobs`` are namespace subpackages (folders without
``__init__.py``) so they never shadow the stdlib ``platform`` or the ``datasets`` package.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Predictor", "__version__", "predict_faces"]


def __getattr__(name: str):
    """Lazy public API without importing torch on ``import flare``: ``flare.Predictor`` and
    ``flare.predict_faces(p, image)``, what ``flare predict`` runs (detector, wide first look, re-crop)."""
    if name == "Predictor":
        from flare.platform.predictor import Predictor

        return Predictor
    if name == "predict_faces":
        from flare.platform.refine import predict_faces

        return predict_faces
    raise AttributeError(f"module 'flare' has no attribute {name!r}")
