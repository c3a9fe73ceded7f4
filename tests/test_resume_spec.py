"""``--resume`` never silently changes the run: a spec that differs from the checkpoint's is refused in one
line naming the keys, unless each key is named with ``--allow-change``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flare.platform.checkpoints import check_resume, spec_changes
from flare.platform.config import load_job

ROOT = Path(__file__).resolve().parents[1]


def _ckpt(tmp_path: Path, overrides: list[str]) -> Path:
    job = load_job(ROOT / "jobs" / "tiny.yaml", ["data.manifest=/d/manifest.json", *overrides])
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "job.json").write_text(json.dumps({"job": job.model_dump(mode="json"), "layout": "300w68"}))
    return d


def test_spec_changes_lists_dotted_keys(tmp_path: Path) -> None:
    a = {"optimizer": {"lr": 1e-3, "epochs": 2}, "model": {"channels": 64}}
    b = {"optimizer": {"lr": 2e-3, "epochs": 2}, "model": {"channels": 64, "stacks": 2}}
    assert spec_changes(a, b) == ["model.stacks", "optimizer.lr"]


def test_check_resume_refuses_unnamed_changes(tmp_path: Path) -> None:
    ckpt = _ckpt(tmp_path, [])
    same = load_job(ROOT / "jobs" / "tiny.yaml", ["data.manifest=/d/manifest.json"])
    check_resume(ckpt, same)  # nothing changed: fine
    changed = load_job(ROOT / "jobs" / "tiny.yaml", ["data.manifest=/d/manifest.json", "objective.name=rwsa",
                                                     "optimizer.lr=0.01"])
    with pytest.raises(ValueError, match=r"differs from the checkpoint's .* in objective.name, optimizer.lr;"):
        check_resume(ckpt, changed)
    with pytest.raises(ValueError, match=r"in objective.name;"):
        check_resume(ckpt, changed, ["optimizer.lr"])
    check_resume(ckpt, changed, ["optimizer", "objective.name"])  # a section name covers its keys


def test_no_ray_resume_with_other_channels_is_one_line(small_300w: Path, tmp_path: Path) -> None:
    """A changed channel count used to end in a 734-line traceback."""
    from flare.platform.cli import app

    base = [str(ROOT / "jobs" / "tiny.yaml"), "--no-ray", "--run-dir", str(tmp_path / "run"),
            "--set", f"data.manifest={small_300w / 'manifest.json'}", "--set", "optimizer.epochs=1",
            "--set", "data.max_train_samples=16", "--set", "data.max_val_samples=8"]
    res = CliRunner().invoke(app, ["train", *base])
    assert res.exit_code == 0, res.output
    assert next(ln for ln in res.output.splitlines() if ln.startswith("epoch ")).startswith("epoch 1/1  train loss")
    res = CliRunner().invoke(app, ["train", *base, "--resume", "last", "--set", "model.channels=32"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [res.output.strip()] and "in model.channels;" in res.output
    res = CliRunner().invoke(app, ["train", *base, "--resume", "last", "--set", "optimizer.epochs=2",
                                   "--allow-change", "optimizer.epochs"])
    assert res.exit_code == 0, res.output
    assert [ln.split("  ")[0] for ln in res.output.splitlines() if ln.startswith("epoch ")] == ["epoch 2/2"]
