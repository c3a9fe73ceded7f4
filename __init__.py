"""flare: train and tune stacked-hourglass facial-landmark detectors.

The repository root is this package; ``flare.models``, ``flare.losses``, ``flare.datasets``,
``flare.platform`` and ``flare.jobs`` are namespace subpackages (folders without
``__init__.py``) so they never shadow the stdlib ``platform`` or the ``datasets`` package.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
