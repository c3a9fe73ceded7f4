"""The README shows the two commands and a configuration reference that matches the config models."""

from __future__ import annotations

from pathlib import Path

from flare.platform.config import JobConfig, flatten
from flare.platform.config_reference import BEGIN, END, reference_markdown

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_opens_with_the_two_commands() -> None:
    head = README[:600]
    assert "make demo" in head and "make test" in head


def test_config_reference_matches_the_models() -> None:
    block = README[README.index(BEGIN) : README.index(END) + len(END)]
    assert block == reference_markdown(), "run: python -m flare.platform.config_reference"
    keys = flatten(JobConfig.model_validate({"data": {"manifest": "m"}}).model_dump())
    for key in keys:
        assert f"| `{key}` |" in block, key
