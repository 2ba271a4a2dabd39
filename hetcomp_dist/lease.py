"""Leases: one writer at a time per output prefix, on local disk and on S3.

A lease is a small JSON object ``<prefix>.lease`` *beside* the prefix (not inside it, so no cleanup
of the prefix can remove it) naming its owner, a random token and an expiry::

    with lease.hold("s3://bucket/run/dataset") as held:   # LeaseHeld if another live writer has it
        ...write parts...                                  # (kept fresh by a thread: renewed every ttl/3)
        held.check()                                       # LeaseLost if it is no longer ours
        ...commit the manifest...

While ``hold`` is active, every manifest this process commits at or under the prefix
(:func:`hetcomp_dist.storage.commit_manifest`, hence ``open_output`` and the checkpointers) first calls
``check()``: a writer whose lease expired or was taken over commits nothing. On leaving the block the
lease is removed, only if it is still ours.

Atomicity. Creation is exclusive: ``os.open(O_CREAT | O_EXCL)`` locally, a conditional PUT
(``If-None-Match: *``) on S3. An expired lease may be taken over: on S3 by a PUT conditional on the
ETag that was read (``If-Match``); locally by renaming the lease aside (an atomic rename: of several
takers one succeeds), checking that what was moved is the very lease read as expired, and creating a
fresh one with ``O_EXCL``. If the moved file turns out to be another, live lease (it was replaced
between the read and the rename) it is linked back (``link`` never overwrites); had a third writer
created a lease in that instant, the live holder finds its token gone at ``check()``: it loses
the lease (LeaseLost) rather than two writers both committing. Renewal is conditional the same way
(S3: ``If-Match``; locally: a fresh file renamed over the lease after checking it is still ours).

A lease is expired when its expiry has passed (wall clocks: hosts sharing a prefix need clocks within
a fraction of the TTL), or at once when its owner ran on this host (same boot, same PID namespace) and
that process is gone: a writer killed with SIGKILL does not block a rerun on the same machine for the
TTL. What remains: a writer stalled longer than the TTL between its ``check()`` and its manifest
write could still commit after another took over (no fencing tokens on plain object stores); the
renewal thread makes that a stall of ``ttl_s`` (15 minutes by default), and parts are written under
writer-private names renamed into place only at commit (storage.Output), so such a writer never
touched the other's parts before.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator

from hetcomp_dist import storage
from hetcomp_dist.storage import StorageError

SUFFIX = ".lease"
WAIT_ENV = "HETCOMP_LEASE_WAIT_S"
FORMAT = "hetcomp-lease/1"
_UNREADABLE_GRACE_S = 10.0     # a lease file still empty / unparseable after this is a dead creator's


class LeaseHeld(StorageError):
    """Another live writer holds the prefix (the message names the owner and the expiry)."""


class LeaseLost(StorageError):
    """Our lease expired or was taken over before the commit."""


def lease_uri(prefix: str) -> str:
    """``<prefix>.lease``: beside the prefix, never inside it."""
    prefix = str(prefix).rstrip("/")
    if prefix.endswith(("s3:/", "file:/")) or not prefix:
        raise StorageError(f"{prefix!r}: no lease for an empty location")
    return prefix + SUFFIX


def _here() -> dict[str, Any]:
    """Where this process runs: host, boot and PID namespace (to tell a dead local owner)."""
    def read(path: str) -> str:
        with contextlib.suppress(OSError):
            with open(path) as f:
                return f.read().strip()
        return ""
    pidns = ""
    with contextlib.suppress(OSError):
        pidns = os.readlink("/proc/self/ns/pid")
    return {"host": socket.gethostname(), "boot_id": read("/proc/sys/kernel/random/boot_id"), "pidns": pidns}


def _default_owner() -> str:
    with contextlib.suppress(Exception):
        return f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()}"
    return f"{socket.gethostname()} pid {os.getpid()}"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):      # a zombie (killed, not yet reaped) is dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _expired(record: dict[str, Any], now: float | None = None) -> bool:
    now = time.time() if now is None else now
    if float(record.get("expires_at", 0)) <= now:
        return True
    here = _here()
    local = all(record.get(k) == here[k] and here[k] for k in ("host", "boot_id", "pidns"))
    return local and isinstance(record.get("pid"), int) and record["pid"] != os.getpid() \
        and not _pid_alive(record["pid"])


def _describe(record: dict[str, Any]) -> str:
    expires = float(record.get("expires_at", 0))
    left = expires - time.time()
    when = f"until {_iso(expires)}, {left:.0f} s from now" if left > 0 else f"expired at {_iso(expires)}"
    return f"owner {record.get('owner', '?')!r}, {when}"


# ----------------------------------------------------------------------------- the two backends

class _Local:
    def __init__(self, path: str):
        self.path = path

    def create(self, data: bytes) -> Any:
        """Write the lease if none exists; its version (the bytes), or None when one exists."""
        with storage._writing(self.path):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return None
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        return data

    def read(self) -> tuple[bytes, Any] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageError(f"{self.path}: cannot read the lease ({e.strerror or e})") from None
        return data, data

    def age(self) -> float:
        with contextlib.suppress(OSError):
            return time.time() - os.stat(self.path).st_mtime
        return 0.0

    def replace(self, version: Any, data: bytes, token: str) -> Any:
        """Take over the lease whose content was ``version``: its new version, or None if it changed."""
        aside = f"{self.path}.{token}.stale"
        try:
            os.rename(self.path, aside)               # atomic: of several takers, one moves it
        except FileNotFoundError:
            return None
        with open(aside, "rb") as f:
            moved = f.read()
        if moved != version:                          # replaced since we read it: a live lease, put it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)             # never over a lease created meanwhile
            os.unlink(aside)
            return None
        os.unlink(aside)
        return self.create(data)

    def renew(self, version: Any, data: bytes, token: str) -> Any:
        current = self.read()
        if current is None or _token(current[0]) != token:
            return None
        tmp = f"{self.path}.{token}.renew"
        with storage._writing(self.path):
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        return data

    def delete(self, version: Any, token: str) -> None:
        aside = f"{self.path}.{token}.release"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        with open(aside, "rb") as f:
            moved = f.read()
        if _token(moved) != token:                    # not ours (taken over): put it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        os.unlink(aside)


class _S3:
    def __init__(self, fs: Any, path: str):
        self.fs, self.path = fs, path
        self.bucket, _, self.key = path.partition("/")

    @staticmethod
    def _precondition_failed(e: BaseException) -> bool:
        if isinstance(e, FileExistsError):
            return True
        cause = e.__cause__ or e.__context__
        code = str(getattr(cause, "response", {}).get("Error", {}).get("Code", ""))
        status = getattr(cause, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409", "NoSuchKey") \
            or status in (409, 412) or isinstance(e, FileNotFoundError)

    def _put(self, data: bytes, **condition: str) -> Any:
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition)["ETag"]
        except OSError as e:
            if self._precondition_failed(e):
                return None
            raise StorageError(f"s3://{self.path}: cannot write the lease ({e})") from None

    def create(self, data: bytes) -> Any:
        return self._put(data, IfNoneMatch="*")

    def read(self) -> tuple[bytes, Any] | None:
        async def get() -> tuple[bytes, str]:
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with response["Body"] as body:
                return await body.read(), response["ETag"]
        import fsspec.asyn

        try:
            return fsspec.asyn.sync(self.fs.loop, get)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageError(f"s3://{self.path}: cannot read the lease ({e})") from None

    def age(self) -> float:
        with contextlib.suppress(Exception):
            modified = self.fs.info(self.path)["LastModified"]
            return time.time() - modified.timestamp()
        return 0.0

    def replace(self, version: Any, data: bytes, token: str) -> Any:
        return self._put(data, IfMatch=version)

    def renew(self, version: Any, data: bytes, token: str) -> Any:
        return self._put(data, IfMatch=version)

    def delete(self, version: Any, token: str) -> None:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=version)
            return
        except OSError as e:
            if self._precondition_failed(e):
                return                                  # changed since: not ours any more
        # A store without conditional deletes: read, compare, delete (a small window, documented above).
        current = self.read()
        if current is not None and _token(current[0]) == token:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path)


def _backend(uri: str) -> Any:
    fs, path = storage.filesystem(uri)
    return _Local(path) if storage._is_local(fs) else _S3(fs, path)


def _parse(data: bytes) -> dict[str, Any] | None:
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        record = json.loads(data)
        if isinstance(record, dict) and record.get("format") == FORMAT:
            return record
    return None


def _token(data: bytes) -> str | None:
    record = _parse(data)
    return None if record is None else record.get("token")


# ----------------------------------------------------------------------------- the lease

_RENEWING = threading.Lock()     # module-level: a Lease must stay picklable (Ray workers check it)

@dataclass
class Lease:
    """A lease we hold on ``prefix`` (``uri`` is its object). Picklable: a Ray worker can ``check()`` it."""

    uri: str
    owner: str
    token: str
    prefix: str = ""
    ttl_s: float = 900.0
    expires_at: float = 0.0
    _version: Any = field(default=None, repr=False)
    _lost: str | None = field(default=None, repr=False)

    def _record(self, now: float) -> dict[str, Any]:
        return {"format": FORMAT, "prefix": self.prefix, "owner": self.owner, "token": self.token,
                "pid": os.getpid(), **_here(), "ttl_s": self.ttl_s, "written": _iso(now),
                "expires": _iso(now + self.ttl_s), "expires_at": now + self.ttl_s}

    def _data(self) -> tuple[bytes, float]:
        now = time.time()
        return json.dumps(self._record(now), indent=1, sort_keys=True).encode(), now + self.ttl_s

    def check(self) -> None:
        """Raise LeaseLost unless the lease is still ours and unexpired (call it right before a commit)."""
        if self._lost:
            raise LeaseLost(self._lost)
        current = _backend(self.uri).read()
        record = None if current is None else _parse(current[0])
        if record is None:
            raise LeaseLost(f"{self.prefix}: our lease {self.uri} was removed before the commit; nothing committed")
        if record.get("token") != self.token:
            raise LeaseLost(f"{self.prefix}: our lease {self.uri} was taken over ({_describe(record)}) before the "
                            "commit; nothing committed")
        if float(record.get("expires_at", 0)) <= time.time():
            raise LeaseLost(f"{self.prefix}: our lease {self.uri} expired at {_iso(float(record['expires_at']))} "
                            "before the commit (not renewed in time); nothing committed")

    def renew(self) -> None:
        """Extend the lease by ``ttl_s`` from now (conditional on it being ours); LeaseLost if it is not."""
        with _RENEWING:      # one renewal at a time per process: two at once collide (same temp file, stale IfMatch)
            if self._lost:
                raise LeaseLost(self._lost)
            data, expires = self._data()
            version = _backend(self.uri).renew(self._version, data, self.token)
            if version is None:
                self._lost = f"{self.prefix}: our lease {self.uri} was taken over or removed (renewal refused)"
                raise LeaseLost(self._lost)
            self._version, self.expires_at = version, expires

    def release(self) -> None:
        """Remove the lease if it is still ours (a lost lease is left to its new owner)."""
        with contextlib.suppress(FileNotFoundError):
            _backend(self.uri).delete(self._version, self.token)


def acquire(prefix: str, owner: str | None = None, ttl_s: float = 900.0) -> Lease:
    """Take the lease on ``prefix`` (creating it, or taking over an expired one); LeaseHeld if a live writer has it."""
    if not ttl_s > 0:
        raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
    uri = lease_uri(prefix)
    backend = _backend(uri)
    lease = Lease(uri=uri, owner=owner or _default_owner(), token=uuid.uuid4().hex, prefix=str(prefix).rstrip("/"),
                  ttl_s=float(ttl_s))
    record: dict[str, Any] | None = None
    for attempt in range(20):
        data, expires = lease._data()
        version = backend.create(data)
        if version is not None:
            lease._version, lease.expires_at = version, expires
            return lease
        current = backend.read()
        if current is None:                              # released meanwhile: try again
            continue
        raw, seen = current
        record = _parse(raw)
        if record is None:                               # being written (or left empty by a dead creator)
            if backend.age() < _UNREADABLE_GRACE_S:
                time.sleep(0.05)
                continue
            record = {"owner": "(an unreadable lease)", "expires_at": 0}
        if not _expired(record):
            raise LeaseHeld(f"{lease.prefix}: another writer holds it ({_describe(record)}; lease {uri}); "
                            "wait for it, or remove the lease if that writer is gone")
        data, expires = lease._data()
        version = backend.replace(seen, data, lease.token)
        if version is not None:
            lease._version, lease.expires_at = version, expires
            return lease
        time.sleep(0.01 * (attempt + 1))                 # another taker was first: look again
    detail = _describe(record) if record else "contended"
    raise LeaseHeld(f"{lease.prefix}: another writer holds it ({detail}; lease {uri})")


class _Renewer(threading.Thread):
    """Renews a lease every ``ttl_s / 3`` until stopped; a refusal marks the lease lost (check() raises)."""

    def __init__(self, lease: Lease):
        super().__init__(name=f"lease {lease.prefix}", daemon=True)
        self.lease, self.stopped = lease, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.lease.ttl_s / 3):
            try:
                self.lease.renew()
            except LeaseLost:
                return
            except Exception:                            # a transient store error: try again next time
                continue

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=30)


def wait_setting() -> float:
    """Seconds to wait for a held lease before giving up: ``HETCOMP_LEASE_WAIT_S`` (default 0).

    A job retried after its driver died on another host (a RayJob's new cluster) finds the dead
    driver's lease until it expires (its TTL); with a wait longer than the TTL the retry takes it over.
    """
    raw = os.environ.get(WAIT_ENV, "").strip()
    try:
        value = float(raw) if raw else 0.0
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise StorageError(f"{WAIT_ENV}={raw!r}: must be a number of seconds >= 0")
    return value


def acquire_waiting(prefix: str, owner: str | None = None, ttl_s: float = 900.0, wait_s: float = 0.0,
                    poll_s: float = 5.0) -> Lease:
    """:func:`acquire`, retried for up to ``wait_s`` seconds while another writer holds the lease."""
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        try:
            return acquire(prefix, owner, ttl_s)
        except LeaseHeld as e:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            if not told:                         # one line, then quiet until it is ours or time is up
                print(f"{e} -- waiting up to {wait_s:g} s ({WAIT_ENV})", file=sys.stderr, flush=True)
                told = True
            time.sleep(min(poll_s, left))


@contextlib.contextmanager
def hold(prefix: str, owner: str | None = None, ttl_s: float = 900.0, wait_s: float | None = None,
         sweep: bool = False) -> Iterator[Lease]:
    """Hold the lease on ``prefix`` for the block (renewed meanwhile); every manifest committed at or
    under ``prefix`` in this process checks it first. Released (if still ours) on leaving. A held
    lease is waited for up to ``wait_s`` seconds (default: :func:`wait_setting`). With ``sweep``, the
    writer-private temporaries that killed writers left under ``prefix`` are removed once the lease is
    ours (no live writer's then; only for a prefix no other lease's output lives under)."""
    lease = acquire_waiting(prefix, owner, ttl_s, wait_setting() if wait_s is None else wait_s)
    renewer = _Renewer(lease)
    renewer.start()
    try:
        if sweep:
            storage.sweep_temporaries(prefix)
        with storage.commit_scope(lease.prefix, check=lease.check):
            yield lease
    finally:
        renewer.stop()
        lease.release()


__all__ = ["Lease", "LeaseHeld", "LeaseLost", "acquire", "acquire_waiting", "hold", "lease_uri", "wait_setting",
           "SUFFIX", "WAIT_ENV"]
