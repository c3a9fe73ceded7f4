"""``bench/gpu_run.sh --dry-run``: the GPU-window script's steps with jobs/tiny.yaml on CPU, on real 300W
shards; every output file exists and parses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_writes_every_output(small_300w: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_run.sh"), "--dry-run", "--data", str(small_300w), "--variants"],
                          env=env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["ced.png", "gpu_run.log", "profile.txt", "summary.json", "throughput.md", "train_log.txt",
                     "train_metrics.jsonl", "val_curve.png"]  # at most 8 files come back from the device
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["throughput"]
    assert [(r["spec"], r["precision"]) for r in rows] == [("tiny", "fp32"), ("tiny", "bf16+channels_last")]
    for r in rows:
        assert r["images_per_s"] > 0 and 0.0 <= r["data_wait"] <= 1.0 and r["batch"] == 16
        assert r["train_flops_per_image"] > 1e8  # the tiny model at 64 px: ~0.2 GFLOP forward
        assert r["warmup_steps"] >= 1 and r["step_s_first_third"] > 0 and r["step_s_last_third"] > 0
    assert "profile" not in rows[0] and rows[1]["profile"]["wall_ms"] > 0  # the bf16 row is profiled
    assert rows[1]["profile"]["host_waits_per_step"] == 0  # no CUDA calls on CPU
    assert "ms/step wall" in (out / "profile.txt").read_text()
    assert (out / "throughput.md").read_text().count("| tiny |") == 2
    variants = {r["variant"]: r for r in summary["variants"]}  # --variants: the A/B of bench/model_variants.py
    assert set(variants) == {"current", "coordconv_concat"} and variants["current"]["ratio_to_first"] == 1.0
    assert variants["coordconv_concat"]["s_per_step"] > 0 and variants["coordconv_concat"]["max_abs_diff"] < 1e-9
    assert "| coordconv_concat | 2 |" in (out / "throughput.md").read_text()
    env_facts = summary["env"]
    assert env_facts["device"] == "cpu" and not env_facts["ray_imported"] and not env_facts["mlflow_imported"]
    assert summary["train_compile"] == "off"  # no compiled row on CPU: the timed run trains eagerly
    train = summary["train"]
    epochs = [json.loads(x) for x in (out / "train_metrics.jsonl").read_text().splitlines()]
    assert train["budget_s"] == 20.0 and train["exit_code"] == 0 and not train["killed_after_grace"]
    assert train["epochs_done"] == len(epochs) == train["planned_epochs"] and 1 <= len(epochs) <= 2
    for e in epochs:
        assert 0.0 <= e["data_wait"] <= 1.0
    later = epochs[1:] or epochs  # the figures quoted from a window: epochs after the first
    assert train["sustained"]["images_per_s_median"] in [e["images_per_s"] for e in later]
    assert abs(train["epoch_mean_s"]["checkpoint_s"] - sum(e["checkpoint_s"] for e in later) / len(later)) < 1e-9
    assert train["first_epoch_s"]["first_batch_s"] == epochs[0]["first_batch_s"] >= 0.0
    test = train["eval"]
    assert test["count"] == 224 and test["subsets"]["common"]["count"] == 224 and train["eval"]["checkpoint"].startswith("epoch_")
    assert (out / "train_log.txt").exists() and "training tiny" in (out / "gpu_run.log").read_text()


@pytest.mark.parametrize("flags, message", [(["--train-only", "--throughput-only"], "--train-only runs no throughput rows"),
                                            (["--keep-model"], "--keep-model needs --train-only")])
def test_conflicting_options_are_refused_in_one_line(tmp_path: Path, flags: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_run.py"), *flags,
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_the_timed_run_compiles_only_as_the_fastest_row_did() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_run", ROOT / "bench" / "gpu_run.py")
    gpu_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_run)

    def rows(**speeds: float) -> list[dict]:
        return [{"spec": "300w_star", "precision": p, "images_per_s": v} for p, v in speeds.items()] + [
            {"spec": "300w_rwsa", "precision": "bf16+channels_last+compile_blocks", "images_per_s": 900.0}]

    eager = "bf16+channels_last"
    blocks, model = "bf16+channels_last+compile_blocks", "bf16+channels_last+compile_model"
    assert gpu_run.train_compile_mode(rows(**{eager: 400.0, blocks: 410.0, model: 520.0}), "300w_star") == "model"
    assert gpu_run.train_compile_mode(rows(**{eager: 400.0, blocks: 410.0}), "300w_star") == "blocks"
    assert gpu_run.train_compile_mode(rows(**{eager: 400.0, model: 390.0}), "300w_star") == "off"
    assert gpu_run.train_compile_mode([{"spec": "300w_star", "precision": model, "error": "not done"}],
                                      "300w_star") == "off"  # a timed-out compile row never wins
    objective = "bf16+channels_last+compile_objective"
    assert gpu_run.train_compile_mode(rows(**{eager: 400.0, model: 390.0, objective: 430.0}), "300w_star") == "objective"


def test_the_compiled_objective_row_runs(small_300w: Path, tmp_path: Path) -> None:
    """``--compile objective`` runs on CUDA only; its row (``--case``, as ``compiled_case`` starts it) is
    checked here on CPU so that a GPU window never finds it broken: the loss compiles and the row is timed."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_run.py"), "--dry-run", "--data", str(small_300w),
                           "--case", "tiny:bf16+channels_last+compile_objective", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    row = json.loads((out / "case.json").read_text())
    assert "error" not in row and row["precision"].endswith("compile_objective") and row["images_per_s"] > 0


def test_train_only_brings_the_model_back_within_eight_files(small_300w: Path, tmp_path: Path) -> None:
    """``--train-only --keep-model``: the selected weights come back as model_partK.pt next to the other files
    (at most 8), and joined here they score what the window measured on the test split."""
    from flare.bench.gpu_model import join
    from flare.platform.evaluate import evaluate_model
    from flare.platform.predictor import Predictor

    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_run.sh"), "--dry-run", "--train-only", "--keep-model",
                           "--data", str(small_300w)], env=env, capture_output=True, text=True, timeout=180,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    parts = [out / f for f in files if f.startswith("model_part")]
    assert len(files) <= 8 and parts and files == sorted(
        ["ced.png", "gpu_run.log", "summary.json", "train_log.txt", "train_metrics.jsonl", "val_curve.png",
         *(p.name for p in parts)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"]["model_parts"]["files"] == [p.name for p in parts]
    model = join(parts, tmp_path / "model")
    nme = evaluate_model(Predictor.from_dir(model, device="cpu"), small_300w, "test", tmp_path / "eval")["nme"]
    assert abs(nme - summary["train"]["eval"]["nme"]) < 1e-4


def test_the_fp32_variant_switches_precision_and_layout_and_restores_them() -> None:
    """bench/model_variants.py's ``fp32_eager`` (run on CUDA only) turns the fast path's bf16 + channels_last
    step into fp32 NCHW for its rounds and back afterwards, so the interleaved rounds after it are unchanged."""
    from flare.bench.model_variants import JOBS, ModelStep, fp32_eager
    from flare.platform.config import load_job

    step = ModelStep(load_job(JOBS / "tiny.yaml", []), 2, torch.device("cpu"))
    step.bf16 = True  # as on CUDA
    step.model.to(memory_format=torch.channels_last)
    step.x = step.x.contiguous(memory_format=torch.channels_last)
    conv = step.model.hgs[0].up1.conv2.conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    with fp32_eager(step):
        assert not step.bf16 and step.x.is_contiguous()
        assert step.model.hgs[0].up1.conv2.conv.weight.is_contiguous()
        step()  # one fp32 step runs
    assert step.bf16 and step.x.is_contiguous(memory_format=torch.channels_last)
    assert step.model.hgs[0].up1.conv2.conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_the_strict_fp32_variant_turns_tf32_off_and_restores_it() -> None:
    """``fp32_strict`` is ``fp32_eager`` with TF32 off (PyTorch's default fp32 runs cudnn convolutions in TF32),
    and leaves the flags as it found them."""
    from flare.bench.model_variants import JOBS, ModelStep, fp32_strict
    from flare.platform.config import load_job

    step = ModelStep(load_job(JOBS / "tiny.yaml", []), 2, torch.device("cpu"))
    step.bf16 = True
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    with fp32_strict(step):
        assert not step.bf16 and not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        step()
    assert step.bf16 and (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


def test_throughput_rows_count_the_images_of_the_epochs_short_last_batch(small_300w: Path) -> None:
    """A row's images/s counts the images it trained on: with 20 training faces in batches of 8, every epoch
    is 8 + 8 + 4, so any 3 consecutive timed steps hold 20 images, not 3 x 8."""
    import importlib.util

    from flare.datasets.ingest import load_manifest

    spec = importlib.util.spec_from_file_location("gpu_run", ROOT / "bench" / "gpu_run.py")
    gpu_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_run)
    manifest = load_manifest(small_300w)
    job = gpu_run.load_job(ROOT / "jobs" / "tiny.yaml", [f"data.manifest={manifest.path}", "data.max_train_samples=20"])
    loaders = gpu_run.Loaders(manifest, workers=0, pin=False)
    try:
        row = gpu_run.throughput(job, "fp32", 8, loaders, torch.device("cpu"), warmup=1, steps=3)
    finally:
        loaders.close()
    assert row["images"] == 20
    assert abs(row["images_per_s"] * row["step_s"] * 3 - 20) < 1e-6


def test_every_model_variant_computes_the_same_function() -> None:
    """bench/model_variants.py's float64 check: each swapped-back implementation (run in the fast path's
    channels_last layout, where the pointwise 1x1 convolutions apply) gives the outputs of today's code."""
    from flare.bench.model_variants import JOBS, VARIANTS, differences
    from flare.platform.config import load_job

    diffs, scale = differences(load_job(JOBS / "tiny.yaml", []), list(VARIANTS))
    assert scale > 0.1 and set(diffs) == set(VARIANTS)
    assert all(d <= 1e-10 * scale for d in diffs.values()), diffs
