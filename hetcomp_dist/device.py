"""Where a component computes: its ``device`` setting (auto | cpu | cuda) and the process-group backend.

Each component that computes owns a ``device`` setting in its own config section (the teachers:
``teachers[i].device``) and resolves it here once, before any work:

- ``auto``: the current CUDA device when torch sees one (``torch.cuda.is_available()``), else the CPU;
- ``cpu``: the CPU, even where a GPU is visible;
- ``cuda``: the current CUDA device. A process that sees none stops with one :class:`DeviceError` line
  naming the setting, rather than training on the CPU it was not asked for.

Under Ray a process may use only the GPUs reserved for it, but Ray (2.60) no longer hides the node's
GPUs from a process that reserved none (CUDA_VISIBLE_DEVICES is left alone when num_gpus=0), so there
``auto`` would take a GPU another process reserved. :func:`under_reservation` therefore reads ``auto``
as "cuda exactly when GPUs are reserved". A Ray Train worker's current CUDA device is its assigned GPU
(``ray.train.torch.get_device()``), so ``resolve`` there gives that GPU.

The process group follows the device (:func:`backend`): NCCL for CUDA tensors, gloo for CPU tensors.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch

from hetcomp_dist.config import ConfigError

Name = Literal["auto", "cpu", "cuda"]
NAMES = ("auto", "cpu", "cuda")


class DeviceError(ConfigError):
    """A device setting this process cannot honour; the message is one line naming the setting."""


def resolve(name: str, key: str = "device") -> torch.device:
    """The torch device for setting ``name``; ``key`` names the setting in errors (e.g. ``teachers[0].device``).

    Raises:
        DeviceError: ``name`` is not auto/cpu/cuda, or it is cuda and this process sees no CUDA device.
    """
    if name not in NAMES:
        raise DeviceError(f"{key}: expected one of {', '.join(NAMES)}, got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"{key}: cuda, but this process sees no CUDA device ({_why_no_cuda()})")
    # An explicit index, so that devices compare equal: torch.device("cuda") != torch.device("cuda", 0).
    return torch.device("cuda", torch.cuda.current_device())


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build; on a GPU host: bash scripts/setup.sh --gpu"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no GPU"
            + (f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""))


def backend(device: torch.device | str) -> str:
    """The process-group backend for collectives on tensors of ``device``: nccl for cuda, else gloo."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def under_reservation(name: str, gpus: float, key: str, gpus_key: str) -> str:
    """The setting a Ray process with ``gpus`` GPUs reserved computes with: cpu or cuda (see the module docstring).

    Raises:
        DeviceError: cuda without a GPU reserved (the process would take one that is not its own), or cpu
            with GPUs reserved (they would stay idle).
    """
    if name not in NAMES:
        raise DeviceError(f"{key}: expected one of {', '.join(NAMES)}, got {name!r}")
    if name == "cuda" and gpus <= 0:
        raise DeviceError(f"{key}: cuda needs {gpus_key} > 0 under Ray (a Ray process may use only the GPUs "
                          "reserved for it)")
    if name == "cpu" and gpus > 0:
        raise DeviceError(idle_gpus(gpus, key, gpus_key))
    return "cuda" if gpus > 0 else "cpu"


def idle_gpus(gpus: float, key: str, gpus_key: str) -> str:
    """The message for GPUs reserved by a process set to compute on the CPU."""
    return f"{gpus_key}: {gpus:g} GPU(s) reserved, but {key} is cpu: they would stay idle (set {key}: auto or cuda)"


def to_cpu(state: Any) -> Any:
    """``state`` (nested dicts, lists, tuples of tensors and plain values) with every tensor on the CPU.

    Checkpoints and outputs are written from this, so that a file written on a GPU loads anywhere, with
    ``torch.load`` and no ``map_location``. CPU tensors are returned as they are (no copy).
    """
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_cpu(v) for v in state)
    return state
