#!/usr/bin/env bash
# Create .venv in the repository root with the exact pinned stack, then install this package.
# Usage: bash scripts/setup.sh [--gpu]
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
gpu=0
if [[ "${1:-}" == "--gpu" ]]; then gpu=1; fi

py=$(command -v python3.11 || command -v python3)
"$py" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 needed, found {sys.version}"'
[[ -x .venv/bin/python ]] || "$py" -m venv .venv
# The lock holds every package at an exact version; --no-deps stops torchrec's metadata from
# pulling the CUDA fbgemm-gpu (and a CUDA torch) onto CPU hosts.
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# Build tools first, pinned: venv's bundled pip/setuptools are too old to build this package
# editable without isolation, and `pip freeze` (the lock) leaves them out.
"${pip[@]}" pip==25.3 setuptools==84.2.1
# fbgemm_gpu-cpu and fbgemm_gpu install the same files under different names: pip would keep both and
# uninstalling one later breaks the other. Switching a .venv between the locks removes the other first.
if [[ $gpu == 0 ]]; then
  .venv/bin/python -m pip uninstall --quiet --yes fbgemm_gpu 2>/dev/null || true
  "${pip[@]}" --no-deps -r requirements/cpu.lock
else
  # GPU hosts: cpu.lock's pins with the CUDA torch/fbgemm-gpu pair and their nvidia-* runtime
  # wheels, resolved once into gpu.lock (fbgemm-gpu 1.8.0 is built for torch 2.13 only; both are
  # CUDA 13.0 builds, which need an NVIDIA driver of the 580 series or newer).
  .venv/bin/python -m pip uninstall --quiet --yes fbgemm_gpu-cpu 2>/dev/null || true
  "${pip[@]}" --no-deps -r requirements/gpu.lock
  # One line, not fbgemm's traceback, if a CPU torch ended up here anyway.
  .venv/bin/python -c 'import sys, torch; torch.version.cuda or sys.exit(f"setup.sh --gpu: torch {torch.__version__} in .venv is a CPU build; requirements/gpu.lock pins the CUDA build (torch===2.13.0)")'
  # The CUDA fbgemm_gpu (so torchrec, so this package) loads the driver's NVML when imported: the lock
  # installs anywhere (an image build needs no GPU), but it runs only where the NVIDIA driver is.
  .venv/bin/python -c 'import ctypes, sys
try:
    ctypes.CDLL("libnvidia-ml.so.1")
except OSError:
    sys.exit("setup.sh --gpu: the GPU stack is installed in .venv, but it needs the NVIDIA driver (libnvidia-ml.so.1), which this host lacks; on a host without a GPU use bash scripts/setup.sh")'
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
.venv/bin/python -c 'import torch, fbgemm_gpu, torchrec, ray, pyarrow, s3fs; print(f"stack ok: torch {torch.__version__}, torchrec, ray {ray.__version__}, pyarrow {pyarrow.__version__}")'
if [[ $gpu == 1 ]]; then
  # Informative, not a failure: a host with the driver may still show no GPU (CUDA_VISIBLE_DEVICES).
  .venv/bin/python -c 'import torch; print(f"cuda: torch built for CUDA {torch.version.cuda}; " + (f"GPU visible: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU visible here"))'
fi
