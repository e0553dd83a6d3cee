"""Pretraining: next-token prediction on packed plain text; every token carries loss."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import islice

import torch

from hybridchat.data.loader import token_batches
from hybridchat.infra.config import StageConfig
from hybridchat.model.engine import Engine
from hybridchat.training.stages import Stage, registered


@dataclass
class PretrainConfig(StageConfig):
    """Every stage's keys, nothing more: StageConfig's defaults are pretraining's."""


@registered
class PretrainStage(Stage):
    name = "pretrain"
    config_class = PretrainConfig

    def __init__(self, ctx):
        super().__init__(ctx)
        self.text = ctx.text
        self.batch_size, self.seq_len = ctx.config.gpu.micro_batch, ctx.config.model.sequence_len

    def train_batches(self, start, rank, world_size):
        return token_batches(self.text, "train", self.ctx.tokenizer, self.batch_size, self.seq_len, rank, world_size,
                             start=start, loop=True)

    @cached_property
    def _val(self):
        """eval_batches batches of micro_batch sequences; a validation split too small for one (a large
        GPU's micro_batch on a small corpus) gives one batch of all the sequences it holds."""
        def batches(size):
            return token_batches(self.text, "val", self.ctx.tokenizer, size, self.seq_len, loop=False)

        full = list(islice(batches(self.batch_size), self.config.eval_batches))
        if full:
            return full
        rows = list(batches(1))
        return [{key: torch.cat([row[key] for row in rows]) for key in ("inputs", "targets")}] if rows else []

    def val_batches(self):
        return self._val

    def samples(self, model, max_new_tokens: int = 32):
        """Greedy completions of the first words of a few validation texts, up to the next document
        boundary: the model should go on to state facts about that entity (seen in other phrasings)."""
        tok = self.ctx.tokenizer
        prompts = [" ".join(text.split()[:5]) for text in islice(self.text("val", 0), 3)]
        result = Engine(model).generate([[tok.bos_id] + tok.encode(p) for p in prompts], max_new_tokens=max_new_tokens,
                                        temperature=0, stop_tokens=[tok.bos_id])
        return [(p, tok.decode(tokens).strip()) for p, tokens in zip(prompts, result.tokens)]
