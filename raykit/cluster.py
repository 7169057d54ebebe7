"""Joining Ray: the cluster when there is one (`ray job submit`, RAY_ADDRESS), else a local Ray."""

from __future__ import annotations

import os


def connect_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(configure_logging=False)


def raykit_env() -> dict[str, str]:
    """RAYKIT_* variables, passed on to Ray workers (fault injection in tests, for one)."""
    return {k: v for k, v in os.environ.items() if k.startswith("RAYKIT_")}


def node_count() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))
