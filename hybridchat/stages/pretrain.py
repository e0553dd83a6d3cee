"""Pretraining: next-token prediction on packed plain text; every token carries loss."""

from __future__ import annotations

from itertools import islice

from hybridchat.config import Config
from hybridchat.data.loader import token_batches
from hybridchat.data.sources import Source
from hybridchat.data.tokenizer import Tokenizer
from hybridchat.stages import Stage


def build(cfg: Config, tokenizer: Tokenizer, source: Source) -> Stage:
    batch, seq = cfg.gpu.micro_batch, cfg.model.sequence_len

    def train_batches(start: int, rank: int, world_size: int):
        return token_batches(source, "train", tokenizer, batch, seq, rank, world_size, start=start, loop=True)

    def val_batches(rank: int, world_size: int):
        stream = token_batches(source, "val", tokenizer, batch, seq, rank, world_size, loop=False)
        return list(islice(stream, cfg.stage.eval_batches))

    # The first words of a few validation texts: after training the model should go on to state
    # the facts about that entity (it has seen them, in other phrasings).
    prompts = tuple(" ".join(text.split()[:5]) for text in islice(source("val", 0), 3))
    return Stage(name="pretrain", source=cfg.stage.source, train_batches=train_batches, val_batches=val_batches,
                 sample_prompts=prompts)
