"""Stages say what a batch looks like and where the loss is; the one training loop does the rest.

A stage is built from the run's pieces and returns a `Stage`: its train batches from a global batch
index on (so a resumed run continues where it stopped), a fixed list of validation batches, and the
stage whose final checkpoint initialises it (None: train from scratch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from hybridchat.data.loader import Batch
from hybridchat.errors import UserError


@dataclass(frozen=True)
class Stage:
    name: str
    source: str | None
    train_batches: Callable[[int, int, int], Iterator[Batch]]  # (start, rank, world_size) -> batches
    val_batches: Callable[[int, int], list[Batch]]              # (rank, world_size) -> batches
    sample_prompts: tuple[str, ...] = ()                        # completed greedily after training
    reads_documents: bool = False                               # uses the `retriever` group


def build_stage(name: str, **pieces) -> Stage:
    from hybridchat.stages import pretrain

    builders = {"pretrain": pretrain.build}
    if name not in builders:
        raise UserError(f"stage.name={name!r} is unknown; allowed: {sorted(builders)}")
    return builders[name](**pieces)
