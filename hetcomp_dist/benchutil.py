"""What the benchmarks (bench/*.py) and ``hetcomp compare`` share: memory, child processes, tables, plots, data.

Imports stay light (no torch or matplotlib at import time): a child started by
:func:`call_in_subprocess` runs this module first, and its peak memory is measured with its imports.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

# --------------------------------------------------------------------------- memory


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (monotone), MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mib(key: str = "VmRSS") -> float:
    """A /proc/self/status memory field in MiB: VmRSS (now) or VmHWM (peak since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS, so that ``rss_mib("VmHWM")`` measures one phase."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} (1 / 5 min) on {os.cpu_count()} CPUs"


# --------------------------------------------------------------------------- child processes


@dataclass
class Child:
    """A finished child process: exit status, wall seconds, its own peak RSS (MiB), its stdout if captured."""

    returncode: int
    seconds: float
    peak_rss_mib: float
    stdout: str = ""


def run_measured(cmd: Sequence[str], env: dict[str, str] | None = None, deadline: float | None = None,
                 capture: bool = False) -> Child:
    """Run ``cmd``; its wall time and peak RSS (os.wait4). Killed (TimeoutError) past ``deadline``
    (a time.monotonic() value); ``capture`` keeps its stdout (through a file: no pipe to drain)."""
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), env=env, stdout=out if capture else None)
        while True:
            pid, status, usage = os.wait4(proc.pid, 0 if deadline is None else os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise TimeoutError(f"killed after {time.perf_counter() - t0:.0f} s (deadline reached)")
            time.sleep(0.2)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)   # reaped here: Popen must not wait again
        out.seek(0)
        return Child(proc.returncode, seconds, usage.ru_maxrss / 1024, out.read() if capture else "")


def call_in_subprocess(fn: Callable[..., Any], kwargs: dict[str, Any], env: dict[str, str] | None = None,
                       deadline: float | None = None) -> tuple[Any, Child]:
    """``fn(**kwargs)`` in a fresh Python process: (its JSON-able return value, the :class:`Child`).

    ``fn`` is a module-level function of an importable module or of a script run as ``__main__``
    (then the child loads the script's file without running its ``__main__`` block). RuntimeError
    if the child fails, TimeoutError past ``deadline`` (see :func:`run_measured`)."""
    target = f"{fn.__module__}:{fn.__qualname__}"
    if fn.__module__ == "__main__":
        target = f"{Path(fn.__code__.co_filename).resolve()}:{fn.__qualname__}"
    with tempfile.TemporaryDirectory(prefix="benchutil-") as tmp:
        args, result = Path(tmp) / "kwargs.json", Path(tmp) / "result.json"
        args.write_text(json.dumps(kwargs))
        child = run_measured([sys.executable, "-m", "hetcomp_dist.benchutil", target, str(args), str(result)],
                             env, deadline)
        if child.returncode != 0:
            raise RuntimeError(f"{fn.__qualname__} failed in a child process (exit status {child.returncode})")
        return json.loads(result.read_text()), child


def _load_target(target: str) -> Callable[..., Any]:
    where, name = target.rsplit(":", 1)
    if where.endswith(".py"):
        spec = importlib.util.spec_from_file_location("_bench_child", where)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module          # dataclasses look their module up while it runs
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    for part in name.split("."):
        module = getattr(module, part)
    return module


def _child_main(argv: list[str]) -> None:
    target, args, result = argv
    value = _load_target(target)(**json.loads(Path(args).read_text()))
    Path(result).write_text(json.dumps(value))


# --------------------------------------------------------------------------- tables and plots


def mean_sd(values: Sequence[float], fmt: str = "{:.4f}") -> str:
    """A table cell over seeds: "mean ± sd", the value alone for one seed, "" for none."""
    if not values:
        return ""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[Any]], numeric: bool = True) -> str:
    """A Markdown table; every column but the first right-aligned when ``numeric``."""
    align = "---:|" if numeric else "---|"
    lines = ["| " + " | ".join(head) + " |", "|---|" + align * (len(head) - 1)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` (its folder created), then close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


# --------------------------------------------------------------------------- data


def dataset_folder(name: str, given: str | Path | None = None) -> Path:
    """``given``, else ``$HETCOMP_DATASETS_DIR/<name>`` (SystemExit naming both when neither is set)."""
    if given:
        return Path(given)
    root = os.environ.get("HETCOMP_DATASETS_DIR")
    if not root:
        raise SystemExit(f"no data folder: pass one, or set HETCOMP_DATASETS_DIR to the folder holding {name}/")
    return Path(root).expanduser() / name


def load_lightgcn_dir(directory: str | Path):
    """train / test Interactions from a LightGCN-format folder (train.txt, test.txt; ids as given,
    pairs deduplicated), read with hetcomp_dist.data.formats.read_lightgcn."""
    import numpy as np

    from hetcomp_dist.data.dataset import Interactions
    from hetcomp_dist.data.formats import read_lightgcn

    def pairs(path: Path):
        batches = list(read_lightgcn(str(path)))
        users = [b.column("user").to_numpy().astype(np.int64) for b in batches]
        items = [b.column("item").to_numpy().astype(np.int64) for b in batches]
        return np.concatenate(users or [np.empty(0, np.int64)]), np.concatenate(items or [np.empty(0, np.int64)])

    directory = Path(directory)
    (tr_u, tr_i), (te_u, te_i) = pairs(directory / "train.txt"), pairs(directory / "test.txt")
    n_users = int(max(tr_u.max(initial=-1), te_u.max(initial=-1))) + 1
    n_items = int(max(tr_i.max(initial=-1), te_i.max(initial=-1))) + 1

    def build(u, i):
        key = np.unique(u * n_items + i)
        return Interactions.from_pairs(key // n_items, key % n_items, n_users, n_items)

    return build(tr_u, tr_i), build(te_u, te_i)


if __name__ == "__main__":
    _child_main(sys.argv[1:])


def time_slices(source: Path, out: Path, steps: int, start: float) -> list[str]:
    """A MovieLens-style .inter file (user, item, rating, timestamp; tab-separated) cut by time: the
    first ``start`` of the rows, then ``steps`` equal slices of the rest, each a CSV with timestamps."""
    lines = Path(source).read_text().splitlines()[1:]
    rows = sorted((int(float(t)), u, i) for u, i, _, t in (line.split("\t") for line in lines))
    n, first = len(rows), int(start * len(rows))
    cuts = [0, first] + [first + (n - first) * k // steps for k in range(1, steps + 1)]
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for j, (a, b) in enumerate(zip(cuts, cuts[1:])):
        path = out / f"day{j}.csv"
        path.write_text("user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for t, u, i in rows[a:b]))
        files.append(str(path))
    return files
