"""``flare demo --quick``: the main job end to end on a fresh directory, as CI runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

FLARE = str(Path(sys.executable).parent / "flare")


def test_demo_quick(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    r = subprocess.run([FLARE, "demo", "--quick"], check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # a person reads it: at most 60 lines in all, no Ray worker logs, ending with the summary table
    printed = (r.stdout + r.stderr).splitlines()
    assert len(printed) <= 60, "\n".join(printed)
    assert not [ln for ln in printed if "pid=" in ln or "Warning" in ln], "\n".join(printed)
    tail = r.stdout.rstrip().splitlines()
    assert tail[-1].startswith("  details:") and any(ln.startswith("flare demo: done in") for ln in tail[-15:])
    summary = json.loads((tmp_path / "out" / "demo" / "summary.json").read_text())
    assert summary["data"].startswith("SYNTHETIC")
    assert len(summary["val_nme_per_epoch"]) == 2
    assert 0 < summary["test_nme"] < 10
    overlays = sorted((tmp_path / "out" / "demo" / "predictions").glob("*_overlay.png"))
    assert len(overlays) == 6
    # the embedded default store: sqlite under ./mlruns, with the champion alias on the registered model
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    # the search: 4 trials of at most 2 epochs; the champion is whichever of the trained model and the
    # search's best trial has the lower val NME (the decision line says which)
    trials = summary["search"]["trials"]
    assert len(trials) == 4 and all(1 <= t["epochs"] <= 2 for t in trials)
    assert {t["objective"] for t in trials} <= {"star", "rwsa"}
    assert all(t["stopped_early"] == (t["epochs"] < 2) for t in trials)
    champion = client.get_model_version_by_alias("demo-synthetic", "champion")
    versions = client.search_model_versions("name='demo-synthetic'")
    assert len(versions) == 2  # the trained model and the search's best trial
    assert summary["champion_decision"].endswith("no champion yet -> champion = v1")  # a fresh store
    best_trial = min(t["best_val_nme"] for t in trials)
    trained = min(summary["val_nme_per_epoch"])
    if "-> better" in summary["search"]["champion_decision"]:
        assert champion.run_id != summary["run_id"] and best_trial < trained + 1e-4
    else:
        assert champion.run_id == summary["run_id"] and best_trial >= trained - 1e-4
    assert "mlflow ui --backend-store-uri sqlite:///" in summary["mlflow_ui"] and "127.0.0.1" in summary["mlflow_ui"]
