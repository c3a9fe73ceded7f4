"""Shared fixtures. Real data is found through FLARE_TEST_DATA (set by .ci/run to ../shared/datasets)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def test_data() -> Path:
    """Root of the shared real datasets; tests that need it skip with a visible reason elsewhere."""
    root = os.environ.get("FLARE_TEST_DATA")
    if not root:
        pytest.skip("FLARE_TEST_DATA is not set: real-data tests need ../shared/datasets (.ci/run sets it)")
    path = Path(root)
    if not (path / "300W").is_dir():
        pytest.skip(f"FLARE_TEST_DATA={root} has no 300W/ folder")
    return path
