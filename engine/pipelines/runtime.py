"""Connecting to Ray: a local instance by default, a cluster by address (``auto`` or ``ray://host:10001``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

# How this process's Ray talks to the console; the CLI sets it (quiet_driver) before any stage starts Ray.
_DRIVER = {"log_to_driver": True, "logging_level": logging.WARNING}
_STARTED: list[bool] = []  # init_ray started or joined Ray in this process (shutdown_ray ends only that one)


def quiet_driver(quiet: bool = True) -> None:
    """Keep Ray's workers' output off this process's console (``log_to_driver=False``: it stays in Ray's own log
    folder, :func:`ray_log_dir`) and let Ray log at INFO (the console's output is then a log file, see
    ``engine.console``). For the next :func:`init_ray` that starts or joins Ray; ``quiet=False`` is the default:
    worker output forwarded to the driver (the Ray jobs' logs), Ray's own messages at WARNING."""
    _DRIVER.update(log_to_driver=not quiet, logging_level=logging.INFO if quiet else logging.WARNING)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start or join Ray once; later calls are no-ops. ``address=None`` means a local Ray on this machine.

    Progress bars come from Ray Data; the dashboard stays off locally (no network needed). Storage settings
    (``AWS_ENDPOINT_URL``, credentials, ``GEOLINK_CACHE_DIR``) travel to every worker in the runtime environment,
    so tasks on any node reach the same remote workspace.
    """
    import ray

    if ray.is_initialized():
        return
    from engine.storage import ray_env_vars

    kwargs: dict = {"ignore_reinit_error": True, **_DRIVER}
    env = ray_env_vars()
    if env:
        kwargs["runtime_env"] = {"env_vars": env}
    if address and address != "local":
        kwargs["address"] = address
    else:  # "local": always a Ray of this process's own, never one another run on this machine happens to hold
        # (ray.init() without an address joins a running one, and then refuses num_cpus)
        kwargs["address"] = "local"
        kwargs["include_dashboard"] = False
        kwargs["num_cpus"] = num_cpus or os.cpu_count()
    ray.init(**kwargs)
    _STARTED.append(True)


def shutdown_ray() -> None:
    """Disconnect from (a local one: stop) the Ray that :func:`init_ray` started here; one started by someone else
    (a test session, a notebook) is left running."""
    if _STARTED:
        import ray

        ray.shutdown()
        _STARTED.clear()


def ray_log_dir() -> Path | None:
    """The log folder of this process's Ray session (every worker's stdout and stderr, Ray Data's and Ray Train's
    logs), or None before Ray is started. On a cluster it is the head node's; each node keeps its own workers' logs."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    except Exception:  # a Ray client connection (ray://) has no local session folder
        return None
