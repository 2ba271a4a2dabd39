"""What a long command shows while it runs: one readable line per evaluation (or JSON lines with
``--log-format json``), and the same curves as TensorBoard event files under the run."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import IO, Any, Callable

from hetcomp_dist import storage

LOG_FORMATS = ("text", "json")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """Report callback for the training loops (``event`` dicts as they emit them).

    text: a line per evaluation and per resume (label, epoch/max, phase, loss, valid metric, best,
    elapsed and an upper bound on what remains at the current epoch time); json: every event as one
    JSON line. With ``tensorboard``, each evaluation's loss and valid metric go to event files there.
    """

    def __init__(self, label: str, max_epochs: int, metric: str, log_format: str = "text",
                 tensorboard: str | None = None, stream: IO[str] | None = None):
        self.label, self.max_epochs, self.metric, self.format = label, max_epochs, metric, log_format
        self.stream = stream or sys.stdout
        self.t0 = time.monotonic()
        self.board = _Board(tensorboard) if tensorboard else None

    def __call__(self, event: dict[str, Any]) -> None:
        if self.format == "json":
            print(json.dumps(event, default=str), file=self.stream, flush=True)
        elif event.get("event") == "resumed":
            print(f"[{self.label}] resumed after the evaluation of epoch {event['epoch']}", file=self.stream, flush=True)
        elif "valid" in event:
            print(self._line(event), file=self.stream, flush=True)
        if self.board is not None and "valid" in event:
            self.board.add(event, self.metric)

    def _line(self, e: dict[str, Any]) -> str:
        elapsed = time.monotonic() - self.t0
        left = (self.max_epochs - e["epoch"]) * e.get("epoch_seconds", 0.0)
        phase = f"  {e['phase']}" if e.get("phase") else ""
        best = f"  best {e['best']:.4f} @ {e['best_epoch']}" if "best_epoch" in e else ""
        return (f"[{self.label}] epoch {e['epoch']:>4}/{self.max_epochs}{phase}  loss {e['loss']:.4g}  "
                f"valid {self.metric} {e['valid']:.4f}{best}  {_duration(elapsed)} elapsed, "
                f"at most {_duration(left)} left")

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


class TeacherLines:
    """One line per evaluation, resume and finish; epoch lines at most every ``interval`` s per teacher."""

    def __init__(self, teachers: list, interval: float = 5.0, stream: Any = None):
        self._cfg = {t.name: t for t in teachers}
        self._width = max((len(t.name) for t in teachers), default=1)
        self._interval = interval
        self._last: dict[str, float] = {}
        self._stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        name, kind = event["teacher"], event["event"]
        t = self._cfg.get(name)
        if kind == "epoch":
            now = time.monotonic()
            if "valid" not in event and now - self._last.get(name, -1e9) < self._interval:
                return
            self._last[name] = now
            line = f"epoch {event['epoch']:>4}/{t.max_epochs if t else '?'}  loss {event['loss']:.4f}  " \
                   f"{event['epoch_seconds']:.1f}s/epoch"
            if "valid" in event:
                metric = t.select_metric if t else "valid"
                line += f"  valid {metric} {event['valid']:.4f}  (best {event['best']:.4f} @ {event['best_epoch']})"
        elif kind == "resumed":
            line = f"resumed from the checkpoint of epoch {event['epoch']}"
        elif kind == "done":
            line = f"done: best epoch {event['best_epoch']}, {event['epochs_trained']} epochs, " \
                   f"{event['train_seconds']:.1f}s training"
        elif kind == "skipped":
            line = "complete trajectory with this config found: not trained again"
        else:
            line = str(event)
        print(f"[{name:<{self._width}}] {line}", file=self._stream or sys.stdout, flush=True)


class TeacherProgress:
    """The teachers' report callback: :class:`TeacherLines` (text) or JSON lines, and TensorBoard event
    files per teacher at ``board_uri(f"teacher-{name}")`` when that is given."""

    def __init__(self, teachers: list, board_uri: Callable[[str], str] | None = None, log_format: str = "text",
                 stream: IO[str] | None = None):
        self.lines = TeacherLines(teachers, stream=stream) if log_format == "text" else None
        self.stream = stream or sys.stdout
        self.metrics = {t.name: t.select_metric for t in teachers}
        self.board_uri, self.boards = board_uri, {}

    def __call__(self, event: dict[str, Any]) -> None:
        if self.lines is not None:
            self.lines(event)
        else:
            print(json.dumps(event, default=str), file=self.stream, flush=True)
        name = event.get("teacher")
        if self.board_uri is not None and event.get("event") == "epoch" and "valid" in event and name in self.metrics:
            if name not in self.boards:
                self.boards[name] = _Board(self.board_uri(f"teacher-{name}"))
            self.boards[name].add(event, self.metrics[name])

    def close(self) -> None:
        for board in self.boards.values():
            board.close()


class _Board:
    """TensorBoard event files at a run URI (written locally; copied to object storage after each add)."""

    def __init__(self, uri: str):
        from tensorboardX import SummaryWriter

        self.uri = uri
        fs, path = storage.filesystem(uri)
        self.remote = not uri.startswith("/") and not uri.startswith("file://") and "://" in uri
        self.dir = tempfile.mkdtemp(prefix="tb-") if self.remote else path
        os.makedirs(self.dir, exist_ok=True)
        self.writer = SummaryWriter(logdir=self.dir)

    def add(self, event: dict[str, Any], metric: str) -> None:
        step = event["epoch"]
        self.writer.add_scalar("train/loss", event["loss"], step)
        self.writer.add_scalar(f"valid/{metric}", event["valid"], step)
        if event.get("epoch_seconds") is not None:
            self.writer.add_scalar("time/epoch_seconds", event["epoch_seconds"], step)
        for t, stage in enumerate((event.get("stages") or {}).get("mean_stage", [])):
            self.writer.add_scalar(f"dkc/mean_stage_teacher{t}", stage, step)
        self.writer.flush()
        if self.remote:
            fs, path = storage.filesystem(self.uri)
            fs.put(self.dir + "/", path + "/", recursive=True)

    def close(self) -> None:
        self.writer.close()
