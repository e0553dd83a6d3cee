"""Pack tokenized documents into fixed-length training rows.

Every document is prefixed with <|bos|> and concatenated into one stream, cut into rows of
sequence_len + 1 tokens (inputs are row[:-1], targets row[1:]). Batches are numbered globally;
rank r of world_size takes batches r, r + world_size, ... so all ranks read the same stream and
resuming is just skipping to a batch index.
"""

from __future__ import annotations

from itertools import count, islice
from typing import Iterator

import torch

from hybridchat.core.errors import UserError
from hybridchat.data.sources import Source
from hybridchat.data.tokenizer import Tokenizer

Batch = dict[str, torch.Tensor]


def _token_rows(source: Source, split: str, tokenizer: Tokenizer, row_len: int, loop: bool) -> Iterator[list[int]]:
    buffer: list[int] = []
    for epoch in count() if loop else [0]:
        docs, seen = iter(source(split, epoch)), False
        # Tokenize 256 documents at a time: the Rust tokenizer parallelises a batch.
        while pending := list(islice(docs, 256)):
            seen = True
            for ids in tokenizer.encode_batch(pending):
                buffer += [tokenizer.bos_id] + ids
            while len(buffer) >= row_len:
                yield buffer[:row_len]
                buffer = buffer[row_len:]
        if not seen:
            raise UserError(f"the {split!r} split of the data source yielded no documents (check data.path "
                            f"and data.val_fraction)")


def token_batches(source: Source, split: str, tokenizer: Tokenizer, batch_size: int, seq_len: int,
                  rank: int = 0, world_size: int = 1, start: int = 0, loop: bool = True) -> Iterator[Batch]:
    """Yield this rank's batches {inputs, targets} of shape (batch_size, seq_len), from global batch
    index `start` on. With loop=True the source repeats epoch after epoch."""
    rows = _token_rows(source, split, tokenizer, seq_len + 1, loop)
    for index in count():
        chunk = [next(rows, None) for _ in range(batch_size)]
        if chunk[-1] is None:
            return
        if index >= start and index % world_size == rank:
            t = torch.tensor(chunk, dtype=torch.long)
            yield {"inputs": t[:, :-1], "targets": t[:, 1:]}
