"""Fault hooks the tests install into the distillation loop (picklable: they travel to Ray workers)."""

from __future__ import annotations

import os
import signal
from pathlib import Path


class KillOnce:
    """SIGKILL the last rank right after the evaluation (and checkpoint) of ``epoch``, once: the
    marker file records that it did, so the restarted worker group runs on."""

    def __init__(self, epoch: int, marker: str):
        self.epoch, self.marker = epoch, marker

    def __call__(self, event: dict, rank: int, world: int) -> None:
        if event["epoch"] == self.epoch and rank == world - 1 and not Path(self.marker).exists():
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
