"""Job specs: YAML files validated by typed config models.

Each section is a small pydantic model with ``extra="forbid"``, so an unknown key or a wrong type is
an error that names the key. ``--set a.b=value`` overrides any field (the value is parsed as YAML).
Relative paths (:data:`PATH_FIELDS`) are made absolute once, on the driver, by :func:`load_job`.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A job spec problem; ``str()`` is one line naming the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """Which prepared dataset to read and how to crop it."""

    manifest: str = Field(description="path or URI of a manifest.json written by `flare data prepare`; a "
                          "relative path is taken from the directory flare is started in")
    train_split: str = Field("train", description="split trained on")
    val_split: str = Field("val", description="split that selects epochs, weights and decoders")
    test_split: str = Field("test", description="split evaluated once per finished run")
    max_train_samples: int | None = Field(None, ge=1, description="use only the first N training faces")
    max_val_samples: int | None = Field(None, ge=1, description="use only the first N validation faces")
    input_size: int = Field(256, ge=64, le=256, description="crop side S in px; heatmaps are S/4")
    augment: bool = Field(True, description="STAR augmentation (method.md 8.2) on training samples")
    loader_workers: int = Field(0, ge=0, le=64, description="processes (--no-ray) or Ray Data actors per worker "
                                "(Ray, 1 CPU each) building training batches ahead of the step (0: in the "
                                "training process); batches do not depend on it")
    drop_last: bool = Field(False, description="train on full batches only: each epoch leaves out its smaller "
                            "remainder (as the official code's multi-GPU loader does); every step then has one "
                            "shape (one set of cudnn choices, one compiled graph)")


class ModelConfig(_Section):
    """Stacked hourglass with AAM (method.md 3)."""

    layout: str | None = Field(None, description="expected landmark layout (wflw98, 300w68, cofw29); "
                               "checked against the data before training")
    stacks: int = Field(4, ge=1, le=8, description="hourglass stacks K")
    channels: int = Field(256, ge=8, description="feature channels f")
    depth: int = Field(4, ge=1, le=5, description="hourglass recursion depth (4: 64 -> 4 px)")
    aam: bool = Field(True, description="AAM point and edge heads with E2H fusion (3.6)")
    heatmap_activation: Literal["in_relu", "none"] | None = Field(
        None, description="None picks the objective's: in_relu for star/l2/smoothl1, none for rwsa (3.5)"
    )
    fusion: Literal["multiply", "none", "log_add"] = Field("multiply", description="AAM fusion of raw RwSA scores (3.6)")


class StarConfig(_Section):
    """STAR loss knobs (method.md 4)."""

    w: float = Field(1.0, ge=0, description="value-restriction weight (Eq. 7)")
    distance: Literal["l1", "l2", "smoothl1", "wing", "awing"] = Field("smoothl1", description="per-component distance d (4.6)")
    s: float = Field(0.01, gt=0, description="smooth-l1 knee in normalised units; only distance smoothl1 "
                     "uses it (ignored for the others)")
    restriction: Literal["value", "detach", "none"] = Field("value", description="eigenvalue restriction (4.7)")
    value_form: Literal["sum_abs", "half_sum"] = Field("sum_abs", description="official code form or paper Eq. 7 form")
    variant: Literal["v1", "v2"] = Field("v2", description="v2: per-component Eq. 6; v1: whitened norm (4.10)")

    @property
    def distance_kwargs(self) -> dict[str, float]:
        """Keyword parameters of ``distance``: the knee ``s`` for smoothl1, none for the others."""
        return {"s": self.s} if self.distance == "smoothl1" else {}


class RwsaConfig(_Section):
    """RwSA loss knobs (method.md 5)."""

    alpha: float = Field(1.0, ge=0, description="margin weight alpha (5.2)")
    epsilon: float = Field(1.0, gt=0, description="log-sum-exp temperature epsilon (5.2)")
    lam: float = Field(5000.0, ge=0, description="lambda of L_AWing + lambda * L_ours (Eq. A14)")
    margin: Literal["smoothl1", "l1", "l2"] = Field("smoothl1", description="margin Delta (5.4)")
    reduction: Literal["pixel_mean", "landmark_mean"] = Field("pixel_mean", description="reduction behind lambda (5.8)")
    target: Literal["bilinear", "nearest"] = Field("bilinear", description="how smoothing samples enter the loss (5.6)")


class SmoothingConfig(_Section):
    """Image-aware label smoothing (method.md 6); used by the rwsa objective."""

    enabled: bool = Field(True, description="draw smoothing samples (else the annotated point)")
    gamma: float = Field(0.01, gt=0, description="smoothing scale (0.001 for COFW)")
    samples: int = Field(10, ge=1, description="samples per landmark per iteration")
    k: int = Field(7, ge=1, description="patch half-size; fixed at prepare time, checked against the manifest")


class ObjectiveConfig(_Section):
    """The training objective and all its weights (method.md 4.8, 5.8)."""

    name: Literal["star", "rwsa", "l2", "smoothl1"] = Field("star", description="the landmark objective")
    star: StarConfig = StarConfig()
    rwsa: RwsaConfig = RwsaConfig()
    smoothing: SmoothingConfig = SmoothingConfig()
    awing_point_weight: float = Field(10.0, ge=0, description="AWing weight on the AAM point maps")
    awing_edge_weight: float = Field(10.0, ge=0, description="AWing weight on the AAM edge maps")
    dr_weight: float = Field(0.0, ge=0, description="JS distribution regulariser (STAR ablation)")


class OptimizerConfig(_Section):
    """Adam with MultiStep milestones (method.md 4.11, 5.10)."""

    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas")
    weight_decay: float = Field(0.0, ge=0, description="0 as in the official code")
    milestones: list[int] = Field([200, 350, 450], description="epochs after which lr *= gamma")
    gamma: float = Field(0.1, gt=0, description="MultiStep factor")
    epochs: int = Field(500, ge=1, description="training epochs")
    batch_size: int = Field(128, ge=1, description="global batch size, split over workers")
    grad_clip: float | None = Field(None, gt=0, description="global gradient-norm clip (off for parity)")
    time_budget_s: float | None = Field(None, gt=0, description="wall-clock budget of one process: epochs and "
                                        "milestones are fitted to the epochs that fit (platform/budget.py)")


class EmaConfig(_Section):
    """EMA of weights and float buffers; decay 0.5^(128/10000) per step (method.md 4.11)."""

    enabled: bool = Field(True, description="keep an EMA of the weights")
    decay: float = Field(0.5 ** (128 / 10000), gt=0, lt=1, description="EMA decay per step")


class ScalingConfig(_Section):
    """Ray Train scaling: workers, GPUs and CPUs per worker, and how workers spread over nodes."""

    workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks)")
    use_gpu: bool = Field(False, description="one GPU per worker (nccl)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per worker")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK", description="where Ray places the workers: PACK (few nodes), SPREAD (many nodes, best effort), "
        "STRICT_SPREAD (one worker per node, needs workers <= nodes)")


class CheckpointConfig(_Section):
    """Keep the best k checkpoints by val NME plus the latest."""

    keep_best: int = Field(2, ge=1, description="checkpoints kept by val NME (plus the latest)")
    max_failures: int = Field(2, ge=0, description="worker failures Ray Train recovers from")


class MlflowConfig(_Section):
    """Tracking: URI (default sqlite under ./mlruns), experiment and registered model name."""

    tracking_uri: str | None = Field(None, description="MLflow URI (default: MLFLOW_TRACKING_URI, else sqlite under ./mlruns)")
    experiment: str = Field("flare", description="MLflow experiment")
    registered_model: str | None = Field(None, description="register the selected model under this name")


class JobConfig(_Section):
    """A training job: one YAML file under ``jobs/``."""

    name: str = Field("job", description="run name")
    seed: int = Field(0, description="seeds the model, augmentation and shuffling")
    data: DataConfig
    model: ModelConfig = ModelConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    ema: EmaConfig = EmaConfig()
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    compile: Literal["off", "blocks", "model"] = Field(
        "off", description="torch.compile: each residual block (fast to compile) or the whole forward; true = model "
        "(CUDA; gain: bench/gpu_run.py)")
    compile_objective: bool = Field(
        False, description="torch.compile the objective (its fp32 elementwise chains fused; 3.8-4.7x faster on CPU, "
        "bench/objective_compile.py); compiles once per batch shape, the epoch's last smaller batch included")
    decode: Literal["auto", "softargmax", "argmax", "argmax_refine"] = Field(
        "auto", description="auto: soft-argmax for star/l2/smoothl1; argmax+refine for rwsa, both reported"
    )
    scaling: ScalingConfig = ScalingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mlflow: MlflowConfig = MlflowConfig()

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_bool(cls, v: object) -> object:
        """Specs written before the modes existed said ``compile: true`` (the whole forward) or ``false``."""
        return {True: "model", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not v or len(v) > 100 or any(c in v for c in "/\\ ") or not v.isprintable():
            raise ValueError("name must be 1-100 printable characters without slashes or spaces")
        return v

    @model_validator(mode="after")
    def _batch_divisible(self) -> JobConfig:
        if self.optimizer.batch_size % self.scaling.workers:
            raise ValueError(
                f"optimizer.batch_size={self.optimizer.batch_size} is not divisible by scaling.workers="
                f"{self.scaling.workers}"
            )
        return self

    @property
    def heatmap_activation(self) -> str:
        """The activation in effect: the explicit one, else the objective's (method.md 3.5)."""
        if self.model.heatmap_activation is not None:
            return self.model.heatmap_activation
        return "none" if self.objective.name == "rwsa" else "in_relu"

    def flat(self) -> dict[str, Any]:
        """The flattened config (``a.b.c`` keys) for MLflow params."""
        return flatten(self.model_dump(mode="json"))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def set_paths(raw: dict[str, Any], values: dict[str, Any], source: str) -> dict[str, Any]:
    """A copy of the nested job dict with ``a.b.c`` paths set to the given values."""
    out = copy.deepcopy(raw)
    for key, value in values.items():
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"{source}: bad key {key!r}")
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{source}: {key}: {p} is not a section of the job spec")
            node = nxt
        node[parts[-1]] = copy.deepcopy(value)
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str = "--set") -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (value parsed as YAML) in order, returning a new dict."""
    out = copy.deepcopy(raw) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override {item!r} is not of the form key.path=value")
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or type(err).__name__
            raise ConfigError(f"{source}: {key}={value!r} is not valid YAML ({problem})") from None
        out = set_paths(out, {key: parsed}, source)
    return out


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {loc + ': ' if loc else ''}{msg}{more}"


def parse_job(raw: dict[str, Any], source: str = "<job>") -> JobConfig:
    """Validate a nested dict into a :class:`JobConfig`; errors are one line naming the key."""
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, with a one-line error naming the file (and line for syntax errors)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a job spec must be a YAML mapping")
    return raw


PATH_FIELDS = ("data.manifest", "mlflow.tracking_uri")  # job-spec keys that hold a path or a URI
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # sqlite:///..., s3://..., http://..., file:...
_NAMED_URIS = ("databricks", "databricks-uc")  # MLflow tracking targets that are names, not paths


def is_uri(value: str) -> bool:
    """True for a URI (``scheme:...``) or an MLflow named target, which are never resolved as paths."""
    return bool(_SCHEME.match(value)) or value in _NAMED_URIS


def absolute_path(value: str, base: Path | None = None) -> str:
    """``value`` as an absolute path against ``base`` (default: the working directory); URIs, absolute
    paths and empty values are returned as they are."""
    if not value or is_uri(value):
        return value
    path = Path(value).expanduser()
    return str(path) if path.is_absolute() else str((Path(base or Path.cwd()) / path).resolve())


def absolute_paths(raw: dict[str, Any], base: Path | None = None) -> dict[str, Any]:
    """A copy of the nested job dict with every :data:`PATH_FIELDS` string made absolute."""
    out = copy.deepcopy(raw)
    for key in PATH_FIELDS:
        section, name = key.split(".")
        node = out.get(section)
        if isinstance(node, dict) and isinstance(node.get(name), str):
            node[name] = absolute_path(node[name], base)
    return out


def load_job(path: Path, overrides: list[str] | None = None) -> JobConfig:
    """Load ``path``, apply ``--set`` overrides and validate. Relative paths (:data:`PATH_FIELDS`) are
    resolved here, once, against the working directory, so Ray workers (which run elsewhere) get
    absolute paths."""
    raw = apply_overrides(load_yaml(path), overrides or [], source=str(path))
    return parse_job(absolute_paths(raw), source=str(path))
