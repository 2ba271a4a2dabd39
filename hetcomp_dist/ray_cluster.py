"""Joining or starting the Ray instance the jobs run on."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from typing import Any, Iterator

from hetcomp_dist.run import RayConfig

LOCALHOST = "127.0.0.1"


def init_ray(rc: RayConfig) -> str | None:
    """Connect to ``rc.address`` / $RAY_ADDRESS ("remote") or start a local instance ("local"); None if connected already.

    A local instance listens on 127.0.0.1 only: nothing else on the network can reach it.
    """
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
        with _loopback_node_ip():
            ray.init(num_cpus=rc.num_cpus or os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING,
                     _node_ip_address=LOCALHOST)
    finally:
        auth_log.setLevel(level)
    return "local"


@contextlib.contextmanager
def _loopback_node_ip() -> Iterator[None]:
    """Let ray.init keep 127.0.0.1 as the node's address, so that every Ray server binds to loopback.

    Ray (2.60, Linux) listens on all interfaces unless the node's address is a loopback one, and
    ray.init replaces a loopback ``_node_ip_address`` by the host's external address unless Ray's
    ENABLE_RAY_CLUSTER (env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER, read when ray is imported) is off.
    Turned off for this call only: a later connection to a real cluster must see the real address.
    """
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def train_storage(path: str | None, endpoint_url: str | None = None) -> tuple[str | None, Any]:
    """Ray Train's ``(storage_path, storage_filesystem)`` for ``ray.train_storage_path``.

    Ray Train (2.60) opens the folder with ``pyarrow.fs.FileSystem.from_uri(storage_path)`` in its controller
    actor, wherever Ray placed it, where pyarrow takes the S3 endpoint from that process's
    AWS_ENDPOINT_URL(_S3) and knows nothing of ``storage.endpoint_url``. For an s3:// path with an endpoint
    (the run's ``storage.endpoint_url``, else the driver's AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) the
    filesystem is made here instead: it travels to the controller and the workers with its endpoint and
    without credentials (each process takes its own node's, as for the run's outputs). Otherwise (AWS
    itself, a shared path, None for Ray's default) Ray resolves the path as usual.
    """
    if not path or not path.startswith("s3://"):
        return path, None
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return path, None
    from pyarrow import fs

    return path[len("s3://"):].rstrip("/"), fs.S3FileSystem(endpoint_override=endpoint)
