"""The one training loop, shared by every stage.

The stage supplies batches, the loss on a batch (training_step) and its evaluation; this loop owns
the optimizers, LR schedule, gradient accumulation, mixed precision, when to evaluate, checkpoints
and metrics; hybridchat.infra.parallel lays the model out on the ranks (DDP or FSDP).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from hybridchat.core.errors import UserError
from hybridchat.infra import checkpoint, parallel, preemption
from hybridchat.infra.config import StageConfig
from hybridchat.infra.context import RunContext
from hybridchat.infra.tracking import Tracker
from hybridchat.training.muon import Muon
from hybridchat.training.stages import Stage

log = logging.getLogger(__name__)

SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "math": SDPBackend.MATH}


def build_optimizers(model, s: StageConfig) -> list[torch.optim.Optimizer]:
    groups = model.param_groups()
    adam_groups = [{"params": groups[name], "lr": lr, "weight_decay": 0.0} for name, lr in
                   [("embedding", s.embedding_lr), ("unembedding", s.unembedding_lr), ("scalar", s.scalar_lr)]
                   if groups[name]]
    if s.matrix_optimizer == "adamw":
        adam_groups.insert(0, {"params": groups["matrix"], "lr": s.matrix_lr, "weight_decay": s.weight_decay})
        optimizers = [torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10)]
    else:
        muon = Muon(groups["matrix"], lr=s.matrix_lr, momentum=0.95, weight_decay=s.weight_decay,
                    adjust_lr_fn="original")
        optimizers = [muon, torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10)]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def _param_checksum(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def train(stage: Stage, ctx: RunContext, tracker: Tracker, resolved_config: dict[str, Any]) -> dict[str, Any]:
    """Train ctx.model through `stage` to stage.num_steps. Returns the monitored metric first and
    last (summary["first"], summary["final"]; no "first" when a resumed run evaluated nothing before
    its last step), every final metric and the final checkpoint."""
    model, cfg, rt, tokenizer = ctx.model, ctx.config, ctx.runtime, ctx.tokenizer
    s = cfg.stage
    ckpt_dir = checkpoint.stage_dir(cfg.paths.checkpoints, cfg.run_name, stage.name)
    accum = ctx.grad_accum

    start_step = 0
    replaces = checkpoint.earlier_run(ckpt_dir, cfg.resume, cfg.overwrite)
    resume_from = checkpoint.latest(ckpt_dir) if cfg.resume else None
    if resume_from is None and ctx.source_checkpoint is not None:  # into the whole model, before sharding
        stage.initialise(model, ctx.source_checkpoint)
        log.info("initialised from %s", ctx.source_checkpoint)
    elif resume_from is None and cfg.resume:
        log.info("resume=true but %s holds no checkpoint: starting from scratch", ckpt_dir)
    # Under FSDP this shards `model` in place: the optimizers are built after it, to hold the shards.
    train_model = parallel.prepare(model, cfg, rt)
    optimizers = build_optimizers(model, s)
    if resume_from is not None:
        start_step = checkpoint.load(resume_from, model, optimizers, tokenizer.fingerprint)["step"]
        log.info("resumed from %s at step %d", resume_from, start_step)
    if not stage.val_batches():
        raise UserError(f"stage={stage.name}: the validation split gives no batches (of text: less than one "
                        f"sequence of model.sequence_len={cfg.model.sequence_len} tokens)")
    batches = stage.train_batches(start_step * accum * rt.world_size, rt.rank, rt.world_size)
    peak_flops = cfg.gpu.peak_tflops_bf16 * 1e12 * rt.world_size
    # The latest checkpoint as (step, folder): an evaluation of the same step adds stage.checkpoint_meta() to it.
    saved: tuple[int, Path] | None = (start_step, resume_from) if resume_from is not None else None

    def save(step: int) -> Path | None:
        nonlocal saved
        # Every rank takes part (FSDP gathers the shards); rank 0 writes.
        meta = {"stage": stage.name, "run_name": cfg.run_name, "tokenizer": tokenizer.fingerprint,
                "data_position": step * accum * rt.world_size, "config": resolved_config}
        path = checkpoint.save(ckpt_dir, step, model, optimizers, meta, keep=s.keep_checkpoints, tokenizer=tokenizer,
                               write=rt.is_main, protect=stage.milestones, replaces=replaces)
        replaces.clear()  # gone with the first save
        saved = (step, path) if path is not None else None
        if rt.distributed:
            dist.barrier()
        return path

    def evaluate(step: int) -> dict[str, float]:
        with parallel.full_weights(model):  # ranks may differ in their number of forwards (generation)
            metrics = stage.evaluate(model)
        tracker.log(step, **metrics)
        extra = stage.checkpoint_meta()
        if extra and rt.is_main and saved is not None and saved[0] == step:
            checkpoint.update_meta(saved[1], extra)
        return metrics

    summary: dict[str, Any] = {"start_step": start_step, "checkpoint_dir": str(ckpt_dir), "monitor": stage.monitor}
    bar = tqdm(range(start_step, s.num_steps), initial=start_step, total=s.num_steps, dynamic_ncols=True,
               disable=not (rt.is_main and cfg.progress), desc=f"{stage.name}")
    with ExitStack() as stack:
        backend = cfg.gpu.attention_backend.value
        if backend != "auto":
            stack.enter_context(sdpa_kernel(SDPA_BACKENDS[backend]))
        stop = stack.enter_context(preemption.stop_flag())
        for step in bar:
            if step % s.eval_every == 0:
                summary.setdefault("first", evaluate(step)[stage.monitor])
            lrm = stage.lr_multiplier(step)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * lrm
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=rt.device)
            tokens = 0
            for micro in range(accum):
                batch = {k: v.to(rt.device) for k, v in next(batches).items()}
                # Gradients are reduced across ranks once per step, on the last micro-batch only.
                with parallel.gradient_sync(train_model, micro == accum - 1):
                    with rt.autocast():
                        loss = stage.training_step(train_model, batch)
                    (loss / accum).backward()
                tokens += stage.batch_tokens(batch)
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            if rt.distributed:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            train_loss = loss_sum.item() / accum
            if not math.isfinite(train_loss):
                raise RuntimeError(f"training loss became {train_loss} at step {step + 1}; lower the learning rates")
            elapsed = time.perf_counter() - t0
            tokens *= rt.world_size  # rows differ in length per rank only in SFT padding: close enough
            metrics = {"train/loss": train_loss, "train/lr_mult": lrm, "train/grad_norm": float(grad_norm),
                       "train/tok_per_s": tokens / elapsed, **stage.step_metrics()}
            if peak_flops:
                metrics["train/mfu"] = model.flops_per_token() * tokens / elapsed / peak_flops
            tracker.log(step + 1, **metrics)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{metrics['train/tok_per_s']:,.0f}")
            # A stop signal ends training here, at a step boundary: save this step (once, also where the
            # periodic checkpoint falls on it) and leave; a run with resume=true continues from it.
            signum = stop.agreed(rt.distributed, rt.device)
            periodic = (step + 1) % s.checkpoint_every == 0 or step + 1 in stage.milestones
            if signum or (periodic and step + 1 < s.num_steps):
                path = save(step + 1)
            if signum:
                stopped = preemption.Preempted(signum, step + 1)
                if rt.is_main:
                    log.warning("%s: saved %s; run the same command with resume=true to continue "
                                "(launchers/slurm.sh passes it)", stopped, path)
                raise stopped
    bar.close()

    # Saved before the final evaluation: an evaluation that fails (out of memory in generation, a
    # killed job) must not cost the run its training.
    summary["checkpoint"] = str(save(s.num_steps))
    summary["metrics"] = evaluate(s.num_steps)
    summary["final"] = summary["metrics"][stage.monitor]
    # Of the whole model also under FSDP, so it compares with a one-process run's. There the ranks agree
    # by construction (one gathered copy); under DDP they must stay equal: check instead of trusting.
    with parallel.full_weights(model):
        checksum = _param_checksum(model)
    if rt.distributed:
        gathered = [0.0] * rt.world_size
        dist.all_gather_object(gathered, checksum)
        if len(set(gathered)) != 1:
            raise RuntimeError(f"ranks disagree on the final weights: checksums {gathered}")
    log.info("rank %d final parameter checksum %.10e", rt.rank, checksum)
    summary["param_checksum"] = checksum
    return summary
