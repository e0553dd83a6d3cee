"""Distillation into a hybrid ("The Mamba in the Llama", Wang et al. 2024): the student, whose block
pattern turns some of the teacher's attention layers into Mamba-2 layers, starts from the teacher's
weights (hybridchat.model.convert) and learns to match the teacher's next-token distributions on the
pretraining text. The teacher is stage.source's checkpoint, frozen.

The KL reaches the replaced layers only through every layer above them. stage.hidden_weight adds a
signal at each of them, the hidden-state alignment of MOHAWK (Bick et al. 2024): each converted
student layer is given the teacher's hidden state entering that layer and scored by the relative
squared error of its output against the teacher layer's output on the same input. Each layer learns
to stand in for its attention layer on its own, whatever the layers below still get wrong."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from hybridchat.core.errors import UserError
from hybridchat.infra.config import StageConfig
from hybridchat.model.blocks import expand_pattern
from hybridchat.model.convert import convert
from hybridchat.model.lm import HybridLM
from hybridchat.training.runs import load_run
from hybridchat.training.stages import evaluate_bpb, registered
from hybridchat.training.stages.pretrain import PretrainStage


class ConvertedOutput(str, Enum):
    attention = "attention"  # out_proj = the attention's O ("The Mamba in the Llama")
    zero = "zero"            # out_proj = 0: each converted layer starts as a no-op and grows in


@dataclass
class DistillConfig(StageConfig):
    """The source checkpoint is the teacher; the run's model (its sizes, with some A letters of the
    block pattern turned into M) is the student, initialised from it and trained to match it."""
    name: str = "distill"
    source: Optional[str] = "pretrain"
    temperature: float = 1.0           # both distributions softened by it; the KL is scaled by its square
    ce_weight: float = 0.0             # loss = KL + ce_weight x next-token cross-entropy on the text
    # + hidden_weight x the converted layers' relative squared error against the teacher's layers, each
    # run on the teacher's hidden state entering it: a signal at every replaced layer, not only at the logits
    hidden_weight: float = 0.0
    # How a converted layer's output projection starts; its in_proj holds Q, K, V either way
    converted_output: ConvertedOutput = ConvertedOutput.attention


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) in nats at every position, between the next-token distributions
    softmax(logits / temperature); float32 whatever the logits' dtype."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)


def hidden_error(student: dict[int, torch.Tensor], teacher: dict[int, torch.Tensor], mask: torch.Tensor
                 ) -> torch.Tensor:
    """Mean over the layers in `teacher` of ||student - teacher||^2 / ||teacher||^2, summed over the
    positions where mask is true and the channels; float32. 0 = the same hidden states, 1 = as far off
    as a zero vector."""
    errors = []
    for layer, target in teacher.items():
        target = target.float()[mask]
        errors.append((student[layer].float()[mask] - target).square().sum() / target.square().sum().clamp(min=1e-12))
    return torch.stack(errors).mean()


def language_model(model: nn.Module) -> HybridLM:
    """The HybridLM inside DDP or torch.compile (FSDP2 shards it in place)."""
    return next(m for m in model.modules() if isinstance(m, HybridLM))


@contextmanager
def block_io(model: nn.Module, layers: list[int]) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Inside, a forward of `model` records (input, output) of blocks[i] for each i in `layers`:
    the hidden state entering the layer and leaving it."""
    recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(layer):
        return lambda module, args, output: recorded.__setitem__(layer, (args[0], output))

    blocks = language_model(model).blocks
    handles = [blocks[i].register_forward_hook(keep(i)) for i in layers]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def aligned_error(model: nn.Module, teacher_io: dict[int, tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor
                  ) -> torch.Tensor:
    """hidden_error of the student's converted layers, each run on the teacher's input to that layer
    (no RoPE: a converted layer is Mamba), against the teacher layer's output."""
    blocks = language_model(model).blocks
    student = {i: blocks[i](x, None) for i, (x, _) in teacher_io.items()}
    return hidden_error(student, {i: y for i, (_, y) in teacher_io.items()}, mask)


@registered
class DistillStage(PretrainStage):
    """Pretraining's batches, validation text and samples; the teacher's distributions as targets."""
    name = "distill"
    config_class = DistillConfig

    def __init__(self, ctx):
        super().__init__(ctx)
        if self.config.temperature <= 0:
            raise UserError(f"stage.temperature={self.config.temperature} must be > 0")
        if self.config.hidden_weight < 0:
            raise UserError(f"stage.hidden_weight={self.config.hidden_weight} must be >= 0")
        self._terms: dict[str, list[float]] = {}

    @cached_property
    def teacher(self) -> HybridLM:
        # Loaded on first use, not in initialise: a resumed run skips initialise and still needs it.
        if self.ctx.source_checkpoint is None:
            raise UserError("stage=distill needs a teacher: set stage.source to the stage whose checkpoint to distil")
        teacher = load_run(self.ctx.source_checkpoint, self.ctx.runtime.device,
                           self.ctx.config.gpu.ssm_backend.value).model
        return teacher.requires_grad_(False)  # load_run leaves it in eval mode

    @cached_property
    def converted_layers(self) -> list[int]:
        """Layers that are attention in the teacher and Mamba in the student."""
        m = self.ctx.config.model
        return [i for i, (t, s) in enumerate(zip(self.teacher.pattern, expand_pattern(m.block_pattern, m.n_layer)))
                if t != s]

    def initialise(self, model, source):
        # source is the teacher's checkpoint
        convert(self.teacher, model, copy_output=self.config.converted_output == ConvertedOutput.attention)

    def training_step(self, model, batch):
        inputs, targets = batch["inputs"], batch["targets"]
        layers = self.converted_layers if self.config.hidden_weight else []
        with torch.no_grad(), block_io(self.teacher, layers) as teacher_io:
            teacher_logits = self.teacher(inputs)
        logits = model(inputs)
        mask = targets >= 0
        t = self.config.temperature
        # x t^2 keeps the gradients' size independent of the temperature (Hinton et al. 2015).
        kl = token_kl(logits, teacher_logits, t)[mask].mean() * t**2
        loss = kl
        self._terms.setdefault("train/kl", []).append(kl.item())
        if self.config.ce_weight:
            ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
            loss = loss + self.config.ce_weight * ce
        if layers:
            error = aligned_error(model, teacher_io, mask)
            self._terms.setdefault("train/hidden_error", []).append(error.item())
            loss = loss + self.config.hidden_weight * error
        return loss

    def step_metrics(self):
        """The loss's terms, averaged over the step's micro-batches."""
        terms, self._terms = self._terms, {}
        return {k: sum(v) / len(v) for k, v in terms.items()}

    @cached_property
    def _teacher_bpb(self) -> float:
        return evaluate_bpb(self.teacher, self.val_batches(), self.ctx)

    def evaluate(self, model):
        kl, error = self._distances(model)
        metrics = {"val/bpb": evaluate_bpb(model, self.val_batches(), self.ctx), "val/kl": kl,
                   "val/teacher_bpb": self._teacher_bpb}
        if self.converted_layers:
            metrics["val/hidden_error"] = error
        return metrics

    @torch.no_grad()
    def _distances(self, model) -> tuple[float, float]:
        """Mean KL(teacher || student) per validation token at temperature 1 (the distributions
        themselves, whatever the training temperature), and the converted layers' hidden_error
        averaged over the validation batches; sharded over ranks like evaluate_bpb."""
        rt = self.ctx.runtime
        was_training = model.training
        model.eval()
        totals = torch.zeros(4, dtype=torch.float64, device=rt.device)
        layers = self.converted_layers
        for batch in self.val_batches()[rt.rank::rt.world_size]:
            inputs, targets = batch["inputs"].to(rt.device), batch["targets"].to(rt.device)
            mask = targets >= 0
            with rt.autocast():
                with block_io(self.teacher, layers) as teacher_io:
                    teacher_logits = self.teacher(inputs)
                kl = token_kl(model(inputs), teacher_logits, 1.0)
                if layers:
                    totals[2] += aligned_error(model, teacher_io, mask).double()
                    totals[3] += 1
            totals[0] += kl[mask].double().sum()
            totals[1] += mask.sum()
        if rt.distributed:
            dist.all_reduce(totals)
        model.train(was_training)
        return (totals[0] / totals[1].clamp(min=1)).item(), (totals[2] / totals[3].clamp(min=1)).item()
