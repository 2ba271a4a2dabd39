"""The run's lease: :func:`hetcomp_dist.lease.hold` (its API: ``hold(prefix, owner=None, ttl_s=900)``, a
context manager yielding a Lease with ``uri, owner, token, check(), renew()``; ``LeaseHeld`` when another
owner holds it). Until that module is in the tree, a stand-in with the same API is used: an object
written with a token and read back (exclusive create on local disk), expiring after ``ttl_s``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

from hetcomp_dist import storage

try:  # the shared implementation, once it lands
    from hetcomp_dist.lease import LeaseHeld, hold  # type: ignore[attr-defined]
    SHARED = True
except ImportError:  # pragma: no cover - depends on the tree
    SHARED = False

    class LeaseHeld(RuntimeError):  # type: ignore[no-redef]
        """Another owner holds the lease."""

    @dataclass
    class _Lease:
        uri: str
        owner: str
        token: str
        ttl_s: float

        def _read(self) -> dict | None:
            fs, path = storage.filesystem(self.uri)
            try:
                with fs.open(path, "rb") as f:
                    return json.loads(f.read())
            except (FileNotFoundError, ValueError):
                return None

        def check(self) -> None:
            held = self._read()
            if held is None or held.get("token") != self.token:
                raise LeaseHeld(f"{self.uri}: this process no longer holds the lease")

        def renew(self) -> None:
            self.check()
            storage.write_atomic(self.uri, _record(self.owner, self.token, self.ttl_s))

    def _record(owner: str, token: str, ttl_s: float) -> bytes:
        return json.dumps({"owner": owner, "token": token, "expires": time.time() + ttl_s}).encode()

    @contextlib.contextmanager
    def hold(prefix: str, owner: str | None = None, ttl_s: float = 900) -> Iterator[_Lease]:  # type: ignore[no-redef]
        uri = storage.join(prefix, "LEASE.json")
        lease = _Lease(uri, owner or f"{os.uname().nodename}:{os.getpid()}", uuid.uuid4().hex, ttl_s)
        fs, path = storage.filesystem(uri)
        held = lease._read()
        if held is not None and held.get("expires", 0) > time.time():
            raise LeaseHeld(f"{uri}: held by {held.get('owner')}")
        data = _record(lease.owner, lease.token, ttl_s)
        if "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
            fs.makedirs(os.path.dirname(path), exist_ok=True)
            if held is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                raise LeaseHeld(f"{uri}: held by another process") from None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        else:
            storage.write_atomic(uri, data)
            time.sleep(0.5)
        lease.check()
        try:
            yield lease
        finally:
            with contextlib.suppress(Exception):
                if (lease._read() or {}).get("token") == lease.token:
                    storage.remove(uri)

__all__ = ["LeaseHeld", "hold", "SHARED"]
