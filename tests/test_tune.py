"""``flare tune`` on a real local Ray (2 CPUs), a real sqlite MLflow and real 300W shards.

Two searches share the module: an ASHA search with ``--max-concurrent auto`` (early stopping,
registration, champion) and a worse one that is interrupted and resumed (champion stays). Trial
statuses, epochs and val NMEs are read back from Tune's own experiment files
(``ray.tune.ExperimentAnalysis``) and from MLflow, not from the command's output.
"""

from __future__ import annotations

import importlib.util
import math
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import typer
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from flare.platform.config import ConfigError, load_job
from flare.platform.plots import plot_trials, trial_table
from flare.platform.registry import decide_champion
from flare.platform.search_space import SchedulerSpec, load_search, validate_search
from flare.platform.tracking import manifest_hash
from flare.platform.tune import (
    INTERRUPT_HOOK,
    TrialSummary,
    choose_concurrency,
    max_concurrent_trials,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-tune"
GUARD_S = 480  # wall-clock limit of one search run: a deadlock fails the test instead of hanging CI


def cli(*args: str):
    """The ``tune`` command on a Typer app, added as the main CLI adds it."""
    from flare.platform.cli_tune import tune

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test app"""

    app.command()(tune)
    return CliRunner().invoke(app, ["tune", *args])


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """SIGINT this process after ``seconds``: Ray Tune's handler ends the search, which then exits 130."""
    timer = threading.Timer(seconds, signal.raise_signal, args=(signal.SIGINT,))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def write_search(path: Path, max_epochs: int, lrs: list[float]) -> Path:
    path.write_text(
        "samples: 1\nseed: 0\n"
        f"scheduler: {{grace_period: 1, reduction_factor: 2, max_epochs: {max_epochs}}}\n"
        f"params:\n  optimizer.lr: {{grid: [{', '.join(f'{v:.1e}' for v in lrs)}]}}\n"
    )
    return path


def trials(path: Path) -> dict[str, dict]:
    """Per trial id: Tune's status, its (epochs_done, val_nme) rows and the lr it sampled."""
    from ray.tune import ExperimentAnalysis

    ea = ExperimentAnalysis(str(path))
    out = {}
    for t in ea.trials:
        df = ea.trial_dataframes[t.trial_id]
        rows = [] if df.empty else list(zip(df["epochs_done"].astype(int), df["val_nme"].astype(float)))
        out[t.trial_id] = {"status": t.status, "rows": rows, "lr": t.config["optimizer.lr"]}
    return out


@pytest.fixture(scope="module")
def env(small_300w: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tune")
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    (root / "mlruns").mkdir()
    sets = [f"data.manifest={small_300w / 'manifest.json'}", f"mlflow.tracking_uri={uri}",
            "mlflow.experiment=tune-tests", f"mlflow.registered_model={MODEL}", "data.max_train_samples=16",
            "data.max_val_samples=8", "optimizer.batch_size=8", "ema.enabled=false", "scaling.workers=1",
            "scaling.cpus_per_worker=1.0"]
    args = [str(ROOT / "jobs" / "tiny.yaml"), "--storage", str(root / "runs")]
    for s in sets:
        args += ["--set", s]
    return {"root": root, "uri": uri, "args": args, "storage": root / "runs"}


@pytest.fixture(scope="module")
def first_search(ray_cluster, env: dict) -> dict:
    """3 trials (lr grid: one that learns, two that cannot), ASHA grace 1 / factor 2 / 4 epochs,
    ``--max-concurrent auto`` on 2 CPUs."""
    free = ray_cluster.available_resources()
    search = write_search(env["root"] / "a.yaml", 4, [3e-3, 1e-7, 3e-7])
    t0 = time.monotonic()
    with deadline(GUARD_S):
        res = cli(*env["args"], "--search", str(search), "--name", "a", "--max-concurrent", "auto")
    return {"res": res, "elapsed": time.monotonic() - t0, "free": free, "path": env["storage"] / "a"}


def test_asha_search_registers_and_promotes_the_best(first_search: dict, env: dict) -> None:
    res = first_search["res"]
    assert res.exit_code == 0, (first_search["elapsed"], res.output[-3000:])
    assert first_search["elapsed"] < GUARD_S
    # auto concurrency: whole trials that fit next to one CPU for Ray Data (1 worker x 1 CPU each); on
    # 2 CPUs that is 1, where two trials holding a CPU each would starve Ray Data and hang
    expect_k = math.floor((first_search["free"]["CPU"] - 1.0) / 1.0)
    assert f"up to {expect_k} trial(s) at once" in res.output

    ts = trials(first_search["path"])
    assert len(ts) == 3 and all(t["status"] == "TERMINATED" for t in ts.values())
    epochs = {tid: max(e for e, _ in t["rows"]) for tid, t in ts.items()}
    assert any(e < 4 for e in epochs.values()), epochs  # ASHA stopped at least one trial early
    assert max(epochs.values()) == 4  # and let at least one run to max_epochs
    best_tid = min(ts, key=lambda tid: min(v for _, v in ts[tid]["rows"]))
    best_nme = min(v for _, v in ts[best_tid]["rows"])

    client = MlflowClient(env["uri"])
    exp = client.get_experiment_by_name("tune-tests")
    runs = client.search_runs([exp.experiment_id], "tags.`flare.tune.search` = 'a'")
    parent = [r for r in runs if r.data.tags.get("flare.kind") == "tune"]
    children = {r.data.tags["flare.tune.trial_id"]: r for r in runs if "flare.tune.trial_id" in r.data.tags}
    assert len(parent) == 1 and set(children) == set(ts)
    for tid, run in children.items():
        assert run.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
        assert run.data.tags["flare.tune.stopped_early"] == str(epochs[tid] < 4).lower()
        assert run.data.tags["flare.tune.stop_rung"] == (str(epochs[tid]) if epochs[tid] < 4 else "none")
        steps = sorted(int(m.step) for m in client.get_metric_history(run.info.run_id, "val_nme"))
        assert steps[: epochs[tid]] == list(range(epochs[tid]))  # per-epoch metrics from the Train loop
        assert float(run.data.params["optimizer.lr"]) == pytest.approx(ts[tid]["lr"])
    assert {"val_nme.png", "trials.txt", "trials.json"} <= {a.path for a in client.list_artifacts(parent[0].info.run_id)}

    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert [str(v.version) for v in versions] == ["1"]  # only the best trial is registered
    assert versions[0].run_id == children[best_tid].info.run_id
    assert float(versions[0].tags["val_nme"]) == pytest.approx(best_nme, rel=1e-6)
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"


def test_trial_runs_end_with_their_training_and_say_what_they_ran(first_search: dict, env: dict,
                                                                  small_300w: Path) -> None:
    """The MLflow pages of search ``a``: each trial run spans its epochs (an ASHA-stopped one included,
    not milliseconds) and ends before the search and before the winner's model is registered; epochs have
    increasing timestamps; runs are named after the sampled values; every run carries the data's digest."""
    assert first_search["res"].exit_code == 0
    client = MlflowClient(env["uri"])
    exp = client.get_experiment_by_name("tune-tests")
    runs = client.search_runs([exp.experiment_id], "tags.`flare.tune.search` = 'a'")
    parent = next(r for r in runs if r.data.tags.get("flare.kind") == "tune")
    children = [r for r in runs if "flare.tune.trial_id" in r.data.tags]
    version = client.get_model_version(MODEL, "1")  # the winner's, registered at the end of the search
    digest = manifest_hash(small_300w / "manifest.json")
    lrs = {tid: t["lr"] for tid, t in trials(first_search["path"]).items()}
    assert len(children) == 3 and any(r.data.tags["flare.tune.stopped_early"] == "true" for r in children)
    for run in children:
        tid, info = run.data.tags["flare.tune.trial_id"], run.info
        history = sorted(client.get_metric_history(info.run_id, "val_nme"), key=lambda m: m.step)
        stamps = [m.timestamp for m in history]
        epoch_s = sum(m.value for m in client.get_metric_history(info.run_id, "epoch_time_s"))
        assert info.status == "FINISHED"
        assert info.end_time - info.start_time >= 1000 * epoch_s > 0, tid
        assert info.start_time <= stamps[0] and stamps[-1] <= info.end_time
        assert stamps == sorted(set(stamps)), stamps  # strictly increasing with the epochs
        assert info.end_time < version.creation_timestamp < parent.info.end_time
        assert info.run_name == f"lr={lrs[tid]:.4g} ({tid})"
        assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [digest]
    assert [d.dataset.digest for d in parent.inputs.dataset_inputs] == [digest]
    assert version.tags["flare.data.digest"] == digest


def test_worse_search_interrupted_resumed_keeps_champion(first_search: dict, env: dict,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    assert first_search["res"].exit_code == 0
    client = MlflowClient(env["uri"])
    champion_nme = float(client.get_model_version_by_alias(MODEL, "champion").tags["val_nme"])
    search = write_search(env["root"] / "b.yaml", 2, [1e-7, 1e-7])  # cannot learn in 2 epochs
    path = env["storage"] / "b"

    # stop the driver after the 3rd epoch result: trial 1 finished (2 epochs), trial 2 has 1 epoch
    monkeypatch.setenv(INTERRUPT_HOOK, "3")
    with deadline(GUARD_S):
        res = cli(*env["args"], "--search", str(search), "--name", "b", "--max-concurrent", "1")
    assert res.exit_code == 130, res.output[-3000:]
    assert "flare tune --resume b" in res.output
    before = trials(path)
    done = [tid for tid, t in before.items() if t["status"] == "TERMINATED"]
    open_ = [tid for tid, t in before.items() if t["status"] != "TERMINATED"]
    assert len(done) == 1 and len(open_) == 1, before
    assert [e for e, _ in before[done[0]]["rows"]] == [1, 2]
    finished_rows = (path / next(path.glob(f"*{done[0]}*")).name / "result.json").read_bytes()
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 1  # nothing registered yet
    exp_id = client.get_experiment_by_name("tune-tests").experiment_id

    def statuses() -> dict[str, str]:
        runs = client.search_runs([exp_id], "tags.`flare.tune.search` = 'b'")
        return {r.data.tags["flare.tune.trial_id"]: r.info.status for r in runs if "flare.tune.trial_id" in r.data.tags}

    assert statuses() == {done[0]: "FINISHED", open_[0]: "KILLED"}  # the interrupted trial's run says so

    monkeypatch.delenv(INTERRUPT_HOOK)
    with deadline(GUARD_S):
        res = cli("--resume", "b", "--storage", str(env["storage"]))
    assert res.exit_code == 0, res.output[-3000:]
    after = trials(path)
    assert all(t["status"] == "TERMINATED" for t in after.values())
    # the finished trial was not re-run: its Tune results are byte-identical
    assert (path / next(path.glob(f"*{done[0]}*")).name / "result.json").read_bytes() == finished_rows
    # the unfinished one continued from its checkpoint: epoch 1 is not reported twice, epoch 2 is new
    resumed = [e for e, _ in after[open_[0]]["rows"]]
    assert resumed.count(1) <= 1 and resumed[-1] == 2, resumed
    assert statuses() == {done[0]: "FINISHED", open_[0]: "FINISHED"}  # and ends again when it is done

    versions = {str(v.version): v for v in client.search_model_versions(f"name = '{MODEL}'")}
    assert set(versions) == {"1", "2"}
    assert float(versions["2"].tags["val_nme"]) > champion_nme  # the new best is worse ...
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"  # ... so champion stays
    assert f"{100 * champion_nme:.3f}%" in res.output and "champion stays v1" in res.output


def test_a_failing_trial_does_not_kill_the_search(first_search: dict, env: dict, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """One trial's worker raises and may not restart: the other trial still runs and is compared, the table,
    the log and the parent run name the failed trial, its child run ends FAILED, and the exit code is 1."""
    assert first_search["res"].exit_code == 0
    monkeypatch.setenv("FLARE_TEST_FAULT_EPOCH", "0")  # the first trial to train fails once (marker file)
    monkeypatch.setenv("FLARE_TEST_FAULT_MARKER", str(tmp_path / "fault"))
    search = write_search(env["root"] / "c.yaml", 1, [1e-3, 2e-3])
    with deadline(GUARD_S):
        res = cli(*env["args"], "--set", "checkpoint.max_failures=0", "--search", str(search), "--name", "c",
                  "--max-concurrent", "1")
    assert res.exit_code == 1, res.output[-3000:]
    ts = trials(env["storage"] / "c")
    assert sorted(t["status"] for t in ts.values()) == ["ERROR", "TERMINATED"], ts
    failed = next(tid for tid, t in ts.items() if t["status"] == "ERROR")
    ok = next(tid for tid, t in ts.items() if t["status"] == "TERMINATED")
    assert ts[ok]["rows"] and (tmp_path / "fault").is_file()
    assert f"trial {failed} failed" in res.output and "1 of 2 trial(s) failed" in res.output
    assert f"best trial {ok}" in res.output
    client = MlflowClient(env["uri"])
    exp = client.get_experiment_by_name("tune-tests")
    runs = client.search_runs([exp.experiment_id], "tags.`flare.tune.search` = 'c'")
    parent = next(r for r in runs if r.data.tags.get("flare.kind") == "tune")
    assert parent.data.tags["flare.tune.failed_trials"] == failed
    child = next(r for r in runs if r.data.tags.get("flare.tune.trial_id") == failed)
    assert child.info.status == "FAILED" and child.data.tags["flare.tune.error"]
    assert child.info.end_time < parent.info.end_time  # when it failed, not when the search ended


@pytest.mark.parametrize(
    "params,needle",
    [
        ("optimizer.lr: {normal: [0.001, 0.01]}", "params.optimizer.lr: unknown distribution 'normal'"),
        ("objective.star.ww: {uniform: [0.1, 1.0]}", "objective.star.ww: unknown key"),
        ("objective.star.distance: {choice: [l1, cosine]}", "params.objective.star.distance=cosine"),
        ("optimizer.lr: {loguniform: [0.0, 0.01]}", "loguniform: low must be > 0"),
    ],
)
def test_bad_search_file_fails_before_anything_starts(small_300w: Path, tmp_path: Path, params: str,
                                                      needle: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"scheduler: {{max_epochs: 2}}\nparams:\n  {params}\n")
    res = cli(str(ROOT / "jobs" / "tiny.yaml"), "--search", str(bad), "--set",
              f"data.manifest={small_300w / 'manifest.json'}", "--set",
              f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlruns' / 'db'}", "--storage", str(tmp_path / "runs"))
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlruns").exists()


def test_optuna_without_the_extra_names_it(small_300w: Path, tmp_path: Path) -> None:
    if importlib.util.find_spec("optuna") is not None:
        pytest.skip("optuna is installed")
    search = tmp_path / "tpe.yaml"
    search.write_text("algorithm: optuna\nscheduler: {max_epochs: 2}\nparams:\n  optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    res = cli(str(ROOT / "jobs" / "tiny.yaml"), "--search", str(search), "--set",
              f"data.manifest={small_300w / 'manifest.json'}", "--storage", str(tmp_path / "runs"))
    assert res.exit_code == 2 and "pip install 'flare-landmarks[optuna]'" in res.output, res.output
    assert not (tmp_path / "runs").exists()


def test_champion_moves_only_when_better_on_the_same_split(mlflow_uri: str) -> None:
    client = MlflowClient(mlflow_uri)
    client.create_registered_model("m")
    for nme, split in [(0.10, "A"), (0.20, "A"), (0.05, "B"), (0.05, "A")]:
        v = client.create_model_version("m", source="file:///nowhere")
        client.set_model_version_tag("m", v.version, "val_nme", str(nme))
        client.set_model_version_tag("m", v.version, "flare.val_split", split)
    assert decide_champion("m", "1", 0.10, "A", mlflow_uri)[0]  # no champion yet: v1 becomes it
    promoted, line = decide_champion("m", "2", 0.20, "A", mlflow_uri)  # worse
    assert not promoted and "20.000%" in line and "10.000%" in line and "champion stays v1" in line
    promoted, line = decide_champion("m", "3", 0.05, "B", mlflow_uri)  # better, but another val split
    assert not promoted and "not comparable" in line
    assert client.get_model_version_by_alias("m", "champion").version in (1, "1")
    promoted, line = decide_champion("m", "4", 0.05, "A", mlflow_uri)  # better on the same split
    assert promoted and "champion = v4" in line
    assert client.get_model_version_by_alias("m", "champion").version in (4, "4")


def test_concurrency_leaves_a_cpu_for_data_ingest() -> None:
    tiny = load_job(ROOT / "jobs" / "tiny.yaml")  # 2 workers x 0.5 CPU
    assert max_concurrent_trials(tiny, {"CPU": 2.0}) == 1  # 1 + 1 <= 2 < 2 + 1
    assert max_concurrent_trials(tiny, {"CPU": 3.0}) == 2
    one = load_job(ROOT / "jobs" / "tiny.yaml", ["scaling.workers=1"])  # 0.5 CPU per trial
    assert max_concurrent_trials(one, {"CPU": 2.0}) == 2  # 2 x 0.5 + 1 = 2
    assert max_concurrent_trials(one, {"CPU": 1.5}) == 1
    gpu = load_job(ROOT / "jobs" / "300w_star.yaml")  # 4 workers x 4 CPU + 1 GPU each
    assert max_concurrent_trials(gpu, {"CPU": 64.0, "GPU": 8.0}) == 2  # GPUs bound it: 8 // 4
    assert max_concurrent_trials(gpu, {"CPU": 40.0, "GPU": 16.0}) == 2  # CPUs bound it: (40 - 1) // 16
    assert choose_concurrency(one, "3", {"CPU": 2.0}, log=lambda s: None) == 3  # K overrides auto
    with pytest.raises(ConfigError, match="only 1.5 are free"):
        choose_concurrency(tiny, "auto", {"CPU": 1.5})
    with pytest.raises(ConfigError, match="--max-concurrent must be auto or a positive integer"):
        choose_concurrency(one, "0", {"CPU": 2.0})


def test_report_table_and_plot(tmp_path: Path) -> None:
    import cv2

    ts = [TrialSummary("t0", {"optimizer.lr": 0.003}, "TERMINATED", [(1, 0.7), (2, 0.65), (3, 0.6), (4, 0.55)]),
          TrialSummary("t1", {"optimizer.lr": 1e-7}, "TERMINATED", [(1, 0.8)]),
          TrialSummary("t2", {"optimizer.lr": 0.5}, "ERROR", [], error="RuntimeError: nan loss")]
    rows = trial_table(ts, max_epochs=4).splitlines()
    assert rows[0].split() == ["trial", "optimizer.lr", "epochs", "best", "val", "NME", "(%)", "stopped", "early"]
    assert rows[2].split() == ["t0", "0.003", "4", "55.000", "no"]
    assert rows[3].split() == ["t1", "1e-07", "1", "80.000", "yes", "(rung", "1)"]
    assert rows[4].split()[:4] == ["t2", "0.5", "0", "-"] and "error: RuntimeError: nan loss" in rows[4]
    png = plot_trials(ts, [1, 2], 4, tmp_path / "p.png", "search")
    assert cv2.imread(str(png)).shape[2] == 3


def test_asha_rungs() -> None:
    assert SchedulerSpec(grace_period=1, reduction_factor=2, max_epochs=4).rungs() == [1, 2]
    assert SchedulerSpec(grace_period=10, reduction_factor=3, max_epochs=120).rungs() == [10, 30, 90]


@pytest.mark.parametrize("search,job", [("star.yaml", "300w_star.yaml"), ("rwsa.yaml", "300w_rwsa.yaml")])
def test_shipped_search_files_fit_their_jobs(search: str, job: str) -> None:
    spec = load_search(ROOT / "jobs" / "search" / search)
    raw = load_job(ROOT / "jobs" / job).model_dump(mode="json")
    jobs = validate_search(raw, spec, search)  # every corner of every parameter is a valid job spec
    assert len(jobs) == 1 + sum(len(d.corners()) for d in spec.params.values())
    assert all(j.optimizer.epochs == spec.scheduler.max_epochs for j in jobs)
    kinds = {k: d.kind for k, d in spec.params.items()}
    if search == "star.yaml":
        assert kinds == {"objective.star.w": "loguniform", "objective.star.distance": "choice",
                         "objective.star.s": "loguniform", "optimizer.lr": "loguniform"}
        assert spec.params["objective.star.w"].arg == (0.1, 10.0)
        assert set(spec.params["objective.star.distance"].arg) == {"smoothl1", "l1", "l2", "wing"}
    else:
        assert spec.params["objective.rwsa.alpha"].arg == (0.1, 10.0)
        assert spec.params["objective.rwsa.epsilon"].arg == (0.1, 10.0) and kinds["objective.rwsa.epsilon"] == \
            "loguniform"
        assert spec.params["objective.rwsa.lam"].arg == (100.0, 10000.0)
        assert spec.params["objective.smoothing.gamma"].arg == (0.001, 0.1)
        assert spec.params["objective.smoothing.samples"].arg == [1, 5, 10]
        assert sorted(j.objective.smoothing.k for j in jobs if j.data.manifest != raw["data"]["manifest"]) == [5, 9]


def test_resume_refuses_a_search_folder_others_can_write(tmp_path: Path) -> None:
    """``--resume`` unpickles Ray's search state: a folder someone else could have written is refused first."""
    from flare.platform.tune import run_search
    from flare.platform.tune_trial import SearchState

    state = SearchState(name="s", job={}, search={}, source="s.yaml", samples=1, tracking_uri="",
                        storage=str(tmp_path))
    state.save()
    (state.path / "tuner.pkl").write_bytes(b"not read")
    (state.path / "tuner.pkl").chmod(0o666)
    with pytest.raises(ValueError, match=r"tuner.pkl: writable by group and others"):
        run_search(resume="s", storage=tmp_path)
