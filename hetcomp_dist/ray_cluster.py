"""Joining or starting the Ray instance the jobs run on."""

from __future__ import annotations

import logging
import os
import secrets

from hetcomp_dist.run import RayConfig


def init_ray(rc: RayConfig) -> str | None:
    """Connect to ``rc.address`` / $RAY_ADDRESS ("remote") or start a local instance ("local"); None if connected already."""
    import ray

    if ray.is_initialized():
        return None
    address = rc.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return "remote"
    # A local instance: keep Ray's token authentication, but with a token of this process in the
    # environment (Ray's processes inherit it) rather than a generated ~/.ray/auth_token, which would
    # switch a later `ray start` in the same HOME to token auth. An explicit RAY_AUTH_* setting wins.
    if not any(os.environ.get(v) for v in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_urlsafe(32)
    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = auth_log.level
    auth_log.setLevel(logging.ERROR)  # "token authentication is enabled" is what we want: no warning
    try:
        ray.init(num_cpus=rc.num_cpus or os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
    finally:
        auth_log.setLevel(level)
    return "local"
