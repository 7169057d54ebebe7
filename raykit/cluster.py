"""Joining Ray: the cluster when there is one (`ray job submit`, RAY_ADDRESS), else a local Ray."""

from __future__ import annotations

import logging
import os
import re

from raykit.errors import RaykitError


def connect_ray(dashboard: bool = True) -> None:
    """`dashboard=False` for a local Ray that needs no State API (Ray Data jobs): one process less on a laptop."""
    import ray

    if not ray.is_initialized():
        ray.init(configure_logging=False, **({} if dashboard else {"include_dashboard": False}))


def raykit_env() -> dict[str, str]:
    """RAYKIT_* variables, passed on to Ray workers (fault injection in tests, for one)."""
    return {k: v for k, v in os.environ.items() if k.startswith("RAYKIT_")}


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


def user_error(e: BaseException) -> RaykitError | None:
    """The RaykitError a worker raised, from the exception Ray hands the driver.

    Ray Data re-raises a worker's exception as RayTaskError(UserCodeException) without the original
    as a cause; its text keeps the remote traceback, whose `raykit.errors.X: message` line is ours.
    """
    if isinstance(e, RaykitError):
        return e
    found = re.findall(r"^raykit\.errors\.\w+: (.+)$", str(e), flags=re.MULTILINE)
    return RaykitError(found[-1]) if found else None
