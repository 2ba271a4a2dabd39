#!/usr/bin/env bash
# The GPU check, for a person on a GPU host: install the GPU stack, then time the same work on cpu and on
# cuda side by side (teacher epochs, evaluation, trajectory top-K, and a two-epoch distillation on
# distill.device). See bench/gpu_check.py for what each row measures.
#
#   bash bench/gpu_check.sh                       # on a GPU host: setup.sh --gpu, then cpu and cuda
#   DEVICES=cpu bash bench/gpu_check.sh           # the CPU half only (a host without a GPU)
#
# Environment: DEVICES (default cpu,cuda), DATASET (default citeulike-t; ml-100k for a quick smoke run),
# THREADS (torch threads on every device; default all cores), SETUP=0 to use .venv as it is,
# HETCOMP_DATASETS_DIR (a local mirror; without it the dataset is downloaded and checked).
# Output: the table on stdout and in bench/out/gpu_check.md (numbers in bench/out/gpu_check.json).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${DEVICES:-cpu,cuda}
DATASET=${DATASET:-citeulike-t}
THREADS=${THREADS:-$(nproc)}

if [[ ${SETUP:-1} == 1 ]]; then
  # cuda needs the CUDA builds of torch and fbgemm-gpu (requirements/gpu.lock); the CPU half the CPU lock.
  if [[ $DEVICES == *cuda* ]]; then bash scripts/setup.sh --gpu; else bash scripts/setup.sh; fi
fi
if [[ $DEVICES == *cuda* ]]; then
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  # One line, before any work, if this torch cannot use the GPU (a CPU build, a driver too old, no device).
  .venv/bin/python -c 'import torch; assert torch.cuda.is_available(), f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"; print("cuda ok:", torch.cuda.get_device_name())'
fi
exec .venv/bin/python bench/gpu_check.py --devices "$DEVICES" --dataset "$DATASET" --threads "$THREADS" "$@"
