"""Distillation into a hybrid ("The Mamba in the Llama", Wang et al. 2024): the student, whose block
pattern turns some of the teacher's attention layers into Mamba-2 layers, starts from the teacher's
weights (hybridchat.model.convert) and learns to match the teacher's next-token distributions on the
pretraining text. The teacher is stage.source's checkpoint, frozen."""

from __future__ import annotations

from functools import cached_property

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hybridchat import checkpoint
from hybridchat.errors import UserError
from hybridchat.model.convert import convert
from hybridchat.model.lm import HybridLM
from hybridchat.stages import evaluate_bpb
from hybridchat.stages.pretrain import PretrainStage


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) in nats at every position, between the next-token distributions
    softmax(logits / temperature); float32 whatever the logits' dtype."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)


class DistillStage(PretrainStage):
    """Pretraining's batches, validation text and samples; the teacher's distributions as targets."""
    name = "distill"

    def __init__(self, ctx):
        super().__init__(ctx)
        if self.config.temperature <= 0:
            raise UserError(f"stage.temperature={self.config.temperature} must be > 0")

    @cached_property
    def teacher(self) -> HybridLM:
        # Loaded on first use, not in initialise: a resumed run skips initialise and still needs it.
        if self.ctx.source_checkpoint is None:
            raise UserError("stage=distill needs a teacher: set stage.source to the stage whose checkpoint to distil")
        teacher, _, _ = checkpoint.load_model(self.ctx.source_checkpoint, self.ctx.runtime.device,
                                              self.ctx.config.gpu.ssm_backend.value)
        return teacher.requires_grad_(False)  # load_model leaves it in eval mode

    def initialise(self, model, source):
        convert(self.teacher, model)  # source is the teacher's checkpoint

    def training_step(self, model, batch):
        inputs, targets = batch["inputs"], batch["targets"]
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        logits = model(inputs)
        t = self.config.temperature
        # x t^2 keeps the gradients' size independent of the temperature (Hinton et al. 2015).
        loss = token_kl(logits, teacher_logits, t)[targets >= 0].mean() * t**2
        if self.config.ce_weight:
            ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
            loss = loss + self.config.ce_weight * ce
        return loss

    @cached_property
    def _teacher_bpb(self) -> float:
        return evaluate_bpb(self.teacher, self.val_batches(), self.ctx)

    def evaluate(self, model):
        return {"val/bpb": evaluate_bpb(model, self.val_batches(), self.ctx), "val/kl": self._val_kl(model),
                "val/teacher_bpb": self._teacher_bpb}

    @torch.no_grad()
    def _val_kl(self, model) -> float:
        """Mean KL(teacher || student) per validation token at temperature 1 (the distributions
        themselves, whatever the training temperature), sharded over ranks like evaluate_bpb."""
        rt = self.ctx.runtime
        was_training = model.training
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=rt.device)
        for batch in self.val_batches()[rt.rank::rt.world_size]:
            inputs, targets = batch["inputs"].to(rt.device), batch["targets"].to(rt.device)
            with rt.autocast():
                kl = token_kl(model(inputs), self.teacher(inputs), 1.0)
            totals[0] += kl[targets >= 0].double().sum()
            totals[1] += (targets >= 0).sum()
        if rt.distributed:
            dist.all_reduce(totals)
        model.train(was_training)
        return (totals[0] / totals[1].clamp(min=1)).item()
