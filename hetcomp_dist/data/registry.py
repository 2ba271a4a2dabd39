"""Known public datasets: where they live upstream, their sha256, format and default protocol.

A local mirror (``$HETCOMP_DATASETS_DIR/<name>/<file>``) is looked at before any download;
downloads go to ``$HETCOMP_CACHE_DIR`` (default ``~/.cache/hetcomp_dist``) and are verified.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from hetcomp_dist.data.formats import DataError

MIRROR_ENV = "HETCOMP_DATASETS_DIR"
CACHE_ENV = "HETCOMP_CACHE_DIR"


@dataclass(frozen=True)
class RemoteFile:
    name: str
    url: str
    sha256: str


@dataclass(frozen=True)
class KnownDataset:
    name: str
    format: str
    protocol: str
    files: tuple[RemoteFile, ...]
    options: dict = field(default_factory=dict)  # protocol/reader options, e.g. rating threshold
    note: str = ""


_LIGHTGCN = "https://raw.githubusercontent.com/gusye1234/LightGCN-PyTorch/master/data/gowalla"
REGISTRY: dict[str, KnownDataset] = {
    d.name: d
    for d in (
        KnownDataset(
            name="citeulike-t", format="citeulike", protocol="hetcomp",
            files=(RemoteFile("users.dat", "https://raw.githubusercontent.com/js05212/citeulike-t/master/users.dat",
                              "02d5d429b2c0362e0ed79f6ef204666b4092563d21493abf4dfb521e8a7078bf"),),
            note="CiteULike-t as used by HetComp (Kang et al. 2023)"),
        KnownDataset(
            name="gowalla", format="lightgcn", protocol="given-test",
            files=(RemoteFile("train.txt", f"{_LIGHTGCN}/train.txt",
                              "7244696fdeb23911319cf7b689f2e15a3c4c92549c873a5677b44e3f13cc3e62"),
                   RemoteFile("test.txt", f"{_LIGHTGCN}/test.txt",
                              "099a2a73924e4b754dc6efd730d764f492321b53c38eb93298850c83acf57be3")),
            note="Gowalla check-ins as split by the LightGCN authors"),
        KnownDataset(
            name="ml-100k", format="inter", protocol="leave-last-out",
            files=(RemoteFile("ml-100k.inter", "https://recbole.s3-accelerate.amazonaws.com/data/ml-100k.inter",
                              "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff"),),
            note="MovieLens 100K in RecBole's atomic format (research use only, GroupLens licence)"),
    )
}


def sha256_file(path: str | Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch(name: str) -> Path:
    """Return a local directory holding the dataset's verified files (mirror first, then cache/download)."""
    if name not in REGISTRY:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted(REGISTRY))} (or give a path)")
    spec = REGISTRY[name]
    mirror = os.environ.get(MIRROR_ENV)
    if mirror and all((Path(mirror) / name / f.name).is_file() for f in spec.files):
        folder = Path(mirror) / name
    else:
        folder = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "hetcomp_dist")) / "datasets" / name
        for f in spec.files:
            if not (folder / f.name).is_file():
                _download(f, folder / f.name)
    for f in spec.files:
        if sha256_file(folder / f.name) != f.sha256:
            raise DataError(f"{folder / f.name}: sha256 does not match the registry's for {name} (corrupt or a different version)")
    return folder


def _download(remote: RemoteFile, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(remote.url, timeout=60) as response, open(tmp, "wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot download {remote.url} ({e}); set {MIRROR_ENV} to a local mirror") from None
    if sha256_file(tmp) != remote.sha256:
        tmp.unlink()
        raise DataError(f"{remote.url}: downloaded file's sha256 does not match the registry")
    os.replace(tmp, dest)  # visible only when complete
