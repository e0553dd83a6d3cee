"""Launcher scripts: they parse, and the multi-node sbatch script's srun + torchrun line, run in a fake
one-node SLURM job (stub srun and scontrol on PATH, 2 gloo processes), puts both ranks in one run dir,
passes SLURM's time-limit warning on to the ranks, and its requeued rerun continues there."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_preemption import pids

ROOT = Path(__file__).resolve().parents[1]
JOB = "7101"
STEPS = 20


@pytest.mark.parametrize("script", ["multinode.sbatch", "torchrun.sh", "slurm.sh", "gpu_check.sh"])
def test_launcher_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / "launchers" / script)], check=True)


def fake_slurm(tmp_path: Path) -> dict:
    """The environment sbatch gives the script on a one-node allocation of this machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # srun: drop its own options and run the command once (one task on the one node).
    (bin_dir / "srun").write_text('#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(
        f'#!/bin/sh\nif [ "$1" = show ]; then echo localhost; else echo "$@" >> {tmp_path / "scontrol.log"}; fi\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HYBRIDCHAT_")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "SLURM_SUBMIT_DIR": str(tmp_path),
            "SLURM_JOB_ID": JOB, "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost", "NPROC_PER_NODE": "2",
            "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}


def train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []  # the last line may be half written
    return [r["step"] for r in map(json.loads, lines) if "train/loss" in r]


def test_multinode_sbatch_one_run_dir_usr1_checkpoint_and_requeued_resume(tmp_path):
    env = fake_slurm(tmp_path)
    command = [str(ROOT / "launchers" / "multinode.sbatch"), "debug=smoke", f"stage.num_steps={STEPS}",
               "stage.total_batch_tokens=2048", "stage.eval_every=1000", "stage.checkpoint_every=1000"]
    run_dir = tmp_path / "outputs" / "runs" / f"slurm-{JOB}"
    with (tmp_path / "first.out").open("w") as log:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while len(train_steps(run_dir)) < 3:
                assert proc.poll() is None, (tmp_path / "first.out").read_text()[-3000:]
                assert time.monotonic() < deadline, "no training steps within 120 s"
                time.sleep(0.05)
            # SLURM's --signal=USR1@120, delivered to the step's process: torchrun (srun and the script exec'd it).
            proc.send_signal(signal.SIGUSR1)
            returncode = proc.wait(timeout=60)
        finally:  # torchrun's workers run in sessions of their own: none may outlive the test
            for pid in pids(run_dir):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
    output = (tmp_path / "first.out").read_text()
    assert returncode != 0, output[-3000:]
    assert [p.name for p in (tmp_path / "outputs" / "runs").iterdir()] == [run_dir.name]
    assert {p.name for p in run_dir.iterdir()} >= {".hydra", ".hydra_rank1", "train.log", "train_rank1.log"}
    stopped = max(train_steps(run_dir))
    assert 3 <= stopped < STEPS
    ckpt_dir = tmp_path / "outputs" / "checkpoints" / "hybrid_tiny" / "pretrain"
    assert [p.name for p in ckpt_dir.iterdir()] == [f"step_{stopped:06d}"], output[-3000:]
    assert f"SIGUSR1 after step {stopped}" in output
    assert (tmp_path / "scontrol.log").read_text().split("\n") == [f"requeue {JOB}", ""]

    # The requeued job: same job id, same command.
    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert train_steps(run_dir) == list(range(1, STEPS + 1))  # one metrics.jsonl, continued where it stopped
    assert (ckpt_dir / f"step_{STEPS:06d}").is_dir()
