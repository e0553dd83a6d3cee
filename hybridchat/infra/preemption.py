"""Preemption-safe training: a stop signal becomes a checkpoint at the next step boundary and an exit.

SIGTERM is what SLURM sends on preemption, scancel and at the time limit (torchrun forwards it to its
workers); SIGUSR1 / SIGUSR2 are the warnings requested with `sbatch --signal=USR1@120` and submitit's
`--signal=USR2@<signal_delay_s>`, sent while there is still time to save. SIGINT (Ctrl-C) is the same
request from a person at a terminal; a second Ctrl-C stops at once, unsaved. The handlers only record the
signal: the loop checks it after each optimizer step, saves and raises `Preempted`, and the entrypoint
exits with 128 + signum (`Preempted.exit_code`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
# Only a warning means "out of time, continue later": nothing else requeues a job that hits its limit.
# SIGTERM is never requeued from here: after scancel the user wants the job gone, and on preemption
# SLURM requeues a requeueable job itself.
TIME_LIMIT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


class Preempted(Exception):
    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signum = signum
        self.step = step

    @property
    def exit_code(self) -> int:
        """128 + signum, the shell's code for "ended by that signal" (143 for SIGTERM). Not 0: that would
        mark the SLURM job COMPLETED, start its afterok dependencies and hand submitit a finished result.
        SLURM's own requeue (preemption, node failure, scontrol requeue) does not look at it, and a site
        can requeue on it with RequeueExit=143 in slurm.conf."""
        return 128 + self.signum


class StopFlag:
    signum = 0  # the last stop signal received, 0 for none

    def _record(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.signum == signal.SIGINT:  # the second Ctrl-C: the person will not wait for the save
                raise KeyboardInterrupt
            os.write(sys.stderr.fileno(), b"\nCtrl-C: stopping after this step and saving it "
                                          b"(Ctrl-C again to quit now, unsaved)\n")
        self.signum = signum  # nothing else: a handler runs between any two bytecodes, even mid-write

    def agreed(self, distributed: bool, device: torch.device) -> int:
        """The stop signal if any rank received one: every rank must stop at the same step, or the barrier
        in the checkpoint save waits forever for the ranks that went on training."""
        if not distributed:
            return self.signum
        signum = torch.tensor(self.signum, device=device)
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        return int(signum)


@contextmanager
def stop_flag() -> Iterator[StopFlag]:
    """Record stop signals while training runs; the previous handlers (the default, which kills the
    process, or submitit's) are back afterwards."""
    flag = StopFlag()
    previous = {sig: signal.signal(sig, flag._record) for sig in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def requeue_after_warning(signum: int) -> None:
    """After a time-limit warning under SLURM, requeue the job (call on one rank: one requeue per job).
    The requeued job reruns the same command, which continues with resume=true (launchers/slurm.sh
    passes it). SLURM then ends this allocation: call it once everything worth keeping is written."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or signum not in TIME_LIMIT_SIGNALS:
        return
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=60, capture_output=True, text=True)
        log.info("requeued SLURM job %s", job)
    except (OSError, subprocess.SubprocessError) as e:  # e.g. submitted with --no-requeue
        log.warning("could not requeue SLURM job %s (%s): resubmit it with resume=true", job,
                    getattr(e, "stderr", None) or e)
