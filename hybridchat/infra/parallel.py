"""How the model is laid out on the ranks: DDP replicas or FSDP2 shards, activation checkpointing,
torch.compile; and the full-tensor gathering and re-sharding that checkpoints need.

Under `distributed.strategy=fsdp` every block and then the root are `fully_shard`ed in place: the
parameters become DTensors holding 1/world_size of each matrix, so the optimizers must be built
after `prepare` to hold (and keep their state as) those shards. Checkpoints stay one-process
files: `full_tensors` gathers each shard on every rank and rank 0 writes; `shard_like` cuts the
full tensors read back into this rank's shard. A one-process run with strategy=fsdp has nothing
to shard and trains the plain model (and says so).
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from hybridchat.infra.config import Config, Strategy
from hybridchat.infra.runtime import Runtime
from hybridchat.model.mamba import cuda_kernels_available

log = logging.getLogger(__name__)


# torch.distributed.fsdp and torch.distributed.tensor cost about a second of imports (DTensor pulls in
# sympy) that every process importing checkpoint paid, FSDP or not. They are imported where FSDP is
# set up (prepare) and where a DTensor is cut (shard_like, only reached with a DTensor in hand); the
# isinstance tests look the classes up in sys.modules: an FSDPModule or a DTensor can exist only
# once its module has been imported.
def _is_fsdp_module(obj) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(obj, fsdp.FSDPModule)


def _is_dtensor(obj) -> bool:
    tensor = sys.modules.get("torch.distributed.tensor")
    return tensor is not None and isinstance(obj, tensor.DTensor)


def prepare(model: nn.Module, config: Config, rt: Runtime) -> nn.Module:
    """Lay `model` (a HybridLM on rt.device) out for training; returns what the loop calls forward on.
    FSDP shards `model` itself: build the optimizers afterwards."""
    model.activation_checkpointing = config.gpu.activation_checkpointing
    strategy = config.distributed.strategy
    if not rt.distributed:
        if strategy == Strategy.fsdp:
            log.info("distributed.strategy=fsdp in one process: nothing to shard, training the whole model")
        train_model = model
    elif strategy == Strategy.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(rt.device.type, (rt.world_size,))
        # One all-gather per block in forward and backward; the root holds embedding, final norm and
        # head, and keeps them gathered from forward to backward (fully_shard's own choice for a root).
        # No MixedPrecisionPolicy: the loop's autocast casts the gathered fp32 weights.
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        train_model = fully_shard(model, mesh=mesh, reshard_after_forward=False)
    else:
        train_model = DistributedDataParallel(model)
    if config.gpu.compile:  # after sharding, as FSDP2 wants: the hooks are already in place
        # Whether mamba_ssm imports is a constant of the graph: dynamo calls it once instead of tracing
        # the lru_cache'd import attempt (with a warning) on every compile. Marked here, not where it is
        # defined, so that importing the model does not import torch._dynamo (a second per process).
        torch.compiler.assume_constant_result(cuda_kernels_available)
        train_model = torch.compile(train_model)
    return train_model


def gradient_sync(train_model: nn.Module, enabled: bool):
    """Context for one micro-batch's forward and backward: with enabled=False the gradients only
    accumulate locally (no all-reduce / reduce-scatter); the last micro-batch syncs them all."""
    inner = getattr(train_model, "_orig_mod", train_model)  # under torch.compile
    if _is_fsdp_module(inner):
        inner.set_requires_gradient_sync(enabled)  # a flag FSDP2 reads in backward, not a context
        return nullcontext()
    if isinstance(inner, DistributedDataParallel) and not enabled:
        return inner.no_sync()
    return nullcontext()


@contextmanager
def full_weights(model: nn.Module) -> Iterator[None]:
    """Inside, every rank holds the whole model and forwards need no collectives, so ranks may run
    different numbers of them: generation stops at different lengths per rank, and rank 0 alone
    writes samples. Entering is collective under FSDP (every rank must enter); it costs one full
    copy of the weights per rank until exit. Anything else: nothing to do."""
    if not _is_fsdp_module(model):
        yield
        return
    sharded = [m for m in model.modules() if _is_fsdp_module(m)]
    for m in sharded:
        m.unshard()
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        # Back to prepare's layout: blocks free their gathered weights after forward, the root keeps them.
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)
        for m in sharded:
            m.reshard()


def full_tensors(tensors: dict[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
    """Whole CPU copies of `tensors`. A DTensor (an FSDP shard) is all-gathered: a collective, so
    every rank calls this with the same names in the same order; with keep=False a rank takes part
    and gets {}. One full tensor at a time is held beyond what is kept."""
    out = {}
    for name, t in tensors.items():
        if _is_dtensor(t):
            t = t.full_tensor()
        if keep:
            out[name] = t.detach().contiguous().cpu()
    return out


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `like` is: cut into this rank's shard when `like` is a DTensor. Every rank
    read the same file, so each takes its own piece without communication."""
    if not _is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
