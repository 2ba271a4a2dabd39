"""The one storage seam: every location is a URI (a plain path, ``file://...`` or ``s3://bucket/prefix``).

An *output* is a directory-like prefix holding data parts and, written last, ``MANIFEST.json``
(parts with row counts, bytes and sha256, the producing config, package versions). A reader
trusts an output only through its manifest, so a crashed or killed writer leaves nothing
visible: opening an output first deletes any old manifest (and the parts it listed), parts are
written under writer-private temporary names (``<name>.<token>.tmp``) renamed into place only at the
commit, and a failed write removes only its own temporaries (never another writer's parts).

Commit scopes (:func:`commit_scope`): while one is active, every manifest this process commits at or
under its prefix first passes its check (e.g. :mod:`hetcomp_dist.lease`: the lease is still ours) and
carries its fields (e.g. the dataset's identity, :mod:`hetcomp_dist.lineage`).

S3 endpoint (MinIO, moto, ...): ``configure(endpoint_url=...)`` or the standard
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` environment variables; credentials and region
come from the usual AWS variables.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from typing import Any, Callable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "MANIFEST.json"
_S3_OPTIONS: dict[str, Any] = {}
_VERSIONED = ("hetcomp_dist", "torch", "torchrec", "fbgemm_gpu-cpu", "fbgemm-gpu", "ray", "pyarrow", "s3fs", "numpy")


class StorageError(RuntimeError):
    """A location is missing, incomplete (no manifest), fails verification or cannot be written."""

    def __init__(self, message: str):
        super().__init__(re.sub(r"\s*\n\s*", " ", str(message).strip()))  # the CLI prints one line


def configure(endpoint_url: str | None = None, **s3_options: Any) -> None:
    """Set S3 options for this process (endpoint for S3-compatible servers, anon, key, ...)."""
    _S3_OPTIONS.clear()
    if endpoint_url:
        _S3_OPTIONS["client_kwargs"] = {"endpoint_url": endpoint_url}
    _S3_OPTIONS.update(s3_options)


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the filesystem for ``uri`` and the path inside it."""
    uri = str(uri)
    if not uri.strip() or uri.strip() in ("s3://", "file://"):
        raise StorageError(f"{uri!r}: an empty location (give a path, file://path or s3://bucket/prefix)")
    if uri.startswith("s3://"):
        options = dict(_S3_OPTIONS)
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "client_kwargs" not in options:
            options["client_kwargs"] = {"endpoint_url": endpoint}
        # fsspec caches instances by these options, so a changed endpoint gets a new client; no
        # listings cache, since other processes write the same prefixes (manifests must be seen).
        fs = fsspec.filesystem("s3", use_listings_cache=False, **options)
        return fs, uri[len("s3://"):].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"unsupported URI scheme in {uri!r} (use a path, file:// or s3://)")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))


def join(uri: str, *names: str) -> str:
    """Join URI parts with '/', for any scheme."""
    return "/".join([str(uri).rstrip("/"), *[n.strip("/") for n in names]])


def is_component(name: str) -> bool:
    """Whether ``name`` is safe as one path component: not empty, ``.`` or ``..``; no ``/``, ``\\``,
    control characters or surrounding spaces."""
    return (bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name
            and name == name.strip() and not any(ord(c) < 32 or ord(c) == 127 for c in name))


def child(prefix: str, name: str) -> str:
    """``prefix/name`` for a relative ``name`` of safe components; StorageError if it would leave ``prefix``.

    Part names read from manifests and progress records come through here before anything is
    read, written or deleted, so a tampered name (``../../x``, ``/etc/x``, a symbolic link
    planted below the prefix) cannot reach outside the output.
    """
    if not isinstance(name, str) or not all(is_component(c) for c in name.split("/")):
        raise StorageError(f"{prefix}: part name {name!r} is not a relative path inside it "
                           "(no '..', leading '/', empty or control-character components)")
    uri = join(prefix, name)
    fs, path = filesystem(uri)
    if _is_local(fs):
        base = os.path.realpath(filesystem(prefix)[1])
        if os.path.commonpath([base, os.path.realpath(path)]) != base:
            raise StorageError(f"{uri}: resolves outside {prefix} (through a symbolic link)")
    return uri


def check_writable(uri: str) -> None:
    """Refuse early (StorageError) a local output location that cannot be written: a file where its
    folder should be, or a read-only folder. Object stores are checked when written."""
    fs, path = filesystem(uri)
    if not _is_local(fs):
        return
    probe = path
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:  # the nearest existing ancestor
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise StorageError(f"{uri}: {probe} is a file, not a folder (cannot write an output there)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise StorageError(f"{uri}: {probe} is not writable")


@contextlib.contextmanager
def _writing(uri: str) -> Iterator[None]:
    """The storage's own OSErrors (read-only place, a file in the way) as one-line StorageErrors."""
    try:
        yield
    except OSError as e:
        raise StorageError(f"{uri}: cannot write ({e.strerror or e})") from None


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def remove(uri: str) -> None:
    """Delete the file or folder at ``uri`` and everything under it; nothing there is not an error."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def is_complete(uri: str) -> bool:
    """True when the output at ``uri`` has its manifest (it finished writing)."""
    return exists(join(uri, MANIFEST))


_SCOPES: list[tuple[tuple[bool, str], Callable[[], None] | None, dict[str, Any]]] = []
_TMP = re.compile(r"\.[0-9a-f]{12}\.tmp$|\.tmp-[0-9a-f]{32}$")   # Output's parts; write_atomic's temporaries


def _key(uri: str) -> tuple[bool, str]:
    fs, path = filesystem(uri)
    return _is_local(fs), path.rstrip("/")


@contextlib.contextmanager
def commit_scope(prefix: str, check: Callable[[], None] | None = None,
                 fields: dict[str, Any] | None = None) -> Iterator[None]:
    """While active, every manifest committed in this process at or under ``prefix`` first calls
    ``check`` (which raises to refuse the commit) and carries ``fields`` (top-level manifest fields)."""
    scope = (_key(prefix), check, dict(fields or {}))
    _SCOPES.append(scope)
    try:
        yield
    finally:
        _SCOPES.remove(scope)


def _scopes_for(uri: str) -> list[tuple[tuple[bool, str], Callable[[], None] | None, dict[str, Any]]]:
    if not _SCOPES:
        return []
    local, path = _key(uri)
    return [s for s in _SCOPES if s[0][0] == local and (path == s[0][1] or path.startswith(s[0][1] + "/"))]


def check_commit(uri: str) -> None:
    """Run the checks of the commit scopes covering ``uri`` (raise to refuse a commit there)."""
    for _, check, _ in _scopes_for(uri):
        if check is not None:
            check()


def sweep_temporaries(uri: str) -> int:
    """Remove the writer-private temporaries (``*.<12 hex>.tmp``, ``*.tmp-<32 hex>``) under ``uri``, left by
    killed writers; only for a writer that holds the prefix's lease (another live writer's would go too).
    Returns the count."""
    fs, path = filesystem(uri)
    try:
        names = fs.find(path)
    except (FileNotFoundError, OSError):
        return 0
    removed = 0
    for name in names:
        if _TMP.search(name):
            with contextlib.suppress(FileNotFoundError, OSError):
                fs.rm(name)
                removed += 1
    return removed


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, raw: Any):
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.nbytes = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._raw.write(view)
        self.sha256.update(view)
        self.nbytes += len(view)
        return len(view)

    def tell(self) -> int:
        return self.nbytes

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


@dataclass
class Output:
    """Writer for one output location; obtain it from :func:`open_output`."""

    uri: str
    kind: str
    config: dict[str, Any]
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    _temporary: dict[str, str] = field(default_factory=dict)   # part name -> its private path until the commit

    @contextlib.contextmanager
    def open_part(self, name: str) -> Iterator[_HashingFile]:
        """Open part ``name`` (a relative path) for binary writing; recorded in the manifest on close.

        Written to ``<name>.<token>.tmp`` (this writer's own), renamed to ``name`` at the commit.
        """
        if name in self.parts or name == MANIFEST:
            raise StorageError(f"part {name!r} written twice to {self.uri}")
        where = child(self.uri, name)
        fs, final = filesystem(where)
        path = f"{final}.{self.token}.tmp"
        self.parts[name] = {"rows": None}  # reserved now so a failure still cleans it up
        self._temporary[name] = path
        with _writing(where):
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            raw = fs.open(path, "wb")
        with raw:
            hashed = _HashingFile(raw)
            yield hashed
        self.parts[name].update(bytes=hashed.nbytes, sha256=hashed.sha256.hexdigest())

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.open_part(name) as f:
            f.write(data)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, json.dumps(obj, indent=2, sort_keys=True).encode())

    @contextlib.contextmanager
    def parquet_writer(self, name: str, schema: pa.Schema, **options: Any) -> Iterator[pq.ParquetWriter]:
        """Stream record batches / tables into one Parquet part (one row group per write_table call)."""
        with self.open_part(name) as f:
            writer = pq.ParquetWriter(f, schema, **options)
            try:
                yield writer
            finally:
                writer.close()
        fs, _ = filesystem(self.uri)
        with fs.open(self._temporary[name], "rb") as f:
            self.parts[name]["rows"] = pq.ParquetFile(f).metadata.num_rows

    def write_table(self, name: str, table: pa.Table, row_group_size: int | None = None) -> None:
        with self.parquet_writer(name, table.schema) as writer:
            writer.write_table(table, row_group_size=row_group_size)

    def _commit(self) -> dict[str, Any]:
        check_commit(self.uri)                     # e.g. the lease: before any part replaces another's
        for name, path in list(self._temporary.items()):
            fs, final = filesystem(child(self.uri, name))
            with _writing(join(self.uri, name)):
                fs.mv(path, final)                 # a rename locally; a server-side copy on S3
            del self._temporary[name]
        return commit_manifest(self.uri, self.kind, self.parts, self.config, self.extra)

    def _abort(self) -> None:
        """Remove this writer's temporaries only: a final name may be another writer's part."""
        for path in self._temporary.values():
            with contextlib.suppress(FileNotFoundError, OSError, StorageError):
                fs, _ = filesystem(self.uri)
                fs.rm(path)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocol


def _rename_into_place(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with _writing(path):
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # an output with no parts has no folder yet
            with fs.open(tmp, "wb") as f:
                f.write(data)
            fs.mv(tmp, path)  # an atomic rename locally; on S3 the final PUT/copy is atomic per object
    except BaseException:
        with contextlib.suppress(FileNotFoundError, OSError):
            fs.rm(tmp)
        raise


def write_atomic(uri: str, data: bytes) -> None:
    """Write a small object so that readers see the old content or the new, never a partial one.

    Locally: a temporary sibling, then a rename. On an object store: one PUT (atomic per object;
    a third of the requests of write-then-copy), so a progress record can be rewritten often.
    """
    fs, path = filesystem(uri)
    if _is_local(fs):
        _rename_into_place(fs, path, data)
    else:
        fs.pipe_file(path, data)


def commit_manifest(uri: str, kind: str, parts: dict[str, dict[str, Any]],
                    config: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``uri/MANIFEST.json`` atomically (the same fields as :func:`open_output` writes); return it.

    For writers whose parts outlive one ``open_output`` block (e.g. written by :func:`write_part`
    over a long run): call it last, once every listed part is complete.
    """
    scoped: dict[str, Any] = {}
    for _, check, fields in _scopes_for(uri):
        if check is not None:
            check()                                 # refuses the commit (e.g. LeaseLost)
        scoped.update(fields)
    manifest = {
        "kind": kind,
        "format_version": 1,
        "created": datetime.now(timezone.utc).isoformat(),
        "parts": parts,
        "config": dict(config or {}),
        "versions": package_versions(),
        **scoped,
        **(extra or {}),
    }
    # Locally a temporary renamed into place; on S3 one PUT (no temporary a kill could leave behind).
    write_atomic(join(uri, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest


@contextlib.contextmanager
def write_part(uri: str, name: str) -> Iterator[_HashingFile]:
    """Stream one part to ``uri/name`` outside :func:`open_output` (binary, hashed while written).

    If the block raises, the (partial) object is removed and the exception propagates. After the
    block, the yielded file's ``entry`` attribute is its manifest entry: ``{"bytes", "sha256"}``.
    """
    if name == MANIFEST:
        raise StorageError(f"{uri}: {MANIFEST} is not a part")
    where = child(uri, name)
    fs, path = filesystem(where)
    with _writing(where):
        if _is_local(fs):  # object stores have no folders (and the call costs a request)
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        raw = fs.open(path, "wb")
    try:
        with raw:
            hashed = _HashingFile(raw)
            yield hashed
    except BaseException:
        with contextlib.suppress(FileNotFoundError, OSError):
            fs.rm(path)
        raise
    hashed.entry = {"bytes": hashed.nbytes, "sha256": hashed.sha256.hexdigest()}


@contextlib.contextmanager
def open_output(uri: str, kind: str, config: dict[str, Any] | None = None) -> Iterator[Output]:
    """Write an output at ``uri``: parts inside the block, the manifest only if the block succeeds.

    An existing manifest is removed first, so readers never mix an old manifest with new parts, then
    the parts it listed (nothing of the old output outlives a rewrite that is killed before its commit).
    Put extra manifest fields in ``out.extra``.
    """
    fs, path = filesystem(join(uri, MANIFEST))
    if fs.exists(path):
        try:
            old = read_manifest(uri)["parts"]
        except StorageError:
            old = {}
        with _writing(uri):
            fs.rm(path)
        stale = []
        for name in old:
            with contextlib.suppress(StorageError):          # a tampered name: never outside the output
                stale.append(filesystem(child(uri, name))[1])
        batches = [[p] for p in stale] if _is_local(fs) else [stale] if stale else []   # S3: one request
        for batch in batches:
            with contextlib.suppress(FileNotFoundError, OSError):
                fs.rm(batch)
    out = Output(uri=str(uri), kind=kind, config=dict(config or {}))
    try:
        yield out
    except BaseException:
        out._abort()
        raise
    out._commit()


def read_manifest(uri: str) -> dict[str, Any]:
    """The manifest of a complete output; StorageError naming the location if absent or unreadable."""
    fs, path = filesystem(join(uri, MANIFEST))
    try:
        with fs.open(path, "rb") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        raise StorageError(f"{uri}: no {MANIFEST} (output missing or not completely written)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StorageError(f"{join(uri, MANIFEST)}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("parts"), dict):
        raise StorageError(f"{join(uri, MANIFEST)}: no 'parts' object")
    return manifest


def _part_entry(uri: str, name: str, manifest: dict[str, Any] | None) -> dict[str, Any]:
    manifest = manifest or read_manifest(uri)
    if name not in manifest["parts"]:
        raise StorageError(f"{uri}: part {name!r} is not in the manifest")
    return manifest["parts"][name]


def read_bytes(uri: str, name: str, manifest: dict[str, Any] | None = None) -> bytes:
    """Read a whole part and check its size and sha256 against the manifest."""
    entry = _part_entry(uri, name, manifest)
    fs, path = filesystem(child(uri, name))
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise StorageError(f"{join(uri, name)}: listed in the manifest but missing") from None
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise StorageError(f"{join(uri, name)}: content does not match the manifest (corrupt or overwritten)")
    return data


def read_json(uri: str, name: str, manifest: dict[str, Any] | None = None) -> Any:
    return json.loads(read_bytes(uri, name, manifest))


def read_table(uri: str, name: str, columns: list[str] | None = None,
               manifest: dict[str, Any] | None = None) -> pa.Table:
    """Read a whole Parquet part, verified against the manifest."""
    return pq.read_table(pa.BufferReader(read_bytes(uri, name, manifest)), columns=columns)


@contextlib.contextmanager
def parquet_file(uri: str, name: str, manifest: dict[str, Any] | None = None, *,
                 entry: dict[str, Any] | None = None,
                 wrap: Callable[[Any], Any] | None = None) -> Iterator[pq.ParquetFile]:
    """Open a Parquet part for partial reads (row groups); checks the size, not the sha256.

    Remote parts are read with ranged GETs for exactly what Parquet asks for (no read-ahead cache),
    and page checksums are verified. ``entry`` (the part's manifest entry) saves reading the
    manifest again; ``wrap`` wraps the raw file (e.g. to count bytes read).
    """
    entry = entry if entry is not None else _part_entry(uri, name, manifest)
    where = child(uri, name)
    fs, path = filesystem(where)
    try:
        size = fs.size(path)
    except FileNotFoundError:
        raise StorageError(f"{where}: listed in the manifest but missing") from None
    if size != entry["bytes"]:
        raise StorageError(f"{where}: {size} bytes, manifest says {entry['bytes']}")
    options = {} if _is_local(fs) else {"cache_type": "none"}
    with fs.open(path, "rb", **options) as raw:
        try:
            pf = pq.ParquetFile(wrap(raw) if wrap else raw, page_checksum_verification=True)
        except (OSError, pa.ArrowException) as e:       # a damaged footer
            raise StorageError(f"{where}: unreadable Parquet ({e})") from None
        yield pf


def verify(uri: str, manifest: dict[str, Any] | None = None, block: int = 8 << 20) -> dict[str, Any]:
    """Check every part of the output at ``uri`` against its manifest (size and sha256), streaming in
    blocks (memory stays one block whatever the part's size); returns the manifest, StorageError if not."""
    manifest = manifest or read_manifest(uri)
    for name, entry in manifest["parts"].items():
        where = child(uri, name)
        fs, path = filesystem(where)
        digest, size = hashlib.sha256(), 0
        try:
            with fs.open(path, "rb") as f:
                while data := f.read(block):
                    digest.update(data)
                    size += len(data)
        except FileNotFoundError:
            raise StorageError(f"{where}: listed in the manifest but missing") from None
        if size != entry.get("bytes") or digest.hexdigest() != entry.get("sha256"):
            raise StorageError(f"{where}: content does not match the manifest (corrupt or overwritten)")
    return manifest
