"""``bench/gpu_run.sh --dry-run``: the GPU-window script's steps with jobs/tiny.yaml on CPU, on real 300W
shards; every output file exists and parses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_writes_every_output(small_300w: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_run.sh"), "--dry-run", "--data", str(small_300w)],
                          env=env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(list(out.iterdir())) <= 8
    rows = json.loads((out / "throughput.json").read_text())
    assert [(r["spec"], r["precision"]) for r in rows] == [("tiny", "fp32"), ("tiny", "bf16+channels_last")]
    for r in rows:
        assert r["images_per_s"] > 0 and 0.0 <= r["data_wait"] <= 1.0 and r["batch"] == 16
    assert (out / "throughput.md").read_text().count("| tiny |") == 2
    env_facts = json.loads((out / "env.json").read_text())
    assert env_facts["device"] == "cpu" and not env_facts["ray_imported"] and not env_facts["mlflow_imported"]
    summary = json.loads((out / "train_summary.json").read_text())
    epochs = [json.loads(x) for x in (out / "train_metrics.jsonl").read_text().splitlines()]
    assert summary["epochs_done"] == len(epochs) and summary["budget_s"] == 40.0
    assert summary["stopped_at_budget"] or (summary["exit_code"] == 0 and len(epochs) == 1)
    for e in epochs:
        assert 0.0 <= e["data_wait"] <= 1.0
    assert (out / "train_log.txt").exists() and "training tiny" in (out / "gpu_run.log").read_text()
