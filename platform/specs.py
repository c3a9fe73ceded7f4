"""The shipped job specs (``jobs/*.yaml``) and search spaces (``jobs/search/*.yaml``), package data of
``flare.jobs``: list them, copy one to edit, validate a spec, and resolve ``flare train NAME``.

Job specs are named by their stem (``300w_star``), search spaces by ``search/STEM`` (``search/star``);
where a search space is expected (``flare tune --search``) the bare stem works too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flare
from flare.files import atomic_write_bytes
from flare.platform.config import ConfigError, JobConfig, load_job, load_yaml

SEARCH_PREFIX = "search/"


def jobs_dir() -> Path:
    """Where the installed package keeps its job specs."""
    return Path(flare.__file__).resolve().parent / "jobs"


def job_specs() -> dict[str, Path]:
    """Shipped job specs by name."""
    return {p.stem: p for p in sorted(jobs_dir().glob("*.yaml"))}


def search_specs() -> dict[str, Path]:
    """Shipped search spaces by name (``search/STEM``)."""
    return {SEARCH_PREFIX + p.stem: p for p in sorted((jobs_dir() / "search").glob("*.yaml"))}


def _lookup(name: str, search: bool) -> Path | None:
    name = name.removesuffix(".yaml")
    if search:
        return search_specs().get(name if name.startswith(SEARCH_PREFIX) else SEARCH_PREFIX + name)
    return job_specs().get(name)


def resolve_spec(arg: str | Path, search: bool = False) -> Path:
    """A path that exists wins; else the shipped job spec (or, with ``search``, search space) of that name;
    else a one-line error listing the shipped names."""
    path = Path(arg).expanduser()
    if path.is_file():
        return path
    found = _lookup(str(arg), search)
    if found is not None:
        return found
    names = search_specs() if search else job_specs()
    what = "search space" if search else "job spec"
    raise ConfigError(f"{arg}: no such file and no shipped {what} of that name; shipped: {', '.join(names)}")


@dataclass(frozen=True)
class ModelSize:
    """A job spec's model: stacks x channels at an input size, and its parameter count."""

    stacks: int
    channels: int
    input_size: int
    parameters: int

    def __str__(self) -> str:
        return f"{self.stacks}x{self.channels} {self.input_size}px {self.parameters / 1e6:.2f}M params"


def build_on_meta(job: JobConfig, layout_name: str | None = None) -> tuple[ModelSize, Any]:
    """Build the job's model on the meta device (no memory, no weights) and its objective."""
    import torch

    from flare.models.layouts import get_layout
    from flare.platform.builders import build_model, objective_from_config

    name = layout_name or job.model.layout
    if name is None:
        raise ConfigError("model.layout: not set; name the layout (wflw98, 300w68, cofw29) to size the model")
    with torch.device("meta"):
        model = build_model(job, get_layout(name))
    objective = objective_from_config(job.objective)
    size = ModelSize(job.model.stacks, job.model.channels, job.data.input_size,
                     sum(p.numel() for p in model.parameters()))
    return size, objective


def search_objective(raw: dict[str, Any]) -> str:
    """The objective(s) a raw search file trains: fixed, or the options of a choice or bundles."""
    if "objective.name" in (raw.get("fixed") or {}):
        return str(raw["fixed"]["objective.name"])
    names: list[str] = []
    for key, dist in (raw.get("params") or {}).items():
        for options in (dist.values() if isinstance(dist, dict) else ()):
            if isinstance(options, dict):
                names += [str(b["objective.name"]) for b in options.values()
                          if isinstance(b, dict) and "objective.name" in b]
            elif isinstance(options, list) and key == "objective.name":
                names += [str(v) for v in options]
    return "|".join(dict.fromkeys(names)) or "any"


def list_lines() -> list[str]:
    """One line per shipped job spec (name, layout, objective, model size) and search space (name,
    objective, parameters)."""
    jobs = {name: load_job(path) for name, path in job_specs().items()}
    width = max(map(len, [*jobs, *search_specs()]))
    lines = ["job specs:"]
    for name, job in jobs.items():
        size, _ = build_on_meta(job)
        lines.append(f"  {name:<{width}}  {job.model.layout or '-':<7} {job.objective.name:<9} {size}")
    lines.append("search spaces:")
    for name, path in search_specs().items():
        raw = load_yaml(path)
        params = ", ".join(raw.get("params") or {})
        lines.append(f"  {name:<{width}}  objective {search_objective(raw):<9} params {params}")
    return lines


def copy_spec(name: str, dest: Path, force: bool = False) -> Path:
    """Copy the shipped spec ``name`` to ``dest`` (a file, or a directory to put it in) to edit; an existing
    file is replaced only with ``force``. The write is atomic."""
    src = _lookup(name, search=name.startswith(SEARCH_PREFIX))
    if src is None:
        names = [*job_specs(), *search_specs()]
        raise ConfigError(f"{name}: no shipped spec of that name; shipped: {', '.join(names)}")
    dest = Path(dest).expanduser()
    if dest.is_dir():
        dest = dest / src.name
    if not dest.parent.is_dir():
        raise FileNotFoundError(f"{dest.parent}: no such directory")
    if dest.exists() and not force:
        raise FileExistsError(f"{dest} already exists; pass --force to replace it")
    atomic_write_bytes(dest, src.read_bytes())
    return dest


def validate_spec(arg: str | Path, overrides: list[str] | None = None) -> str:
    """Parse the job spec, check its data (manifest, splits, layout; see ``check_job``), build its model on
    the meta device and its objective. Returns a one-line summary; raises with a one-line error."""
    from flare.platform.ray_train import check_job

    path = resolve_spec(arg)
    job = load_job(path, overrides or [])
    manifest = check_job(job)
    size, _ = build_on_meta(job, manifest.layout.name)
    return (f"OK {path}: {manifest.layout.name} {job.objective.name} {size}; "
            f"data {manifest.path}")
