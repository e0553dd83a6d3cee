"""Launcher scripts: they parse, and the multi-node sbatch script's srun + torchrun line, run in a fake
one-node SLURM job (stub srun and scontrol on PATH, 2 gloo processes), puts both ranks in one run dir,
passes SLURM's time-limit warning on to the ranks, and its requeued rerun continues there."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port
from test_preemption import pids

# One xdist worker, one at a time, with tests/test_preemption.py (make test's --dist loadgroup): torchrun under a
# fake SLURM (2 gloo ranks and an agent) beside that file's timed exits would slow them past their bound.
pytestmark = pytest.mark.xdist_group("signals")

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
    # MASTER_PORT: the script's default is derived from the job id (27101 here), fixed, so two runs of this
    # test on one machine (xdist workers, two checkouts) would meet at one rendezvous.
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "SLURM_SUBMIT_DIR": str(tmp_path),
            "MASTER_PORT": str(free_port()),
            "SLURM_JOB_ID": JOB, "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost", "NPROC_PER_NODE": "2",
            "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}


def train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []  # the last line may be half written
    return [r["step"] for r in map(json.loads, lines) if "train/loss" in r]


def ppid_and_state(pid: int) -> tuple[int, str]:
    state, ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    return int(ppid), state


def pending(pid: int, sig: signal.Signals) -> bool:
    """Whether `sig` waits to be delivered to the process `pid` (a stopped one keeps it pending)."""
    masks = re.findall(r"^(?:SigPnd|ShdPnd):\s*([0-9a-f]+)$", Path(f"/proc/{pid}/status").read_text(), re.M)
    return any(int(mask, 16) >> (sig - 1) & 1 for mask in masks)


@contextlib.contextmanager
def ranks_held(agent: int, run_dir: Path):
    """torchrun's workers (the agent's children) stopped (SIGSTOP) inside, continued (SIGCONT) after: a
    signal sent to them meanwhile is handled as they resume, within a step of where they stood."""
    ranks = [pid for pid in pids(run_dir) if ppid_and_state(pid)[0] == agent]
    assert len(ranks) == 2, ranks
    try:
        for pid in ranks:
            os.kill(pid, signal.SIGSTOP)
        while any(ppid_and_state(pid)[1] != "T" for pid in ranks):  # stopped before anything is sent
            time.sleep(0.01)
        yield ranks
    finally:
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


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
            # The ranks are held while it travels: on a busy machine (xdist workers) they would train on for
            # as long as this test and torchrun wait for a core, and could finish all the steps first.
            with ranks_held(proc.pid, run_dir) as ranks:
                proc.send_signal(signal.SIGUSR1)
                while not all(pending(pid, signal.SIGUSR1) for pid in ranks):  # torchrun passed it on
                    assert time.monotonic() < deadline, "torchrun did not pass SIGUSR1 on within 120 s"
                    time.sleep(0.01)
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
    # A port of its own: the first run's rendezvous port may not be free again yet.
    rerun = subprocess.run(command, cwd=tmp_path, env={**env, "MASTER_PORT": str(free_port())}, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert train_steps(run_dir) == list(range(1, STEPS + 1))  # one metrics.jsonl, continued where it stopped
    assert (ckpt_dir / f"step_{STEPS:06d}").is_dir()
