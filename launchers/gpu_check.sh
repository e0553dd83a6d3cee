#!/usr/bin/env bash
# The GPU check (python -m hybridchat.bench gpu_check: gpu tests, d12 training tok/s + MFU, the smoke
# pipeline's recompilations, scans, kernels; one table in at most 10 minutes) on a CUDA machine that
# already has PyTorch and Triton, as cluster images and NGC containers do, with or without network:
#   make wheels                         # where pip has network: the dependencies into wheels/
#   (copy the repository, wheels/ included, to the GPU machine)
#   launchers/gpu_check.sh              # there (= make gpu-check); options go to the check:
#   launchers/gpu_check.sh --gpu a100 --only train_hybrid_d12
# The check runs in a venv over the system Python (PYTHON, default python3), so the machine's own
# CUDA build of torch stays in use; pip adds only what is missing, from wheels/ when it exists (no
# index is asked then), else from the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${GPU_CHECK_VENV:-.venv-gpu}"
if [[ ! -x "$venv/bin/python" ]]; then
  # --without-pip: the system's pip serves the venv too, also where ensurepip is not installed.
  "${PYTHON:-python3}" -m venv --system-site-packages --without-pip "$venv"
fi
from_wheels=""
[[ -d wheels ]] && from_wheels="--no-index --find-links wheels"
# shellcheck disable=SC2086  # from_wheels is several words or none
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check $from_wheels -e ".[dev]"
exec "$venv/bin/python" -m hybridchat.bench gpu_check "$@"
