"""What a long command shows while it runs: one readable line per evaluation (or JSON lines with
``--log-format json``), and the same curves as TensorBoard event files under the run."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import IO, Any

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
