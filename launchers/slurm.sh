#!/usr/bin/env bash
# SLURM through Hydra's submitit launcher: one sbatch job per sweep point, submitted from the login
# node, each running DDP across its tasks (hybridchat.infra.runtime reads submitit's environment).
#   launchers/slurm.sh -m gpu=a100 model=hybrid_d12,transformer_d12 \
#       hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=8 hydra.launcher.tasks_per_node=8
# The defaults (1 node, 1 GPU, 1 task, 4 h) live in conf/hydra/launcher/slurm.yaml.
# resume=true: a job requeued after preemption or its time-limit warning reruns this same command and
# must continue from its latest checkpoint (a first run finds none and starts from scratch). To start
# a run over instead, pass resume=false or a new run_name.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m hybridchat.train hydra/launcher=slurm resume=true "$@"
