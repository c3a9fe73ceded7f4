"""Job specs: shipped recipes, one-line errors naming file and key, ``--set``
overrides, derived fields, and the ``flare train`` CLI failing fast on a bad spec (no Ray)."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from flare.platform.config import ConfigError, JobConfig, apply_overrides, load_job, parse_job

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
DATASETS = ("wflw", "300w", "cofw")
EMA_DECAY = math.exp((128 / 10000) * math.log(0.5))  # 0.5^(128/10000), method.md 4.11


def _write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _error(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_job(path, overrides)
    msg = str(info.value)
    assert "\n" not in msg, f"error is not one line: {msg!r}"
    return msg


MINIMAL = """\
name: t
data:
  manifest: m.json
"""


# ------------------------------------------------------------------------------------------ shipped


def test_every_shipped_spec_validates() -> None:
    paths = sorted(JOBS.glob("*.yaml"))
    names = {p.stem for p in paths}
    expected = {f"{d}_{o}" for d in DATASETS for o in ("star", "rwsa")} | {"demo", "tiny"}
    assert expected <= names, f"missing specs: {expected - names}"
    for path in paths:
        job = load_job(path)
        assert isinstance(job, JobConfig)
        assert job.optimizer.batch_size % job.scaling.workers == 0


@pytest.mark.parametrize("dataset", DATASETS)
def test_star_specs_carry_the_paper_recipe(dataset: str) -> None:
    """method.md 4.11: Adam 1e-3 (0.9, 0.999), wd 0, 500 epochs, x0.1 at 200/350/450, batch 128, EMA."""
    job = load_job(JOBS / f"{dataset}_star.yaml")
    opt = job.optimizer
    assert job.objective.name == "star"
    assert opt.lr == pytest.approx(1e-3, rel=0, abs=1e-15)
    assert opt.epochs == 500
    assert list(opt.milestones) == [200, 350, 450]
    assert opt.gamma == pytest.approx(0.1)
    assert opt.batch_size == 128
    assert tuple(opt.betas) == (0.9, 0.999)
    assert opt.weight_decay == 0.0
    assert job.objective.star.distance == "smoothl1"
    assert job.objective.star.w == 1.0
    assert (job.objective.awing_point_weight, job.objective.awing_edge_weight) == (10.0, 10.0)
    assert job.objective.dr_weight == 0.0
    assert (job.model.stacks, job.model.channels, job.model.aam, job.data.input_size) == (4, 256, True, 256)
    assert job.heatmap_activation == "in_relu"
    assert job.ema.enabled
    assert job.ema.decay == pytest.approx(EMA_DECAY, rel=1e-12)


@pytest.mark.parametrize("dataset", DATASETS)
def test_rwsa_specs_carry_the_appendix_recipe(dataset: str) -> None:
    """method.md 5.10: 200 epochs, constant lr, lam 5000, alpha = eps = 1, gamma 0.01 (COFW 0.001),
    10 samples, raw scores (heatmap activation none)."""
    job = load_job(JOBS / f"{dataset}_rwsa.yaml")
    assert job.objective.name == "rwsa"
    assert job.optimizer.lr == pytest.approx(1e-3, rel=0, abs=1e-15)
    assert job.optimizer.epochs == 200
    assert list(job.optimizer.milestones) == []
    assert job.optimizer.batch_size == 128
    assert job.objective.rwsa.lam == 5000.0
    assert job.objective.rwsa.alpha == 1.0
    assert job.objective.rwsa.epsilon == 1.0
    sm = job.objective.smoothing
    assert sm.enabled
    assert sm.gamma == pytest.approx(0.001 if dataset == "cofw" else 0.01, rel=1e-12)
    assert sm.samples == 10
    assert job.model.heatmap_activation == "none"
    assert job.heatmap_activation == "none"
    assert job.ema.decay == pytest.approx(EMA_DECAY, rel=1e-12)


def test_ema_default_decay() -> None:
    job = parse_job({"data": {"manifest": "m.json"}})
    assert EMA_DECAY == pytest.approx(0.991167, abs=1e-6)
    assert job.ema.decay == pytest.approx(EMA_DECAY, rel=1e-14)


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("colour: red\n", "colour"),
        ("objective:\n  star: {ww: 1}\n", "objective.star.ww"),
        ("optimizer: {lr: 1.0e-3, momentum: 0.9}\n", "optimizer.momentum"),
    ],
)
def test_unknown_key_names_file_and_dotted_key(tmp_path: Path, extra: str, key: str) -> None:
    path = _write(tmp_path, MINIMAL + extra)
    msg = _error(path)
    assert str(path) in msg
    assert f"{key}: unknown key" in msg


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("optimizer: {lr: fast}\n", "optimizer.lr"),
        ("model: {stacks: 2.5}\n", "model.stacks"),
        ("objective: {name: mse}\n", "objective.name"),
        ("ema: {decay: 1.5}\n", "ema.decay"),
    ],
)
def test_wrong_type_or_value_names_file_and_key(tmp_path: Path, extra: str, key: str) -> None:
    path = _write(tmp_path, MINIMAL + extra)
    msg = _error(path)
    assert msg.startswith(f"{path}: {key}: "), msg


def test_missing_required_manifest_names_key(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, "name: t\n"))
    assert "data" in msg and "required" in msg.lower()


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    # line 5 is over-indented under a scalar: "mapping values are not allowed here" at line 5
    path = _write(tmp_path, "name: t\ndata:\n  manifest: m.json\n  input_size: 64\n   bad: 1\n")
    msg = _error(path)
    assert msg.startswith(f"{path}:5:"), msg
    assert "invalid YAML" in msg


def test_tab_indentation_names_its_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: t\ndata:\n  manifest: m.json\n\tfoo: 1\n")
    assert _error(path).startswith(f"{path}:4:")


def test_non_mapping_yaml_is_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, "- a\n- b\n")
    assert _error(path).startswith(f"{path}:")


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "job.yaml"
    msg = _error(path)
    assert str(path) in msg and "no such file" in msg


# ------------------------------------------------------------------------------------------ --set


def test_override_nested_key_and_yaml_values() -> None:
    job = load_job(JOBS / "tiny.yaml", ["optimizer.lr=0.5", "model.channels=32", "data.augment=false"])
    assert job.optimizer.lr == 0.5
    assert job.model.channels == 32
    assert job.data.augment is False
    assert job.model.stacks == 1  # untouched sibling keeps the file's value


def test_override_exponent_without_dot_is_a_float() -> None:
    # YAML 1.1 reads "1e-3" as a string; the typed config must still yield the number 0.001
    job = load_job(JOBS / "tiny.yaml", ["optimizer.lr=1e-3"])
    assert isinstance(job.optimizer.lr, float) and job.optimizer.lr == pytest.approx(0.001, rel=1e-15)


def test_override_list_and_null() -> None:
    job = load_job(JOBS / "wflw_star.yaml", ["optimizer.milestones=[1,2]", "mlflow.registered_model=null",
                                             "optimizer.grad_clip=null"])
    assert list(job.optimizer.milestones) == [1, 2]
    assert job.mlflow.registered_model is None
    assert job.optimizer.grad_clip is None


def test_override_value_may_contain_equals() -> None:
    job = load_job(JOBS / "tiny.yaml", ["mlflow.tracking_uri=sqlite:///a=b.db"])
    assert job.mlflow.tracking_uri == "sqlite:///a=b.db"


def test_override_creates_new_nested_value_inside_existing_section() -> None:
    # tiny.yaml's objective is {name: star}: no rwsa sub-section in the file
    job = load_job(JOBS / "tiny.yaml", ["objective.rwsa.alpha=2", "objective.smoothing.gamma=0.005"])
    assert job.objective.rwsa.alpha == 2.0
    assert job.objective.rwsa.lam == 5000.0  # other fields keep their defaults
    assert job.objective.smoothing.gamma == 0.005


def test_apply_overrides_returns_new_dict() -> None:
    raw = {"data": {"manifest": "m.json"}}
    out = apply_overrides(raw, ["data.input_size=64", "model.stacks=2"])
    assert raw == {"data": {"manifest": "m.json"}}
    assert out == {"data": {"manifest": "m.json", "input_size": 64}, "model": {"stacks": 2}}


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("optimizer.lr", "not of the form"),  # no '='
        ("name.foo=1", "name is not a section"),  # into a scalar
        ("optimizer.lr.x=1", "lr is not a section"),
        ("a..b=1", "bad key"),
    ],
)
def test_malformed_overrides_fail(override: str, needle: str) -> None:
    msg = _error(JOBS / "tiny.yaml", [override])
    assert str(JOBS / "tiny.yaml") in msg
    assert needle in msg


def test_override_result_is_validated() -> None:
    assert "objective.star.ww: unknown key" in _error(JOBS / "tiny.yaml", ["objective.star.ww=1"])
    tiny = JOBS / "tiny.yaml"
    assert _error(tiny, ["optimizer.lr=fast"]).startswith(f"{tiny}: optimizer.lr: ")


@pytest.mark.parametrize(("value", "mode"), [("true", "model"), ("false", "off"), ("blocks", "blocks"),
                                             ("model", "model"), ("off", "off")])
def test_compile_modes_and_older_booleans(value: str, mode: str) -> None:
    assert load_job(JOBS / "tiny.yaml", [f"compile={value}"]).compile == mode


def test_unknown_compile_mode_names_the_key() -> None:
    tiny = JOBS / "tiny.yaml"
    assert _error(tiny, ["compile=fast"]).startswith(f"{tiny}: compile: ")


# ------------------------------------------------------------------------------------------ derived


def test_batch_size_must_divide_over_workers() -> None:
    msg = _error(JOBS / "tiny.yaml", ["optimizer.batch_size=15", "scaling.workers=2"])
    assert "optimizer.batch_size=15" in msg and "scaling.workers=2" in msg
    assert load_job(JOBS / "tiny.yaml", ["optimizer.batch_size=12", "scaling.workers=3"]).scaling.workers == 3


@pytest.mark.parametrize(("objective", "expected"),
                         [("star", "in_relu"), ("rwsa", "none"), ("l2", "in_relu"), ("smoothl1", "in_relu")])
def test_heatmap_activation_follows_objective(objective: str, expected: str) -> None:
    job = load_job(JOBS / "tiny.yaml", [f"objective.name={objective}"])
    assert job.model.heatmap_activation is None
    assert job.heatmap_activation == expected


def test_explicit_heatmap_activation_wins() -> None:
    job = load_job(JOBS / "tiny.yaml", ["objective.name=rwsa", "model.heatmap_activation=in_relu"])
    assert job.heatmap_activation == "in_relu"


def _leaf_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted paths of every leaf field, walked from the pydantic field declarations."""
    out: set[str] = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= _leaf_paths(ann, f"{prefix}{name}.")
        else:
            out.add(f"{prefix}{name}")
    return out


def test_flat_keys_are_dotted_and_complete() -> None:
    job = load_job(JOBS / "wflw_star.yaml")
    flat = job.flat()
    assert set(flat) == _leaf_paths(JobConfig)
    assert {"objective.star.w", "objective.rwsa.lam", "optimizer.milestones", "ema.decay", "data.manifest",
            "scaling.workers", "mlflow.registered_model", "name"} <= set(flat)
    assert flat["objective.star.w"] == 1.0
    assert flat["optimizer.milestones"] == [200, 350, 450]
    assert flat["data.manifest"] == str(Path.cwd().resolve() / "data/wflw/manifest.json")
    assert not any(isinstance(v, dict) for v in flat.values())


# ------------------------------------------------------------------------------------------ paths


def test_relative_paths_resolve_against_the_working_directory(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolved once, at load, against the directory flare runs in (not the spec's folder)."""
    monkeypatch.chdir(tmp_path)
    here = tmp_path.resolve()
    job = load_job(JOBS / "tiny.yaml")
    assert job.data.manifest == str(here / "data/300w/manifest.json")
    job = load_job(JOBS / "tiny.yaml", ["data.manifest=../other/m.json", "mlflow.tracking_uri=mlruns"])
    assert job.data.manifest == str(here.parent / "other/m.json")
    assert job.mlflow.tracking_uri == str(here / "mlruns")


@pytest.mark.parametrize("value", ["/abs/m.json", "s3://bucket/300w/manifest.json", "gs://b/m.json"])
def test_absolute_paths_and_uris_stay_as_written(value: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_job(JOBS / "tiny.yaml", [f"data.manifest={value}"]).data.manifest == value
    for uri in ("sqlite:///mlruns/mlflow.db", "http://mlflow:5000", "databricks"):
        assert load_job(JOBS / "tiny.yaml", [f"mlflow.tracking_uri={uri}"]).mlflow.tracking_uri == uri


def test_parse_job_leaves_paths_alone() -> None:
    """Workers parse the driver's (already absolute) job dict; they must not re-resolve anything."""
    assert parse_job({"data": {"manifest": "m.json"}}).data.manifest == "m.json"


def test_train_no_ray_with_a_relative_manifest(small_300w: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``data.manifest: data/300w/manifest.json`` (tiny.yaml as shipped) from a folder holding data/300w."""
    from typer.testing import CliRunner

    from flare.platform.cli import app

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "300w").symlink_to(small_300w)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["train", str(JOBS / "tiny.yaml"), "--no-ray", "--set", "optimizer.epochs=1",
                                   "--set", "data.max_val_samples=8", "--run-dir", str(tmp_path / "run")])
    assert res.exit_code == 0, f"{res.output}{res.exception!r}"
    assert "done: 1 epochs" in res.output
    saved = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(saved) == 1


# ------------------------------------------------------------------------------------------ CLI


def _flare_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("flare")
    if exe.is_file():
        return [str(exe)]
    return [sys.executable, "-c", "from flare.platform.cli import main; main()"]


def _run_cli(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.perf_counter()
    proc = subprocess.run([*_flare_cmd(), *args], check=False, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    return proc, time.perf_counter() - t0


def test_cli_unknown_key_is_one_line_exit_2() -> None:
    proc, elapsed = _run_cli("train", "jobs/tiny.yaml", "--set", "objective.star.ww=1")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and lines[0].endswith("objective.star.ww: unknown key"), lines
    assert "tiny.yaml" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert elapsed < 60, f"bad spec took {elapsed:.1f} s to fail: something started before validation"


def test_cli_bad_spec_never_starts_ray() -> None:
    """In-process: the config error ends the command while Ray is not even initialised."""
    code = textwrap.dedent("""
        import sys
        from flare.platform.cli import app
        try:
            app(["train", "jobs/tiny.yaml", "--set", "objective.star.ww=1"])
        except SystemExit as e:
            rc = e.code
        ray = sys.modules.get("ray")
        print(rc, bool(ray is not None and ray.is_initialized()))
    """)
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr


def test_cli_missing_manifest_is_one_line_exit_2(tmp_path: Path) -> None:
    proc, _ = _run_cli("train", "jobs/tiny.yaml", "--no-ray", "--run-dir", str(tmp_path / "run"),
                       "--set", "data.manifest=/nonexistent/manifest.json")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "/nonexistent/manifest.json" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
