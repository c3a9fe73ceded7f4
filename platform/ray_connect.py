"""Connecting to Ray: an embedded local Ray by default, or a cluster by address.

Local Ray binds its dashboard to 127.0.0.1 and keeps token authentication as Ray configures it
(never disabled here). Ray's worker, controller and data logs stay in Ray's log dir (its path is printed
once) unless ``flare --verbose`` asks for them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

VERBOSE_ENV = "FLARE_VERBOSE"


def verbose() -> bool:
    """``flare --verbose`` (or ``FLARE_VERBOSE=1``): Ray's worker, controller and data logs on the terminal."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def quiet_warnings() -> None:
    """Deprecation and internal warnings of Ray, MLflow and torch stay off the terminal in normal use."""
    import warnings

    if not verbose():
        for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category)
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # "Created version ...", db migrations
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        logging.getLogger("torch._export").setLevel(logging.ERROR)  # export specialisation notes


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """``ray.init`` once: connect to ``address`` (``auto``, ``ray://host:10001``) or, inside a Ray job,
    to ``RAY_ADDRESS``; otherwise start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # the raylet warns on the driver's terminal whenever more than 4x this many workers were started, which
    # a search's zero-CPU actors (trials, queues, data coordinators) always do on a small machine
    os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(max(8, os.cpu_count() or 1)))
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    loud = verbose()
    kwargs = {"log_to_driver": loud, "logging_level": logging.INFO if loud else logging.WARNING,
              "configure_logging": True}
    address = address or os.environ.get("RAY_ADDRESS")
    if address is None:
        ray.init(num_cpus=num_cpus, include_dashboard=False, dashboard_host="127.0.0.1",
                 runtime_env={"worker_process_setup_hook": "flare.platform.ray_connect.quiet_worker_logs"},
                 **kwargs)
    else:
        ray.init(address=address, **kwargs)
    if not loud:
        for name in ("ray.data", "ray.train", "ray.tune", "mlflow"):  # driver-side INFO chatter
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled" notice
        with contextlib.suppress(Exception):  # private API: the path is a courtesy, never a failure
            logs = ray._private.worker._global_node.get_logs_dir_path()
            print(f"Ray logs (workers, controller, data): {logs}  (flare --verbose shows them here)",
                  file=sys.stderr, flush=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()  # bars for a terminal; none in log files and job logs
    ctx.print_on_execution_start = False


def quiet_worker_logs() -> None:
    """Worker setup hook of the embedded Ray. It runs without a dashboard, hence without the State API,
    and Ray Train's placement-group cleaner would warn every few seconds that it cannot query the
    controller (flare's runs remove their placement groups themselves: ``tune.FlareTrial.cleanup``)."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
