"""One trial of ``flare tune``: a Ray Tune trainable that runs one Ray Train run (Train V2) of the job spec
with the sampled values applied, plus the search state it is built from.

The trainable builds the ``TorchTrainer`` itself; a ``UserCallback`` on the Train controller relays each
epoch's report to the trainable, which hands it to Tune, and ASHA decides whether the trial continues.

Why a class trainable and not ``TuneReportCallback`` in a function trainable: when ASHA stops a
function trial, Tune ends the trial's actor; the Train controller it owns dies with it and the
workers' placement group is left behind (Ray's own cleaner needs the dashboard's state API). Measured
on 2 CPUs: free CPUs went 2.0 -> 1.5 -> 1.0 after two stopped trials and the third trial's Ray Data
ingest never started. Here ``cleanup`` aborts the controller through ``TrainController.abort``, which
removes the placement group, before the actor goes away. On Ctrl-C the driver raises a
:class:`StopBoard` flag that running trials poll, so they abort their Train runs at once (Tune kills a
trial actor that does not stop within ~10 s).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.train.v2._internal.execution.callback import ControllerCallback  # internal; Ray is pinned
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from flare.files import atomic_write_bytes
from flare.platform.config import ConfigError, JobConfig, parse_job
from flare.platform.search_space import SearchSpec, plain, set_paths
from flare.platform.storage import local_storage

METRIC = "val_nme"
TIME_ATTR = "epochs_done"  # epochs completed (the loop's 0-based ``epoch`` + 1): ASHA's time axis
STATE_FILE = "flare_search.json"


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
    worker_env: dict[str, str] = field(default_factory=dict)  # test hooks (FLARE_TEST_*) for the workers

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
    def load(cls, storage: str | Path | None, name: str) -> SearchState:
        root = Path(local_storage(storage))
        path = root / name / STATE_FILE
        if not path.is_file():
            raise ConfigError(f"--resume {name}: no search named {name} under {root}")
        return cls(**json.loads(path.read_text()))

    def trial_job(self, values: dict[str, Any], trial_id: str | None = None) -> JobConfig:
        """The job spec of one trial: base job + fixed + sampled values (+ per-trial name)."""
        raw = set_paths(self.job, self.spec.overrides(values), self.source)
        if trial_id:
            raw["name"] = f"{raw.get('name', 'job')}-{trial_id}"
        return parse_job(raw, source=f"{self.source}: trial {trial_id}")


class _Announce(ControllerCallback):
    """On the Train controller: hand its own actor handle to the trial (to abort it on stop)."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def after_controller_start(self, train_run_context: Any) -> None:
        self.queue.put(("controller", ray.get_runtime_context().current_actor))


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
        from flare.platform.ray_train import check_job, make_trainer, relay_callback

        self.state = SearchState(**state)
        self.values = {k: plain(config[k]) for k in self.state.spec.params if k in config}
        self.job = self.state.trial_job(self.values, self.trial_id)
        manifest = check_job(self.job)
        self.run_id = child_run(self.state, self.job, self.trial_id, self.values)
        # the trial's queue lives on the trial's node: it goes when the trial goes, never with another node
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.controller: Any = None
        self.aborted = False  # aborted because the search was interrupted
        self.stopping = False  # Tune (ASHA) is stopping the trial
        self.last: dict[str, Any] | None = None
        try:
            self.board = ray.get_actor(board_name(self.state.name))
        except ValueError:  # no driver board (not started by run_search): nothing to watch
            self.board = None
        # this trial actor's own context, captured by its datasets: several trials' Ray Data bars
        # interleaved are noise next to the driver's trial lines
        ray.data.DataContext.get_current().enable_progress_bars = False
        trainer = make_trainer(self.job, manifest, self.trial_id, self.state.path / "train", self.state.tracking_uri,
                               self.run_id, worker_env=self.state.worker_env,
                               callbacks=[relay_callback(self.queue), _Announce(self.queue)])
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
        self._end_run(error)
        with contextlib.suppress(Exception):  # the queue is gone when the trial is being torn down
            self.queue.put(("done", (error, metrics)))

    def _end_run(self, error: str | None) -> None:
        """End the trial's MLflow run now that its training ended: FINISHED when it ran out or ASHA stopped
        it, KILLED when the search was interrupted (resumed later), FAILED on an error."""
        from mlflow.tracking import MlflowClient

        from flare.platform.tracking import end_run

        interrupted = self.aborted
        if not interrupted and self.board is not None:
            with contextlib.suppress(Exception):
                interrupted = bool(ray.get(self.board.is_stopping.remote(), timeout=10))
        status = "KILLED" if interrupted else "FINISHED" if error is None or self.stopping else "FAILED"
        with contextlib.suppress(Exception):  # the driver ends it at the search's end if this fails
            end_run(MlflowClient(self.state.tracking_uri), self.run_id, status, time.time())

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
        self.stopping = True
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
        client.update_run(found[0].info.run_id, status="RUNNING")  # a resumed trial trains again
        return found[0].info.run_id
    run_id, _ = open_run(job, state.tracking_uri, parent_run_id=state.parent_run_id,
                         tags={"flare.tune.search": state.name, "flare.tune.trial_id": trial_id,
                               "flare.tune.values": json.dumps(values, sort_keys=True)},
                         run_name=trial_run_name(trial_id, values))
    return run_id


def trial_run_name(trial_id: str, values: dict[str, Any]) -> str:
    """A trial run's name says what it ran: ``lr=0.003, decode=argmax (a1b2c_00001)``; a sampled key is
    shortened to its last part where that stays unambiguous."""
    from flare.platform.plots import format_values

    last = [k.rsplit(".", 1)[-1] for k in values]
    short = {(s if last.count(s) == 1 else k): v for k, s, v in zip(values, last, values.values())}
    return f"{format_values(short)} ({trial_id})" if short else trial_id
