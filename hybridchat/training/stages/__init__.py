"""Stages: what a batch looks like, where the loss is, how the model is judged. One loop runs them all.

A stage is built from the run's pieces (`RunContext`) and overrides hooks, like a Lightning module:

    initialise(model, source)               start from checkpoint `source` (not on resume); default: load it
    train_batches(start, rank, world_size)  its batches from a global batch index on (resume = skip)
    training_step(model, batch)             the loss; default: next-token loss where targets != -1
    batch_tokens(batch)                     tokens that step ran through the model (tok/s, MFU)
    val_batches()                           one fixed validation set, the same on every world size
    evaluate(model)                         metrics dict; default: bits per byte on val_batches()
    samples(model)                          (prompt, completion) pairs shown after training
    checkpoint_meta()                       what the last evaluate() learned about the weights it saw,
                                            for the meta.json of their checkpoint (rag's abstention
                                            threshold); default: nothing
    step_metrics()                          what the last training step measured beyond its loss
                                            (refrag's rewards), logged with it
    lr_multiplier(step)                     the learning rate's share at a step; default: warmup,
                                            constant, warmdown over the stage (lr_multiplier below)

`source` names the stage whose final checkpoint initialises this one (None: from scratch);
`monitor` is the metric a sweep optimises and the summary reports; `milestones` are steps whose
checkpoints are saved whatever stage.checkpoint_every says and never pruned (refrag's end of warm
start, which the evaluator compares with the end of RL).

A stage is one module of this package, its config dataclass (a StageConfig subclass: the keys only it
has) next to its class, decorated with @registered, plus conf/stage/<name>.yaml, which starts with
`defaults: [<name>_schema]`. The package finds its modules itself (stage_classes): no list of stages
is kept by hand, and the entry points register every stage's config class with Hydra from here.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from hybridchat.core.errors import UserError
from hybridchat.data.loader import Batch
from hybridchat.infra import checkpoint
from hybridchat.infra.config import StageConfig
from hybridchat.infra.context import RunContext
from hybridchat.infra.runtime import Runtime


class Stage:
    name = "stage"
    config_class: type[StageConfig] = StageConfig   # checks conf/stage/<name>.yaml (the stage's own keys)
    reads_documents = False            # uses the `retriever` group
    monitor = "val/bpb"
    # The questions its checkpoints answer from retrieved documents: 1 single-hop, 2 multi-hop; 0 none.
    # Chat and the evaluator open the stage that answers the questions asked (answering_stage), so one
    # registered stage at most answers each.
    answers_hops = 0

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.milestones: frozenset[int] = frozenset()
        self.config = ctx.config.stage
        self.source = self.config.source
        # Training batches of varying width (conversations) come in a few padded widths under
        # torch.compile (evaluation runs the model uncompiled: its batches keep their exact width).
        self.width_limit = ctx.config.model.sequence_len if ctx.config.gpu.compile else None

    def initialise(self, model, source: Path) -> None:
        checkpoint.load(source, model, None, self.ctx.tokenizer.fingerprint)

    def train_batches(self, start: int, rank: int, world_size: int) -> Iterator[Batch]:
        raise NotImplementedError

    def val_batches(self) -> list[Batch]:
        raise NotImplementedError

    def training_step(self, model, batch: Batch) -> torch.Tensor:
        return model(batch["inputs"], batch["targets"])

    def batch_tokens(self, batch: Batch) -> int:
        """Tokens the last training_step on `batch` ran through the model (tok/s and MFU)."""
        return batch["inputs"].numel()

    def evaluate(self, model) -> dict[str, float]:
        return {"val/bpb": evaluate_bpb(model, self.val_batches(), self.ctx)}

    def samples(self, model) -> list[tuple[str, str]]:
        return []

    def checkpoint_meta(self) -> dict:
        """Fields for the meta.json of the checkpoint of the weights the last evaluate() saw: the loop
        adds them where it saved that checkpoint (evaluation comes after the save: a failed
        evaluation must not cost the run its training)."""
        return {}

    def step_metrics(self) -> dict[str, float]:
        return {}

    def lr_multiplier(self, step: int) -> float:
        return lr_multiplier(step, self.config)


def lr_multiplier(step: int, s: StageConfig, num_steps: int | None = None) -> float:
    """Linear warmup, constant, then a linear warmdown to final_lr_frac over the last steps of
    num_steps (default: the stage's)."""
    num_steps = s.num_steps if num_steps is None else num_steps
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    warmdown = max(1, round(s.warmdown_ratio * num_steps))
    if step <= num_steps - warmdown:
        return 1.0
    progress = (num_steps - step) / warmdown
    return progress + (1 - progress) * s.final_lr_frac


def evaluate_bpb(model, batches: list[Batch], ctx: RunContext) -> float:
    """bits_per_byte with the run's tokenizer and runtime."""
    return bits_per_byte(model, batches, ctx.tokenizer.token_bytes(), ctx.runtime)


@torch.no_grad()
def bits_per_byte(model, batches: list[Batch], token_bytes: torch.Tensor, rt: Runtime) -> float:
    """Bits per byte: summed loss over target tokens / (ln 2 x their UTF-8 bytes). Independent of the
    vocabulary, so runs with different tokenizers compare. Special tokens (0 bytes) are left out.
    Rank r scores batches r, r + world_size, ...: the sums, and so the result, do not depend on
    the number of ranks."""
    token_bytes = token_bytes.to(rt.device)
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=rt.device)
    for batch in batches[rt.rank::rt.world_size]:
        inputs, targets = batch["inputs"].to(rt.device), batch["targets"].to(rt.device)
        with rt.autocast():
            losses = model(inputs, targets, reduction="none")
        flat = targets.reshape(-1)
        nbytes = torch.where(flat >= 0, token_bytes[flat.clamp(min=0)], 0)
        totals[0] += (losses.double() * (nbytes > 0)).sum()
        totals[1] += nbytes.sum()
    if rt.distributed:
        dist.all_reduce(totals)
    model.train(was_training)
    return (totals[0] / (math.log(2) * totals[1].clamp(min=1))).item()


_REGISTERED: dict[str, type[Stage]] = {}


def registered(cls: type[Stage]) -> type[Stage]:
    """Class decorator: `cls` is the stage called cls.name (stage=<name>, built by build_stage)."""
    _REGISTERED[cls.name] = cls
    return cls


def stage_classes() -> dict[str, type[Stage]]:
    """Every stage by name: importing this package's modules registers the stages they define."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return dict(_REGISTERED)


def stage_schemas() -> dict[str, type[StageConfig]]:
    """Each stage's config class by name: what infra.config.register stores as stage/<name>_schema."""
    return {name: cls.config_class for name, cls in stage_classes().items()}


def answering_stage(hops: int) -> type[Stage]:
    """The stage whose checkpoints answer `hops`-hop questions from retrieved documents."""
    found = [cls for cls in stage_classes().values() if cls.answers_hops == hops]
    if len(found) != 1:
        raise RuntimeError(f"{len(found)} stages answer {hops}-hop questions ({[c.name for c in found]}); "
                           f"answers_hops must pick one")
    return found[0]


def build_stage(ctx: RunContext) -> Stage:
    stages = stage_classes()
    name = ctx.config.stage.name
    if name not in stages:
        raise UserError(f"stage.name={name!r} is unknown; allowed: {sorted(stages)}")
    return stages[name](ctx)
