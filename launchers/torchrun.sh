#!/usr/bin/env bash
# Multi-GPU (or multi-process CPU) training on one machine with DDP:
#   launchers/torchrun.sh 8 model=hybrid_d20 gpu=h100
#   launchers/torchrun.sh 2 gpu=cpu debug=smoke            # gloo on CPU
# All ranks share ONE Hydra run dir: it is fixed here, before the ranks start, because each rank
# resolving ${now:} on its own can split a run into several folders.
set -euo pipefail
nproc="${1:?usage: launchers/torchrun.sh NPROC [hydra overrides...]}"
shift
export HYBRIDCHAT_RUN_DIR="${HYBRIDCHAT_RUN_DIR:-outputs/runs/$(date +%Y-%m-%d)/$(date +%H-%M-%S)-ddp${nproc}}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
  -m hybridchat.train "$@"
