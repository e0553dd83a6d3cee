"""Preemption: a stop signal mid-training leaves a complete checkpoint at the step it stopped and a
documented exit code, and the same command with resume=true continues the uninterrupted loss curve.

Real processes and real signals, sent once metrics.jsonl shows a few steps: no test hook in the code.
SLURM is faked by SLURM_JOB_ID and an `scontrol` on PATH that records its arguments.
"""

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
import torch
from conftest import in_ranks

from hybridchat.infra import checkpoint

# One xdist worker, one at a time, for this file and tests/test_launchers.py (make test's --dist loadgroup): its
# module fixtures are shared by its tests, and both time a training process's exit after a real signal (< 10 s),
# which one of them overran (12.8 s) beside test_launchers' torchrun run, both workers pinned to one busy core.
pytestmark = pytest.mark.xdist_group("signals")

ROOT = Path(__file__).resolve().parents[1]
STEPS = 60  # ~50 ms each: the signal, sent after 3, lands long before the end
JOB = "4242"


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """One outputs folder (one tokenizer cache) for all runs; a fake scontrol in its bin/."""
    out = tmp_path_factory.mktemp("preempt")
    (out / "bin").mkdir()
    scontrol = out / "bin" / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {out / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    return out


def command(out: Path, name: str, *extra: str) -> list[str]:
    # Checkpoints and evaluations only at the end: the one checkpoint before it is the preemption's.
    return [sys.executable, "-m", "hybridchat.train", "debug=smoke", f"paths.outputs={out}", f"run_name={name}",
            f"stage.num_steps={STEPS}", "stage.eval_every=1000", "stage.checkpoint_every=1000", *extra]


def environment(out: Path, run_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_JOB_ID")}
    return {**env, "HYBRIDCHAT_RUN_DIR": str(run_dir), "OMP_NUM_THREADS": "1", "SLURM_JOB_ID": JOB,
            "PATH": f"{out / 'bin'}{os.pathsep}{env['PATH']}"}


def metrics(run_dir: Path) -> list[dict]:
    """The complete lines of metrics.jsonl (the run may be writing the next one)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [json.loads(line) for line in lines]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in metrics(run_dir) if "train/loss" in r}


def finish(out: Path, name: str, *extra: str) -> Path:
    run_dir = out / "runs" / " ".join([name, *extra])  # a resumed run gets a metrics.jsonl of its own
    result = subprocess.run(command(out, name, *extra), cwd=ROOT, env=environment(out, run_dir), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


def pids(run_dir: Path, *env: str) -> list[int]:
    """The processes of the run writing to run_dir (torchrun's agent and workers too), by environment."""
    wanted = {f"HYBRIDCHAT_RUN_DIR={run_dir}".encode(), *(e.encode() for e in env)}
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if wanted <= set(environ.read_bytes().split(b"\0")):
                found.append(int(environ.parent.name))
        except OSError:  # gone, or not ours
            continue
    return found


def interrupt(out: Path, name: str, sig: signal.Signals, ddp: bool = False, again_after: str | None = None,
              extra: tuple[str, ...] = ()) -> dict:
    """Start a run, send `sig` once it has logged 3 steps, wait for it to exit. ddp: two torchrun
    processes on CPU, and the signal goes to rank 1 alone. again_after: send `sig` once more as soon as
    the run's output shows this text (the first signal handled)."""
    run_dir = out / "runs" / name
    log_path = out / f"{name}.out"
    argv = command(out, name, *extra)
    if ddp:
        argv[1:3] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "hybridchat.train",
                     "stage.total_batch_tokens=2048"]
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=environment(out, run_dir), stdout=log, stderr=subprocess.STDOUT,
                                text=True)
        try:
            deadline = time.monotonic() + 120
            while len(losses(run_dir)) < 3:
                assert proc.poll() is None, f"exited before the signal:\n{log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no training steps within 120 s"
                time.sleep(0.01)
            os.kill(pids(run_dir, "RANK=1")[0] if ddp else proc.pid, sig)
            while again_after is not None and again_after not in log_path.read_text() and proc.poll() is None:
                time.sleep(0.001)
            if again_after is not None:
                os.kill(proc.pid, sig)
            sent = time.monotonic()
            returncode = proc.wait(timeout=30)
            exit_seconds = time.monotonic() - sent
        finally:  # a hung run (torchrun's workers run in sessions of their own) must not outlive the test
            for pid in pids(run_dir):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
    stopped = max(losses(run_dir))
    return {"run_dir": run_dir, "returncode": returncode, "exit_seconds": exit_seconds, "stopped": stopped,
            "output": log_path.read_text(), "ckpt_dir": checkpoint.stage_dir(out / "checkpoints", name, "pretrain")}


def scontrol_calls(out: Path) -> list[str]:
    path = out / "scontrol.log"
    return path.read_text().splitlines() if path.exists() else []


def assert_stopped_with_checkpoint(run: dict, sig: signal.Signals) -> None:
    assert run["returncode"] == 128 + sig, run["output"][-3000:]
    assert run["exit_seconds"] < 10, f"took {run['exit_seconds']:.1f} s to exit"
    stopped = run["stopped"]
    assert 3 <= stopped < STEPS
    # Exactly one step folder, at the last logged step: no temp folder (.step_*.tmp) left beside it.
    assert sorted(p.name for p in run["ckpt_dir"].iterdir()) == [f"step_{stopped:06d}"]
    ckpt = run["ckpt_dir"] / f"step_{stopped:06d}"
    assert sorted(p.name for p in ckpt.iterdir()) == ["meta.json", "model.safetensors", "optimizer.safetensors",
                                                     "tokenizer.json"]
    meta = checkpoint.read_meta(ckpt)
    assert meta["step"] == stopped and meta["data_position"] == stopped and meta["config"]["stage"]["num_steps"] == STEPS
    assert f"{sig.name} after step {stopped}: saved {ckpt}" in run["output"] and "resume=true" in run["output"]
    assert (run["run_dir"] / "metrics.png").exists()  # the tracker was finished


@pytest.fixture(scope="module")
def straight(out):
    return losses(finish(out, "straight"))


@pytest.fixture(scope="module")
def sigterm_run(out):
    before = len(scontrol_calls(out))
    run = interrupt(out, "term", signal.SIGTERM)
    run["requeued"] = scontrol_calls(out)[before:]
    return run


def test_sigterm_writes_a_resumable_checkpoint_and_exits_143(sigterm_run):
    assert_stopped_with_checkpoint(sigterm_run, signal.SIGTERM)
    assert sigterm_run["requeued"] == []  # scancel or preemption: SLURM decides, not the job


def test_resumed_run_continues_the_same_loss_curve(out, sigterm_run, straight):
    resumed = losses(finish(out, "term", "resume=true"))
    stopped = sigterm_run["stopped"]
    assert sorted(resumed) == list(range(stopped + 1, STEPS + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(straight[step], rel=1e-5, abs=1e-6), step
    assert checkpoint.latest(sigterm_run["ckpt_dir"]).name == f"step_{STEPS:06d}"


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGUSR2], ids=["USR1", "USR2"])
def test_time_limit_warning_checkpoints_and_requeues_the_slurm_job(out, sig):
    """SIGUSR1 (sbatch --signal=USR1@120) and SIGUSR2 (submitit's): the same stop, plus one requeue."""
    before = len(scontrol_calls(out))
    run = interrupt(out, f"warn_{sig.name}", sig)
    assert_stopped_with_checkpoint(run, sig)
    assert scontrol_calls(out)[before:] == [f"requeue {JOB}"]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank-1 process through /proc")
def test_ddp_ranks_stop_at_the_same_step_when_one_is_signalled(out):
    """Rank 1 alone gets SIGTERM: the flag is all-reduced, so rank 0 stops and saves at the same step
    instead of training on while rank 1 waits in the save's barrier forever."""
    run = interrupt(out, "ddp", signal.SIGTERM, ddp=True)
    assert run["exit_seconds"] < 10, f"took {run['exit_seconds']:.1f} s to exit"
    # torchrun's report: both ranks stop themselves with 143; whichever exits second may instead be
    # killed by torchrun (-15) once the first is gone, so only the set of codes is fixed, not who wins.
    codes = re.findall(r"rank\s*:\s*\d \(local_rank: \d\)\s*exitcode\s*:\s*(-?\d+)", run["output"])
    assert "143" in codes and set(codes) <= {"143", "-15"}, run["output"][-3000:]
    ckpt = run["ckpt_dir"] / f"step_{run['stopped']:06d}"
    assert [p.name for p in run["ckpt_dir"].iterdir()] == [ckpt.name]
    assert checkpoint.read_meta(ckpt)["data_position"] == 2 * run["stopped"]  # both ranks' batches
    assert f"SIGTERM after step {run['stopped']}: saved {ckpt}" in run["output"]
    assert (run["run_dir"] / "metrics.png").exists()


def test_ctrl_c_saves_like_sigterm_and_a_second_one_quits_at_once(out):
    """Ctrl-C once: the step's checkpoint, the resume hint, exit 130 (was a KeyboardInterrupt traceback
    and nothing saved). Twice: out at once, a line saying nothing was saved, no traceback. Python's
    children of a non-interactive shell may start with SIGINT ignored: the handler is set explicitly."""
    run = interrupt(out, "ctrl_c", signal.SIGINT)
    assert "Ctrl-C: stopping after this step and saving it" in run["output"]
    assert_stopped_with_checkpoint(run, signal.SIGINT)
    assert "Traceback" not in run["output"]

    # Steps of ~a second (64 rows): the second Ctrl-C lands in the step the first one asked to end.
    twice = interrupt(out, "ctrl_c_twice", signal.SIGINT, again_after="Ctrl-C: stopping", extra=("gpu.micro_batch=64",))
    assert twice["returncode"] == 130 and twice["exit_seconds"] < 30, twice["output"][-3000:]  # 60 steps: > 60 s
    assert "interrupted: nothing saved since the last checkpoint" in twice["output"]
    assert "Traceback" not in twice["output"]


def test_stop_flag_records_signals_inside_and_restores_every_previous_handler_after():
    """Inside: a stop signal is recorded, not acted on. After (also after an exception): each signal has
    the handler it had before (submitit's own, or the default that ends the process)."""
    from hybridchat.infra.preemption import STOP_SIGNALS, stop_flag

    sentinels = {sig: (lambda s, f, sig=sig: None) for sig in STOP_SIGNALS}
    before = {sig: signal.signal(sig, handler) for sig, handler in sentinels.items()}
    try:
        with pytest.raises(RuntimeError), stop_flag() as flag:
            assert all(signal.getsignal(sig) == flag._record for sig in STOP_SIGNALS)
            os.kill(os.getpid(), signal.SIGUSR1)
            assert flag.signum == signal.SIGUSR1
            raise RuntimeError("training failed")
        assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == sentinels
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------
# The pieces in this process (fast; what mutation testing runs): the exception, the handler, the
# agreement between ranks, the requeue.


def test_preempted_names_the_signal_and_step_and_exits_128_plus_signum():
    from hybridchat.infra.preemption import Preempted

    stop = Preempted(signal.SIGTERM, 7)
    assert str(stop) == "stopped by SIGTERM after step 7"
    assert (stop.signum, stop.step, stop.exit_code) == (signal.SIGTERM, 7, 143)
    assert Preempted(signal.SIGUSR1, 0).exit_code == 128 + 10


def test_the_handler_records_the_last_signal_and_a_second_ctrl_c_quits(capfd):
    from hybridchat.infra.preemption import StopFlag

    flag = StopFlag()
    assert flag.signum == 0 and flag.agreed(False, torch.device("cpu")) == 0
    flag._record(signal.SIGUSR2, None)
    assert flag.signum == signal.SIGUSR2 and capfd.readouterr().err == ""  # a warning is silent
    flag._record(signal.SIGINT, None)  # Ctrl-C after a warning: the first Ctrl-C, saves
    assert flag.signum == signal.SIGINT
    assert capfd.readouterr().err == "\nCtrl-C: stopping after this step and saving it (Ctrl-C again to quit now, unsaved)\n"
    with pytest.raises(KeyboardInterrupt):
        flag._record(signal.SIGINT, None)
    flag = StopFlag()
    flag._record(signal.SIGINT, None)
    flag._record(signal.SIGTERM, None)  # the last signal wins; a Ctrl-C after it saves again
    assert flag.signum == signal.SIGTERM and flag.agreed(False, torch.device("cpu")) == signal.SIGTERM
    flag._record(signal.SIGINT, None)
    assert flag.signum == signal.SIGINT


def _agree(rank: int, signums: list[int]) -> int:
    from hybridchat.infra.preemption import StopFlag

    flag = StopFlag()
    flag.signum = signums[rank]
    return flag.agreed(True, torch.device("cpu"))


@pytest.mark.parametrize("signums", [[0, signal.SIGUSR1], [signal.SIGTERM, signal.SIGUSR1], [0, 0]])
def test_ranks_agree_on_the_largest_signal_any_of_them_received(tmp_path, signums):
    """Two gloo ranks: a signal on one rank stops both, at one value."""
    assert in_ranks(_agree, 2, tmp_path / "init", signums) == {0: max(signums), 1: max(signums)}


def test_ranks_agree_on_a_tensor_on_the_given_device_whatever_torchs_default(monkeypatch):
    """The reduced flag lives on the device the process group reduces on (a CUDA tensor for NCCL), not on
    torch's default device: under a meta default device, a CPU device still gives the reduced value."""
    import torch.distributed as dist

    from hybridchat.infra.preemption import StopFlag

    seen = []

    def all_reduce(t, op):  # a stand-in group: another rank received SIGTERM (15)
        seen.append((t.device.type, op))
        t.fill_(15)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    flag = StopFlag()
    flag.signum = signal.SIGUSR1
    with torch.device("meta"):
        assert flag.agreed(True, torch.device("cpu")) == 15
    assert seen == [("cpu", dist.ReduceOp.MAX)]


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    """An `scontrol` first on PATH that records its arguments (exit status and stderr settable)."""
    def install(status: int = 0, stderr: str = ""):
        (tmp_path / "bin").mkdir(exist_ok=True)
        script = tmp_path / "bin" / "scontrol"
        script.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\necho "{stderr}" >&2\nexit {status}\n')
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
        return tmp_path / "calls"
    return install


def test_a_time_limit_warning_requeues_the_job_once_and_nothing_else_does(fake_scontrol, monkeypatch, caplog):
    import logging

    from hybridchat.infra.preemption import requeue_after_warning

    calls = fake_scontrol()
    caplog.set_level(logging.INFO, logger="hybridchat.infra.preemption")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    requeue_after_warning(signal.SIGUSR1)  # not under SLURM
    monkeypatch.setenv("SLURM_JOB_ID", "")
    requeue_after_warning(signal.SIGUSR1)
    monkeypatch.setenv("SLURM_JOB_ID", JOB)
    for sig in (signal.SIGTERM, signal.SIGINT, 0):  # scancel, Ctrl-C, no signal: never requeued from here
        requeue_after_warning(sig)
    assert not calls.exists() and caplog.records == []
    # The call is bounded: a hung scontrol cannot keep the job past its end.
    seen = []
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda *a, **kw: seen.append(kw) or real_run(*a, **kw))
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        requeue_after_warning(sig)
    assert calls.read_text() == f"requeue {JOB}\n" * 2
    assert [r.getMessage() for r in caplog.records] == [f"requeued SLURM job {JOB}"] * 2
    assert seen == [{"check": True, "timeout": 60, "capture_output": True, "text": True}] * 2


def test_a_refused_or_missing_scontrol_is_a_warning_naming_the_job_and_the_reason(fake_scontrol, monkeypatch,
                                                                                caplog):
    from hybridchat.infra.preemption import requeue_after_warning

    monkeypatch.setenv("SLURM_JOB_ID", JOB)
    fake_scontrol(status=1, stderr="Requested operation is disabled")  # e.g. submitted with --no-requeue
    requeue_after_warning(signal.SIGUSR2)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", f"could not requeue SLURM job {JOB} (Requested operation is disabled\n): resubmit it with "
                    "resume=true")]
    caplog.clear()
    monkeypatch.setenv("PATH", "/nonexistent")
    requeue_after_warning(signal.SIGUSR1)
    [record] = caplog.records
    assert record.levelname == "WARNING"
    assert record.getMessage().startswith(f"could not requeue SLURM job {JOB} ([Errno 2] No such file or directory")
