"""Search files (``jobs/search/*.yaml``): typed models, validation against a job spec, and
conversion to Ray Tune distributions.

A search file names job-spec paths (``objective.star.w``) and gives each a distribution written as a
one-key mapping, ``{loguniform: [0.1, 10]}``. Kinds: ``uniform``/``loguniform`` ``[low, high]``,
``randint`` ``[low, high)``, ``choice``/``grid`` ``[v1, v2, ...]``. A ``choice``/``grid`` may instead
be a mapping ``{label: {path: value, ...}}``: each option is a bundle of overrides applied together
(the parameter name is then only a label), e.g. a smoothing patch size ``k`` with the shards that were
prepared for it. Relative paths among the values (``data.manifest``) are made absolute when the file is
loaded, against the working directory, as :func:`flare.platform.config.load_job` does for job specs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flare.platform.config import (
    PATH_FIELDS,
    ConfigError,
    JobConfig,
    absolute_path,
    load_yaml,
    parse_job,
    set_paths,
)

KINDS = ("uniform", "loguniform", "randint", "choice", "grid")
Value = bool | int | float | str | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Distribution(_Strict):
    """One parameter's distribution; exactly one of the fields is set."""

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    choice: list[Value] | dict[str, dict[str, Value]] | None = None
    grid: list[Value] | dict[str, dict[str, Value]] | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, data: Any) -> Any:
        if not isinstance(data, dict) or len(data) != 1:
            raise ValueError(f"a distribution is a one-key mapping, one of {', '.join(KINDS)}")
        kind = next(iter(data))
        if kind not in KINDS:
            raise ValueError(f"unknown distribution {kind!r}; use one of {', '.join(KINDS)}")
        return data

    @model_validator(mode="after")
    def _bounds(self) -> Distribution:
        kind, arg = self.kind, self.arg
        if kind in ("uniform", "loguniform", "randint"):
            low, high = arg
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"{kind}: need low < high, got [{low}, {high}]")
            if kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform: low must be > 0, got {low}")
        elif not arg:
            raise ValueError(f"{kind}: needs at least one option")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def arg(self) -> Any:
        return getattr(self, self.kind)

    @property
    def is_bundle(self) -> bool:
        """Options are labelled bundles of overrides rather than values of one path."""
        return isinstance(self.arg, dict)

    def corners(self) -> list[Any]:
        """Values that together exercise the whole range: the bounds or every option."""
        if self.kind == "randint":
            return [self.arg[0], self.arg[1] - 1]
        return list(self.arg)

    def to_tune(self) -> Any:
        """The Ray Tune sampler (bundles sample their label)."""
        from ray import tune

        kind, arg = self.kind, self.arg
        if kind == "uniform":
            return tune.uniform(*arg)
        if kind == "loguniform":
            return tune.loguniform(*arg)
        if kind == "randint":
            return tune.randint(*arg)
        options = list(arg) if isinstance(arg, dict) else arg
        return tune.choice(options) if kind == "choice" else tune.grid_search(options)


class SchedulerSpec(_Strict):
    """ASHA (Li et al. 2020): rungs at grace_period * reduction_factor^k epochs, up to max_epochs."""

    grace_period: int = Field(1, ge=1, description="epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(3.0, gt=1, description="keep the best 1/reduction_factor at each rung")
    max_epochs: int = Field(..., ge=1, description="epochs of a trial that is never stopped (sets optimizer.epochs)")

    @model_validator(mode="after")
    def _grace_below_max(self) -> SchedulerSpec:
        if self.grace_period > self.max_epochs:
            raise ValueError(f"grace_period={self.grace_period} exceeds max_epochs={self.max_epochs}")
        return self

    def rungs(self) -> list[int]:
        """The epochs at which ASHA compares trials (below max_epochs)."""
        out, r = [], float(self.grace_period)
        while r < self.max_epochs:
            out.append(math.ceil(r))
            r *= self.reduction_factor
        return out


class SearchSpec(_Strict):
    """A search file: what to sample, how many trials, how to stop them early."""

    name: str | None = Field(None, description="search name prefix (default: the file's stem)")
    algorithm: Literal["random", "optuna"] = Field("random", description="random search, or Optuna's TPE")
    samples: int = Field(8, ge=1, description="trials (times the grid size); --samples overrides")
    seed: int = 0
    scheduler: SchedulerSpec
    fixed: dict[str, Value] = Field(default_factory=dict, description="overrides applied to every trial")
    params: dict[str, Distribution] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _optuna_no_grid(self) -> SearchSpec:
        if self.algorithm == "optuna":
            grids = [k for k, d in self.params.items() if d.kind == "grid"]
            if grids:
                raise ValueError(f"optuna cannot sample a grid ({', '.join(grids)}); use choice")
        return self

    def param_space(self) -> dict[str, Any]:
        """The Tune ``param_space``: one sampler per parameter, keyed by its name."""
        return {k: d.to_tune() for k, d in self.params.items()}

    def overrides(self, values: dict[str, Any]) -> dict[str, Any]:
        """Sampled values (bundle labels expanded) plus the fixed ones and max_epochs, as path -> value."""
        out: dict[str, Any] = {**self.fixed, "optimizer.epochs": self.scheduler.max_epochs}
        for key, dist in self.params.items():
            if key not in values:
                continue
            value = plain(values[key])
            if dist.is_bundle:
                out.update(dist.arg[value])
            else:
                out[key] = value
        return out


def plain(value: Any) -> Any:
    """A sampled value as a plain Python scalar (Tune samples numpy scalars)."""
    return value.item() if hasattr(value, "item") and callable(value.item) else value


def load_search(path: Path) -> SearchSpec:
    """Read and validate a search file; errors are one line naming the file and the key."""
    raw = map_path_values(load_yaml(path), lambda _key, value: absolute_path(value))
    try:
        return SearchSpec.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{path}: {loc}: {msg}" if loc else f"{path}: {msg}") from None


def map_path_values(raw: dict[str, Any], fn: Callable[[str, str], str]) -> dict[str, Any]:
    """A copy of a raw search file with ``fn(key, value)`` applied to every path value
    (:data:`PATH_FIELDS`) in ``fixed``, in bundles and in plain choices of a path."""
    def fix(values: Any) -> None:
        if isinstance(values, dict):
            for key in PATH_FIELDS:
                if isinstance(values.get(key), str):
                    values[key] = fn(key, values[key])

    raw = copy.deepcopy(raw)
    fix(raw.get("fixed"))
    for key, dist in (raw.get("params") or {}).items():
        for options in (dist.values() if isinstance(dist, dict) else ()):
            if isinstance(options, dict):
                for bundle in options.values():
                    fix(bundle)
            elif isinstance(options, list) and key in PATH_FIELDS:
                options[:] = [fn(key, v) if isinstance(v, str) else v for v in options]
    return raw


def corner_overrides(search: SearchSpec) -> list[tuple[str, dict[str, Any]]]:
    """(where, overrides) for every corner of every parameter, the others left at the job's values."""
    out = [("fixed", search.overrides({}))]
    for key, dist in search.params.items():
        for v in dist.corners():
            label = f"params.{key}={v}"
            out.append((label, search.overrides({key: v})))
    return out


def validate_search(job_raw: dict[str, Any], search: SearchSpec, source: str,
                    check: Callable[[JobConfig], Any] | None = None) -> list[JobConfig]:
    """Apply every corner value to the job spec and validate it (unknown path, bad value or, with
    ``check`` such as :func:`flare.platform.ray_train.check_job`, data that does not fit) before any
    trial starts. Returns the validated corner jobs."""
    jobs = []
    for where, values in corner_overrides(search):
        try:
            job = parse_job(set_paths(job_raw, values, f"{source}: {where}"), source=f"{source}: {where}")
            if check is not None:
                check(job)
        except ConfigError as err:
            raise ConfigError(f"{source}: {where}: {_strip_source(str(err), source, where)}") from None
        except (OSError, ValueError) as err:  # manifest and layout problems from ``check``
            raise ConfigError(f"{source}: {where}: {str(err).splitlines()[0]}") from None
        jobs.append(job)
    return jobs


def _strip_source(msg: str, source: str, where: str) -> str:
    prefix = f"{source}: {where}: "
    return msg.removeprefix(prefix)
