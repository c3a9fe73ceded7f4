"""``flare tune``: hyperparameter search with Ray Tune + ASHA over Ray Train runs (issue 5).

Every trial is one Ray Train run (Train V2) of the job spec with the sampled values applied. Its
Tune trainable builds the ``TorchTrainer`` itself; a ``UserCallback`` on the Train controller relays
each epoch's report to the trainable, which hands it to Tune, and ASHA (time attribute: epochs
completed, metric ``val_nme``, mode min) decides whether the trial continues.

Why a class trainable and not ``TuneReportCallback`` in a function trainable: when ASHA stops a
function trial, Tune ends the trial's actor; the Train controller it owns dies with it and the
workers' placement group is left behind (Ray's own cleaner needs the dashboard's state API). Measured
on 2 CPUs: free CPUs went 2.0 -> 1.5 -> 1.0 after two stopped trials and the third trial's Ray Data
ingest never started. Here ``cleanup`` aborts the controller through ``TrainController.abort``, which
removes the placement group, before the actor goes away.

Interruption (Ctrl-C): Tune saves its state and stops the trials, but kills a trial actor that does not
stop within ~10 s, which an epoch in flight easily exceeds. The driver therefore also raises a
:class:`StopBoard` flag that running trials poll, so they abort their Train runs at once; ``--resume``
restores the Tune experiment (``Tuner.restore``): finished trials are not re-run and unfinished ones
restart their Train run under the same name, which Ray Train resumes from its latest checkpoint.

Concurrency: trials run at most ``K`` at a time where every running trial's workers fit into the free
CPUs/GPUs with a whole CPU left for Ray Data's read tasks (measured: a read task asks for one CPU and
ingest hangs when less is free). The trial's own actor reserves no CPU.

MLflow: one parent run per search; one child run per trial (params, per-epoch metrics logged by the
rank-0 worker, tags with the sampled values and whether/at which rung ASHA stopped it). Only the best
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
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.train import UserCallback
from ray.train.v2._internal.execution.callback import ControllerCallback  # internal; Ray is pinned
from ray.util.queue import Empty, Queue

from flare.files import atomic_write_bytes
from flare.platform.config import ConfigError, JobConfig, load_job, parse_job
from flare.platform.registry import champion_if_better
from flare.platform.search_space import SearchSpec, load_search, plain, set_paths, validate_search

METRIC = "val_nme"
TIME_ATTR = "epochs_done"  # epochs completed (the loop's 0-based ``epoch`` + 1): ASHA's time axis
DATA_TASK_CPUS = 1.0  # a Ray Data read task asks for one whole CPU; with less free, ingest never starts
TRIAL_ACTOR_RESOURCES = {"CPU": 0.0, "memory": 64 * 2**20}  # Tune needs a non-empty bundle; no CPU slot
STATE_FILE = "flare_search.json"
INTERRUPT_HOOK = "FLARE_TEST_INTERRUPT_AFTER_RESULTS"  # test-only: SIGINT the driver after N epoch results


class SearchInterrupted(KeyboardInterrupt):
    """The search stopped before all trials finished; ``flare tune --resume NAME`` continues it."""


# ----------------------------------------------------------------------------------------------
# planning: validation, state, concurrency
# ----------------------------------------------------------------------------------------------


@dataclass
class SearchState:
    """What a search needs to be resumed, saved as ``<storage>/<name>/flare_search.json``."""

    name: str
    job: dict[str, Any]
    search: dict[str, Any]
    source: str
    samples: int
    tracking_uri: str
    storage: str
    parent_run_id: str | None = None
    max_concurrent: int = 1

    @property
    def path(self) -> Path:
        return Path(self.storage) / self.name

    @property
    def spec(self) -> SearchSpec:
        return SearchSpec.model_validate(self.search)

    @property
    def base_job(self) -> JobConfig:
        return parse_job(self.job, source=self.name)

    def save(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path / STATE_FILE, (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode())

    @classmethod
    def load(cls, storage: Path, name: str) -> SearchState:
        path = Path(storage).resolve() / name / STATE_FILE
        if not path.is_file():
            raise ConfigError(f"--resume {name}: no search named {name} under {Path(storage).resolve()}")
        return cls(**json.loads(path.read_text()))

    def trial_job(self, values: dict[str, Any], trial_id: str | None = None) -> JobConfig:
        """The job spec of one trial: base job + fixed + sampled values (+ per-trial name)."""
        raw = set_paths(self.job, self.spec.overrides(values), self.source)
        if trial_id:
            raw["name"] = f"{raw.get('name', 'job')}-{trial_id}"
        return parse_job(raw, source=f"{self.source}: trial {trial_id}")


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
                name: str | None = None, storage: Path | None = None, tracking_uri: str | None = None,
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
    storage = Path(storage or Path.cwd() / "runs").resolve()
    name = name or f"{job.name}-{search.name or Path(search_file).stem}-{datetime.now():%Y%m%d-%H%M%S}"
    if any(c in name for c in "/\\ ") or not name:
        raise ConfigError(f"--name {name!r}: use a name without slashes or spaces")
    if (storage / name).exists():
        raise ConfigError(f"search {name} already exists under {storage}; continue it with --resume {name}")
    uri = tracking_uri or job.mlflow.tracking_uri or ""  # "" = the default store, resolved when the search runs
    return SearchState(name=name, job=raw, search=search.model_dump(mode="json", exclude_none=True),
                       source=str(search_file), samples=samples or search.samples, tracking_uri=uri,
                       storage=str(storage))


def max_concurrent_trials(job: JobConfig, free: dict[str, float]) -> int:
    """How many trials fit at once: ``K * workers * cpus_per_worker + DATA_TASK_CPUS <= free CPUs``
    (and ``K * workers <= free GPUs`` with GPUs), so no trial waits forever for a CPU."""
    per_trial = job.scaling.workers * job.scaling.cpus_per_worker
    k = math.floor((float(free.get("CPU", 0.0)) - DATA_TASK_CPUS) / per_trial + 1e-9)
    if job.scaling.use_gpu:
        k = min(k, math.floor(float(free.get("GPU", 0.0)) / job.scaling.workers + 1e-9))
    return k


def choose_concurrency(job: JobConfig, requested: str | int, free: dict[str, float], log=print) -> int:
    """``auto``: :func:`max_concurrent_trials` of the free resources; an integer overrides it."""
    fits = max_concurrent_trials(job, free)
    if fits < 1:
        need = job.scaling.workers * job.scaling.cpus_per_worker + DATA_TASK_CPUS
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
# the trial: a Tune trainable that runs one Ray Train run
# ----------------------------------------------------------------------------------------------


class _Announce(ControllerCallback):
    """On the Train controller: hand its own actor handle to the trial (to abort it on stop)."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def after_controller_start(self, train_run_context: Any) -> None:
        self.queue.put(("controller", ray.get_runtime_context().current_actor))


class _Relay(UserCallback):
    """On the Train controller: relay rank 0's report of every epoch to the trial."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        self.queue.put(("report", dict(metrics[0])))


@ray.remote(num_cpus=0)
class StopBoard:
    """The driver raises this flag when the search is interrupted (Ctrl-C): running trials then abort
    their Train runs gracefully, since Tune gives a stopping trial actor only ~10 s before killing it."""

    def __init__(self) -> None:
        self.stopping = False

    def stop(self) -> None:
        self.stopping = True

    def reset(self) -> None:
        self.stopping = False

    def is_stopping(self) -> bool:
        return self.stopping


def board_name(search: str) -> str:
    return f"flare-tune-stop-{search}"


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class FlareTrial(tune.Trainable):
    """One trial = one Ray Train run of the trial's job spec; ``step`` returns its next epoch."""

    def setup(self, config: dict[str, Any], state: dict[str, Any]) -> None:
        from flare.platform.ray_train import check_job, make_trainer

        self.state = SearchState(**state)
        self.values = {k: plain(config[k]) for k in self.state.spec.params if k in config}
        self.job = self.state.trial_job(self.values, self.trial_id)
        manifest = check_job(self.job)
        self.run_id = child_run(self.state, self.job, self.trial_id, self.values)
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.controller: Any = None
        self.aborted = False
        self.last: dict[str, Any] | None = None
        try:
            self.board = ray.get_actor(board_name(self.state.name))
        except ValueError:  # no driver board (not started by run_search): nothing to watch
            self.board = None
        # this trial actor's own context, captured by its datasets: several trials' Ray Data bars
        # interleaved are noise next to the driver's trial lines
        ray.data.DataContext.get_current().enable_progress_bars = False
        trainer = make_trainer(self.job, manifest, self.trial_id, self.state.path / "train", self.state.tracking_uri,
                               self.run_id, callbacks=[_Relay(self.queue), _Announce(self.queue)])
        self.thread = threading.Thread(target=self._fit, args=(trainer,), daemon=True)
        if not self._interrupted():
            self.thread.start()

    def _interrupted(self) -> bool:
        """The driver was interrupted; abort the Train run (once its controller is known)."""
        if self.board is None:
            return False
        try:
            stopping = ray.get(self.board.is_stopping.remote(), timeout=10)
        except ray.exceptions.RayActorError:  # the driver is gone: stop as well
            stopping = True
        except ray.exceptions.GetTimeoutError:
            stopping = False
        if stopping and self.controller is not None and not self.aborted:
            self.controller.abort.remote()
            self.aborted = True
        return stopping

    def _fit(self, trainer: Any) -> None:
        metrics = None
        try:
            result = trainer.fit()
            error = None if result.error is None else f"{type(result.error).__name__}: {result.error}"
            metrics = dict(result.metrics) if result.metrics else None
        except Exception as err:  # noqa: BLE001 - reported to Tune as the trial's error
            error = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        with contextlib.suppress(Exception):  # the queue is gone when the trial is being torn down
            self.queue.put(("done", (error, metrics)))

    def _next(self, timeout: float | None = None) -> tuple[str, Any] | None:
        """The next report or end of training (None after ``timeout`` s); notes the controller handle."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            try:
                kind, payload = self.queue.get(block=True, timeout=2)
            except Empty:
                interrupted = self._interrupted()
                if not self.thread.is_alive() and self.queue.empty():
                    why = "search interrupted (continue with --resume)" if interrupted else "training ended early"
                    return ("done", (why, None))
                continue
            if kind == "controller":
                self.controller = payload
                continue
            return kind, payload
        return None

    def step(self) -> dict[str, Any]:
        kind, payload = self._next()
        if kind == "done":
            error, final = payload
            if self.aborted:
                error = "search interrupted (continue with flare tune --resume)"
            if error is not None:
                raise RuntimeError(error)
            if self.last is None and not final:
                raise RuntimeError("training finished without reporting an epoch")
            # a resumed run whose last epoch was already done reports nothing new: use its final metrics
            last = self.last or {**_scalars(final), TIME_ATTR: int(final["epoch"]) + 1}
            return {**last, "done": True}
        res = _scalars(payload)
        res[TIME_ATTR] = int(payload["epoch"]) + 1
        self.last = res
        return {**res, "done": True} if res[TIME_ATTR] >= self.job.optimizer.epochs else res

    def save_checkpoint(self, checkpoint_dir: str) -> dict[str, Any]:
        """Nothing to save: the Train run keeps its own checkpoints, which a restarted trial resumes."""
        return {TIME_ATTR: self.last[TIME_ATTR] if self.last else 0}

    def load_checkpoint(self, checkpoint: dict[str, Any] | None) -> None:
        """Nothing to load (see :meth:`save_checkpoint`)."""

    def cleanup(self) -> None:
        """Stop the Train run gracefully (``abort`` removes its placement group) before the actor ends."""
        if not self.thread.is_alive():
            return
        if self.last is not None and self.last[TIME_ATTR] >= self.job.optimizer.epochs:
            self.thread.join(timeout=60)  # the last epoch is in: the run is finishing by itself
        deadline = time.monotonic() + 120
        while self.thread.is_alive() and self.controller is None and time.monotonic() < deadline:
            self._next(timeout=2)
        if self.thread.is_alive() and self.controller is not None:
            with contextlib.suppress(Exception):  # abort ends the controller actor, which raises here
                ray.get(self.controller.abort.remote(), timeout=120)
        self.thread.join(timeout=60)


def child_run(state: SearchState, job: JobConfig, trial_id: str, values: dict[str, Any]) -> str:
    """The trial's MLflow child run: found again by its trial id on resume, else opened."""
    from mlflow.tracking import MlflowClient

    from flare.platform import tracking
    from flare.platform.ray_train import open_run

    exp_id = tracking.setup(state.tracking_uri, job.mlflow.experiment)
    client = MlflowClient(state.tracking_uri)
    found = client.search_runs([exp_id], f"tags.`flare.tune.search` = '{state.name}' and "
                                         f"tags.`flare.tune.trial_id` = '{trial_id}'")
    if found:
        return found[0].info.run_id
    run_id, _ = open_run(job, state.tracking_uri, parent_run_id=state.parent_run_id,
                         tags={"flare.tune.search": state.name, "flare.tune.trial_id": trial_id,
                               "flare.tune.values": json.dumps(values, sort_keys=True)})
    return run_id


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
            print(f"trial {trial.trial_id}: epoch {result.get(TIME_ATTR)} val_nme {result[METRIC]:.5f}", flush=True)
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


def best_checkpoint_dir(run_dir: Path) -> Path | None:
    """The checkpoint of a Train run directory with the smallest val NME."""
    from flare.platform.checkpoints import load_checkpoint

    best, best_nme = None, math.inf
    for d in sorted(Path(run_dir).glob("checkpoint_*")):
        if (d / "state.pt").is_file():
            state, _ = load_checkpoint(d)
            if float(state["val_nme"]) < best_nme:
                best, best_nme = d, float(state["val_nme"])
    return best


def run_search(state: SearchState | None = None, *, resume: str | None = None, storage: Path | None = None,
               max_concurrent: str | int = "auto", address: str | None = None, log=print,
               verbose: bool = True) -> SearchOutcome:
    """Run (or with ``resume``, continue) a search planned by :func:`plan_search`, then report,
    register the best trial's model and decide on ``champion``."""
    from mlflow.tracking import MlflowClient

    from flare.platform import tracking
    from flare.platform.ray_connect import ensure_ray

    if resume:
        state = SearchState.load(storage or Path.cwd() / "runs", resume)
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
    return rid


def finish_search(state: SearchState, trials: list[TrialSummary], client: Any, log=print) -> SearchOutcome:
    """Tag the child runs, print the table, log the plot, register the best model, decide on champion."""
    spec = state.spec
    max_epochs, rungs = spec.scheduler.max_epochs, spec.scheduler.rungs()
    exp_id = client.get_experiment_by_name(state.base_job.mlflow.experiment).experiment_id
    runs = {r.data.tags.get("flare.tune.trial_id"): r.info.run_id
            for r in client.search_runs([exp_id], f"tags.`flare.tune.search` = '{state.name}'")}
    for t in trials:
        t.run_id = runs.get(t.trial_id)
        if t.run_id:
            stopped = t.stopped_early(max_epochs)
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
    done = [t for t in trials if t.history and t.run_id]
    if not done:
        client.set_terminated(state.parent_run_id, status="FAILED")
        errors = "; ".join(f"{t.trial_id}: {t.error}" for t in trials if t.error)
        raise RuntimeError(f"search {state.name}: no trial reported a validation epoch ({errors or 'no trials'})")
    best = min(done, key=lambda t: t.best_val_nme)
    client.log_metric(state.parent_run_id, "best_val_nme", best.best_val_nme)
    client.set_tag(state.parent_run_id, "flare.tune.best_trial", best.trial_id)
    log(f"best trial {best.trial_id}: val NME {best.best_val_nme:.5f} ({_values(best.values)})")
    version, promoted, decision = register_best(state, best, log)
    client.set_tag(state.parent_run_id, "flare.tune.champion_decision", decision)
    client.set_terminated(state.parent_run_id, status="FINISHED")
    return SearchOutcome(state.name, state.path, state.parent_run_id, trials, best, version, promoted, decision,
                         plot)


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


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _values(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())


def trial_table(trials: list[TrialSummary], max_epochs: int) -> str:
    """A plain-text table: trial, sampled values, epochs run, best val NME, stopped early (at which rung)."""
    keys = sorted({k for t in trials for k in t.values})
    head = ["trial", *keys, "epochs", "best val NME", "stopped early"]
    rows = []
    for t in trials:
        if t.status == "ERROR":
            stop = f"error: {t.error}"[:60]
        else:
            stop = f"yes (rung {t.epochs})" if t.stopped_early(max_epochs) else "no"
        best = f"{t.best_val_nme:.5f}" if t.history else "-"
        rows.append([t.trial_id, *[_fmt(t.values.get(k, "")) for k in keys], str(t.epochs), best, stop])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def plot_trials(trials: list[TrialSummary], rungs: list[int], max_epochs: int, path: Path, title: str) -> Path:
    """val NME against epochs for every trial; ASHA's rungs as dashed lines, early stops as crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in rungs:
        ax.axvline(r, color="0.6", ls="--", lw=1)
        ax.annotate(f"rung {r}", (r, 1.0), xycoords=("data", "axes fraction"), ha="left", va="top",
                    fontsize=8, color="0.4", xytext=(2, -2), textcoords="offset points")
    for t in trials:
        if not t.history:
            continue
        xs, ys = zip(*t.history)
        (ln,) = ax.plot(xs, ys, marker="o", ms=3, lw=1.2, label=t.trial_id)
        if t.stopped_early(max_epochs):
            ax.plot([xs[-1]], [ys[-1]], marker="x", ms=9, mew=2, color=ln.get_color())
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epochs completed")
    ax.set_ylabel("val NME")
    ax.set_xlim(0.5, max_epochs + 0.5)
    ax.set_title(f"{title} (x = stopped by ASHA)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
