"""Lineage: which dataset an output was computed from, recorded where it is written and checked where it is read.

A prepared dataset's *identity* is what its meta.json says of it: the source's sha256, format, split
protocol and seed, and the counts (users, items, interactions, splits). ``hetcomp prepare`` writes it
into the dataset's manifest (``dataset``); the teachers' trajectories and checkpoints and the student's
manifest carry a copy. Where one stage reads another's output it compares them:

- distillation refuses trajectories written for another dataset (:func:`check_trajectories`);
- ``train-teachers`` skips a finished teacher, and resumes a checkpoint, only for the same dataset;
- a run's stages reuse a complete student only for the same dataset.

Outputs written before lineage was recorded carry none: a reader accepts them (it cannot tell), a
skip or a resume does not (it trains again).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Iterable, Iterator

from hetcomp_dist import lease, storage
from hetcomp_dist.storage import StorageError

KEY = "dataset"        # the manifests' field
FIELDS = ("source", "format", "source_sha256", "protocol", "seed", "n_users", "n_items", "n_interactions",
          "n_interactions_kept", "splits")
_NOT_COMPARED = ("source",)   # the same bytes prepared the same way are the same dataset, wherever they were read


def identity_of(meta: dict[str, Any]) -> dict[str, Any]:
    """A dataset's identity from its meta.json content (JSON types, so it compares equal to a stored copy)."""
    return json.loads(json.dumps({k: meta.get(k) for k in FIELDS}))


def dataset_identity(dataset_uri: str) -> dict[str, Any]:
    """The identity of the complete dataset at ``dataset_uri``: its manifest's, else (a dataset prepared
    before lineage was recorded) derived from its verified meta.json. StorageError if it is incomplete."""
    manifest = storage.read_manifest(dataset_uri)
    if manifest.get("kind") != "dataset":
        raise StorageError(f"{dataset_uri}: not a prepared dataset (kind {manifest.get('kind')!r})")
    stored = manifest.get(KEY)
    if isinstance(stored, dict):
        return stored
    return identity_of(storage.read_json(dataset_uri, "meta.json", manifest))


def same(a: Any, b: Any) -> bool:
    """Whether two identities name the same dataset (None, i.e. not recorded, is never the same)."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return False
    return all(a.get(k) == b.get(k) for k in FIELDS if k not in _NOT_COMPARED)


def describe(identity: Any) -> str:
    """A short one-line description: source, protocol, seed, counts and the source's sha256 prefix."""
    if not isinstance(identity, dict):
        return "(no dataset recorded)"
    protocol = identity.get("protocol") or {}
    name = protocol.get("name") if isinstance(protocol, dict) else protocol
    digests = identity.get("source_sha256") or {}
    sha = ",".join(str(v)[:12] for v in digests.values()) if isinstance(digests, dict) else str(digests)[:12]
    return (f"[source {identity.get('source')!r}, protocol {name!r}, seed {identity.get('seed')}, "
            f"{identity.get('n_users')} users x {identity.get('n_items')} items, sha256 {sha}]")


def check_trajectories(dataset_uri: str, trajectory_uris: Iterable[str],
                       identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Refuse (one-line StorageError naming both datasets) a complete trajectory written for another
    dataset than ``dataset_uri``'s, or one whose parts do not match their sha256 (the distillation reads
    them by row group, where only page checksums are checked); returns that dataset's identity.
    Incomplete trajectories are left to their reader's own error; ones written before lineage was
    recorded are accepted."""
    identity = identity if identity is not None else dataset_identity(dataset_uri)
    for uri in trajectory_uris:
        if not storage.is_complete(uri):
            continue
        manifest = storage.read_manifest(uri)
        stored = manifest.get(KEY)
        storage.verify(uri, manifest)
        if stored is not None and not same(stored, identity):
            raise StorageError(f"{uri}: this trajectory was written for dataset {describe(stored)}, but "
                               f"{dataset_uri} is dataset {describe(identity)}: train the teacher again on "
                               "this dataset (hetcomp train-teachers), or distil on the dataset it was trained on")
    return identity


def drop_foreign_checkpoints(out: str, identity: dict[str, Any]) -> bool:
    """Remove ``<out>/checkpoints`` if a checkpoint there was written for another dataset (never resumed
    on this one); True if removed. Checkpoints written before lineage was recorded are kept."""
    root = storage.join(out, "checkpoints")
    fs, path = storage.filesystem(root)
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except (FileNotFoundError, OSError):
        return False
    for name in names:
        uri = storage.join(root, name)
        if not name.startswith("epoch-") or not storage.is_complete(uri):
            continue
        with contextlib.suppress(StorageError):
            stored = storage.read_manifest(uri).get(KEY)
            if stored is not None and not same(stored, identity):
                storage.remove(root)
                return True
    return False


@contextlib.contextmanager
def student_output(out: str, dataset_uri: str, trajectory_uris: Iterable[str]) -> Iterator[tuple[Any, dict]]:
    """The distillation's output ``out`` for its entry points (one process or the Ray driver):

    refuses trajectories of another dataset, holds ``out``'s lease (every manifest committed under ``out`` in
    this process, the checkpoints' and the final one, checks it first), drops checkpoints of another dataset,
    and stamps the dataset's identity into those manifests. Yields ``(lease, identity)``: a Ray worker
    re-enters the same scope with :func:`worker_scope`.
    """
    identity = check_trajectories(dataset_uri, trajectory_uris)
    with lease.hold(out, sweep=True) as held:
        drop_foreign_checkpoints(out, identity)
        with storage.commit_scope(out, fields={KEY: identity}):
            yield held, identity


@contextlib.contextmanager
def worker_scope(out: str, held: Any, identity: dict[str, Any] | None) -> Iterator[None]:
    """In a process that writes under ``out`` for the holder of ``held`` (a Ray worker): each manifest it
    commits there checks that lease first and carries the dataset's identity."""
    if held is None:
        yield
        return
    with storage.commit_scope(out, check=held.check, fields={KEY: identity} if identity else None):
        yield
