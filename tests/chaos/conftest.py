"""The chaos suite (integration tier): probes against the real CLI on local disk and the moto S3 server.

    .venv/bin/python -m pytest -q -m integration tests/chaos

Every test here is marked integration. Each probe counts its trials and failures; the table (probe,
backend, trials, failures, seconds, outcomes) is printed at the end of the session and written to
$HETCOMP_CHAOS_TABLE (default /tmp/hetcomp-chaos-results.md). Random kill times and byte offsets come
from $HETCOMP_CHAOS_SEED (default fixed), so a failing run can be repeated.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import chaoslib


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    if not chaoslib.RESULTS:
        return
    text = chaoslib.table()
    terminalreporter.write_sep("=", "chaos probes")
    terminalreporter.write_line(text)
    where = Path(os.environ.get("HETCOMP_CHAOS_TABLE", "/tmp/hetcomp-chaos-results.md"))
    where.write_text(f"seed {chaoslib.SEED}\n\n{text}\n")
    terminalreporter.write_line(f"(written to {where})")


@pytest.fixture(scope="session")
def datasets_env(datasets_dir: Path) -> Path:
    """HETCOMP_DATASETS_DIR for the CLI subprocesses."""
    old = os.environ.get("HETCOMP_DATASETS_DIR")
    os.environ["HETCOMP_DATASETS_DIR"] = str(datasets_dir)
    yield datasets_dir
    if old is None:
        os.environ.pop("HETCOMP_DATASETS_DIR", None)
    else:
        os.environ["HETCOMP_DATASETS_DIR"] = old


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, datasets_env: Path) -> Path:
    """A finished one-teacher run on MovieLens-100K (configs/tiny.yaml's bpr_mf): dataset and trajectory."""
    root = tmp_path_factory.mktemp("tiny")
    config = chaoslib.tiny_config(root / "tiny.yaml", str(root / "run"))
    done = chaoslib.cli("train-teachers", "--config", str(config), "--sequential")
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run"


@pytest.fixture
def scratch_run(tmp_path: Path, tiny_run: Path):
    """A function returning a fresh copy of the tiny run (dataset and teachers) and its config."""
    count = [0]

    def make(**changes) -> tuple[Path, Path]:
        count[0] += 1
        run = tmp_path / f"run{count[0]}"
        shutil.copytree(tiny_run, run)
        return run, chaoslib.tiny_config(tmp_path / f"run{count[0]}.yaml", str(run), **changes)
    return make
