"""Every shipped job spec builds its model (meta device) and objective; every shipped search space, applied
to the job specs of its objective the way trials apply it, only yields configurations whose objective builds:
every combination of its discrete options and a few dozen seeded samples of its own distributions."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from flare.models.layouts import get_layout
from flare.platform.config import JobConfig, load_job, load_yaml, parse_job, set_paths
from flare.platform.search_space import SearchSpec, load_search, plain
from flare.platform.specs import search_objective

ROOT = Path(__file__).resolve().parents[1]
JOB_FILES = sorted((ROOT / "jobs").glob("*.yaml"))
SEARCH_FILES = sorted((ROOT / "jobs" / "search").glob("*.yaml"))
SAMPLES = 32


def build_objective(job: JobConfig) -> nn.Module:
    """The one place this test reaches the objective builder."""
    from flare.platform.builders import objective_from_config

    return objective_from_config(job.objective)


def build_model_on_meta(job: JobConfig) -> nn.Module:
    from flare.platform.builders import build_model

    with torch.device("meta"):
        return build_model(job, get_layout(job.model.layout))


def test_there_are_shipped_specs() -> None:
    assert len(JOB_FILES) >= 8 and len(SEARCH_FILES) >= 3


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.stem)
def test_job_spec_builds_model_and_objective(path: Path) -> None:
    job = load_job(path)
    model = build_model_on_meta(job)
    params = list(model.parameters())
    assert params and all(p.is_meta for p in params)
    assert sum(p.numel() for p in params) > 10_000
    assert isinstance(build_objective(job), nn.Module)


def _jobs_for(search_path: Path) -> list[Path]:
    objectives = search_objective(load_yaml(search_path)).split("|")
    jobs = [p for p in JOB_FILES if objectives == ["any"] or load_job(p).objective.name in objectives]
    assert jobs, f"{search_path.name}: no shipped job spec trains {objectives}"
    return jobs


def _sample(spec: SearchSpec, rng: np.random.Generator) -> dict[str, Any]:
    """One configuration drawn from the file's own distributions (the Tune domains trials get)."""
    out = {}
    for key, domain in spec.param_space().items():
        if isinstance(domain, dict):  # grid_search
            out[key] = domain["grid_search"][rng.integers(len(domain["grid_search"]))]
        else:
            out[key] = domain.sample(random_state=rng)
    return out


def _discrete_combinations(spec: SearchSpec, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Every combination of the choice/grid options, the continuous parameters drawn once each."""
    finite = {k: list(d.arg) for k, d in spec.params.items() if d.kind in ("choice", "grid")}
    out = []
    for combo in itertools.product(*finite.values()):
        values = _sample(spec, rng)
        values.update(zip(finite, combo))
        out.append(values)
    return out


SEARCH_PARAMS = SEARCH_FILES


@pytest.mark.parametrize("search_path", SEARCH_PARAMS, ids=lambda p: p.stem)
def test_search_space_samples_build(search_path: Path) -> None:
    spec = load_search(search_path)
    rng = np.random.default_rng(0)
    configs = _discrete_combinations(spec, rng) + [_sample(spec, rng) for _ in range(SAMPLES)]
    models_seen: set[str] = set()
    for job_path in _jobs_for(search_path):
        base = load_job(job_path).model_dump(mode="json")
        for i, values in enumerate(configs):
            where = f"{search_path.name} on {job_path.name}, sample {i}: {values}"
            raw = set_paths(base, spec.overrides({k: plain(v) for k, v in values.items()}), where)
            job = parse_job(raw, source=where)  # what a trial runs
            try:
                build_objective(job)
            except (ValueError, TypeError) as err:
                pytest.fail(f"{where}: objective does not build: {err}")
            key = job.model.model_dump_json() + str(job.data.input_size)
            if key not in models_seen:
                models_seen.add(key)
                build_model_on_meta(job)
