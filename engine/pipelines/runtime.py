"""Connecting to Ray: a local instance by default, a cluster by address (``auto`` or ``ray://host:10001``)."""

from __future__ import annotations

import logging
import os


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

    kwargs: dict = {"ignore_reinit_error": True, "logging_level": logging.WARNING}
    env = ray_env_vars()
    if env:
        kwargs["runtime_env"] = {"env_vars": env}
    if address and address != "local":
        kwargs["address"] = address
    else:
        kwargs["include_dashboard"] = False
        kwargs["num_cpus"] = num_cpus or os.cpu_count()
    ray.init(**kwargs)
