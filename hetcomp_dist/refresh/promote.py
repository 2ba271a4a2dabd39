"""The ``current`` pointer, the promotion history, promotion and rollback.

``<run>/current`` is one small JSON object, written with :func:`storage.write_atomic` (one PUT on S3,
a rename locally), so a reader sees the old pointer or the new one, never a mix. It names a version
whose export is complete (its manifest was written last) and the sha256 of that export's
``MANIFEST.json``: :func:`read_current` checks it, so a pointer can only lead to the bytes it was
written for. Each promotion or rollback first writes ``<run>/promotions/NNNNNN.json`` (the next
number, never rewritten), then the pointer; a process killed between the two leaves a history entry
that ``current`` does not name (``applied`` is then told by ``current.promotion``).

Every change happens under the run's lease (:mod:`hetcomp_dist.lease`), checked right before the
pointer is written, so two refreshes or a refresh and a rollback never move it at once.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any

from hetcomp_dist import storage
from hetcomp_dist.refresh.layout import Layout, version_name, version_number
from hetcomp_dist.storage import StorageError


def manifest_sha256(uri: str) -> str:
    fs, path = storage.filesystem(storage.join(uri, storage.MANIFEST))
    try:
        with fs.open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        raise StorageError(f"{uri}: no {storage.MANIFEST} (not completely written)") from None


def read_current(layout: Layout, verify: bool = True) -> dict[str, Any] | None:
    """The pointer, or None before the first promotion; with ``verify``, its export checked against it."""
    fs, path = storage.filesystem(layout.current)
    try:
        with fs.open(path, "rb") as f:
            pointer = json.loads(f.read())
    except FileNotFoundError:
        return None
    if verify and manifest_sha256(pointer["export"]) != pointer["manifest_sha256"]:
        raise StorageError(f"{layout.current}: {pointer['export']}'s manifest does not match the pointer's sha256")
    return pointer


def history(layout: Layout) -> list[dict[str, Any]]:
    """Every promotion and rollback, oldest first."""
    fs, path = storage.filesystem(layout.promotions)
    if not fs.exists(path):
        return []
    out = []
    for name in sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)):
        if name.endswith(".json") and name[:-5].isdigit():
            with fs.open(f"{path}/{name}", "rb") as f:
                out.append(json.loads(f.read()))
    return out


def promoted(layout: Layout, version: int) -> bool:
    """Whether a promotion of ``version`` took effect: a history entry promoting it that ``current`` has reached
    (``current.promotion`` at or past the entry's number; an entry left by a process killed before it wrote the
    pointer has not)."""
    current = read_current(layout, verify=False)
    if current is None:
        return False
    return any(h.get("version") == version_name(version) and h.get("action") == "promote"
               and h.get("promotion", 0) <= current["promotion"] for h in history(layout))


def _next_number(layout: Layout) -> int:
    fs, path = storage.filesystem(layout.promotions)
    if not fs.exists(path):
        return 1
    numbers = [int(n[:-5]) for n in (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
               if n.endswith(".json") and n[:-5].isdigit()]
    return max(numbers, default=0) + 1


def move_pointer(layout: Layout, version: int, action: str, gate: dict[str, Any] | None, lease: Any,
                 reason: str = "") -> dict[str, Any]:
    """Point ``current`` at ``version``'s export: a history entry, then the pointer (atomically)."""
    export = layout.export(version)
    if not storage.is_complete(export):
        raise StorageError(f"{export}: no complete export of {version_name(version)} to point at")
    previous = read_current(layout, verify=False)
    number = _next_number(layout)
    pointer = {"version": version_name(version), "export": export, "manifest_sha256": manifest_sha256(export),
               "time": datetime.now(timezone.utc).isoformat(), "gate": gate, "action": action, "reason": reason,
               "promotion": number, "lease_owner": getattr(lease, "owner", None),
               "previous": None if previous is None else {k: previous[k] for k in ("version", "manifest_sha256", "promotion")}}
    data = json.dumps(pointer, indent=2, sort_keys=True).encode()
    entry = layout.promotion(number)
    if storage.exists(entry):
        raise StorageError(f"{entry}: already written (promotion history entries are never rewritten)")
    if lease is not None:
        lease.check()
    storage.write_atomic(entry, data)
    if lease is not None:
        lease.check()
    storage.write_atomic(layout.current, data)
    return pointer


def rollback_target(layout: Layout, to: str | None) -> int:
    """The version a rollback goes to: ``to``, else the one ``current`` pointed at before."""
    current = read_current(layout, verify=False)
    if current is None:
        raise StorageError(f"{layout.run}: nothing promoted yet, nothing to roll back")
    if to is not None:
        return version_number(to)
    if current.get("previous") is None:
        raise StorageError(f"{layout.run}: {current['version']} is the first promotion, there is no version before it")
    return version_number(current["previous"]["version"])
