"""Device, dtype, distributed init and seeding, from the `gpu` preset and the torchrun environment."""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hybridchat.core.errors import UserError
from hybridchat.infra.config import GPUConfig


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def grad_accum_steps(total_batch_tokens: int | None, micro_batch: int, seq_len: int, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank: stage.total_batch_tokens over the tokens one
    forward pass of every rank takes (None: 1)."""
    per_pass = micro_batch * seq_len * world_size
    if total_batch_tokens is None:
        return 1
    if total_batch_tokens <= 0 or total_batch_tokens % per_pass:
        raise UserError(f"stage.total_batch_tokens={total_batch_tokens} must be a positive multiple of "
                        f"gpu.micro_batch x model.sequence_len x world_size = {micro_batch} x {seq_len} x "
                        f"{world_size} = {per_pass}")
    return total_batch_tokens // per_pass


def _check_device(gpu: GPUConfig) -> None:
    device = gpu.device.value
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"gpu={gpu.name} needs a CUDA device, but torch.cuda.is_available() is False on this "
                        f"machine; run with gpu=cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"gpu={gpu.name} needs Apple MPS, which is not available here; run with gpu=cpu")


def _export_submitit_distributed_env() -> None:
    """In a SLURM job with several tasks (hydra/launcher=slurm with tasks_per_node > 1, or srun) every
    task runs the job: turn submitit's view of the job into torch.distributed's env:// variables."""
    if "WORLD_SIZE" in os.environ:  # torchrun already set them
        return
    try:
        import submitit

        job = submitit.JobEnvironment()  # raises outside a SLURM/submitit job
    except Exception:
        return
    if job.num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def setup(gpu: GPUConfig, seed: int) -> Runtime:
    _check_device(gpu)
    _export_submitit_distributed_env()
    device_type = gpu.device.value
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device(device_type)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                                device_id=device if device_type == "cuda" else None)
    torch.manual_seed(seed)  # same seed on every rank: identical init, DDP then keeps them in sync
    autocast_dtype = None if gpu.dtype.value == "float32" else getattr(torch, gpu.dtype.value)
    return Runtime(device=device, autocast_dtype=autocast_dtype, rank=rank, local_rank=local_rank,
                   world_size=world_size)


def teardown() -> None:
    """Destroy the process group: Hydra's basic launcher runs multirun jobs in one process."""
    if dist.is_initialized():
        dist.destroy_process_group()
