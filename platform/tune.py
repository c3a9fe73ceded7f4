"""``flare tune``: the search driver. Plans and validates a search, runs Ray Tune with ASHA over trials of
:class:`flare.platform.tune_trial.FlareTrial` (time attribute: epochs completed, metric ``val_nme``, mode
min), then reports, registers the best trial and decides on ``champion``.

Interruption (Ctrl-C): Tune saves its state and the driver raises the trials' stop board; ``--resume``
restores the Tune experiment (``Tuner.restore``): finished trials are not re-run and unfinished ones
restart their Train run under the same name, which Ray Train resumes from its latest checkpoint.

Concurrency: trials run at most ``K`` at a time where every running trial's workers fit into the free
CPUs/GPUs with a whole CPU left for Ray Data's read tasks (measured: a read task asks for one CPU and
ingest hangs when less is free). The trial's own actor reserves no CPU.

MLflow: one parent run per search; one child run per trial, named after its sampled values and ended when
its training ended (params, per-epoch metrics logged by the rank-0 worker, the data's dataset input, tags
with the sampled values and whether/at which rung ASHA stopped it). Only the best
trial's model is registered, and ``champion`` moves only when it beats the champion's val NME on the
same validation split.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import ray
from ray import tune

from flare.errors import FlareError
from flare.files import atomic_write_bytes
from flare.platform.checkpoints import best_checkpoint_dir
from flare.platform.config import ConfigError, JobConfig, load_job
from flare.platform.plots import format_values, plot_trials, trial_table
from flare.platform.ray_batches import ACTOR_CPUS
from flare.platform.registry import champion_if_better
from flare.platform.search_space import SearchSpec, load_search, plain, validate_search
from flare.platform.storage import local_storage
from flare.platform.trust import check_trusted_tree
from flare.platform.tune_trial import METRIC, TIME_ATTR, FlareTrial, SearchState, StopBoard, board_name

DATA_TASK_CPUS = 1.0  # a Ray Data read task asks for one whole CPU; with less free, ingest never starts
TRIAL_ACTOR_RESOURCES = {"CPU": 0.0, "memory": 64 * 2**20}  # Tune needs a non-empty bundle; no CPU slot
TEST_HOOK_PREFIX = "FLARE_TEST_"  # test-only hooks, forwarded to the trials' training workers
INTERRUPT_HOOK = "FLARE_TEST_INTERRUPT_AFTER_RESULTS"  # test-only: SIGINT the driver after N epoch results


class SearchFailed(FlareError):
    """No trial of the search reported a validation epoch; ``str()`` is one line with the trials' errors."""


class SearchInterrupted(KeyboardInterrupt):
    """The search stopped before all trials finished; ``flare tune --resume NAME`` continues it."""


# ----------------------------------------------------------------------------------------------
# planning: validation, state, concurrency
# ----------------------------------------------------------------------------------------------


def _absolute_manifests(raw: dict[str, Any], search: SearchSpec) -> tuple[dict[str, Any], SearchSpec]:
    """Manifest paths made absolute (trials run in their own working directories)."""
    def fix(p: Any) -> Any:
        return str(Path(p).resolve()) if isinstance(p, str) and p else p

    raw = {**raw, "data": {**raw.get("data", {}), "manifest": fix(raw.get("data", {}).get("manifest"))}}
    data = search.model_dump(mode="json", exclude_none=True)
    if "data.manifest" in data["fixed"]:
        data["fixed"]["data.manifest"] = fix(data["fixed"]["data.manifest"])
    for dist in data["params"].values():
        for kind in ("choice", "grid"):
            if isinstance(dist.get(kind), dict):
                for bundle in dist[kind].values():
                    if "data.manifest" in bundle:
                        bundle["data.manifest"] = fix(bundle["data.manifest"])
    return raw, SearchSpec.model_validate(data)


def plan_search(job_file: Path, search_file: Path, overrides: list[str] | None = None, samples: int | None = None,
                name: str | None = None, storage: str | Path | None = None, tracking_uri: str | None = None,
                check: Callable[[JobConfig], Any] | None = None) -> SearchState:
    """Load and validate the job and the search file (every corner of every parameter applied to the
    job, and checked against the data with ``check``) before anything starts (nothing is written)."""
    if check is None:
        from flare.platform.ray_train import check_job as check
    job = load_job(job_file, overrides or [])
    search = load_search(search_file)
    raw, search = _absolute_manifests(job.model_dump(mode="json"), search)
    validate_search(raw, search, str(search_file), check)
    if search.algorithm == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError(f"{search_file}: algorithm: optuna is not installed; it is the optional extra "
                          "'optuna': pip install 'flare-landmarks[optuna]'")
    if samples is not None and samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    storage = Path(local_storage(storage))
    name = name or f"{job.name}-{search.name or Path(search_file).stem}-{datetime.now():%Y%m%d-%H%M%S}"
    if any(c in name for c in "/\\ ") or not name or len(name) > 100 or not name.isprintable():
        raise ConfigError(f"--name {name!r}: use a name without slashes or spaces")
    if (storage / name).exists():
        raise ConfigError(f"search {name} already exists under {storage}; continue it with --resume {name}")
    uri = tracking_uri or job.mlflow.tracking_uri or ""  # "" = the default store, resolved when the search runs
    return SearchState(name=name, job=raw, search=search.model_dump(mode="json", exclude_none=True),
                       source=str(search_file), samples=samples or search.samples, tracking_uri=uri,
                       storage=str(storage),
                       worker_env={k: v for k, v in os.environ.items() if k.startswith(TEST_HOOK_PREFIX)})


def max_concurrent_trials(job: JobConfig, free: dict[str, float]) -> int:
    """How many trials fit at once: ``K * workers * cpus_per_worker + DATA_TASK_CPUS <= free CPUs``
    (and ``K * workers <= free GPUs`` with GPUs), so no trial waits forever for a CPU."""
    per_trial = job.scaling.workers * (job.scaling.cpus_per_worker + job.data.loader_workers * ACTOR_CPUS)
    k = math.floor((float(free.get("CPU", 0.0)) - DATA_TASK_CPUS) / per_trial + 1e-9)
    if job.scaling.use_gpu:
        k = min(k, math.floor(float(free.get("GPU", 0.0)) / job.scaling.workers + 1e-9))
    return k


def choose_concurrency(job: JobConfig, requested: str | int, free: dict[str, float], log=print) -> int:
    """``auto``: :func:`max_concurrent_trials` of the free resources; an integer overrides it."""
    fits = max_concurrent_trials(job, free)
    if fits < 1:
        need = job.scaling.workers * (job.scaling.cpus_per_worker + job.data.loader_workers * ACTOR_CPUS) \
            + DATA_TASK_CPUS
        raise ConfigError(
            f"scaling: one trial needs {job.scaling.workers} workers x {job.scaling.cpus_per_worker} CPU plus "
            f"{DATA_TASK_CPUS:g} CPU for data ingest = {need:g} CPUs, but only {free.get('CPU', 0.0):g} are free"
            + (f" (GPUs free: {free.get('GPU', 0.0):g})" if job.scaling.use_gpu else "")
        )
    if str(requested) == "auto":
        return fits
    try:
        k = int(requested)
    except ValueError:
        raise ConfigError(f"--max-concurrent must be auto or a positive integer, got {requested!r}") from None
    if k < 1:
        raise ConfigError(f"--max-concurrent must be auto or a positive integer, got {requested!r}")
    if k > fits:
        log(f"warning: --max-concurrent {k} exceeds the {fits} trial(s) that fit in the free resources; "
            "extra trials can starve Ray Data of CPUs")
    return k


# ----------------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------------


class _Monitor(tune.Callback):
    """Driver side: progress lines and the test-only interrupt hook (pickled with the search)."""

    def __init__(self, verbose: bool, board: str) -> None:
        self.verbose, self.board, self.results = verbose, board, 0

    def setup(self, **info: Any) -> None:
        """Wrap Tune's SIGINT handler: also raise the stop board, so trials end their runs gracefully."""
        if threading.current_thread() is not threading.main_thread():
            return
        tune_handler, board = signal.getsignal(signal.SIGINT), self.board

        def on_sigint(signum: int, frame: Any) -> None:
            with contextlib.suppress(Exception):
                ray.get_actor(board).stop.remote()
            if callable(tune_handler):
                tune_handler(signum, frame)
            else:
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if METRIC not in result:
            return
        if self.verbose:
            print(f"trial {trial.trial_id}: epoch {result.get(TIME_ATTR)}  val NME {100 * result[METRIC]:.2f}%",
                  flush=True)
        self.results += 1
        at = os.environ.get(INTERRUPT_HOOK)
        if at is not None and self.results == int(at):
            signal.raise_signal(signal.SIGINT)  # Tune's own handler: save the state, end the run


def _tuner(state: SearchState, restore: bool, verbose: bool) -> tune.Tuner:
    from ray.tune.schedulers import ASHAScheduler

    spec = state.spec
    trainable = tune.with_resources(tune.with_parameters(FlareTrial, state=asdict(state)), TRIAL_ACTOR_RESOURCES)
    if restore:
        return tune.Tuner.restore(str(state.path), trainable=trainable, resume_unfinished=True)
    if spec.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg, limit = OptunaSearch(seed=spec.seed), state.max_concurrent
    else:
        from ray.tune.search import BasicVariantGenerator

        # the generator limits concurrency itself (Tune ignores max_concurrent_trials with it)
        search_alg, limit = BasicVariantGenerator(random_state=spec.seed, max_concurrent=state.max_concurrent), None
    sched = spec.scheduler
    scheduler = ASHAScheduler(time_attr=TIME_ATTR, max_t=sched.max_epochs, grace_period=sched.grace_period,
                              reduction_factor=sched.reduction_factor)
    return tune.Tuner(
        trainable, param_space=spec.param_space(),
        tune_config=tune.TuneConfig(metric=METRIC, mode="min", scheduler=scheduler, search_alg=search_alg,
                                    num_samples=state.samples, max_concurrent_trials=limit),
        run_config=tune.RunConfig(name=state.name, storage_path=state.storage, verbose=0,
                                  callbacks=[_Monitor(verbose, board_name(state.name))],
                                  checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False)),
    )


@dataclass
class TrialSummary:
    """One trial as the report shows it."""

    trial_id: str
    values: dict[str, Any]
    status: str
    history: list[tuple[int, float]] = field(default_factory=list)  # (epochs completed, val NME)
    run_id: str | None = None
    error: str | None = None

    @property
    def epochs(self) -> int:
        return max((e for e, _ in self.history), default=0)

    @property
    def best_val_nme(self) -> float:
        return min((v for _, v in self.history), default=math.inf)

    def stopped_early(self, max_epochs: int) -> bool:
        return self.status == "TERMINATED" and self.epochs < max_epochs


@dataclass
class SearchOutcome:
    """What a finished search produced."""

    name: str
    path: Path
    parent_run_id: str | None
    trials: list[TrialSummary]
    best: TrialSummary | None
    registered_version: str | None
    promoted: bool
    decision: str
    plot: Path | None
    failed: list[str] = field(default_factory=list)  # trial ids that ended in an error


def summarize(path: Path) -> list[TrialSummary]:
    """Trials of the Tune experiment at ``path`` with their status and (epoch, val NME) history."""
    ea = tune.ExperimentAnalysis(str(path))
    frames = ea.trial_dataframes
    out = []
    for trial in ea.trials:
        df = frames.get(trial.trial_id)
        hist: dict[int, float] = {}
        if df is not None and TIME_ATTR in df and METRIC in df:
            for e, v in zip(df[TIME_ATTR], df[METRIC]):
                if not (math.isnan(e) or math.isnan(v)):
                    hist[int(e)] = float(v)
        out.append(TrialSummary(trial.trial_id, {k: plain(trial.config[k]) for k in sorted(trial.config)}, trial.status,
                                sorted(hist.items()), error=_first_line(trial)))
    return sorted(out, key=lambda t: t.trial_id)


def _first_line(trial: Any) -> str | None:
    err = getattr(trial, "error_file", None)
    if trial.status != "ERROR":
        return None
    try:
        return Path(err).read_text().strip().splitlines()[-1] if err else "error"
    except OSError:
        return "error"


def run_search(state: SearchState | None = None, *, resume: str | None = None, storage: str | Path | None = None,
               max_concurrent: str | int = "auto", address: str | None = None, log=print,
               verbose: bool = True) -> SearchOutcome:
    """Run (or with ``resume``, continue) a search planned by :func:`plan_search`, then report,
    register the best trial's model and decide on ``champion``."""
    from mlflow.tracking import MlflowClient

    from flare.platform import tracking
    from flare.platform.ray_connect import ensure_ray
    from flare.platform.ray_connect import verbose as ray_verbose

    if resume:
        state = SearchState.load(storage, resume)
        check_trusted_tree(state.path)  # Tuner.restore unpickles what lies there
    assert state is not None
    state.tracking_uri = state.tracking_uri or tracking.default_tracking_uri()
    base = state.base_job
    tracking.setup(state.tracking_uri, base.mlflow.experiment)
    client = MlflowClient(state.tracking_uri)
    if resume and client.get_run(state.parent_run_id).info.status == "FINISHED":
        raise ConfigError(f"--resume {state.name}: this search already finished (parent run {state.parent_run_id})")
    ensure_ray(address)
    if not resume:
        state.max_concurrent = choose_concurrency(base, max_concurrent, ray.available_resources(), log)
        state.parent_run_id = open_parent(state, client)
        state.save()
    else:
        client.update_run(state.parent_run_id, status="RUNNING")
    log(f"search {state.name}: {state.samples} sample(s), up to {state.max_concurrent} trial(s) at once, "
        f"MLflow parent run {state.parent_run_id}")
    board = StopBoard.options(name=board_name(state.name), get_if_exists=True).remote()
    ray.get(board.reset.remote())
    if not ray_verbose():
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's experiment banner and tables stay off
    in_main = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT)
    try:
        _tuner(state, restore=bool(resume), verbose=verbose).fit()
    finally:
        if in_main:  # Tune leaves its handler installed; Ctrl-C should work again after the search
            signal.signal(signal.SIGINT, sigint)
    trials = summarize(state.path)
    unfinished = [t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR")]
    if unfinished:
        client.set_terminated(state.parent_run_id, status="KILLED")
        log(f"search {state.name} interrupted with {len(unfinished)} unfinished trial(s); "
            f"continue with: flare tune --resume {state.name}")
        raise SearchInterrupted(state.name)
    return finish_search(state, trials, client, log)


def open_parent(state: SearchState, client: Any) -> str:
    """The search's parent MLflow run: the search file, job spec and search settings."""
    from mlflow.entities import Param

    from flare.platform.config import flatten
    from flare.platform.tracking import job_data_input

    exp = client.get_experiment_by_name(state.base_job.mlflow.experiment)
    run = client.create_run(exp.experiment_id, run_name=state.name,
                            tags={"flare.tune.search": state.name, "flare.kind": "tune"})
    rid = run.info.run_id
    params = {f"search.{k}": str(v)[:500] for k, v in flatten(state.search).items()}
    params.update({"search.samples_run": str(state.samples), "search.max_concurrent": str(state.max_concurrent)})
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(rid, params=items[i:i + 100])
    client.log_dict(rid, state.job, "job.json")
    client.log_dict(rid, state.search, "search.json")
    with contextlib.suppress(OSError):  # no base manifest: the search samples data.manifest (trials log theirs)
        client.log_inputs(rid, datasets=[job_data_input(state.trial_job({}))])
    return rid


def finish_search(state: SearchState, trials: list[TrialSummary], client: Any, log=print) -> SearchOutcome:
    """Tag the child runs, print the table, log the plot, register the best model, decide on champion."""
    from flare.platform.tracking import end_run

    spec = state.spec
    max_epochs, rungs = spec.scheduler.max_epochs, spec.scheduler.rungs()
    exp_id = client.get_experiment_by_name(state.base_job.mlflow.experiment).experiment_id
    runs = {r.data.tags.get("flare.tune.trial_id"): r.info.run_id
            for r in client.search_runs([exp_id], f"tags.`flare.tune.search` = '{state.name}'")}
    for t in trials:
        t.run_id = runs.get(t.trial_id)
        if t.run_id:
            stopped = t.stopped_early(max_epochs)
            if t.status == "ERROR":
                client.set_tag(t.run_id, "flare.tune.error", (t.error or "error")[:500])
                end_run(client, t.run_id, "FAILED")  # keeps the end time the trial recorded
            elif client.get_run(t.run_id).info.status == "RUNNING":  # its actor went before ending it
                end_run(client, t.run_id, "FINISHED")  # at its last epoch, not now
            client.set_tag(t.run_id, "flare.tune.status", t.status)
            client.set_tag(t.run_id, "flare.tune.epochs", str(t.epochs))
            client.set_tag(t.run_id, "flare.tune.stopped_early", str(stopped).lower())
            client.set_tag(t.run_id, "flare.tune.stop_rung", str(t.epochs) if stopped else "none")
    table = trial_table(trials, max_epochs)
    log(table)
    atomic_write_bytes(state.path / "trials.txt", (table + "\n").encode())
    atomic_write_bytes(state.path / "trials.json",
                       (json.dumps([asdict(t) for t in trials], indent=2, default=str) + "\n").encode())
    plot = plot_trials(trials, rungs, max_epochs, state.path / "val_nme.png", state.name)
    for f in ("trials.txt", "trials.json", "val_nme.png"):
        client.log_artifact(state.parent_run_id, str(state.path / f))
    failed = [t.trial_id for t in trials if t.status == "ERROR"]
    client.set_tag(state.parent_run_id, "flare.tune.failed_trials", ",".join(failed) or "none")
    for t in trials:
        if t.status == "ERROR":
            log(f"trial {t.trial_id} failed: {t.error}")
    done = [t for t in trials if t.history and t.run_id]
    if not done:
        client.set_terminated(state.parent_run_id, status="FAILED")
        errors = "; ".join(f"{t.trial_id}: {t.error}" for t in trials if t.error)
        raise SearchFailed(f"search {state.name}: no trial reported a validation epoch ({errors or 'no trials'})")
    best = min(done, key=lambda t: t.best_val_nme)
    client.log_metric(state.parent_run_id, "best_val_nme", best.best_val_nme)
    client.set_tag(state.parent_run_id, "flare.tune.best_trial", best.trial_id)
    log(f"best trial {best.trial_id}: val NME {100 * best.best_val_nme:.2f}% ({format_values(best.values)})")
    version, promoted, decision = register_best(state, best, log)
    client.set_tag(state.parent_run_id, "flare.tune.champion_decision", decision)
    client.set_terminated(state.parent_run_id, status="FINISHED")
    return SearchOutcome(state.name, state.path, state.parent_run_id, trials, best, version, promoted, decision,
                         plot, failed)


def register_best(state: SearchState, best: TrialSummary, log=print) -> tuple[str | None, bool, str]:
    """Log (and register) the best trial's val-selected checkpoint; move ``champion`` only if better."""
    import shutil
    import tempfile

    from flare.platform.ray_train import finish_run

    job = state.trial_job(best.values, best.trial_id)
    ckpt = best_checkpoint_dir(state.path / "train" / best.trial_id)
    if ckpt is None:
        raise RuntimeError(f"trial {best.trial_id}: no checkpoint under {state.path / 'train' / best.trial_id}")
    local = Path(tempfile.mkdtemp(prefix="flare-best-"))
    try:
        shutil.copytree(ckpt, local, dirs_exist_ok=True)
        outcome = finish_run(job, local, best.run_id, state.tracking_uri, log)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    name, version = job.mlflow.registered_model, outcome.registered_version
    if not name or version is None:
        return None, False, "no registered model (mlflow.registered_model is unset)"
    promoted, decision = champion_if_better(job, version, float(outcome.best_metrics["val_nme"]),
                                            state.tracking_uri)
    log(decision)
    return version, promoted, decision


