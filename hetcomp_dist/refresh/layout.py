"""Every location of the refresh under a run URI (see the package docstring)."""

from __future__ import annotations

import re

from hetcomp_dist import storage
from hetcomp_dist.config import check_name

_VERSION = re.compile(r"v(\d{4,})")


def version_name(number: int) -> str:
    return f"v{number:04d}"


def version_number(name: str) -> int:
    """``v0003`` (or ``3``) -> 3; ValueError otherwise."""
    text = str(name).strip()
    if text.isdigit():
        return int(text)
    match = _VERSION.fullmatch(text)
    if not match:
        raise ValueError(f"{name!r} is not a version (v0001, v0002, ... or a number)")
    return int(match.group(1))


class Layout:
    def __init__(self, run: str):
        self.run = str(run).rstrip("/")

    def _at(self, *parts: str) -> str:
        return storage.join(self.run, *parts)

    @property
    def data_root(self) -> str:
        return self._at("data")

    def data(self, version: int) -> str:
        return self._at("data", version_name(version))

    def version(self, version: int) -> str:
        return self._at("versions", version_name(version))

    def teacher(self, version: int, name: str) -> str:
        return storage.join(self.version(version), "teachers", check_name(name, "teacher name"))

    def trajectory(self, version: int, name: str) -> str:
        return storage.join(self.teacher(version, name), "trajectory")

    def student(self, version: int) -> str:
        return storage.join(self.version(version), "student")

    def report(self, version: int) -> str:
        return storage.join(self.version(version), "report")

    def export(self, version: int) -> str:
        return storage.join(self.version(version), "export")

    @property
    def current(self) -> str:
        return self._at("current")

    @property
    def promotions(self) -> str:
        return self._at("promotions")

    def promotion(self, number: int) -> str:
        return self._at("promotions", f"{number:06d}.json")

    @property
    def lease(self) -> str:
        return self._at("lease")

    def data_versions(self) -> list[int]:
        """Complete data versions (a manifest), oldest first."""
        fs, path = storage.filesystem(self.data_root)
        if not fs.exists(path):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
        found = sorted(int(m.group(1)) for m in map(_VERSION.fullmatch, names) if m)
        return [v for v in found if storage.is_complete(self.data(v))]
