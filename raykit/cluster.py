"""Joining Ray: the cluster when there is one (`ray job submit`, RAY_ADDRESS), else a local Ray."""

from __future__ import annotations

import logging
import os
import re

import raykit.log
from raykit.errors import RaykitError, RunFailed

log = logging.getLogger(__name__)

_connected_here = False  # whether this process's ray.init() was raykit's (not a notebook's or a test's)


def connect_ray(dashboard: bool = True) -> None:
    """`dashboard=False` for a local Ray that needs no State API (Ray Data jobs): one process less on a laptop."""
    global _connected_here
    import ray

    if not ray.is_initialized():
        # The job's Ray processes (workers, Ray Data's coordinators) log at WARNING unless -v: their
        # INFO lines (execution plans, "Starting execution") would bury raykit's progress lines.
        verbose = raykit.log.level() <= logging.DEBUG
        quiet = ray.LoggingConfig(log_level="DEBUG" if verbose else "WARNING")
        local = not os.environ.get("RAY_ADDRESS")
        if not verbose and local:
            quiet_local_ray()
        options = {"include_dashboard": False} if not dashboard else own_state_api() if local else {}
        ray.init(configure_logging=False, logging_config=quiet, **options)
        _connected_here = True


def own_state_api() -> dict:
    """ray.init options for a local Ray whose processes find their own State API.

    Ray Train's placement-group cleaner (in the controller) looks the State API up by scanning the
    machine for Ray instances: with a second local Ray running (another raykit command, a notebook)
    it finds two and dies, and nothing removes a lost run's placement groups. So the dashboard gets
    a port of our choosing and every process of this job is told it (RAY_API_SERVER_ADDRESS).
    """
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    os.environ["RAY_API_SERVER_ADDRESS"] = url  # this process's own State API calls
    return {"dashboard_host": "127.0.0.1", "dashboard_port": port,
            "runtime_env": {"env_vars": {"RAY_API_SERVER_ADDRESS": url}}}


def quiet_local_ray() -> None:
    """The environment a local Ray started from this process gives its processes (set before it starts)."""
    # Ray Data reads its own level from it, and DeepSpeed on a machine without CUDA need not warn
    # that it chose the CPU.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    # Ray Train's preemption watcher serves clusters of spot nodes; on one machine it is one more
    # process per run that only prints a C++ error line about its constructor arguments.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Ray's processes would print Ray Data's deprecation notes to itself (exclude_resources).
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    if not _has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def disconnect_ray() -> None:
    """Leave the Ray that raykit joined or started, so that nothing Ray forwards (worker and GCS lines
    arrive on their own thread) can print after raykit's last line: its one-line error."""
    global _connected_here
    if _connected_here:
        import ray

        ray.shutdown()
        _connected_here = False


def require_shared_storage(key: str, path: str) -> None:
    """Refuse, before anything starts, a local output path on a Ray cluster spread over several hosts.

    Each host would write its part to its own disk (Ray Train checkpoints, embedding shards) and no
    node would see the whole. A local Ray (no RAY_ADDRESS, nothing initialized) is this machine alone.
    """
    import ray

    from raykit import storage

    if storage.is_uri(path) or not (ray.is_initialized() or os.environ.get("RAY_ADDRESS")):
        return
    connect_ray()
    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    if len(hosts) > 1:
        raise RaykitError(
            f"{key}: {path} is a local path, but this Ray cluster spans {len(hosts)} hosts that do not share "
            f"its disk; write to storage every node reaches: {key}=s3://bucket/prefix"
        )


def check_local_cpus(cpus: int, asked: str, fix: str) -> None:
    """A local Ray (no RAY_ADDRESS) has this machine's cores, and nothing adds more: a run that asks
    for more waits for ever (Ray Train retries its workers' start every minute, printing a traceback
    each time). Refused here, before anything is written. A cluster is not checked: its autoscaler
    may add the nodes."""
    if os.environ.get("RAY_ADDRESS"):
        return
    import ray

    have = int(ray.cluster_resources().get("CPU", 0)) if ray.is_initialized() else len(os.sched_getaffinity(0))
    if cpus > have:
        raise RaykitError(f"{asked} need {cpus} CPUs, and the local Ray here has {have}; {fix}")


def check_local_compiler(key: str, gpu: bool) -> None:
    """A local Ray's workers and actors compile (torch.compile, `key`) on this machine: one without the
    compiler that needs is refused here, before anything is written, not at every worker's first step
    (raykit/device.py). A cluster's nodes check for themselves."""
    if not os.environ.get("RAY_ADDRESS"):
        from raykit.device import check_compiler  # torch: imported only where a job compiles

        check_compiler(key, "cuda" if gpu else "cpu")


def actor_count(concurrency: int, num_gpus: float, cpus_per_actor: float, work_items: int) -> int:
    """How many actors a Ray Data pool gets: `concurrency` when set, else as many as the cluster's
    GPUs (num_gpus > 0) or CPUs hold at once; never more than there are work items."""
    import ray

    if not concurrency:
        resources = ray.cluster_resources()
        if num_gpus:
            concurrency = int(resources.get("GPU", 0) // num_gpus)
        else:
            concurrency = int(resources.get("CPU", 1) // cpus_per_actor)
    return max(1, min(concurrency, work_items))


def node_count() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def quiet_ray_data() -> None:
    """Our progress line instead of Ray Data's bars, and a worker's error shown once (by us)."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    for name in ("ray.data.exceptions", "ray.data._internal.execution.streaming_executor_state"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def raised_by_raykit(e: BaseException) -> RaykitError | RunFailed | None:
    """The raykit exception (bad input, or a run-time failure such as StorageUnavailable) a worker
    raised, from the exception Ray hands the driver.

    Ray Data re-raises a worker's exception as RayTaskError(UserCodeException) without the original
    as a cause; its text keeps the remote traceback, whose `raykit.errors.X: message` line is ours.
    """
    import ray.exceptions

    import raykit.errors

    if isinstance(e, ray.exceptions.RayTaskError):  # a Ray task's: also an instance of our class, its text the traceback
        cause = getattr(e, "cause", None)
        if isinstance(cause, (RaykitError, RunFailed)):
            return cause
    elif isinstance(e, (RaykitError, RunFailed)):
        return e
    elif isinstance(getattr(e, "controller_failure", None), RaykitError):  # raised by Ray Train's controller (bad_input.py)
        return e.controller_failure
    found = re.findall(r"^raykit\.errors\.(\w+): (.+)$", str(e), flags=re.MULTILINE)
    if not found:
        return None
    name, message = found[-1]
    cls = getattr(raykit.errors, name, RaykitError)
    return cls(message) if isinstance(cls, type) and issubclass(cls, (RaykitError, RunFailed)) else RaykitError(message)


def worker_error(e: BaseException, what: str, resume: str) -> RaykitError | RunFailed:
    """What the driver raises for an exception a Ray Data worker raised: the worker's own raykit
    error (bad input, exit 2; storage unavailable, exit 1), else a run-time failure in one line (exit 1): `what` failed, with the error
    that caused it, and how to resume; the full traceback goes to the log first.

    Ray's exception text holds the remote traceback; the first exception line there that is not
    Ray's (UserCodeException, RayTaskError) is the worker's own error.
    """
    if ours := raised_by_raykit(e):
        return ours
    log.error(str(e))
    lines = [line.strip() for line in str(e).splitlines()]
    raised = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*: ", line)]
    cause = next((line for line in raised if not line.startswith("ray.")), None) or next(
        (line for line in lines if line), type(e).__name__)
    return RunFailed(f"{what} ({cause}); {resume}")
